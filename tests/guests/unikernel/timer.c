/* Delays timed by the i8254 PIT channel 2 in mode 0, polled through port 0x61
 * bit 5 (OUT2). No TSC, no interrupts. sleep_ms with idle=hlt instead halts
 * the vCPU until the local APIC timer's interrupt, as an idle OS does. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "smp.h"
#include "user.h"

#define PIT_HZ 1193182u
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61

/* Wait for `ticks` (1..65535) PIT input clocks. */
static void pit_wait_ticks(uint32_t ticks)
{
	uint8_t b = inb(PORT_B);
	outb(PORT_B, (uint8_t)((b & ~0x02) | 0x01)); /* gate2 on, speaker off */
	outb(PIT_CMD, 0xb0);                          /* ch2, lo/hi, mode 0, binary */
	outb(PIT_CH2, (uint8_t)ticks);
	outb(PIT_CH2, (uint8_t)(ticks >> 8));
	/* OUT2 goes high at terminal count. Bounded in case there is no PIT. */
	for (uint32_t i = 0; i < 2000000; i++)
		if (inb(PORT_B) & 0x20)
			break;
}

void delay_us(uint32_t us)
{
	while (us) {
		uint32_t chunk = us > 50000 ? 50000 : us;
		uint32_t ticks = (uint32_t)(((uint64_t)chunk * PIT_HZ) / 1000000u);
		if (ticks == 0)
			ticks = 1;
		pit_wait_ticks(ticks);
		us -= chunk;
	}
}

void delay_ms(uint32_t ms)
{
	while (ms--)
		delay_us(1000);
}

/* ---- idle=hlt: sleep in `hlt`, woken by the local APIC timer ---- */

#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_TMICT 0x380 /* initial count */
#define LAPIC_TMCCT 0x390 /* current count */
#define LAPIC_TDCR 0x3e0  /* divide configuration */
#define LVT_MASKED (1u << 16)
#define TIMER_VECTOR 0x30
#define CALIBRATE_MS 20

static int idle_hlt;
static uint32_t lapic_per_ms; /* timer counts per ms at divide 1; 0: not set up */


int timer_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	if (!word_eq(k, kn, "idle"))
		return 0;
	if (word_eq(v, vn, "hlt"))
		idle_hlt = 1;
	else if (word_eq(v, vn, "poll"))
		idle_hlt = 0;
	else
		check_fail("bad idle= value");
	return 1;
}

/* Interrupts from the local APIC timer only: the 8259s and LINT0/1 masked
 * (KVM resets the BSP's LINT0 to ExtINT, unmasked), the timer counted
 * against a PIT wait. 0 when the timer does not count. */
static int idle_setup(void)
{
	cpu_tables_load();
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_write(LAPIC_SVR, 0x1ff); /* software enable, spurious vector 0xff */
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
	lapic_write(LAPIC_TDCR, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR); /* one-shot */
	lapic_write(LAPIC_TMICT, 0xffffffffu);
	delay_us(CALIBRATE_MS * 1000);
	uint32_t left = lapic_read(LAPIC_TMCCT);
	lapic_write(LAPIC_TMICT, 0);
	lapic_per_ms = (0xffffffffu - left) / CALIBRATE_MS;
	if (lapic_per_ms == 0) {
		check_fail("idle=hlt: the local APIC timer does not count");
		idle_hlt = 0;
		return 0;
	}
	lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR);
	kprintf("IDLE hlt lapic_per_ms=%u\n", lapic_per_ms);
	return 1;
}

void sleep_ms(uint32_t ms)
{
	if (!idle_hlt || (!lapic_per_ms && !idle_setup())) {
		delay_ms(ms);
		return;
	}
	while (ms--) {
		lapic_write(LAPIC_TMICT, lapic_per_ms);
		/* Until the count runs out: another interrupt may end a hlt
		 * early. `sti; hlt` cannot lose the wake-up (sti's one-instruction
		 * shadow), and an interrupt already pending ends the hlt at once. */
		while (lapic_read(LAPIC_TMCCT) != 0)
			__asm__ volatile("sti; hlt; cli" : : : "memory");
	}
}
