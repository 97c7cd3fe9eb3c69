/* The mem check: print the boot protocol's memory map, extend the identity
 * map (2 MiB pages, one page directory per GiB, taken from the RAM right after
 * the image) up to the top of RAM, then write a distinct 64-bit pattern to the
 * first and last 8 bytes of every RAM range and to every 256 MiB boundary in
 * between, and read them all back. Skips the first 1 MiB and the image,
 * stacks and page tables. */
#include "kernel.h"
#include "lib.h"
#include "mem.h"
#include "serial.h"

#define MIB ((uint64_t)1 << 20)
#define GIB ((uint64_t)1 << 30)
#define PAGE 4096ull
#define PTE_P_RW 0x003ull
#define PDE_2M 0x083ull /* present, writable, page size; write-back */
#define PDE_PCD_PWT 0x018ull /* uncached */
#define PATTERN_STRIDE ((uint64_t)256 << 20)
#define MISMATCHES_SHOWN 16

extern uint64_t pml4[512], pdpt[512]; /* entry.S: PML4[0] -> pdpt -> 4 PDs */
extern char __image_start[], __image_end[];

static uint64_t pool_start, pool_next; /* page-table pages, right after the image */
static uint64_t mapped_top;            /* everything below is identity mapped */
static unsigned pages_touched, mismatches;
static uint64_t last_page;

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

static void pool_init(void)
{
	if (!pool_start)
		pool_start = pool_next = align_up((uint64_t)(uintptr_t)__image_end, PAGE);
}

/* A page for the page tables from the RAM after the image; 0 if there is none. */
static uint64_t alloc_table(void)
{
	pool_init();
	uint64_t p = pool_next;
	if (memmap_is_ram(p, PAGE) != 1)
		return 0;
	pool_next += PAGE;
	volatile uint64_t *t = (volatile uint64_t *)(uintptr_t)p;
	for (int i = 0; i < 512; i++)
		t[i] = 0;
	return p;
}

/* Identity-map [4 GiB, top) with 2 MiB pages; top is a multiple of 1 GiB.
 * Returns the number of page directories added; sets mapped_top. */
static unsigned map_high(uint64_t top)
{
	unsigned pds = 0;
	mapped_top = 4 * GIB;
	for (uint64_t gib = 4; gib < top / GIB; gib++) {
		uint64_t l4 = gib >> 9, l3 = gib & 511;
		volatile uint64_t *dir;
		if (l4 == 0) {
			dir = pdpt;
		} else {
			if (!(pml4[l4] & 1)) {
				uint64_t t = alloc_table();
				if (!t)
					goto no_ram;
				pml4[l4] = t | PTE_P_RW;
			}
			dir = (volatile uint64_t *)(uintptr_t)(pml4[l4] & ~0xfffull);
		}
		if (!(dir[l3] & 1)) {
			uint64_t t = alloc_table();
			if (!t)
				goto no_ram;
			volatile uint64_t *pd = (volatile uint64_t *)(uintptr_t)t;
			for (uint64_t i = 0; i < 512; i++)
				pd[i] = (gib * GIB + i * (2 * MIB)) | PDE_2M;
			dir[l3] = t | PTE_P_RW;
			pds++;
		}
		mapped_top = (gib + 1) * GIB;
	}
	goto done;
no_ram:
	check_fail("mem no RAM for page tables at 0x%lx (mapped up to 0x%lx)", pool_next,
		   mapped_top);
done:;
	uint64_t cr3;
	__asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
	return pds;
}

static uint64_t pattern(uint64_t addr)
{
	/* Multiplying by an odd constant is a bijection: distinct per address. */
	return (addr * 0x9e3779b97f4a7c15ull) ^ 0x5aa5c33c0ff0e11eull;
}

static void touch(uint64_t addr, int verify)
{
	volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)addr;
	if (!verify) {
		*p = pattern(addr);
		if ((addr & ~(PAGE - 1)) != last_page || pages_touched == 0)
			pages_touched++;
		last_page = addr & ~(PAGE - 1);
		return;
	}
	uint64_t got = *p, want = pattern(addr);
	if (got != want) {
		if (mismatches < MISMATCHES_SHOWN)
			check_fail("mem 0x%lx read 0x%lx expected 0x%lx", addr, got, want);
		mismatches++;
	}
}

/* First and last 8 bytes of [s, e) and every PATTERN_STRIDE boundary inside. */
static void visit(uint64_t s, uint64_t e, int verify)
{
	s = align_up(s, 8);
	e &= ~7ull;
	if (s + 8 > e)
		return;
	touch(s, verify);
	for (uint64_t p = align_up(s + 8, PATTERN_STRIDE); p < e - 8; p += PATTERN_STRIDE)
		touch(p, verify);
	if (e - 8 > s)
		touch(e - 8, verify);
}

/* A RAM range minus the first 1 MiB, the image and page tables, and
 * whatever is above the identity map. */
static void visit_ram(uint64_t s, uint64_t e, int verify)
{
	uint64_t rs = (uint64_t)(uintptr_t)__image_start, re = pool_next;
	if (s < MIB)
		s = MIB;
	if (e > mapped_top)
		e = mapped_top;
	if (s >= e)
		return;
	if (s < re && e > rs) {
		visit(s, e < rs ? e : rs, verify);
		visit(s > re ? s : re, e, verify);
	} else {
		visit(s, e, verify);
	}
}

