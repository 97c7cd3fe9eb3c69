/* virtio-blk over modern virtio-pci, polled. See virtio_blk.h. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "virtio_blk.h"

/* struct virtio_blk_config */
#define CFG_CAPACITY 0x00
#define CFG_SEG_MAX 0x0c
#define CFG_BLK_SIZE 0x14
#define CFG_NUM_QUEUES 0x22
#define CFG_MAX_DISCARD_SECTORS 0x24
#define CFG_MAX_DISCARD_SEG 0x28
#define CFG_MAX_WZ_SECTORS 0x30
#define CFG_MAX_WZ_SEG 0x34

/*
 * Polling: first spin on the used ring (plain memory reads, no VM exits),
 * then wait in 1 ms PIT steps, so the timeout is real time even where each
 * port access of a finer delay costs far more than the delay itself.
 */
#define POLL_SPINS 100000
uint32_t vblk_timeout_ms = 10000;

#define BIT(n) ((uint64_t)1 << (n))

static const uint64_t wanted_features =
	BIT(VIRTIO_F_VERSION_1) | BIT(VIRTIO_F_ACCESS_PLATFORM) | BIT(VIRTIO_BLK_F_SEG_MAX) |
	BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_FLUSH) | BIT(VIRTIO_BLK_F_DISCARD) |
	BIT(VIRTIO_BLK_F_WRITE_ZEROES) | BIT(VIRTIO_BLK_F_MQ) | BIT(VIRTIO_BLK_F_RO);

