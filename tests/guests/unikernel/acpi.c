#include "acpi.h"
#include "io.h"
#include "lib.h"
#include "serial.h"

struct acpi_info acpi;

static int verbose;

#define FAIL(...)                               \
	do {                                    \
		if (verbose)                    \
			check_fail(__VA_ARGS__); \
	} while (0)

#define MAX_TABLE_LEN (16u << 20)

static uint8_t rd8(uint64_t a) { return mmio_read8(a); }
static uint16_t rd16(uint64_t a) { return (uint16_t)(rd8(a) | (rd8(a + 1) << 8)); }
static uint32_t rd32(uint64_t a) { return (uint32_t)rd16(a) | ((uint32_t)rd16(a + 2) << 16); }
static uint64_t rd64(uint64_t a) { return (uint64_t)rd32(a) | ((uint64_t)rd32(a + 4) << 32); }

static int sig_eq(uint64_t a, const char *sig)
{
	for (int i = 0; i < 4; i++)
		if (rd8(a + i) != (uint8_t)sig[i])
			return 0;
	return 1;
}

static uint8_t sum_bytes(uint64_t a, uint32_t len)
{
	uint8_t s = 0;
	for (uint32_t i = 0; i < len; i++)
		s = (uint8_t)(s + rd8(a + i));
	return s;
}

/* Only the identity-mapped low 4 GiB is reachable. */
static int addr_ok(uint64_t a, uint64_t len)
{
	return a != 0 && a < 0x100000000ull && len <= 0x100000000ull - a;
}

static int rsdp_valid(uint64_t a)
{
	if (rd8(a) != 'R' || !sig_eq(a, "RSD ") || !sig_eq(a + 4, "PTR "))
		return 0;
	return sum_bytes(a, 20) == 0;
}

static uint64_t find_rsdp(uint64_t hint)
{
	if (hint && addr_ok(hint, 36) && rsdp_valid(hint))
		return hint;
	if (hint)
		FAIL("acpi rsdp_paddr=0x%lx from start info is not a valid RSDP", hint);
	for (uint64_t a = 0xe0000; a < 0x100000; a += 16)
		if (rsdp_valid(a))
			return a;
	return 0;
}

/* Print the per-table line; returns the table length if the table is usable. */
static uint32_t visit_table(uint64_t a, const char *expect_sig)
{
	char sig[5];
	if (!addr_ok(a, 36)) {
		FAIL("acpi table at 0x%lx not below 4 GiB", a);
		return 0;
	}
	for (int i = 0; i < 4; i++)
		sig[i] = (char)rd8(a + i);
	sig[4] = 0;
	uint32_t len = rd32(a + 4);
	if (expect_sig && !sig_eq(a, expect_sig)) {
		FAIL("acpi %s expected at 0x%lx, found signature %s", expect_sig, a, sig);
		return 0;
	}
	if (len < 36 || len > MAX_TABLE_LEN || !addr_ok(a, len)) {
		if (verbose)
			kprintf("ACPI %s addr=0x%lx len=%u checksum=bad\n", sig, a, len);
		FAIL("acpi %s at 0x%lx has bad length %u", sig, a, len);
		return 0;
	}
	int ok = sum_bytes(a, len) == 0;
	if (verbose)
		kprintf("ACPI %s addr=0x%lx len=%u checksum=%s\n", sig, a, len, ok ? "ok" : "bad");
	if (!ok)
		FAIL("acpi %s checksum", sig);
	return len;
}

static void read_gas(uint64_t a, struct acpi_gas *g)
{
	g->space = rd8(a);
	g->bit_width = rd8(a + 1);
	g->bit_offset = rd8(a + 2);
	g->access_size = rd8(a + 3);
	g->address = rd64(a + 4);
}

