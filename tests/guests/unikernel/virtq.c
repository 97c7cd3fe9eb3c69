/* Split virtqueue helpers; see virtq.h. Ordering: x86 keeps stores in order
 * and loads in order, so compiler barriers are all that is needed between
 * filling descriptors, the ring entry and the index (and, on the way back,
 * between reading used->idx and the used entry). No fences. */
#include "io.h"
#include "lib.h"
#include "virtq.h"

static size_t align_up(size_t v, size_t a) { return (v + a - 1) & ~(a - 1); }

static size_t used_offset(uint16_t size)
{
	return align_up(16u * size + 6u + 2u * size, 4);
}

size_t virtq_mem_size(uint16_t size)
{
	return used_offset(size) + 6u + 8u * size;
}

void virtq_init(struct virtq *q, uint16_t index, uint16_t size, void *mem)
{
	uint8_t *m = mem;
	memset(m, 0, virtq_mem_size(size));
	q->index = index;
	q->size = size;
	q->desc = (volatile struct virtq_desc *)m;
	q->avail = (volatile uint16_t *)(m + 16u * size);
	q->used = (volatile uint16_t *)(m + used_offset(size));
	q->used_ring = (volatile struct virtq_used_elem *)(m + used_offset(size) + 4);
	for (uint16_t i = 0; i < size; i++) {
		q->desc[i].next = (uint16_t)(i + 1 < size ? i + 1 : 0);
		q->chain_len[i] = 0;
	}
	q->free_head = 0;
	q->num_free = size;
	q->avail_idx = 0;
	q->last_used = 0;
	q->notify_addr = 0;
}

uint64_t virtq_desc_addr(const struct virtq *q) { return (uint64_t)(uintptr_t)q->desc; }
uint64_t virtq_avail_addr(const struct virtq *q) { return (uint64_t)(uintptr_t)q->avail; }
uint64_t virtq_used_addr(const struct virtq *q) { return (uint64_t)(uintptr_t)q->used; }

int virtq_add(struct virtq *q, const struct virtq_buf *out, unsigned n_out,
	      const struct virtq_buf *in, unsigned n_in)
{
	unsigned n = n_out + n_in;
	if (n == 0 || n > q->num_free)
		return -1;
	uint16_t head = q->free_head, d = head;
	for (unsigned i = 0; i < n; i++) {
		const struct virtq_buf *b = i < n_out ? &out[i] : &in[i - n_out];
		q->desc[d].addr = (uint64_t)(uintptr_t)b->addr;
		q->desc[d].len = b->len;
		q->desc[d].flags = (uint16_t)((i < n_out ? 0 : VIRTQ_DESC_F_WRITE) |
					      (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		d = q->desc[d].next; /* free list link, or already the chain link */
	}
	q->free_head = d;
	q->num_free = (uint16_t)(q->num_free - n);
	q->chain_len[head] = (uint16_t)n;

	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	barrier(); /* descriptors and ring entry before the index */
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	barrier(); /* index before the caller's notify */
	return head;
}

int virtq_get_used(struct virtq *q, uint32_t *len)
{
	if (q->used[1] == q->last_used)
		return -1;
	barrier(); /* index before the entry */
	volatile struct virtq_used_elem *e = &q->used_ring[q->last_used & (q->size - 1)];
	uint32_t id = e->id, l = e->len;
	q->last_used++;
	if (id >= q->size || q->chain_len[id] == 0)
		return -2;
	/* Return the chain to the free list: its descriptors are still linked. */
	uint16_t n = q->chain_len[id], d = (uint16_t)id;
	for (uint16_t i = 1; i < n; i++)
		d = q->desc[d].next;
	q->desc[d].next = q->free_head;
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n);
	q->chain_len[id] = 0;
	if (len)
		*len = l;
	return (int)id;
}
