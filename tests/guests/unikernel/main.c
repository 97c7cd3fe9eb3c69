/* tern test unikernel: parse the command line, run the requested checks,
 * report, then perform the final action. See README.md for the protocol. */
#include "acpi.h"
#include "blk_test.h"
#include "virtio_blk.h"
#include "bootparam.h"
#include "io.h"
#include "kbd.h"
#include "kernel.h"
#include "lib.h"
#include "mem.h"
#include "net_test.h"
#include "pci.h"
#include "power.h"
#include "scsi_test.h"
#include "serial.h"
#include "smp.h"
#include "hotplug.h"
#include "snap.h"
#include "start_info.h"
#include "user.h"

#define CMDLINE_MAX 1024
#define FAIL_EXIT_VALUE 0x7e /* host exit status (0x7e << 1) | 1 = 253 */

unsigned check_failures;

void check_fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	serial_puts("CHECK FAIL ");
	vkprintf(fmt, ap);
	serial_puts("\n");
	va_end(ap);
	check_failures++;
}

uint32_t boot_protocol;
static struct hvm_start_info start_info;
static uint8_t boot_params[BP_SIZE]; /* Linux 64-bit protocol only */
static char cmdline[CMDLINE_MAX];
static uint64_t rsdp_hint;
struct hvm_memmap_table_entry memmap[MEMMAP_MAX];
unsigned memmap_entries;
static unsigned memmap_given; /* entries the boot protocol gave (may exceed MEMMAP_MAX) */

int memmap_is_ram(uint64_t addr, uint64_t len)
{
	if (memmap_entries == 0)
		return -1;
	for (unsigned i = 0; i < memmap_entries; i++)
		if (memmap[i].type == 1 && addr >= memmap[i].addr &&
		    addr + len <= memmap[i].addr + memmap[i].size)
			return 1;
	return 0;
}

static struct {
	int check_pci, check_acpi, check_smp, check_mem, check_blk, check_net, check_scsi;
	int blk_passes;
	struct blk_opts blk;
	char action[32];
	uint8_t code;
	int cpus;    /* -1: not given */
	int64_t mem; /* MiB, -1: not given */
	uint32_t period_ms; /* heartbeat period */
	uint32_t beats;     /* heartbeats before exit, 0: no limit */
} cfg;

static void copy_cmdline(uint64_t p)
{
	if (!p || p >= 0x100000000ull - CMDLINE_MAX)
		return;
	const volatile char *src = (const volatile char *)(uintptr_t)p;
	for (int i = 0; i < CMDLINE_MAX - 1 && src[i]; i++)
		cmdline[i] = src[i];
}

/* PVH: copy what we need out of the start info before anything can overwrite it. */
static void copy_start_info(uint32_t si_paddr)
{
	if (si_paddr)
		memcpy(&start_info, (const void *)(uintptr_t)si_paddr, sizeof(start_info));
	if (start_info.magic != HVM_START_MAGIC)
		return;
	if (start_info.version >= 1 && start_info.memmap_paddr &&
	    start_info.memmap_paddr < 0x100000000ull - sizeof(memmap)) {
		memmap_given = start_info.memmap_entries;
		memmap_entries = memmap_given < MEMMAP_MAX ? memmap_given : MEMMAP_MAX;
		memcpy(memmap, (const void *)(uintptr_t)start_info.memmap_paddr,
		       memmap_entries * sizeof(memmap[0]));
	}
	rsdp_hint = start_info.rsdp_paddr;
	copy_cmdline(start_info.cmdline_paddr);
}

static uint32_t bp_u32(unsigned off)
{
	uint32_t v;
	memcpy(&v, boot_params + off, 4);
	return v;
}

static uint64_t bp_u64(unsigned off)
{
	uint64_t v;
	memcpy(&v, boot_params + off, 8);
	return v;
}

/* Linux 64-bit protocol: the same from boot_params (the zero page). */
static void copy_boot_params(uint32_t bp_paddr)
{
	if (bp_paddr)
		memcpy(boot_params, (const void *)(uintptr_t)bp_paddr, sizeof(boot_params));
	memmap_given = boot_params[BP_E820_ENTRIES];
	if (memmap_given > BP_E820_MAX)
		memmap_given = BP_E820_MAX;
	memmap_entries = memmap_given < MEMMAP_MAX ? memmap_given : MEMMAP_MAX;
	for (unsigned i = 0; i < memmap_entries; i++) {
		unsigned o = BP_E820_TABLE + i * BP_E820_ENTRY_SIZE;
		memmap[i].addr = bp_u64(o);
		memmap[i].size = bp_u64(o + 8);
		memmap[i].type = bp_u32(o + 16);
		memmap[i].reserved = 0;
	}
	rsdp_hint = bp_u64(BP_ACPI_RSDP_ADDR);
	copy_cmdline(bp_u32(BP_HDR_CMD_LINE_PTR) | (uint64_t)bp_u32(BP_EXT_CMD_LINE_PTR) << 32);
}

