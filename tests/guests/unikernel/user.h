/* Ring 3 for the test unikernel. On a software KVM (kvm_pvm) every ring-0
 * instruction is emulated (~450 ns) while user-mode code runs natively, so
 * byte-heavy loops (the net data path, checksums) run much faster in ring 3.
 * See README.md, "Ring 3".
 *
 * user_call(fn, arg) runs fn(arg) at CPL 3 on a user stack, with IOPL 3 (port
 * I/O such as the serial console and PCI 0xCF8/0xCFC keeps working) and
 * interrupts off, over the same identity map (U/S set on every present
 * entry, RAM and MMIO alike). fn's return is a `hlt` at CPL 3, whose #GP
 * brings the CPU back to ring 0 through the IDT and TSS.RSP0; user_call then
 * returns fn's value. Any other exception in ring 3 prints
 * "CHECK FAIL user exception ..." and user_call returns -1; an exception in
 * ring 0 prints "KERNEL exception ..." and ends the VM with the failure code.
 * Only the BSP uses it; calls do not nest. */
#ifndef USER_H
#define USER_H

#include <stdint.h>

/* Sets up the GDT (user segments, TSS), the IDT and the U/S bits, once;
 * later calls only refresh the U/S bits. 0 on success. */
int user_init(void);

/* Loads the GDT, the TSS and the IDT (once; user_init does it too). IDT
 * vectors 32-255 all go to irq_wake, which acknowledges the local APIC and
 * returns: an interrupt here only ends a `hlt` (timer.c, idle=hlt). */
void cpu_tables_load(void);

/* Runs fn(arg) in ring 3 (user_init first, on demand). When ring 3 is off
 * (`user=0` on the command line) it is a plain call. */
long user_call(long (*fn)(long), long arg);

/* user=0|1 on the command line (default 1). */
extern int user_enabled;

/* Port accesses from ring 3 that trapped (#GP) and were done by ring 0. */
extern uint64_t user_port_traps;

/* Is this code running in ring 3? */
int user_mode(void);

/* A time base that costs no exit: TSC ticks per ms, calibrated against the
 * PIT by user_init (0 when not calibrated). */
extern uint64_t tsc_per_ms;
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

/* Elapsed real time in ms, advanced from TSC readings; each step between two
 * calls counts at most 100 ms and never backwards (the TSC read natively and
 * inside the host's emulator may differ by an offset). */
struct tsc_clock {
	uint64_t last, frac;
	uint32_t ms;
};
void tsc_clock_start(struct tsc_clock *c);
uint32_t tsc_clock_ms(struct tsc_clock *c);

/* Command-line keys: user=0|1, userbench=1 (1 if the key was one of them). */
#include <stddef.h>
int user_parse_key(const char *k, size_t kn, const char *v, size_t vn);
/* userbench=1: time a loop in ring 0 and in ring 3 (prints USER lines). */
void user_bench(void);

#endif
