/* Snapshot aids for the heartbeat (see README.md, "Snapshot aids"). */
#include "kernel.h"
#include "lib.h"
#include "mem.h"
#include "net_test.h"
#include "serial.h"
#include "snap.h"
#include "virtio_blk.h"

#define MIB ((uint64_t)1 << 20)
#define PAGE 4096ull
#define SLACK (2 * MIB) /* after the page-table pool: room for later tables */
#define MAX_DIRTY_PAGES 65536
#define MAX_DIRTY_SPAN (1u << 20) /* memdirtyspan: pages (4 GiB) */
#define SB_A_OFF (1u * 1024 * 1024) /* the disk pattern */
#define SB_A_LEN (8u * 1024)
#define SB_B_OFF (2u * 1024 * 1024) /* beat n writes sector SB_B_OFF/512 + n % SB_SLOTS */
#define SB_SLOTS 2048u
#define SB_MAGIC 0x50414e53u /* "SNAP" little-endian */

static struct {
	int64_t pattern_mib;  /* 0: none, -1: all RAM above the start */
	uint32_t check_every; /* beats between pattern checks, 0: never */
	uint32_t dirty_pages;
	uint32_t dirty_span; /* memdirtyspan: pages the dirty window rotates through; 0: dirty_pages */
	uint32_t fill_beat; /* fill the pattern right before this beat; 0: before the first */
	int blk, net;
} so = { 0, 1, 0, 0, 0, 0, 0 };
static uint64_t pattern_start;
static int pattern_filled;

static struct {
	uint64_t s, e;
} pr[MEMMAP_MAX];
static unsigned npr;
static uint64_t pat_bytes, pat_sum;
static volatile uint64_t *dirty_area;
static uint32_t dirty_next; /* memdirtyspan: the first page of the next beat's window */

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

int snap_parse_key(const char *k, size_t kn, const char *v, size_t vn)
{
	int64_t m = parse_num(v, vn);
	if (word_eq(k, kn, "mempattern")) {
		if (word_eq(v, vn, "all"))
			so.pattern_mib = -1;
		else if (m < 0 || m > (int64_t)1 << 22)
			check_fail("bad mempattern= value");
		else
			so.pattern_mib = m;
	} else if (word_eq(k, kn, "memcheck")) {
		if (m < 0 || m > 0xffffffffll)
			check_fail("bad memcheck= value");
		else
			so.check_every = (uint32_t)m;
	} else if (word_eq(k, kn, "memfillbeat")) {
		if (m < 0 || m > 0xffffffffll)
			check_fail("bad memfillbeat= value");
		else
			so.fill_beat = (uint32_t)m;
	} else if (word_eq(k, kn, "memdirty")) {
		if (m < 0 || m > MAX_DIRTY_PAGES)
			check_fail("bad memdirty= value");
		else
			so.dirty_pages = (uint32_t)m;
	} else if (word_eq(k, kn, "memdirtyspan")) {
		if (m < 0 || m > MAX_DIRTY_SPAN)
			check_fail("bad memdirtyspan= value");
		else
			so.dirty_span = (uint32_t)m;
	} else if (word_eq(k, kn, "snapblk") || word_eq(k, kn, "netserve")) {
		if (m < 0 || m > (word_eq(k, kn, "snapblk") ? 2 : 1))
			check_fail("bad %s value", word_eq(k, kn, "snapblk") ? "snapblk=" : "netserve=");
		else if (word_eq(k, kn, "snapblk"))
			so.blk = (int)m;
		else
			so.net = (int)m;
	} else {
		return 0;
	}
	return 1;
}

int snap_enabled(void)
{
	return so.pattern_mib != 0 || so.dirty_pages || so.blk || so.net;
}

/* ---- memory ---- */

static uint64_t pat_word(uint64_t addr)
{
	return (addr * 0x9e3779b97f4a7c15ull) ^ 0x3c5a96e1d2b4f078ull;
}

/* Each page of the pattern holds two words: at its start and at an offset
 * that varies from page to page. (Guest code runs emulated on a software
 * KVM at ~2M instructions a second: every word of 64 MiB would take
 * minutes.) */
static uint64_t second_word(uint64_t page)
{
	uint64_t o = ((page >> 12) * 0x58) & (PAGE - 8);
	return o ? o : 8;
}

static uint64_t mix(uint64_t sum, uint64_t w)
{
	return ((sum << 5) | (sum >> 59)) ^ w;
}

