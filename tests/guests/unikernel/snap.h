/* Snapshot aids for the heartbeat action (see README.md, "Snapshot aids"):
 * a memory pattern checksummed every beat, pages rewritten every beat, a
 * disk written and read every beat, NICs that answer pings between beats. */
#ifndef SNAP_H
#define SNAP_H

#include <stddef.h>
#include <stdint.h>

/* mempattern, memcheck, memfillbeat, memdirty, snapblk, netserve: 1 if the word was one
 * of them (bad values are CHECK FAILs), 0 otherwise. */
int snap_parse_key(const char *k, size_t kn, const char *v, size_t vn);
/* Any of them given? Then the heartbeat runs snap_beat/snap_tick. */
int snap_enabled(void);
/* Before the first beat: fill the pattern, write the disk's pattern,
 * bring the NICs up. */
void snap_setup(void);
/* Beat n: the per-beat work and the whole "HEARTBEAT n ..." line. */
void snap_beat(uint32_t n);
/* Every millisecond between beats. */
void snap_tick(void);

#endif
