/* virtio-net driver (virtio 1.x, section 5.1) on the modern PCI transport,
 * polled. No offloads: every frame carries the 12-byte virtio_net_hdr_v1
 * with flags 0 and gso_type NONE. One device-writable 2 KiB buffer per rx
 * descriptor (MRG_RXBUF frames that span several are gathered), one
 * device-readable buffer (header + frame) per tx descriptor. */
#ifndef VIRTIO_NET_H
#define VIRTIO_NET_H

#include <stdint.h>

#include "virtio_pci.h"
#include "virtq.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_NET_PCI_ID VIRTIO_PCI_MODERN_ID(VIRTIO_ID_NET) /* 0x1041 */
#define VIRTIO_NET_PCI_TRANSITIONAL_ID 0x1000

/* Feature bits */
#define VIRTIO_NET_F_MTU 3
#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS 16
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_MQ 22

#define VNET_HDR_LEN 12      /* struct virtio_net_hdr_v1 */
#define VNET_MAX_QP 8        /* queue pairs set up at most */
#define VNET_RX_SIZE 64      /* rx descriptors (= buffers) per rx queue, at most */
#define VNET_TX_SIZE 32      /* tx descriptors (= buffers) per tx queue, at most */
#define VNET_BUF 2048        /* bytes per rx/tx buffer (header included) */
#define VNET_FRAME_MAX 16384 /* largest (gathered) received frame kept */
#define VNET_TX_MAX (VNET_BUF - VNET_HDR_LEN)

struct vnet {
	struct vpci_dev pci;
	char name[8];            /* "00:03.0" */
	uint8_t mac[6];
	uint16_t status;         /* config status (1 = link up; 1 assumed without STATUS) */
	uint16_t mtu;            /* config mtu, 1500 without MTU */
	uint16_t max_pairs;      /* max_virtqueue_pairs (1 without MQ) */
	uint16_t pairs;          /* queue pairs in use */
	int broken;
	struct virtq rxq[VNET_MAX_QP], txq[VNET_MAX_QP], ctrlq;
	uint8_t *rx_buf[VNET_MAX_QP]; /* rxq[i].size buffers of VNET_BUF */
	uint8_t *tx_buf[VNET_MAX_QP]; /* txq[i].size buffers of VNET_BUF */
	uint8_t *ctrl_buf;            /* 16 bytes: class, cmd, data; ack at +8 */
	int rx_posted[VNET_MAX_QP];   /* buffers re-posted since the last notify */
	unsigned rx_frames[VNET_MAX_QP], tx_frames, rx_dropped, rx_merged;
	int tx_defer;                 /* 1: vnet_tx_commit leaves the notify to vnet_tx_flush */
	unsigned tx_pending[VNET_MAX_QP]; /* frames published but not notified (tx_defer) */
};

/* How long a wait for the device (free tx slot, control command) may take. */
extern uint32_t vnet_timeout_ms;

/* Carve `len` bytes (4 KiB aligned) out of the driver's static pool; 0 when
 * it is used up. vnet_pool_reset() frees everything (all devices closed). */
void *vnet_alloc(uint32_t len);
void vnet_pool_reset(void);

/* Open the function, negotiate VERSION_1 plus whichever of MAC, STATUS, MTU,
 * MRG_RXBUF, CTRL_VQ, MQ (with CTRL_VQ) and ACCESS_PLATFORM are offered,
 * set up want_pairs queue pairs (at most max_virtqueue_pairs and
 * VNET_MAX_QP) and the control queue, post the rx buffers, DRIVER_OK, and
 * with more than one pair VQ_PAIRS_SET. 0 on success; else CHECK FAIL
 * printed. */
int vnet_init(struct vnet *n, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w, unsigned want_pairs);
void vnet_close(struct vnet *n);
static inline int vnet_has(const struct vnet *n, unsigned bit)
{
	return (int)((n->pci.accepted >> bit) & 1);
}

/* Transmit: vnet_tx_begin returns where the Ethernet frame goes (at most
 * VNET_TX_MAX bytes) in the next free tx buffer of queue qi (waiting for the
 * device to free one), 0 on timeout/broken; vnet_tx_commit publishes it and
 * rings the doorbell. No other tx on qi in between. */
uint8_t *vnet_tx_begin(struct vnet *n, unsigned qi);
int vnet_tx_commit(struct vnet *n, unsigned qi, uint32_t frame_len);
/* With n->tx_defer set, commits only publish; this notifies queue qi once for
 * all of them (each notify is an exit). vnet_tx_begin flushes a full queue. */
void vnet_tx_flush(struct vnet *n, unsigned qi);
/* Free the tx buffers the device is done with. */
void vnet_tx_reclaim(struct vnet *n);

/* Receive: the next frame from rx queue qi (without the virtio header),
 * copied (gathered) into a static buffer valid until the next call; its
 * buffers are re-posted. Returns the frame length, 0 for a dropped one
 * (malformed, or longer than VNET_FRAME_MAX), -1 when none is there. */
int vnet_rx(struct vnet *n, unsigned qi, const uint8_t **frame);
/* Doorbell for re-posted rx buffers (call after a batch of vnet_rx). */
void vnet_rx_kick(struct vnet *n, unsigned qi);

#endif
