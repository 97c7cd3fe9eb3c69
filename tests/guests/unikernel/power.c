#include "acpi.h"
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "power.h"
#include "serial.h"

static void do_exit(uint8_t v) { outb(DEBUG_EXIT_PORT, v); }

static void do_i8042(void)
{
	for (int i = 0; i < 100000; i++) /* input buffer empty */
		if (!(inb(0x64) & 0x02))
			break;
	outb(0x64, 0xfe); /* pulse the reset line */
}

static void do_cf9(void) { outb(0xcf9, 0x06); }

static void do_acpi_reset(void)
{
	if (!acpi.fadt) {
		kprintf("ACTION acpi-reset: no FADT\n");
		return;
	}
	if (!acpi.reset_supported)
		kprintf("ACTION acpi-reset: FADT does not set RESET_REG_SUP, trying anyway\n");
	const struct acpi_gas *r = &acpi.reset_reg;
	if (r->space == 1)
		outb((uint16_t)r->address, acpi.reset_value);
	else if (r->space == 0 && r->address && r->address < 0x100000000ull)
		mmio_write8(r->address, acpi.reset_value);
	else
		kprintf("ACTION acpi-reset: unsupported RESET_REG space=%u addr=0x%lx\n", r->space,
			r->address);
}

static void do_s5(void)
{
	if (!acpi.pm1a_cnt || acpi.s5_slp_typ < 0) {
		kprintf("ACTION s5: no PM1a control block or no _S5_\n");
		return;
	}
	uint16_t v = (uint16_t)((acpi.s5_slp_typ << 10) | (1u << 13));
	if (acpi.pm1b_cnt)
		outw((uint16_t)acpi.pm1b_cnt, v);
	outw((uint16_t)acpi.pm1a_cnt, v);
}

static void do_triple_fault(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };
	cli();
	__asm__ volatile("lidt %0" : : "m"(empty_idt));
	/* #DE with no usable IDT: #GP, #DF, shutdown. */
	__asm__ volatile("xorl %%ecx, %%ecx\n\tdivl %%ecx" : : : "eax", "ecx", "edx", "memory");
	/* Should the divide not fault: touch an unmapped address (#PF). */
	(void)mmio_read32(0x4000000000ull);
}

/*
 * An instruction KVM's instruction emulator lacks, right after a port write.
 * On a software KVM (kvm_pvm) the instructions after a trap run in that
 * emulator, so the VM must stop with an emulation failure that the VMM
 * reports with the guest RIP. On hardware KVM popcnt simply runs. The bytes
 * sit under a *_data symbol so check-insns.sh skips exactly them.
 */
static void __attribute__((noinline)) do_emulator_gap(void)
{
	__asm__ volatile("xorl %%eax, %%eax\n\t"
			 "outb %%al, $0x80\n"
			 "emulator_gap_data:\n\t"
			 ".byte 0xf3, 0x48, 0x0f, 0xb8, 0xc0\n" /* popcnt %rax, %rax */
			 "emulator_gap_end:\n\t"
			 : : : "eax", "memory");
}

static const char *const actions[] = {
	"exit", "i8042", "cf9", "acpi-reset", "s5", "halt", "triple-fault", "emulator-gap",
	"heartbeat", /* run by kmain through heartbeat() (kbd.c), which ends with "exit" */
};

int power_action_known(const char *name)
{
	for (unsigned i = 0; i < sizeof(actions) / sizeof(actions[0]); i++)
		if (word_eq(name, strlen(name), actions[i]))
			return 1;
	return 0;
}

void power_action(const char *name, uint8_t exit_value)
{
	size_t n = strlen(name);
	if (word_eq(name, n, "exit")) {
		do_exit(exit_value);
	} else if (word_eq(name, n, "i8042")) {
		do_i8042();
	} else if (word_eq(name, n, "cf9")) {
		do_cf9();
	} else if (word_eq(name, n, "acpi-reset")) {
		do_acpi_reset();
	} else if (word_eq(name, n, "s5")) {
		do_s5();
	} else if (word_eq(name, n, "halt")) {
		kprintf("HALT\n");
		halt_forever();
	} else if (word_eq(name, n, "triple-fault")) {
		do_triple_fault();
	} else if (word_eq(name, n, "emulator-gap")) {
		do_emulator_gap();
	}
	/* The VMM may end the VM asynchronously: give it a moment first. */
	delay_ms(1000);
	kprintf("ACTION %s did not end the VM\n", name);
	halt_forever();
}
