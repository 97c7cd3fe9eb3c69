/* virtio-net over modern virtio-pci, polled. See virtio_net.h. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "virtio_net.h"

/* struct virtio_net_config */
#define CFG_MAC 0x00
#define CFG_STATUS 0x06
#define CFG_MAX_PAIRS 0x08
#define CFG_MTU 0x0a

#define CC_NUMQ 0x12 /* virtio_pci_common_cfg.num_queues */

/* Control queue */
#define CTRL_MQ 4
#define CTRL_MQ_VQ_PAIRS_SET 0
#define CTRL_OK 0

#define POLL_SPINS 100000
uint32_t vnet_timeout_ms = 10000;

#define BIT(n) ((uint64_t)1 << (n))

static const uint64_t wanted_features =
	BIT(VIRTIO_F_VERSION_1) | BIT(VIRTIO_F_ACCESS_PLATFORM) | BIT(VIRTIO_NET_F_MAC) |
	BIT(VIRTIO_NET_F_STATUS) | BIT(VIRTIO_NET_F_MTU) | BIT(VIRTIO_NET_F_MRG_RXBUF) |
	BIT(VIRTIO_NET_F_CTRL_VQ) | BIT(VIRTIO_NET_F_MQ);

/* Rings, rx/tx buffers: not zeroed at boot (NOLOAD .noinit), always
 * initialised before use (virtq_init zeroes the rings). 2 MiB: a queue pair
 * takes 4 KiB + 4 KiB of rings and 128 KiB + 64 KiB of buffers. */
#define POOL_BYTES (2u << 20)
static uint8_t pool[POOL_BYTES] __attribute__((section(".noinit.net"), aligned(4096)));
static uint32_t pool_used;

void *vnet_alloc(uint32_t len)
{
	len = (len + 4095) & ~4095u;
	if (len > POOL_BYTES - pool_used)
		return 0;
	void *p = pool + pool_used;
	pool_used += len;
	return p;
}

void vnet_pool_reset(void) { pool_used = 0; }

static void post_rx(struct vnet *n, unsigned qi)
{
	struct virtq *q = &n->rxq[qi];
	while (q->num_free) {
		/* One descriptor per chain: the head is the free-list head, and
		 * buffer i belongs to descriptor i. */
		struct virtq_buf b = { n->rx_buf[qi] + (uint32_t)q->free_head * VNET_BUF, VNET_BUF };
		if (virtq_add(q, 0, 0, &b, 1) < 0)
			break;
		n->rx_posted[qi]++;
	}
}

void vnet_rx_kick(struct vnet *n, unsigned qi)
{
	if (qi < n->pairs && n->rx_posted[qi]) {
		n->rx_posted[qi] = 0;
		vpci_notify(&n->rxq[qi]);
	}
}

static int ctrl_cmd(struct vnet *n, uint8_t cls, uint8_t cmd, const void *data, uint32_t len)
{
	uint8_t *c = n->ctrl_buf;
	c[0] = cls;
	c[1] = cmd;
	memcpy(c + 2, data, len);
	c[15] = 0xff; /* ack, preset: the device must overwrite it */
	struct virtq_buf out[2] = { { c, 2 }, { c + 2, len } };
	struct virtq_buf in = { c + 15, 1 };
	if (virtq_add(&n->ctrlq, out, 2, &in, 1) < 0)
		return -1;
	vpci_notify(&n->ctrlq);
	int id = -1;
	for (uint32_t i = 0; i < POLL_SPINS + vnet_timeout_ms && id == -1; i++) {
		id = virtq_get_used(&n->ctrlq, 0);
		if (id == -1 && i >= POLL_SPINS)
			delay_ms(1);
	}
	if (id < 0)
		return -1;
	barrier();
	return c[15];
}

