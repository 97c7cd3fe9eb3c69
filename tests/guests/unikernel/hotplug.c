/* See hotplug.h. Plain integer code. */
#include "hotplug.h"
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "pci.h"
#include "scsi_test.h"
#include "serial.h"
#include "net_test.h"
#include "virtio_blk.h"
#include "virtio_net.h"

#define PCIHP_PORT 0xae00
#define PCIHP_UP (PCIHP_PORT + 0x0)   /* read clears */
#define PCIHP_DOWN (PCIHP_PORT + 0x4) /* slots to release */
#define PCIHP_EJECT (PCIHP_PORT + 0x8) /* write: slots released */
#define PCIHP_SLOTS (PCIHP_PORT + 0xc) /* slots holding a device */

static int enabled;
/* Hot-plugged NICs being served (polled every tick). */
static int nets;

void hotplug_tick(void)
{
	if (nets)
		net_serve_poll();
}

/* Hot-plugged virtio-blk functions the guest drives, a few at a time. */
#define HP_DISKS 3
static struct vblk hpblk[HP_DISKS];
static int hpblk_slot[HP_DISKS] = { -1, -1, -1 };
static uint8_t hpbuf[64 * 1024] __attribute__((aligned(4096)));
static uint32_t check_every, beat_no; /* hpcheck=N: re-read every N beats */

/* Where and what the guest writes on a plugged disk: 64 KiB at 1 MiB, byte i
 * = (i * 31 + slot) mod 256 (the host test computes the same). */
#define HP_OFF (1u << 20)
#define HP_LEN ((uint32_t)sizeof(hpbuf))

static uint8_t hp_byte(uint32_t i, unsigned slot)
{
	return (uint8_t)(i * 31u + slot);
}

/* Reads the pattern region of disk d back; the number of wrong bytes, with
 * the request status in *rs. */
static uint32_t reread(int d, int *rs)
{
	unsigned slot = (unsigned)hpblk_slot[d];
	for (uint32_t i = 0; i < HP_LEN; i++)
		hpbuf[i] = 0;
	*rs = vblk_rw(&hpblk[d], 0, 0, HP_OFF / VBLK_SECTOR, hpbuf, HP_LEN, HP_LEN);
	uint32_t bad = 0;
	for (uint32_t i = 0; i < HP_LEN; i++)
		if (hpbuf[i] != hp_byte(i, slot))
			bad++;
	return bad;
}

/* Drives the new disk: write the pattern, read it back, compare. */
static void blk_plugged(unsigned slot)
{
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	int d = 0;
	while (d < HP_DISKS && hpblk_slot[d] >= 0)
		d++;
	if (d == HP_DISKS) {
		kprintf("HOTPLUG blk slot=%u skipped (%d disks in use)\n", slot, HP_DISKS);
		return;
	}
	if (vblk_init(&hpblk[d], &a, PCI_BDF(0, slot, 0), &w) != 0) {
		kprintf("HOTPLUG blk slot=%u init failed\n", slot);
		return;
	}
	hpblk_slot[d] = (int)slot;
	/* Its first request, before the guest's (slow, emulated) byte loops:
	 * tern-bench hotplug times this line. */
	int fs = vblk_rw(&hpblk[d], 0, 0, 0, hpbuf, VBLK_SECTOR, VBLK_SECTOR);
	kprintf("HOTPLUG blk first-io slot=%u status=%d\n", slot, fs);
	for (uint32_t i = 0; i < HP_LEN; i++)
		hpbuf[i] = hp_byte(i, slot);
	int ws = vblk_rw(&hpblk[d], 0, 1, HP_OFF / VBLK_SECTOR, hpbuf, HP_LEN, HP_LEN);
	if (ws == 0 && vblk_has(&hpblk[d], VIRTIO_BLK_F_FLUSH))
		ws = vblk_flush(&hpblk[d]);
	int rs;
	uint32_t bad = reread(d, &rs);
	kprintf("HOTPLUG blk slot=%u capacity=%lu write=%d read=%d mismatches=%u\n", slot,
		(unsigned long)hpblk[d].capacity, ws, rs, bad);
}

/* A plugged disk the guest waits to drive (hpdelay=N beats). */
static int pending_slot = -1;
static uint32_t pending_beats;

int hotplug_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	if (word_eq(k, kn, "hpcheck")) {
		int64_t m = parse_num(v, vn);
		if (m < 0 || m > 100000)
			check_fail("bad hpcheck= value");
		else
			check_every = (uint32_t)m;
		return 1;
	}
	if (word_eq(k, kn, "hpdelay")) {
		int64_t m = parse_num(v, vn);
		if (m < 0 || m > 100000)
			check_fail("bad hpdelay= value");
		else
			scsi_hp_delay = (uint32_t)m;
		return 1;
	}
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
	scsi_hotplug_beat();
	beat_no++;
	for (int d = 0; check_every && beat_no % check_every == 0 && d < HP_DISKS; d++) {
		if (hpblk_slot[d] < 0)
			continue;
		int rs;
		uint32_t bad = reread(d, &rs);
		kprintf("HOTPLUG check slot=%d read=%d mismatches=%u\n", hpblk_slot[d], rs, bad);
	}
	if (pending_slot >= 0 && pending_beats-- == 0) {
		unsigned slot = (unsigned)pending_slot;
		pending_slot = -1;
		kprintf("HOTPLUG enabling slot=%u\n", slot);
		blk_plugged(slot);
	}
	uint32_t up = inl(PCIHP_UP);
	uint32_t down = inl(PCIHP_DOWN);
	for (unsigned slot = 0; slot < 32; slot++) {
		uint32_t bit = 1u << slot;
		if (up & bit) {
			uint32_t id = slot_id(slot);
			kprintf("HOTPLUG up slot=%u vendor=%x device=%x slots=%x\n", slot, id & 0xffff,
				id >> 16, inl(PCIHP_SLOTS));
			if ((id >> 16) == VIRTIO_BLK_PCI_ID && scsi_hp_delay && pending_slot < 0) {
				/* Found now, driven (DRIVER_OK) only some beats later. */
				pending_slot = (int)slot;
				pending_beats = scsi_hp_delay;
			} else if ((id >> 16) == VIRTIO_BLK_PCI_ID) {
				blk_plugged(slot);
			}
			int nic;
			if ((id >> 16) == VIRTIO_NET_PCI_ID &&
			    (nic = net_serve_add(PCI_BDF(0, slot, 0))) >= 0) {
				nets++;
				/* Its first request: one frame out (tern-bench hotplug times this). */
				kprintf("HOTPLUG net slot=%u tx=%s\n", slot,
					net_serve_announce(nic) == 0 ? "ok" : "failed");
			}
		}
		if (down & bit) {
			/* Stop the device (reset: it no longer touches our memory),
			 * then let go of the slot. */
			if (pending_slot == (int)slot)
				pending_slot = -1;
			for (int d = 0; d < HP_DISKS; d++)
				if (hpblk_slot[d] == (int)slot) {
					vblk_close(&hpblk[d]);
					hpblk_slot[d] = -1;
				}
			net_serve_remove(PCI_BDF(0, slot, 0));
			outl(PCIHP_EJECT, bit);
			kprintf("HOTPLUG ejected slot=%u\n", slot);
		}
	}
}
