/* The blk check: every virtio-blk function on bus 0 is initialised and
 * exercised (see README.md, "The blk check"). */
#include "blk_test.h"
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "virtio_blk.h"

#define KIB 1024u
#define MIB (1024u * 1024u)
#define MAX_DEVS 16
#define SUM_BYTES (64 * KIB)
#define SEG_BYTES (64 * KIB)

/* Data buffers: not zeroed at boot (.noinit goes to the NOLOAD .stack
 * output section), always filled before use. */
static uint8_t big[MIB] __attribute__((section(".noinit.blk"), aligned(4096)));
static uint8_t small[SUM_BYTES] __attribute__((section(".noinit.blk"), aligned(4096)));
static struct vblk blk;

/* The pattern regions: absolute disk offset and length. */
static const struct {
	uint32_t off, len;
} regions[] = {
	{ 4 * KIB, 4 * KIB },          /* one page */
	{ 64 * KIB, 64 * KIB },        /* one 64 KiB descriptor */
	{ MIB - 512, 1 * KIB },        /* crosses the 1 MiB boundary */
	{ 4 * MIB, MIB },              /* 1 MiB in 16 descriptors of 64 KiB */
};
#define N_REGIONS (sizeof(regions) / sizeof(regions[0]))
#define PATTERN_END (5 * MIB)
#define DISCARD_OFF (2 * MIB)
#define DISCARD_LEN MIB
#define WZ_OFF (3 * MIB)
#define WZ_LEN (64 * KIB)

/* Byte at absolute disk offset o. */
static uint8_t pattern_byte(uint64_t o)
{
	return (uint8_t)((o * 7 + 0x5a) ^ (o >> 9));
}

static void fill_pattern(uint8_t *p, uint64_t off, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++)
		p[i] = pattern_byte(off + i);
}

/* Index of the first byte that differs from the pattern, or -1. */
static int64_t check_pattern(const uint8_t *p, uint64_t off, uint32_t len)
{
	for (uint32_t i = 0; i < len; i++)
		if (p[i] != pattern_byte(off + i))
			return i;
	return -1;
}

static uint32_t fnv1a(const uint8_t *p, uint32_t len)
{
	uint32_t h = 0x811c9dc5u;
	for (uint32_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x01000193u;
	}
	return h;
}

static int fits(const struct vblk *b, uint64_t end_bytes, const char *what)
{
	if (b->capacity * VBLK_SECTOR >= end_bytes)
		return 1;
	kprintf("BLK skip %s capacity=%lu\n", what, b->capacity);
	return 0;
}

static void test_pattern(struct vblk *b, int verify)
{
	if (b->ro) {
		kprintf("BLK skip pattern (ro)\n");
		return;
	}
	if (!fits(b, PATTERN_END, "pattern"))
		return;
	for (unsigned r = 0; r < N_REGIONS; r++) {
		fill_pattern(big, regions[r].off, regions[r].len);
		int st = vblk_rw(b, 0, 1, regions[r].off / VBLK_SECTOR, big, regions[r].len, SEG_BYTES);
		if (st != 0) {
			check_fail("blk %s write at 0x%x len 0x%x status=%d", b->name, regions[r].off,
				   regions[r].len, st);
			return;
		}
	}
	kprintf("BLK write ok offsets=");
	for (unsigned r = 0; r < N_REGIONS; r++)
		kprintf("%s0x%x+0x%x", r ? "," : "", regions[r].off, regions[r].len);
	kprintf("\n");
	if (!verify)
		return;
	int bad = 0;
	for (unsigned r = 0; r < N_REGIONS; r++) {
		memset(big, 0, regions[r].len);
		int st = vblk_rw(b, 0, 0, regions[r].off / VBLK_SECTOR, big, regions[r].len, SEG_BYTES);
		if (st != 0) {
			check_fail("blk %s read at 0x%x len 0x%x status=%d", b->name, regions[r].off,
				   regions[r].len, st);
			return;
		}
		int64_t at = check_pattern(big, regions[r].off, regions[r].len);
		if (at >= 0) {
			check_fail("blk %s pattern mismatch at disk offset 0x%lx: 0x%x, expected 0x%x",
				   b->name, regions[r].off + at, big[at],
				   pattern_byte(regions[r].off + (uint64_t)at));
			bad = 1;
		}
	}
	if (!bad)
		kprintf("BLK read ok\n");
}

