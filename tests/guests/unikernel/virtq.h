/* Split virtqueues (virtio 1.x, section 2.7): descriptor table, available
 * and used rings in guest memory, identity-mapped (address = pointer).
 * No indirect descriptors, no event index. Transport-independent: the
 * transport (virtio_pci.c) tells the device where the rings are and rings
 * the doorbell. */
#ifndef VIRTQ_H
#define VIRTQ_H

#include <stddef.h>
#include <stdint.h>

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2 /* device-writable */
#define VIRTQ_MAX_SIZE 256

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* One buffer of a chain: device-readable ones first, then device-writable. */
struct virtq_buf {
	const void *addr;
	uint32_t len;
};

struct virtq {
	uint16_t index; /* queue number on the device */
	uint16_t size;  /* entries, a power of 2 */
	volatile struct virtq_desc *desc;
	volatile uint16_t *avail;                /* flags, idx, ring[size], used_event */
	volatile uint16_t *used;                 /* flags, idx, then used_elem[size] */
	volatile struct virtq_used_elem *used_ring;
	uint16_t free_head, num_free;
	uint16_t avail_idx; /* next avail->idx to publish */
	uint16_t last_used; /* used->idx consumed so far */
	uint16_t chain_len[VIRTQ_MAX_SIZE];
	uint64_t notify_addr; /* set by the transport */
};

/* Bytes of memory for a queue of `size` entries (desc, avail, used back to
 * back; 16-byte aligned start). */
size_t virtq_mem_size(uint16_t size);

/* Lay the rings out in `mem` (zeroed here; 16-byte aligned, at least
 * virtq_mem_size(size) bytes) and build the free list. */
void virtq_init(struct virtq *q, uint16_t index, uint16_t size, void *mem);

/* Guest-physical addresses of the three parts, for the transport. */
uint64_t virtq_desc_addr(const struct virtq *q);
uint64_t virtq_avail_addr(const struct virtq *q);
uint64_t virtq_used_addr(const struct virtq *q);

/* Chain n_out device-readable then n_in device-writable buffers and publish
 * the chain in the available ring. Returns the head descriptor index, or -1
 * when there are not enough free descriptors. The caller then notifies. */
int virtq_add(struct virtq *q, const struct virtq_buf *out, unsigned n_out,
	      const struct virtq_buf *in, unsigned n_in);

/* Take one completed chain from the used ring: returns its head id (and
 * *len, bytes the device wrote) and frees its descriptors; -1 when none is
 * there yet; -2 when the device returned an id that is not an outstanding
 * head. */
int virtq_get_used(struct virtq *q, uint32_t *len);

#endif