void mem_check(int64_t expect_mib)
{
	uint64_t ram = 0, legacy = 0, top = 0;

	for (unsigned i = 0; i < memmap_entries; i++) {
		const struct hvm_memmap_table_entry *m = &memmap[i];
		kprintf("MEM map addr=0x%lx size=0x%lx type=%u\n", m->addr, m->size, m->type);
		uint64_t end = m->addr + m->size;
		if (m->type == 1) {
			ram += m->size;
			if (end > top)
				top = end;
		} else if (m->addr < MIB) {
			legacy += (end < MIB ? end : MIB) - m->addr;
		}
	}
	kprintf("MEM ram=%lu entries=%u\n", ram / MIB, memmap_entries);
	if (memmap_entries == 0) {
		check_fail("mem no memory map from the boot protocol");
		return;
	}
	if (ram == 0)
		check_fail("mem no RAM in the memory map");
	if (expect_mib >= 0 && ram + legacy != (uint64_t)expect_mib * MIB)
		check_fail("mem ram=0x%lx + reserved below 1 MiB=0x%lx is not mem=%ld MiB", ram,
			   legacy, expect_mib);

	/* The identity map: RAM above 4 GiB needs page directories. */
	pool_init();
	if (top > MEM_MAP_LIMIT) {
		check_fail("mem RAM up to 0x%lx, only 0x%lx is mapped and tested", top,
			   MEM_MAP_LIMIT);
		top = MEM_MAP_LIMIT;
	}
	unsigned pds = map_high(align_up(top, GIB));
	kprintf("MEM paging top=0x%lx pds=%u tables=0x%lx-0x%lx\n", mapped_top, pds, pool_start,
		pool_next);

	/* Write every location, then read them all back. */
	for (int verify = 0; verify < 2; verify++)
		for (unsigned i = 0; i < memmap_entries; i++)
			if (memmap[i].type == 1)
				visit_ram(memmap[i].addr, memmap[i].addr + memmap[i].size, verify);
	if (mismatches > MISMATCHES_SHOWN)
		check_fail("mem %u more mismatches", mismatches - MISMATCHES_SHOWN);
	if (pages_touched == 0)
		check_fail("mem no RAM to test");
	if (mismatches == 0)
		kprintf("MEM pattern ok pages=%u\n", pages_touched);
	else
		kprintf("MEM pattern bad mismatches=%u pages=%u\n", mismatches, pages_touched);
}

/* The page directory of 1 GiB number `gib` (>= 4), created with a write-back
 * identity map if missing; 0 if there is no RAM for it. */
static volatile uint64_t *page_dir(uint64_t gib)
{
	uint64_t l4 = gib >> 9, l3 = gib & 511;
	volatile uint64_t *dir;
	if (l4 == 0) {
		dir = pdpt;
	} else {
		if (!(pml4[l4] & 1)) {
			uint64_t t = alloc_table();
			if (!t)
				return 0;
			pml4[l4] = t | PTE_P_RW;
		}
		dir = (volatile uint64_t *)(uintptr_t)(pml4[l4] & ~0xfffull);
	}
	if (!(dir[l3] & 1)) {
		uint64_t t = alloc_table();
		if (!t)
			return 0;
		volatile uint64_t *pd = (volatile uint64_t *)(uintptr_t)t;
		for (uint64_t i = 0; i < 512; i++)
			pd[i] = (gib * GIB + i * (2 * MIB)) | PDE_2M;
		dir[l3] = t | PTE_P_RW;
	}
	return (volatile uint64_t *)(uintptr_t)(dir[l3] & ~0xfffull);
}

int mem_map_mmio(uint64_t addr, uint64_t size)
{
	uint64_t end = addr + size;
	if (end <= 4 * GIB)
		return 0; /* the boot page tables map it (uncached above 2 GiB) */
	if (end < addr || end > MEM_MMIO_LIMIT)
		return -1;
	int rc = 0;
	for (uint64_t p = (addr < 4 * GIB ? 4 * GIB : addr) & ~(2 * MIB - 1); p < end; p += 2 * MIB) {
		volatile uint64_t *pd = page_dir(p / GIB);
		if (!pd) {
			rc = -1;
			break;
		}
		pd[(p / (2 * MIB)) & 511] = p | PDE_2M | PDE_PCD_PWT;
	}
	uint64_t cr3;
	__asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
	return rc;
}

uint64_t mem_map_all_ram(void)
{
	uint64_t top = 0;
	for (unsigned i = 0; i < memmap_entries; i++)
		if (memmap[i].type == 1 && memmap[i].addr + memmap[i].size > top)
			top = memmap[i].addr + memmap[i].size;
	if (top > MEM_MAP_LIMIT)
		top = MEM_MAP_LIMIT;
	pool_init();
	if (top > 4 * GIB)
		map_high(align_up(top, GIB)); /* idempotent */
	/* The boot tables map 2-4 GiB uncached (for MMIO); RAM there is
	 * made write-back, a whole 2 MiB page at a time. */
	for (uint64_t p = 2 * GIB; p < 4 * GIB && p < top; p += 2 * MIB) {
		if (memmap_is_ram(p, 2 * MIB) != 1)
			continue;
		volatile uint64_t *pd = (volatile uint64_t *)(uintptr_t)(pdpt[p / GIB] & ~0xfffull);
		pd[(p / (2 * MIB)) & 511] = p | PDE_2M;
	}
	uint64_t cr3;
	__asm__ volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=r"(cr3) : : "memory");
	return pool_next;
}