int vnet_init(struct vnet *n, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w, unsigned want_pairs)
{
	memset(n, 0, sizeof(*n));
	n->broken = 1;
	const char *hex = "0123456789abcdef";
	char *nm = n->name;
	nm[0] = hex[PCI_BUS(bdf) >> 4];
	nm[1] = hex[PCI_BUS(bdf) & 15];
	nm[2] = ':';
	nm[3] = hex[PCI_DEV(bdf) >> 4];
	nm[4] = hex[PCI_DEV(bdf) & 15];
	nm[5] = '.';
	nm[6] = hex[PCI_FN(bdf)];
	nm[7] = 0;
	char who[24] = "net ";
	memcpy(who + 4, nm, 8);

	struct vpci_dev *d = &n->pci;
	if (vpci_open(d, a, bdf, w, who) != 0)
		return -1;
	if (!d->device_cfg) {
		check_fail("%s no device config capability", who);
		return -1;
	}
	if (vpci_begin_init(d) != 0) {
		check_fail("%s reset did not complete (status 0x%x)", who, vpci_status(d));
		return -1;
	}
	if (!(d->features & BIT(VIRTIO_F_VERSION_1))) {
		check_fail("%s does not offer VIRTIO_F_VERSION_1 (features 0x%lx)", who, d->features);
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}
	uint64_t f = d->features & wanted_features;
	if (!(f & BIT(VIRTIO_NET_F_CTRL_VQ)))
		f &= ~BIT(VIRTIO_NET_F_MQ); /* MQ needs the control queue */
	if (vpci_set_features(d, f) != 0) {
		check_fail("%s FEATURES_OK did not stick (features 0x%lx)", who, d->accepted);
		return -1;
	}

	if (vnet_has(n, VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			n->mac[i] = vpci_cfg8(d, CFG_MAC + (uint32_t)i);
	} else {
		/* Locally administered, from the slot. */
		static const uint8_t m[6] = { 0x52, 0x54, 0x00, 0x7e, 0x00, 0x00 };
		memcpy(n->mac, m, 6);
		n->mac[5] = (uint8_t)bdf;
	}
	n->status = vnet_has(n, VIRTIO_NET_F_STATUS) ? vpci_cfg16(d, CFG_STATUS) : 1;
	n->mtu = vnet_has(n, VIRTIO_NET_F_MTU) ? vpci_cfg16(d, CFG_MTU) : 1500;
	n->max_pairs = vnet_has(n, VIRTIO_NET_F_MQ) ? vpci_cfg16(d, CFG_MAX_PAIRS) : 1;
	if (n->max_pairs == 0) {
		check_fail("%s MQ with max_virtqueue_pairs=0", who);
		n->max_pairs = 1;
	}
	/* num_queues again: a device may size its queue set by the negotiated
	 * features (QEMU has 3 queues before MQ is accepted, 2 * max + 1 after). */
	d->num_queues = mmio_read16(d->common + CC_NUMQ);
	unsigned nvq = 2u * n->max_pairs + (vnet_has(n, VIRTIO_NET_F_CTRL_VQ) ? 1u : 0u);
	if (nvq > d->num_queues) {
		check_fail("%s needs %u queues, the common config has %u", who, nvq, d->num_queues);
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}
	unsigned pairs = want_pairs ? want_pairs : 1;
	if (pairs > n->max_pairs)
		pairs = n->max_pairs;
	if (pairs > VNET_MAX_QP)
		pairs = VNET_MAX_QP;
	n->pairs = (uint16_t)pairs;

	for (unsigned i = 0; i < pairs; i++) {
		void *rr = vnet_alloc(4096), *tr = vnet_alloc(4096);
		n->rx_buf[i] = vnet_alloc(VNET_RX_SIZE * VNET_BUF);
		n->tx_buf[i] = vnet_alloc(VNET_TX_SIZE * VNET_BUF);
		if (!rr || !tr || !n->rx_buf[i] || !n->tx_buf[i]) {
			check_fail("%s out of buffer memory at queue pair %u", who, i);
			vpci_add_status(d, VIRTIO_STATUS_FAILED);
			return -1;
		}
		if (vpci_setup_queue(d, &n->rxq[i], (uint16_t)(2 * i), VNET_RX_SIZE, rr) != 0 ||
		    vpci_setup_queue(d, &n->txq[i], (uint16_t)(2 * i + 1), VNET_TX_SIZE, tr) != 0) {
			check_fail("%s queue pair %u: size 0 or notify offset outside the notify region",
				   who, i);
			vpci_add_status(d, VIRTIO_STATUS_FAILED);
			return -1;
		}
		post_rx(n, i);
	}
	if (vnet_has(n, VIRTIO_NET_F_CTRL_VQ)) {
		void *cr = vnet_alloc(4096);
		n->ctrl_buf = vnet_alloc(4096);
		if (!cr || !n->ctrl_buf ||
		    vpci_setup_queue(d, &n->ctrlq, (uint16_t)(2 * n->max_pairs), 8, cr) != 0) {
			check_fail("%s control queue setup failed", who);
			vpci_add_status(d, VIRTIO_STATUS_FAILED);
			return -1;
		}
	}
	vpci_driver_ok(d);
	uint8_t st = vpci_status(d);
	if ((st & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) ||
	    !(st & VIRTIO_STATUS_DRIVER_OK)) {
		check_fail("%s status 0x%x after DRIVER_OK", who, st);
		return -1;
	}
	for (unsigned i = 0; i < pairs; i++)
		vnet_rx_kick(n, i);
	if (pairs > 1) {
		uint16_t np = (uint16_t)pairs;
		int ack = ctrl_cmd(n, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &np, 2);
		if (ack != CTRL_OK) {
			check_fail("%s VQ_PAIRS_SET %u ack=%d", who, pairs, ack);
			return -1;
		}
	}
	n->broken = 0;
	return 0;
}

void vnet_close(struct vnet *n)
{
	if (n->pci.common && vpci_reset(&n->pci) != 0)
		check_fail("net %s reset did not complete", n->name);
	n->broken = 1;
}

void vnet_tx_reclaim(struct vnet *n)
{
	for (unsigned i = 0; i < n->pairs; i++) {
		int id;
		while ((id = virtq_get_used(&n->txq[i], 0)) != -1)
			if (id == -2 && !n->broken) {
				check_fail("net %s tx queue %u: bad used id", n->name, i);
				n->broken = 1;
			}
	}
}

uint8_t *vnet_tx_begin(struct vnet *n, unsigned qi)
{
	if (n->broken || qi >= n->pairs)
		return 0;
	struct virtq *q = &n->txq[qi];
	if (q->num_free == 0)
		vnet_tx_flush(n, qi);
	for (uint32_t i = 0; q->num_free == 0; i++) {
		vnet_tx_reclaim(n);
		if (q->num_free)
			break;
		if (i >= POLL_SPINS + vnet_timeout_ms) {
			check_fail("net %s tx queue %u: no buffer freed in %u ms", n->name, qi,
				   vnet_timeout_ms);
			n->broken = 1;
			return 0;
		}
		if (i >= POLL_SPINS)
			delay_ms(1);
	}
	uint8_t *b = n->tx_buf[qi] + (uint32_t)q->free_head * VNET_BUF;
	memset(b, 0, VNET_HDR_LEN); /* flags 0, gso NONE, num_buffers 0 */
	return b + VNET_HDR_LEN;
}

int vnet_tx_commit(struct vnet *n, unsigned qi, uint32_t frame_len)
{
	struct virtq *q = &n->txq[qi];
	if (frame_len > VNET_TX_MAX)
		return -1;
	struct virtq_buf b = { n->tx_buf[qi] + (uint32_t)q->free_head * VNET_BUF,
			       VNET_HDR_LEN + frame_len };
	if (virtq_add(q, &b, 1, 0, 0) < 0)
		return -1;
	if (n->tx_defer)
		n->tx_pending[qi]++;
	else
		vpci_notify(q);
	n->tx_frames++;
	return 0;
}

void vnet_tx_flush(struct vnet *n, unsigned qi)
{
	if (qi < n->pairs && n->tx_pending[qi]) {
		n->tx_pending[qi] = 0;
		vpci_notify(&n->txq[qi]);
	}
}

static uint8_t frame_buf[VNET_FRAME_MAX];

int vnet_rx(struct vnet *n, unsigned qi, const uint8_t **frame)
{
	if (n->broken || qi >= n->pairs)
		return -1;
	struct virtq *q = &n->rxq[qi];
	uint32_t len;
	int id = virtq_get_used(q, &len);
	if (id == -1)
		return -1;
	if (id < 0) {
		check_fail("net %s rx queue %u: bad used id", n->name, qi);
		n->broken = 1;
		return -1;
	}
	const uint8_t *b = n->rx_buf[qi] + (uint32_t)id * VNET_BUF;
	if (len > VNET_BUF)
		len = VNET_BUF;
	uint16_t nbuf = vnet_has(n, VIRTIO_NET_F_MRG_RXBUF) ? (uint16_t)(b[10] | b[11] << 8) : 1;
	int drop = len < VNET_HDR_LEN || nbuf == 0;
	uint32_t flen = 0;
	if (drop)
		nbuf = 1;
	if (!drop) {
		flen = len - VNET_HDR_LEN;
		memcpy(frame_buf, b + VNET_HDR_LEN, flen);
	}
	post_rx(n, qi); /* the buffer just copied goes back */
	/* MRG_RXBUF: the rest of the frame is in the next nbuf-1 used entries
	 * (published together with the first; no header in them). */
	for (uint16_t k = 1; k < nbuf; k++) {
		int id2 = -1;
		for (uint32_t i = 0; i < POLL_SPINS && id2 == -1; i++)
			id2 = virtq_get_used(q, &len);
		if (id2 < 0) {
			check_fail("net %s rx queue %u: num_buffers=%u but buffer %u missing", n->name,
				   qi, nbuf, k);
			n->broken = 1;
			return -1;
		}
		if (len > VNET_BUF)
			len = VNET_BUF;
		if (!drop && flen + len <= VNET_FRAME_MAX)
			memcpy(frame_buf + flen, n->rx_buf[qi] + (uint32_t)id2 * VNET_BUF, len);
		else
			drop = 1;
		flen += len;
		post_rx(n, qi);
		n->rx_merged++;
	}
	if (drop) {
		n->rx_dropped++;
		*frame = frame_buf;
		return 0;
	}
	n->rx_frames[qi]++;
	*frame = frame_buf;
	return (int)flen;
}