static void test_device(struct vblk *b, const struct blk_opts *o)
{
	char id[VBLK_ID_BYTES + 1];
	int id_st = vblk_get_id(b, id);
	if (id_st < 0)
		return;
	kprintf("BLK %s features=0x%lx capacity=%lu queues=%u ro=%d serial=%s\n", b->name,
		b->pci.accepted, b->capacity, b->dev_queues, b->ro, id);
	kprintf("BLK %s offered=0x%lx blk_size=%u seg_max=%u common=0x%lx notify=0x%lx "
		"notify_mult=%u msix=%s\n",
		b->name, b->pci.features, b->blk_size, b->seg_max, b->pci.common, b->pci.notify,
		b->pci.notify_mult, b->pci.msix_cap ? "off" : "none");
	if (id_st == 0)
		kprintf("BLK id %s\n", id);
	else
		kprintf("BLK id status=%d\n", id_st);
	if (b->nq < b->dev_queues)
		kprintf("BLK using %u of %u queues\n", b->nq, b->dev_queues);

	/* The first 64 KiB, before anything is written. */
	uint32_t sum_len = b->capacity * VBLK_SECTOR < SUM_BYTES ? (uint32_t)(b->capacity * VBLK_SECTOR)
								 : SUM_BYTES;
	int st = vblk_rw(b, 0, 0, 0, small, sum_len, SEG_BYTES);
	if (st != 0)
		check_fail("blk %s read of the first 64 KiB status=%d", b->name, st);
	else
		kprintf("BLK sum %08x\n", fnv1a(small, sum_len));

	if (o->pattern || o->write)
		test_pattern(b, o->pattern);

	/* One sector right after the end: the device must refuse it. */
	st = vblk_rw(b, 0, 0, b->capacity, big, VBLK_SECTOR, SEG_BYTES);
	kprintf("BLK read past end status=%d\n", st);
	if (st != VIRTIO_BLK_S_IOERR)
		check_fail("blk %s read past end status=%d, expected 1", b->name, st);

	if (vblk_has(b, VIRTIO_BLK_F_FLUSH)) {
		st = vblk_flush(b);
		kprintf("BLK flush status=%d\n", st);
		if (st != 0)
			check_fail("blk %s flush status=%d", b->name, st);
	} else {
		kprintf("BLK skip flush (not offered)\n");
	}

	if (!vblk_has(b, VIRTIO_BLK_F_DISCARD)) {
		kprintf("BLK skip discard (not offered)\n");
	} else if (b->ro) {
		kprintf("BLK skip discard (ro)\n");
	} else if (fits(b, DISCARD_OFF + DISCARD_LEN, "discard")) {
		st = vblk_discard_wz(b, VIRTIO_BLK_T_DISCARD, DISCARD_OFF / VBLK_SECTOR,
				     DISCARD_LEN / VBLK_SECTOR);
		kprintf("BLK discard status=%d\n", st);
		if (st != 0)
			check_fail("blk %s discard status=%d", b->name, st);
	}

	if (!vblk_has(b, VIRTIO_BLK_F_WRITE_ZEROES)) {
		kprintf("BLK skip write-zeroes (not offered)\n");
	} else if (b->ro) {
		kprintf("BLK skip write-zeroes (ro)\n");
	} else if (fits(b, WZ_OFF + WZ_LEN, "write-zeroes")) {
		/* Pattern first, so that the zeroes are the device's doing. */
		fill_pattern(big, WZ_OFF, WZ_LEN);
		st = vblk_rw(b, 0, 1, WZ_OFF / VBLK_SECTOR, big, WZ_LEN, SEG_BYTES);
		if (st == 0)
			st = vblk_discard_wz(b, VIRTIO_BLK_T_WRITE_ZEROES, WZ_OFF / VBLK_SECTOR,
					     WZ_LEN / VBLK_SECTOR);
		if (st != 0) {
			check_fail("blk %s write-zeroes status=%d", b->name, st);
		} else {
			memset(big, 0xa5, WZ_LEN);
			st = vblk_rw(b, 0, 0, WZ_OFF / VBLK_SECTOR, big, WZ_LEN, SEG_BYTES);
			uint32_t nz = 0;
			for (uint32_t i = 0; i < WZ_LEN; i++)
				nz += big[i] != 0;
			if (st != 0 || nz)
				check_fail("blk %s write-zeroes read back status=%d non-zero bytes=%u",
					   b->name, st, nz);
			else
				kprintf("BLK write-zeroes ok\n");
		}
	}

	if (b->ro) {
		fill_pattern(big, 4 * KIB, 4 * KIB);
		st = vblk_rw(b, 0, 1, 4 * KIB / VBLK_SECTOR, big, 4 * KIB, SEG_BYTES);
		kprintf("BLK write on ro status=%d\n", st);
		if (st <= 0)
			check_fail("blk %s write on a read-only device status=%d", b->name, st);
	}

	/* Multiqueue: one read on each queue, compared with queue 0's. */
	if (b->nq > 1) {
		for (unsigned q = 0; q < b->nq; q++) {
			uint32_t len = sum_len < 4 * KIB ? sum_len : 4 * KIB;
			memset(big, 0xa5, len);
			st = vblk_rw(b, q, 0, 0, big, len, SEG_BYTES);
			if (st != 0)
				check_fail("blk %s queue %u read status=%d", b->name, q, st);
			else if (memcmp(big, small, len) != 0)
				check_fail("blk %s queue %u read differs from queue 0", b->name, q);
			else
				kprintf("BLK queue %u ok\n", q);
		}
	}
	kprintf("BLK %s done requests=%u isr_reads=%u isr_set=%u\n", b->name, b->requests,
		b->pci.isr_reads, b->pci.isr_set);
}

void blk_check(const struct blk_opts *o)
{
	static uint16_t bdfs[MAX_DEVS];
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	if (o->bar) {
		w.reassign = 1;
		if (o->bar >= 0x100000000ull) {
			w.base64 = o->bar;
			w.end64 = o->bar + ((uint64_t)64 << 30);
		} else {
			w.base32 = o->bar;
		}
	}
	int n = vpci_find(&a, VIRTIO_BLK_PCI_ID, VIRTIO_BLK_PCI_TRANSITIONAL_ID, bdfs, MAX_DEVS);
	for (int i = 0; i < n; i++) {
		if (vblk_init(&blk, &a, bdfs[i], &w) == 0)
			test_device(&blk, o);
		vblk_close(&blk);
	}
	kprintf("BLK devices=%d\n", n);
	if (n == 0)
		check_fail("blk no virtio-blk device on bus 0");
}