/* A 64-bit hex (0x...) or decimal address; 0 on error. */
static uint64_t parse_addr(const char *s, size_t n)
{
	uint64_t v = 0;
	unsigned base = 10;
	size_t i = 0;
	if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i == n || n - i > 16)
		return 0;
	for (; i < n; i++) {
		char c = s[i];
		unsigned d;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			return 0;
		v = v * base + d;
	}
	return v;
}

static void parse_checks(const char *v, size_t n)
{
	size_t i = 0;
	while (i < n) {
		size_t j = i;
		while (j < n && v[j] != ',')
			j++;
		if (j > i) {
			if (word_eq(v + i, j - i, "pci"))
				cfg.check_pci = 1;
			else if (word_eq(v + i, j - i, "acpi"))
				cfg.check_acpi = 1;
			else if (word_eq(v + i, j - i, "smp"))
				cfg.check_smp = 1;
			else if (word_eq(v + i, j - i, "mem"))
				cfg.check_mem = 1;
			else if (word_eq(v + i, j - i, "blk"))
				cfg.check_blk = 1;
			else if (word_eq(v + i, j - i, "net"))
				cfg.check_net = 1;
			else if (word_eq(v + i, j - i, "scsi"))
				cfg.check_scsi = 1;
			else {
				char name[32];
				size_t k = j - i < sizeof(name) - 1 ? j - i : sizeof(name) - 1;
				memcpy(name, v + i, k);
				name[k] = 0;
				check_fail("unknown check %s", name);
			}
		}
		i = j + 1;
	}
}

static void parse_cmdline(void)
{
	memcpy(cfg.action, "exit", 5);
	cfg.cpus = -1;
	cfg.mem = -1;
	cfg.period_ms = 100;
	const char *s = cmdline;
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		const char *w = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
		size_t wn = (size_t)(s - w), kn = 0;
		while (kn < wn && w[kn] != '=')
			kn++;
		if (kn == wn)
			continue; /* not key=value: ignore */
		const char *v = w + kn + 1;
		size_t vn = wn - kn - 1;
		if (word_eq(w, kn, "checks")) {
			parse_checks(v, vn);
		} else if (word_eq(w, kn, "action")) {
			if (vn >= sizeof(cfg.action))
				vn = sizeof(cfg.action) - 1;
			memcpy(cfg.action, v, vn);
			cfg.action[vn] = 0;
		} else if (word_eq(w, kn, "code")) {
			int64_t c = parse_num(v, vn);
			if (c < 0 || c > 255)
				check_fail("bad code= value");
			else
				cfg.code = (uint8_t)c;
		} else if (word_eq(w, kn, "cpus")) {
			int64_t c = parse_num(v, vn);
			if (c < 1 || c > MAX_CPUS)
				check_fail("bad cpus= value");
			else
				cfg.cpus = (int)c;
		} else if (word_eq(w, kn, "mem")) {
			int64_t m = parse_num(v, vn);
			if (m < 1)
				check_fail("bad mem= value");
			else
				cfg.mem = m;
		} else if (word_eq(w, kn, "period")) {
			int64_t m = parse_num(v, vn);
			if (m < 1 || m > 3600000)
				check_fail("bad period= value");
			else
				cfg.period_ms = (uint32_t)m;
		} else if (word_eq(w, kn, "blkpattern") || word_eq(w, kn, "blkwrite")) {
			int64_t m = parse_num(v, vn);
			if (m < 0 || m > 1)
				check_fail("bad %s value", word_eq(w, kn, "blkwrite") ? "blkwrite=" : "blkpattern=");
			else if (word_eq(w, kn, "blkwrite"))
				cfg.blk.write = (int)m;
			else
				cfg.blk.pattern = (int)m;
		} else if (word_eq(w, kn, "blktimeout")) {
			int64_t m = parse_num(v, vn);
			if (m < 1 || m > 600000)
				check_fail("bad blktimeout= value");
			else
				vblk_timeout_ms = (uint32_t)m;
		} else if (word_eq(w, kn, "blkpasses")) {
			int64_t m = parse_num(v, vn);
			if (m < 1 || m > 16)
				check_fail("bad blkpasses= value");
			else
				cfg.blk_passes = (int)m;
		} else if (word_eq(w, kn, "blkbar")) {
			uint64_t b = parse_addr(v, vn);
			if (b == 0 || (b & 0xfff))
				check_fail("bad blkbar= value");
			else
				cfg.blk.bar = b;
		} else if (hotplug_parse_key(w, kn, v, vn)) {
			/* hotplug */
		} else if (snap_parse_key(w, kn, v, vn)) {
			/* mempattern, memcheck, memfillbeat, memdirty, snapblk, netserve */
		} else if (net_parse_key(w, kn, v, vn)) {
			/* netip, netgw, netqueues, netudp, netport, netwait, nettimeout */
		} else if (timer_parse_key(w, kn, v, vn)) {
			/* idle */
		} else if (user_parse_key(w, kn, v, vn)) {
			/* user, userbench */
		} else if (scsi_parse_key(w, kn, v, vn)) {
			/* scsiluns, scsiro, scsiunmap, scsibadlun, scsipattern, scsitimeout */
		} else if (word_eq(w, kn, "beats")) {
			int64_t m = parse_num(v, vn);
			if (m < 0 || m > 0xffffffffll)
				check_fail("bad beats= value");
			else
				cfg.beats = (uint32_t)m;
		}
	}
}

