/* Delays timed by the i8254 PIT channel 2 in mode 0, polled through port 0x61
 * bit 5 (OUT2). No TSC, no interrupts. */
#include "io.h"
#include "kernel.h"

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
