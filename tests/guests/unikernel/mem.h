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

#endif