static void parse_fadt(uint64_t a, uint32_t len)
{
	uint64_t facs = len >= 40 ? rd32(a + 36) : 0;
	uint64_t dsdt = len >= 44 ? rd32(a + 40) : 0;
	if (len >= 140 && rd64(a + 132))
		facs = rd64(a + 132); /* X_FIRMWARE_CTRL */
	if (len >= 148 && rd64(a + 140))
		dsdt = rd64(a + 140); /* X_DSDT */
	acpi.facs = facs;
	acpi.dsdt = dsdt;

	acpi.pm1a_cnt = len >= 76 ? rd32(a + 72) : 0;
	acpi.pm1b_cnt = len >= 80 ? rd32(a + 76) : 0;
	if (len >= 184) { /* X_PM1a_CNT_BLK / X_PM1b_CNT_BLK, if system I/O */
		struct acpi_gas g;
		read_gas(a + 172, &g);
		if (g.space == 1 && g.address)
			acpi.pm1a_cnt = (uint32_t)g.address;
		if (len >= 196) {
			read_gas(a + 184, &g);
			if (g.space == 1 && g.address)
				acpi.pm1b_cnt = (uint32_t)g.address;
		}
	}
	if (len >= 129) {
		uint32_t flags = rd32(a + 112);
		acpi.reset_supported = (flags >> 10) & 1;
		read_gas(a + 116, &acpi.reset_reg);
		acpi.reset_value = rd8(a + 128);
	}
}

static void parse_madt(uint64_t a, uint32_t len)
{
	acpi.lapic_addr = rd32(a + 36);
	for (uint64_t p = a + 44; p + 2 <= a + len;) {
		uint8_t type = rd8(p), elen = rd8(p + 1);
		if (elen < 2 || p + elen > a + len) {
			FAIL("acpi MADT entry at 0x%lx has bad length %u", p, elen);
			break;
		}
		uint32_t apic_id = 0, flags = 0;
		int cpu = 0;
		if (type == 0 && elen >= 8) { /* processor local APIC */
			apic_id = rd8(p + 3);
			flags = rd32(p + 4);
			cpu = 1;
		} else if (type == 9 && elen >= 16) { /* processor local x2APIC */
			apic_id = rd32(p + 4);
			flags = rd32(p + 8);
			cpu = 1;
		} else if (type == 1) {
			acpi.ioapics++;
		}
		if (cpu && (flags & 1)) {
			acpi.madt_cpus++;
			if (acpi.n_apic_ids < MAX_CPUS)
				acpi.apic_ids[acpi.n_apic_ids++] = apic_id;
		}
		p += elen;
	}
}

static void parse_mcfg(uint64_t a, uint32_t len)
{
	for (uint64_t p = a + 44; p + 16 <= a + len; p += 16) {
		if (rd16(p + 8) != 0) /* PCI segment group */
			continue;
		acpi.mcfg_base = rd64(p);
		acpi.mcfg_bus_start = rd8(p + 10);
		acpi.mcfg_bus_end = rd8(p + 11);
		return;
	}
}

/* AML PkgLength: returns the number of encoding bytes (1..4). */
static int pkg_len_bytes(uint8_t lead) { return 1 + (lead >> 6); }

/* Read one integer data object (ZeroOp, OneOp, OnesOp, Byte/Word/DWordPrefix).
 * Returns the number of bytes consumed or 0 if not an integer. */
static int aml_int(uint64_t p, uint64_t end, uint32_t *v)
{
	if (p >= end)
		return 0;
	switch (rd8(p)) {
	case 0x00: *v = 0; return 1;
	case 0x01: *v = 1; return 1;
	case 0xff: *v = 0xffffffffu; return 1;
	case 0x0a: if (p + 2 > end) return 0; *v = rd8(p + 1); return 2;
	case 0x0b: if (p + 3 > end) return 0; *v = rd16(p + 1); return 3;
	case 0x0c: if (p + 5 > end) return 0; *v = rd32(p + 1); return 5;
	default: return 0;
	}
}

/* Find Name(_S5_, Package(){SLP_TYPa, ...}) in the DSDT's AML. */
static int find_s5(uint64_t a, uint32_t len)
{
	uint64_t end = a + len;
	for (uint64_t p = a + 36; p + 4 <= end; p++) {
		if (!sig_eq(p, "_S5_"))
			continue;
		/* Preceded by NameOp, possibly with a root prefix '\'. */
		int named = (p > a + 36 && rd8(p - 1) == 0x08) ||
			    (p > a + 37 && rd8(p - 1) == '\\' && rd8(p - 2) == 0x08);
		if (!named)
			continue;
		uint64_t q = p + 4;
		if (q >= end || rd8(q) != 0x12) /* PackageOp */
			continue;
		q++;
		if (q >= end)
			continue;
		q += pkg_len_bytes(rd8(q));
		q++; /* NumElements */
		uint32_t v;
		if (aml_int(q, end, &v))
			return (int)(v & 7);
	}
	return -1;
}

