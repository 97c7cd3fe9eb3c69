/* virtio-blk driver (virtio 1.x, section 5.2) on the modern PCI transport,
 * polled, one request in flight per queue. */
#ifndef VIRTIO_BLK_H
#define VIRTIO_BLK_H

#include <stdint.h>

#include "virtio_pci.h"
#include "virtq.h"

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_BLK_PCI_ID VIRTIO_PCI_MODERN_ID(VIRTIO_ID_BLOCK) /* 0x1042 */
#define VIRTIO_BLK_PCI_TRANSITIONAL_ID 0x1001

/* Feature bits */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* Request types */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

/* Status byte */
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VBLK_SECTOR 512u
#define VBLK_MAX_QUEUES 16
#define VBLK_QUEUE_SIZE 64 /* at most; less if the device offers less */
#define VBLK_RING_BYTES 4096
#define VBLK_ID_BYTES 20

/* Result of a request that did not complete: */
#define VBLK_TIMEOUT (-1) /* no used entry within ~10 s (CHECK FAIL printed) */
#define VBLK_BROKEN (-2)  /* the device misbehaved earlier or now */

struct virtio_blk_outhdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

struct vblk {
	/* The rings, one page per queue; first for alignment. */
	uint8_t ring_mem[VBLK_MAX_QUEUES][VBLK_RING_BYTES] __attribute__((aligned(4096)));
	struct {
		struct virtio_blk_outhdr hdr;
		uint8_t status;
		uint8_t pad[15];
	} req[VBLK_MAX_QUEUES];
	uint8_t dwz[VBLK_MAX_QUEUES][16]; /* discard/write-zeroes segment */
	struct virtq q[VBLK_MAX_QUEUES];
	struct vpci_dev pci;
	char name[16];           /* "00:04.0" */
	uint64_t capacity;       /* 512-byte sectors */
	uint32_t seg_max, blk_size;
	uint32_t max_discard_sectors, max_discard_seg;
	uint32_t max_wz_sectors, max_wz_seg;
	uint16_t dev_queues;     /* num_queues (1 without MQ) */
	uint16_t nq;             /* queues set up: min(dev_queues, VBLK_MAX_QUEUES) */
	int ro;
	int broken;
	unsigned requests;
};

/* Open the PCI function, run the init sequence, accept VERSION_1 plus
 * whichever of SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES, MQ, RO (and
 * ACCESS_PLATFORM) the device offers, set up the queues, DRIVER_OK. 0 on
 * success; otherwise a CHECK FAIL was printed. */
/* How long a request may take before it counts as timed out (blktimeout=). */
extern uint32_t vblk_timeout_ms;

int vblk_init(struct vblk *b, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w);
/* Reset the device (stops it touching our memory). */
void vblk_close(struct vblk *b);
static inline int vblk_has(const struct vblk *b, unsigned bit)
{
	return (int)((b->pci.accepted >> bit) & 1);
}

/* One request on queue qi: header, the data buffers (device-readable for
 * write-like types, device-writable when data_in), status byte. Returns the
 * status byte (0-255), VBLK_TIMEOUT or VBLK_BROKEN. */
int vblk_request(struct vblk *b, unsigned qi, uint32_t type, uint64_t sector,
		 const struct virtq_buf *data, unsigned n, int data_in);
/* Read or write len bytes at sector, split in descriptors of at most seg
 * bytes (and in several requests if the device's seg_max or the queue size
 * needs it). Returns the first non-zero status, or 0. */
int vblk_rw(struct vblk *b, unsigned qi, int write, uint64_t sector, void *buf, uint32_t len,
	    uint32_t seg);
int vblk_flush(struct vblk *b);
/* GET_ID into id (NUL-terminated, at most 20 characters). */
int vblk_get_id(struct vblk *b, char id[VBLK_ID_BYTES + 1]);
/* DISCARD or WRITE_ZEROES of nsect sectors, split by the device's maximum. */
int vblk_discard_wz(struct vblk *b, uint32_t type, uint64_t sector, uint64_t nsect);

#endif