static void pattern_fill(uint64_t start)
{
	uint64_t want = so.pattern_mib < 0 ? ~0ull : (uint64_t)so.pattern_mib * MIB;
	for (unsigned i = 0; i < memmap_entries && pat_bytes < want; i++) {
		if (memmap[i].type != 1)
			continue;
		uint64_t s = align_up(memmap[i].addr, PAGE), e = (memmap[i].addr + memmap[i].size) & ~(PAGE - 1);
		if (s < start)
			s = start;
		if (e > MEM_MAP_LIMIT)
			e = MEM_MAP_LIMIT;
		if (s >= e)
			continue;
		if (e - s > want - pat_bytes)
			e = s + (want - pat_bytes);
		pr[npr].s = s;
		pr[npr].e = e;
		npr++;
		pat_bytes += e - s;
	}
	if (so.pattern_mib > 0 && pat_bytes < want)
		check_fail("mempattern: only %lu MiB of RAM above 0x%lx", pat_bytes / MIB, start);
	uint64_t sum = 0;
	for (unsigned r = 0; r < npr; r++)
		for (uint64_t p = pr[r].s; p < pr[r].e; p += PAGE) {
			uint64_t a0 = p, a1 = p + second_word(p);
			*(volatile uint64_t *)(uintptr_t)a0 = pat_word(a0);
			*(volatile uint64_t *)(uintptr_t)a1 = pat_word(a1);
			sum = mix(mix(sum, pat_word(a0)), pat_word(a1));
		}
	pat_sum = sum;
	pattern_filled = 1;
	kprintf("MEMPATTERN bytes=%lu start=0x%lx end=0x%lx ranges=%u sum=0x%lx\n", pat_bytes,
		npr ? pr[0].s : 0, npr ? pr[npr - 1].e : 0, npr, pat_sum);
}

/* The checksum of the pattern area now; *bad: first address that differs. */
static uint64_t pattern_sum(uint64_t *bad)
{
	uint64_t sum = 0;
	*bad = 0;
	for (unsigned r = 0; r < npr; r++)
		for (uint64_t p = pr[r].s; p < pr[r].e; p += PAGE) {
			uint64_t a0 = p, a1 = p + second_word(p);
			uint64_t w0 = *(volatile uint64_t *)(uintptr_t)a0;
			uint64_t w1 = *(volatile uint64_t *)(uintptr_t)a1;
			if (!*bad && w0 != pat_word(a0))
				*bad = a0;
			if (!*bad && w1 != pat_word(a1))
				*bad = a1;
			sum = mix(mix(sum, w0), w1);
		}
	return sum;
}

/* ---- disk ---- */

static struct vblk sbk;
static uint8_t sbuf[SB_A_LEN] __attribute__((section(".noinit.snapblk"), aligned(4096)));
static uint32_t sector_buf[VBLK_SECTOR / 4] __attribute__((aligned(512)));
static int sb_up;