int vblk_init(struct vblk *b, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w)
{
	b->broken = 1;
	b->requests = 0;
	b->nq = 0;
	char *n = b->name;
	const char *hex = "0123456789abcdef";
	n[0] = hex[PCI_BUS(bdf) >> 4];
	n[1] = hex[PCI_BUS(bdf) & 15];
	n[2] = ':';
	n[3] = hex[PCI_DEV(bdf) >> 4];
	n[4] = hex[PCI_DEV(bdf) & 15];
	n[5] = '.';
	n[6] = hex[PCI_FN(bdf)];
	n[7] = 0;
	char who[24] = "blk ";
	memcpy(who + 4, n, 8);

	struct vpci_dev *d = &b->pci;
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
	if (vpci_set_features(d, d->features & wanted_features) != 0) {
		check_fail("%s FEATURES_OK did not stick (features 0x%lx)", who, d->accepted);
		return -1;
	}

	b->capacity = vpci_cfg64(d, CFG_CAPACITY);
	b->seg_max = vblk_has(b, VIRTIO_BLK_F_SEG_MAX) ? vpci_cfg32(d, CFG_SEG_MAX) : 0;
	b->blk_size = vblk_has(b, VIRTIO_BLK_F_BLK_SIZE) ? vpci_cfg32(d, CFG_BLK_SIZE) : VBLK_SECTOR;
	b->ro = vblk_has(b, VIRTIO_BLK_F_RO);
	b->dev_queues = vblk_has(b, VIRTIO_BLK_F_MQ) ? vpci_cfg16(d, CFG_NUM_QUEUES) : 1;
	if (b->dev_queues == 0) {
		check_fail("%s MQ with num_queues=0", who);
		b->dev_queues = 1;
	}
	if (b->dev_queues > d->num_queues) {
		check_fail("%s num_queues=%u but the common config has %u", who, b->dev_queues,
			   d->num_queues);
		b->dev_queues = d->num_queues ? d->num_queues : 1;
	}
	if (vblk_has(b, VIRTIO_BLK_F_DISCARD)) {
		b->max_discard_sectors = vpci_cfg32(d, CFG_MAX_DISCARD_SECTORS);
		b->max_discard_seg = vpci_cfg32(d, CFG_MAX_DISCARD_SEG);
	}
	if (vblk_has(b, VIRTIO_BLK_F_WRITE_ZEROES)) {
		b->max_wz_sectors = vpci_cfg32(d, CFG_MAX_WZ_SECTORS);
		b->max_wz_seg = vpci_cfg32(d, CFG_MAX_WZ_SEG);
	}

	b->nq = b->dev_queues < VBLK_MAX_QUEUES ? b->dev_queues : VBLK_MAX_QUEUES;
	for (uint16_t i = 0; i < b->nq; i++) {
		if (vpci_setup_queue(d, &b->q[i], i, VBLK_QUEUE_SIZE, b->ring_mem[i]) != 0) {
			check_fail("%s queue %u: size 0 or notify offset outside the notify region", who, i);
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
	b->broken = 0;
	return 0;
}

void vblk_close(struct vblk *b)
{
	if (b->pci.common && vpci_reset(&b->pci) != 0)
		check_fail("blk %s reset did not complete", b->name);
	b->broken = 1;
}

int vblk_request(struct vblk *b, unsigned qi, uint32_t type, uint64_t sector,
		 const struct virtq_buf *data, unsigned n, int data_in)
{
	if (b->broken || qi >= b->nq)
		return VBLK_BROKEN;
	struct virtq *q = &b->q[qi];
	struct virtq_buf out[VBLK_QUEUE_SIZE], in[VBLK_QUEUE_SIZE];
	unsigned n_out = 0, n_in = 0;
	if (n + 2 > q->size)
		return VBLK_BROKEN;

	b->req[qi].hdr.type = type;
	b->req[qi].hdr.ioprio = 0;
	b->req[qi].hdr.sector = sector;
	b->req[qi].status = 0xff; /* the device must overwrite it */
	out[n_out].addr = &b->req[qi].hdr;
	out[n_out++].len = sizeof(b->req[qi].hdr);
	for (unsigned i = 0; i < n; i++) {
		if (data_in)
			in[n_in++] = data[i];
		else
			out[n_out++] = data[i];
	}
	in[n_in].addr = &b->req[qi].status;
	in[n_in++].len = 1;

	int head = virtq_add(q, out, n_out, in, n_in);
	if (head < 0) {
		check_fail("blk %s queue %u: no free descriptors", b->name, qi);
		b->broken = 1;
		return VBLK_BROKEN;
	}
	vpci_notify(q);
	b->requests++;

	uint32_t len = 0;
	int id = -1;
	for (uint32_t i = 0; i < POLL_SPINS + vblk_timeout_ms; i++) {
		id = virtq_get_used(q, &len);
		if (id != -1)
			break;
		if (i >= POLL_SPINS)
			delay_ms(1);
	}
	if (id == -1) {
		check_fail("blk %s queue %u: request type %u sector %lu timed out", b->name, qi, type,
			   sector);
		b->broken = 1;
		return VBLK_TIMEOUT;
	}
	if (id != head) {
		check_fail("blk %s queue %u: used id %d, expected %d", b->name, qi, id, head);
		b->broken = 1;
		return VBLK_BROKEN;
	}
	(void)vpci_read_isr(&b->pci);
	barrier();
	return b->req[qi].status;
}

int vblk_rw(struct vblk *b, unsigned qi, int write, uint64_t sector, void *buf, uint32_t len,
	    uint32_t seg)
{
	if (qi >= b->nq)
		return VBLK_BROKEN;
	struct virtq_buf data[VBLK_QUEUE_SIZE];
	unsigned max_segs = (unsigned)b->q[qi].size - 2;
	if (b->seg_max && b->seg_max < max_segs)
		max_segs = b->seg_max;
	uint8_t *p = buf;
	while (len) {
		unsigned n = 0;
		uint32_t chunk = 0;
		while (n < max_segs && chunk < len) {
			uint32_t l = len - chunk < seg ? len - chunk : seg;
			data[n].addr = p + chunk;
			data[n++].len = l;
			chunk += l;
		}
		int st = vblk_request(b, qi, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector, data, n,
				      !write);
		if (st != 0)
			return st;
		p += chunk;
		sector += chunk / VBLK_SECTOR;
		len -= chunk;
	}
	return 0;
}

int vblk_flush(struct vblk *b)
{
	return vblk_request(b, 0, VIRTIO_BLK_T_FLUSH, 0, 0, 0, 0);
}

int vblk_get_id(struct vblk *b, char id[VBLK_ID_BYTES + 1])
{
	static char raw[VBLK_ID_BYTES];
	memset(raw, 0, sizeof(raw));
	struct virtq_buf data = { raw, VBLK_ID_BYTES };
	int st = vblk_request(b, 0, VIRTIO_BLK_T_GET_ID, 0, &data, 1, 1);
	unsigned i = 0;
	if (st == 0)
		for (; i < VBLK_ID_BYTES && raw[i]; i++)
			id[i] = raw[i] > ' ' && raw[i] < 0x7f ? raw[i] : '.';
	id[i] = 0;
	return st;
}

int vblk_discard_wz(struct vblk *b, uint32_t type, uint64_t sector, uint64_t nsect)
{
	uint32_t max = type == VIRTIO_BLK_T_DISCARD ? b->max_discard_sectors : b->max_wz_sectors;
	if (max == 0)
		max = 0xffffffffu;
	uint8_t *seg = b->dwz[0];
	while (nsect) {
		uint32_t n = nsect < max ? (uint32_t)nsect : max;
		/* struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags */
		memcpy(seg, &sector, 8);
		memcpy(seg + 8, &n, 4);
		memset(seg + 12, 0, 4);
		struct virtq_buf data = { seg, 16 };
		int st = vblk_request(b, 0, type, 0, &data, 1, 0);
		if (st != 0)
			return st;
		sector += n;
		nsect -= n;
	}
	return 0;
}
