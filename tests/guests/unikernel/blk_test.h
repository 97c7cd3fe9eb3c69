/* The blk check (see README.md). */
#ifndef BLK_TEST_H
#define BLK_TEST_H

#include <stdint.h>

struct blk_opts {
	int pattern;    /* blkpattern=1: write the pattern, read it back, compare */
	int write;      /* blkwrite=1: write the pattern only */
	uint64_t bar;   /* blkbar=ADDR: reassign the BARs from ADDR; 0: not given */
};

void blk_check(const struct blk_opts *o);

#endif