/* info_paddr: hvm_start_info (BOOT_PVH) or boot_params (BOOT_LINUX64). */
void kmain(uint32_t info_paddr, uint32_t protocol)
{
	serial_init();
	boot_protocol = protocol;
	if (protocol == BOOT_LINUX64)
		copy_boot_params(info_paddr);
	else
		copy_start_info(info_paddr);
	kprintf("TERN-UNIKERNEL v1 cmdline=%s\n", cmdline);
	kprintf("BOOT protocol=%s\n", protocol == BOOT_LINUX64 ? "linux64" : "pvh");
	if (protocol == BOOT_LINUX64) {
		uint16_t flag = (uint16_t)(boot_params[BP_HDR_BOOT_FLAG] |
					   boot_params[BP_HDR_BOOT_FLAG + 1] << 8);
		if (flag != BP_BOOT_FLAG_MAGIC || bp_u32(BP_HDR_HEADER) != BP_HEADER_MAGIC)
			check_fail("boot_params boot_flag=0x%x header=0x%x at 0x%x", flag,
				   bp_u32(BP_HDR_HEADER), info_paddr);
	} else if (start_info.magic != HVM_START_MAGIC) {
		check_fail("start_info magic=0x%x at 0x%x", start_info.magic, info_paddr);
	}
	parse_cmdline();
	if (!power_action_known(cfg.action)) {
		check_fail("unknown action %s", cfg.action);
		memcpy(cfg.action, "exit", 5);
	}

	uint64_t ecam = PCI_ECAM_DEFAULT;

	if (cfg.check_acpi) {
		acpi_parse(rsdp_hint, 1);
		if (cfg.cpus > 0 && acpi.madt && acpi.madt_cpus != cfg.cpus)
			check_fail("acpi MADT cpus=%d, expected %d", acpi.madt_cpus, cfg.cpus);
		if (acpi.mcfg_base)
			ecam = acpi.mcfg_base;
	}
	if (cfg.check_pci)
		pci_check(ecam);
	if (cfg.check_smp) {
		if (!cfg.check_acpi)
			acpi_parse(rsdp_hint, 0);
		if (!acpi.madt) {
			check_fail("smp needs the MADT");
		} else {
			int online = smp_start_aps(acpi.apic_ids, acpi.n_apic_ids);
			int want = cfg.cpus > 0 ? cfg.cpus : acpi.madt_cpus;
			kprintf("SMP online=%d\n", online);
			if (online != want)
				check_fail("smp online=%d, expected %d", online, want);
		}
	}
	if (cfg.check_mem) {
		if (memmap_given > memmap_entries)
			check_fail("mem map has %u entries, only %u kept", memmap_given,
				   memmap_entries);
		mem_check(cfg.mem);
	}
	/* Each pass resets and re-initialises every device (blkpasses=N). */
	for (int pass = 0; cfg.check_blk && pass < (cfg.blk_passes ? cfg.blk_passes : 1); pass++) {
		if (pass)
			kprintf("BLK pass %d\n", pass + 1);
		blk_check(&cfg.blk);
	}

	user_bench();

	if (cfg.check_net)
		net_check();

	if (cfg.check_scsi)
		scsi_check();

	if (check_failures == 0)
		kprintf("RESULT pass\n");
	else
		kprintf("RESULT fail failures=%u\n", check_failures);

	/* Actions that need the FADT/DSDT get them even without the acpi check. */
	if (!acpi.found && (word_eq(cfg.action, strlen(cfg.action), "s5") ||
			    word_eq(cfg.action, strlen(cfg.action), "acpi-reset")))
		acpi_parse(rsdp_hint, 0);

	uint8_t exit_value = check_failures ? FAIL_EXIT_VALUE : cfg.code;
	if (word_eq(cfg.action, strlen(cfg.action), "heartbeat"))
		heartbeat(cfg.period_ms, cfg.beats, exit_value, FAIL_EXIT_VALUE);
	power_action(cfg.action, exit_value);
}
