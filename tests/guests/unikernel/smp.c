#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "smp.h"

#define LAPIC_ID 0x020
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_PENDING (1u << 12)
#define ICR_INIT 0x00004500u    /* INIT, level assert */
#define ICR_STARTUP 0x00004600u /* Start-up, level assert, vector in bits 0-7 */

extern const uint8_t ap_tramp_start[], ap_tramp_end[];

volatile uint32_t ap_online;

static void send_ipi(uint32_t apic_id, uint32_t icr)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, icr);
	for (int i = 0; i < 100000; i++)
		if (!(lapic_read(LAPIC_ICR_LO) & ICR_PENDING))
			break;
}

void ap_main(uint32_t apic_id)
{
	(void)apic_id;
	__asm__ volatile("lock incl %0" : "+m"(ap_online) : : "memory");
	halt_forever();
}

int smp_start_aps(const uint32_t *apic_ids, int n)
{
	uint32_t self = lapic_read(LAPIC_ID) >> 24;
	int want = 0;

	if (memmap_is_ram(AP_TRAMPOLINE, 0x1000) == 0) {
		check_fail("smp trampoline page 0x%x is not RAM in the memory map", AP_TRAMPOLINE);
		return 1;
	}

	memcpy((void *)(uintptr_t)AP_TRAMPOLINE, ap_tramp_start,
	       (size_t)(ap_tramp_end - ap_tramp_start));
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100); /* software enable */

	for (int i = 0; i < n; i++) {
		if (apic_ids[i] == self)
			continue;
		if (apic_ids[i] >= MAX_CPUS || apic_ids[i] > 0xff) {
			check_fail("smp APIC id %u unsupported", apic_ids[i]);
			continue;
		}
		send_ipi(apic_ids[i], ICR_INIT);
		want++;
	}
	delay_ms(10);
	for (int round = 0; round < 2; round++) {
		for (int i = 0; i < n; i++) {
			if (apic_ids[i] == self || apic_ids[i] >= MAX_CPUS)
				continue;
			send_ipi(apic_ids[i], ICR_STARTUP | (AP_TRAMPOLINE >> 12));
		}
		delay_us(200);
	}
	for (int ms = 0; ms < 2000 && (int)ap_online < want; ms++)
		delay_ms(1);
	return 1 + (int)ap_online;
}
