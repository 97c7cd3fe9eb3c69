/* Shared declarations of the test unikernel. */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdint.h>

#include "start_info.h"

#define MAX_CPUS 64      /* APIC ids 0..MAX_CPUS-1 get an AP stack */
#define AP_STACK_SIZE 4096

/* Every failed expectation: prints "CHECK FAIL <what>" and counts it. */
void check_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern unsigned check_failures;

/* How the VMM entered (kmain's second argument, set by entry.S). */
#define BOOT_PVH 0     /* _start32 through the PVH note, start info in %ebx */
#define BOOT_LINUX64 1 /* _start64_linux, Linux 64-bit boot protocol, boot_params in %rsi */
extern uint32_t boot_protocol;

/* The memory map the boot protocol gave (E820 entries converted to the PVH
 * layout), copied at entry. Type 1 is RAM. */
#define MEMMAP_MAX 64
extern struct hvm_memmap_table_entry memmap[MEMMAP_MAX];
extern unsigned memmap_entries;

/* Is [addr, addr+len) RAM in the PVH memory map? 1 yes, 0 no, -1 no map given. */
int memmap_is_ram(uint64_t addr, uint64_t len);

/* Busy-wait delays timed by PIT channel 2 (ports 0x42/0x43/0x61). */
void delay_us(uint32_t us);
void delay_ms(uint32_t ms);

/* Sleeps ms: delay_ms, or with idle=hlt on the command line in `hlt`, woken
 * by the local APIC timer each ms (the vCPU costs the host nothing). */
void sleep_ms(uint32_t ms);

/* Command-line key idle=poll|hlt (1 if it was that key). */
#include <stddef.h>
int timer_parse_key(const char *k, size_t kn, const char *v, size_t vn);

#endif