void acpi_parse(uint64_t rsdp_hint, int v)
{
	verbose = v;
	memset(&acpi, 0, sizeof(acpi));
	acpi.s5_slp_typ = -1;

	uint64_t rsdp = find_rsdp(rsdp_hint);
	if (!rsdp) {
		FAIL("acpi RSDP not found");
		return;
	}
	acpi.rsdp = rsdp;
	acpi.rsdp_rev = rd8(rsdp + 15);
	int use_xsdt = 0;
	if (acpi.rsdp_rev >= 2) {
		uint32_t rlen = rd32(rsdp + 20);
		if (rlen < 36 || sum_bytes(rsdp, rlen) != 0)
			FAIL("acpi RSDP extended checksum");
		if (rd64(rsdp + 24)) {
			acpi.root = rd64(rsdp + 24);
			use_xsdt = 1;
		}
	}
	if (!use_xsdt)
		acpi.root = rd32(rsdp + 16);
	if (verbose)
		kprintf("ACPI RSDP rev=%u %s=0x%lx\n", acpi.rsdp_rev, use_xsdt ? "xsdt" : "rsdt",
			acpi.root);

	uint32_t root_len = visit_table(acpi.root, use_xsdt ? "XSDT" : "RSDT");
	if (!root_len)
		return;
	acpi.found = 1;

	uint32_t esize = use_xsdt ? 8 : 4;
	for (uint32_t off = 36; off + esize <= root_len; off += esize) {
		uint64_t t = use_xsdt ? rd64(acpi.root + off) : rd32(acpi.root + off);
		uint32_t len = visit_table(t, 0);
		if (!len)
			continue;
		if (sig_eq(t, "FACP")) {
			acpi.fadt = t;
			parse_fadt(t, len);
		} else if (sig_eq(t, "APIC")) {
			acpi.madt = t;
			parse_madt(t, len);
		} else if (sig_eq(t, "MCFG")) {
			acpi.mcfg = t;
			parse_mcfg(t, len);
		}
	}

	if (!acpi.fadt) {
		FAIL("acpi FADT missing");
	} else {
		if (acpi.dsdt) {
			uint32_t len = visit_table(acpi.dsdt, "DSDT");
			if (len)
				acpi.s5_slp_typ = find_s5(acpi.dsdt, len);
		} else {
			FAIL("acpi FADT has no DSDT");
		}
		if (acpi.facs) {
			/* The FACS has no checksum field. */
			if (addr_ok(acpi.facs, 64) && sig_eq(acpi.facs, "FACS")) {
				if (verbose)
					kprintf("ACPI FACS addr=0x%lx len=%u checksum=none\n", acpi.facs,
						rd32(acpi.facs + 4));
			} else {
				FAIL("acpi FACS at 0x%lx invalid", acpi.facs);
			}
		}
	}

	if (!verbose)
		return;
	if (acpi.madt) {
		kprintf("ACPI MADT cpus=%d ioapics=%d\n", acpi.madt_cpus, acpi.ioapics);
		if (acpi.madt_cpus == 0)
			FAIL("acpi MADT has no enabled CPU");
		if (acpi.ioapics == 0)
			FAIL("acpi MADT has no IOAPIC");
	} else {
		FAIL("acpi MADT missing");
	}
	if (acpi.mcfg && acpi.mcfg_base) {
		kprintf("ACPI MCFG base=0x%lx buses=%u-%u\n", acpi.mcfg_base, acpi.mcfg_bus_start,
			acpi.mcfg_bus_end);
	} else {
		FAIL("acpi MCFG missing or without segment 0");
	}
	if (acpi.fadt) {
		kprintf("ACPI FADT pm1a_cnt=0x%x reset_reg=0x%lx reset_value=0x%x\n", acpi.pm1a_cnt,
			acpi.reset_reg.address, acpi.reset_value);
		if (!acpi.pm1a_cnt)
			FAIL("acpi FADT has no PM1a control block");
	}
	if (acpi.dsdt) {
		if (acpi.s5_slp_typ >= 0)
			kprintf("ACPI DSDT s5=%d\n", acpi.s5_slp_typ);
		else
			FAIL("acpi DSDT has no _S5_ package");
	}
}
