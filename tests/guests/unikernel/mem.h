/* The mem check: memory map, identity map above 4 GiB, RAM pattern test. */
#ifndef MEM_H
#define MEM_H

#include <stdint.h>

/* Largest address the runtime identity map can reach (RAM above it is
 * reported and skipped). */
#define MEM_MAP_LIMIT ((uint64_t)4 << 40) /* 4 TiB */

/* Print the map, extend the identity map to the top of RAM, write and read
 * back patterns in every RAM range. expect_mib: the host's mem= value in MiB,
 * or -1 when not given. */
void mem_check(int64_t expect_mib);

/* Identity-map [addr, addr+size) uncached (2 MiB pages), for MMIO such as
 * PCI BARs above 4 GiB; page tables come from the same pool as the mem
 * check's (RAM after the image). Below 4 GiB the boot tables already map it.
 * 0 ok, -1 no RAM for page tables or beyond MEM_MMIO_LIMIT. */
#define MEM_MMIO_LIMIT ((uint64_t)1 << 46) /* 64 TiB */
int mem_map_mmio(uint64_t addr, uint64_t size);

/* Identity-map all RAM write-back (page directories above 4 GiB, and the
 * RAM between 2 and 4 GiB that the boot tables map uncached). Returns the
 * end of the page-table pool (RAM after the image used for tables). */
uint64_t mem_map_all_ram(void);

#endif