static uint8_t sb_byte(uint64_t o)
{
	return (uint8_t)(((o * 13 + 0x3c) ^ (o >> 8)) ^ 0xa5);
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

static void snapblk_init(void)
{
	uint16_t bdf;
	const struct pci_access a = { PCI_CF8, 0 };
	struct vpci_window w = { 0xc0000000ull, 0xfec00000ull, 0, 0, 0 };
	if (vpci_find(&a, VIRTIO_BLK_PCI_ID, VIRTIO_BLK_PCI_TRANSITIONAL_ID, &bdf, 1) < 1) {
		check_fail("snapblk no virtio-blk device on bus 0");
		return;
	}
	if (vblk_init(&sbk, &a, bdf, &w) != 0)
		return;
	if (sbk.capacity * VBLK_SECTOR < SB_B_OFF + SB_SLOTS * VBLK_SECTOR) {
		check_fail("snapblk %s capacity=%lu sectors, needs %u", sbk.name, sbk.capacity,
			   (SB_B_OFF + SB_SLOTS * VBLK_SECTOR) / VBLK_SECTOR);
		return;
	}
	for (uint32_t i = 0; i < SB_A_LEN; i++)
		sbuf[i] = sb_byte(SB_A_OFF + i);
	int st = vblk_rw(&sbk, 0, 1, SB_A_OFF / VBLK_SECTOR, sbuf, SB_A_LEN, SB_A_LEN);
	if (st != 0) {
		check_fail("snapblk %s pattern write status=%d", sbk.name, st);
		return;
	}
	if (vblk_has(&sbk, VIRTIO_BLK_F_FLUSH))
		vblk_flush(&sbk);
	sb_up = 1;
	kprintf("SNAPBLK %s pattern off=0x%x len=0x%x fnv=%08x slots=0x%x+%u\n", sbk.name, SB_A_OFF,
		SB_A_LEN, fnv1a(sbuf, SB_A_LEN), SB_B_OFF, SB_SLOTS);
}

/* Beat n: sector SB_B_OFF/512 + n % SB_SLOTS gets {SB_MAGIC, n, n * 0x9e3779b1 + i...};
 * then the pattern is read back. */
static void snapblk_beat(uint32_t n)
{
	if (!sb_up) {
		kprintf("SNAPBLK %u BAD device not up\n", n);
		return;
	}
	sector_buf[0] = SB_MAGIC;
	sector_buf[1] = n;
	for (uint32_t i = 2; i < VBLK_SECTOR / 4; i++)
		sector_buf[i] = n * 0x9e3779b1u + i;
	int ws = vblk_rw(&sbk, 0, 1, SB_B_OFF / VBLK_SECTOR + n % SB_SLOTS, sector_buf, VBLK_SECTOR,
			 VBLK_SECTOR);
	memset(sbuf, 0, SB_A_LEN);
	int rs = vblk_rw(&sbk, 0, 0, SB_A_OFF / VBLK_SECTOR, sbuf, SB_A_LEN, SB_A_LEN);
	int64_t at = -1;
	for (uint32_t i = 0; rs == 0 && i < SB_A_LEN; i++)
		if (sbuf[i] != sb_byte(SB_A_OFF + i)) {
			at = i;
			break;
		}
	if (ws == 0 && rs == 0 && at < 0)
		kprintf("SNAPBLK %u ok\n", n);
	else
		kprintf("SNAPBLK %u BAD write=%d read=%d mismatch=%d\n", n, ws, rs, (int)at);
}

/* ---- the heartbeat ---- */

void snap_setup(void)
{
	if (so.pattern_mib != 0 || so.dirty_pages) {
		uint64_t start = align_up(mem_map_all_ram(), 2 * MIB) + SLACK;
		if (so.dirty_pages) {
			/* The window rotates through the span: a whole number of windows. */
			if (so.dirty_span < so.dirty_pages)
				so.dirty_span = so.dirty_pages;
			so.dirty_span = (so.dirty_span + so.dirty_pages - 1) / so.dirty_pages * so.dirty_pages;
			if (memmap_is_ram(start, (uint64_t)so.dirty_span * PAGE) != 1) {
				check_fail("memdirty: no RAM at 0x%lx+0x%lx", start,
					   (unsigned long)((uint64_t)so.dirty_span * PAGE));
				so.dirty_pages = 0;
			} else {
				dirty_area = (volatile uint64_t *)(uintptr_t)start;
				for (uint32_t i = 0; i < so.dirty_span; i++)
					dirty_area[i * (PAGE / 8)] = 0;
				if (so.dirty_span == so.dirty_pages)
					kprintf("MEMDIRTY pages=%u at=0x%lx\n", so.dirty_pages, start);
				else
					kprintf("MEMDIRTY pages=%u at=0x%lx span=%u\n", so.dirty_pages, start,
						so.dirty_span);
				start = align_up(start + (uint64_t)so.dirty_span * PAGE, 2 * MIB);
			}
		}
		pattern_start = start;
		if (so.pattern_mib != 0 && so.fill_beat <= 1)
			pattern_fill(start);
	}
	if (so.blk)
		snapblk_init();
	if (so.net)
		net_serve_init();
}

void snap_beat(uint32_t n)
{
	int ok = 1, dirty_ok = 1;
	if (so.pattern_mib != 0 && !pattern_filled && n >= so.fill_beat)
		pattern_fill(pattern_start);
	if (so.dirty_pages) {
		/* A page of this window was last written one turn of the span ago. */
		uint32_t turn = so.dirty_span / so.dirty_pages;
		uint64_t prev = n > turn ? (uint64_t)n - turn : 0;
		volatile uint64_t *w = dirty_area + (uint64_t)dirty_next * (PAGE / 8);
		for (uint32_t i = 0; i < so.dirty_pages; i++) {
			volatile uint64_t *p = w + (uint64_t)i * (PAGE / 8);
			if (*p != prev)
				dirty_ok = 0;
			*p = n;
		}
		dirty_next += so.dirty_pages;
		if (dirty_next >= so.dirty_span)
			dirty_next = 0;
	}
	if (so.blk == 1)
		snapblk_beat(n);
	kprintf("HEARTBEAT %u", n);
	if (pattern_filled && so.check_every && n % so.check_every == 0) {
		uint64_t bad;
		uint64_t sum = pattern_sum(&bad);
		kprintf(" mem=0x%lx", sum);
		if (sum != pat_sum || bad) {
			ok = 0;
			kprintf(" membad=0x%lx", bad);
		}
	}
	if (so.dirty_pages) {
		kprintf(" dirty=%s", dirty_ok ? "ok" : "BAD");
		ok &= dirty_ok;
	}
	if (so.net)
		kprintf(" pings=%u", net_serve_answered());
	kprintf(" %s\n", ok ? "ok" : "BAD");
}

void snap_tick(void)
{
	if (so.net)
		net_serve_poll();
}
