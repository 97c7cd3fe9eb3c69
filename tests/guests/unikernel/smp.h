/* Application processor start-up (INIT-SIPI-SIPI through the xAPIC). */
#ifndef SMP_H
#define SMP_H

#include <stdint.h>

#include "io.h"

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_SVR 0x0f0 /* spurious vector; bit 8 enables the APIC */

/* The local APIC's registers (xAPIC MMIO at its reset address). */
static inline uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
#define AP_TRAMPOLINE 0x8000 /* must match entry.S */

/* APs that reached long mode (incremented with lock incl). */
extern volatile uint32_t ap_online;

/* Start every enabled CPU of the MADT except this one; wait up to ~2 s.
 * Returns the number of CPUs online, this one included. */
int smp_start_aps(const uint32_t *apic_ids, int n);

/* Called on each AP, in long mode on its own stack (entry.S). */
void ap_main(uint32_t apic_id) __attribute__((noreturn));

#endif
