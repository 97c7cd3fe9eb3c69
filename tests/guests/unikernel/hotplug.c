/* See hotplug.h. Plain integer code. */
#include "hotplug.h"
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "pci.h"
#include "serial.h"

#define PCIHP_PORT 0xae00
#define PCIHP_UP (PCIHP_PORT + 0x0)   /* read clears */
#define PCIHP_DOWN (PCIHP_PORT + 0x4) /* slots to release */
#define PCIHP_EJECT (PCIHP_PORT + 0x8) /* write: slots released */
#define PCIHP_SLOTS (PCIHP_PORT + 0xc) /* slots holding a device */

static int enabled;

int hotplug_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	if (!word_eq(k, kn, "hotplug"))
		return 0;
	int64_t m = parse_num(v, vn);
	if (m < 0 || m > 1)
		check_fail("bad hotplug= value");
	else
		enabled = (int)m;
	return 1;
}

/* Vendor and device of slot's function 0, through the legacy ports (the
 * ECAM base is not needed). */
static uint32_t slot_id(unsigned slot)
{
	outl(0xcf8, 0x80000000u | (slot << 11));
	return inl(0xcfc);
}

void hotplug_beat(void)
{
	if (!enabled)
		return;
	uint32_t up = inl(PCIHP_UP);
	uint32_t down = inl(PCIHP_DOWN);
	for (unsigned slot = 0; slot < 32; slot++) {
		uint32_t bit = 1u << slot;
		if (up & bit) {
			uint32_t id = slot_id(slot);
			kprintf("HOTPLUG up slot=%u vendor=%x device=%x slots=%x\n", slot, id & 0xffff,
				id >> 16, inl(PCIHP_SLOTS));
		}
		if (down & bit) {
			/* Nothing of ours uses a hot-plugged device yet: let go at once. */
			outl(PCIHP_EJECT, bit);
			kprintf("HOTPLUG ejected slot=%u\n", slot);
		}
	}
}
