/* virtio-scsi over modern virtio-pci, polled. See virtio_scsi.h. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "serial.h"
#include "virtio_scsi.h"

/* struct virtio_scsi_config */
#define CFG_NUM_QUEUES 0x00
#define CFG_SEG_MAX 0x04
#define CFG_MAX_SECTORS 0x08
#define CFG_CMD_PER_LUN 0x0c
#define CFG_EVENT_INFO_SIZE 0x10
#define CFG_SENSE_SIZE 0x14
#define CFG_CDB_SIZE 0x18
#define CFG_MAX_CHANNEL 0x1c
#define CFG_MAX_TARGET 0x1e
#define CFG_MAX_LUN 0x20

#define Q_CONTROL 0
#define Q_EVENT 1
#define Q_REQUEST 2

/* Polling as in virtio_blk.c: spin on the used ring, then 1 ms PIT steps. */
#define POLL_SPINS 100000
uint32_t vscsi_timeout_ms = 10000;

#define BIT(n) ((uint64_t)1 << (n))

static const uint64_t wanted_features = BIT(VIRTIO_F_VERSION_1) | BIT(VIRTIO_F_ACCESS_PLATFORM);

static void bdf_name(char *n, uint16_t bdf)
{
	const char *hex = "0123456789abcdef";
	n[0] = hex[PCI_BUS(bdf) >> 4];
	n[1] = hex[PCI_BUS(bdf) & 15];
	n[2] = ':';
	n[3] = hex[PCI_DEV(bdf) >> 4];
	n[4] = hex[PCI_DEV(bdf) & 15];
	n[5] = '.';
	n[6] = hex[PCI_FN(bdf)];
	n[7] = 0;
}

int vscsi_init(struct vscsi *s, const struct pci_access *a, uint16_t bdf,
	       const struct vpci_window *w)
{
	s->broken = 1;
	s->requests = 0;
	s->nq = 0;
	s->next_id = 1;
	bdf_name(s->name, bdf);
	char who[24] = "scsi ";
	memcpy(who + 5, s->name, 8);

	struct vpci_dev *d = &s->pci;
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
	uint64_t want = wanted_features | (s->hotplug ? BIT(VIRTIO_SCSI_F_HOTPLUG) : 0);
	if (vpci_set_features(d, d->features & want) != 0) {
		check_fail("%s FEATURES_OK did not stick (features 0x%lx)", who, d->accepted);
		return -1;
	}

	s->num_queues = vpci_cfg32(d, CFG_NUM_QUEUES);
	s->seg_max = vpci_cfg32(d, CFG_SEG_MAX);
	s->max_sectors = vpci_cfg32(d, CFG_MAX_SECTORS);
	s->cmd_per_lun = vpci_cfg32(d, CFG_CMD_PER_LUN);
	s->event_info_size = vpci_cfg32(d, CFG_EVENT_INFO_SIZE);
	s->sense_size = vpci_cfg32(d, CFG_SENSE_SIZE);
	s->cdb_size = vpci_cfg32(d, CFG_CDB_SIZE);
	s->max_channel = vpci_cfg16(d, CFG_MAX_CHANNEL);
	s->max_target = vpci_cfg16(d, CFG_MAX_TARGET);
	s->max_lun = vpci_cfg32(d, CFG_MAX_LUN);
	if (s->num_queues == 0) {
		check_fail("%s num_queues=0", who);
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}
	if (s->num_queues + 2 > d->num_queues) {
		check_fail("%s num_queues=%u but the common config has %u queues", who,
			   s->num_queues, d->num_queues);
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}
	/* This driver's request and response layouts are the defaults. */
	if (s->cdb_size != VSCSI_CDB_SIZE || s->sense_size != VSCSI_SENSE_SIZE) {
		check_fail("%s cdb_size=%u sense_size=%u, expected %u and %u", who, s->cdb_size,
			   s->sense_size, VSCSI_CDB_SIZE, VSCSI_SENSE_SIZE);
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}

	s->nq = s->num_queues < VSCSI_MAX_QUEUES ? (uint16_t)s->num_queues : VSCSI_MAX_QUEUES;
	for (uint16_t i = 0; i < 2 + s->nq; i++) {
		if (vpci_setup_queue(d, &s->q[i], i, VSCSI_QUEUE_SIZE, s->ring_mem[i]) != 0) {
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
	/* Event buffers, as a driver keeps them posted (vscsi_event reads them). */
	struct virtq *eq = &s->q[Q_EVENT];
	for (unsigned i = 0; i < VSCSI_EVENTS; i++) {
		struct virtq_buf b = { s->events[i], sizeof(s->events[i]) };
		s->ev_head[i] = virtq_add(eq, 0, 0, &b, 1);
	}
	vpci_notify(eq);
	s->broken = 0;
	return 0;
}

void vscsi_close(struct vscsi *s)
{
	if (s->pci.common && vpci_reset(&s->pci) != 0)
		check_fail("scsi %s reset did not complete", s->name);
	s->broken = 1;
}

/* Waits for the chain `head` on q; 0, or VSCSI_TIMEOUT / VSCSI_BROKEN. */
static int wait_used(struct vscsi *s, struct virtq *q, int head, uint32_t *len, const char *what)
{
	int id = -1;
	for (uint32_t i = 0; i < POLL_SPINS + vscsi_timeout_ms; i++) {
		id = virtq_get_used(q, len);
		if (id != -1)
			break;
		if (i >= POLL_SPINS)
			delay_ms(1);
	}
	if (id == -1) {
		check_fail("scsi %s queue %u: %s timed out", s->name, q->index, what);
		s->broken = 1;
		return VSCSI_TIMEOUT;
	}
	if (id != head) {
		check_fail("scsi %s queue %u: used id %d, expected %d", s->name, q->index, id, head);
		s->broken = 1;
		return VSCSI_BROKEN;
	}
	(void)vpci_read_isr(&s->pci);
	barrier();
	return 0;
}

static void put_lun(uint8_t *p, uint16_t lun)
{
	p[0] = 1;
	p[1] = 0; /* target */
	p[2] = (uint8_t)(0x40 | ((lun >> 8) & 0x3f));
	p[3] = (uint8_t)lun;
	memset(p + 4, 0, 4);
}

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data. */
static void decode_sense(struct vscsi_result *r)
{
	r->key = r->asc = r->ascq = 0;
	uint32_t n = r->sense_len < VSCSI_SENSE_SIZE ? r->sense_len : VSCSI_SENSE_SIZE;
	if (n < 4)
		return;
	uint8_t code = r->sense[0] & 0x7f;
	if ((code == 0x70 || code == 0x71) && n >= 14) {
		r->key = r->sense[2] & 0x0f;
		r->asc = r->sense[12];
		r->ascq = r->sense[13];
	} else if (code == 0x72 || code == 0x73) {
		r->key = r->sense[1] & 0x0f;
		r->asc = r->sense[2];
		r->ascq = r->sense[3];
	}
}

int vscsi_cmd(struct vscsi *s, unsigned qi, uint16_t lun, const uint8_t *cdb, unsigned cdb_len,
	      const struct virtq_buf *data, unsigned n, int data_in, struct vscsi_result *r)
{
	if (s->broken || qi >= s->nq || cdb_len > VSCSI_CDB_SIZE || n > VSCSI_MAX_BUFS)
		return VSCSI_BROKEN;
	struct virtq *q = &s->q[Q_REQUEST + qi];
	if (n + 2 > q->size)
		return VSCSI_BROKEN;
	struct virtq_buf out[VSCSI_MAX_BUFS + 1], in[VSCSI_MAX_BUFS + 1];
	unsigned n_out = 0, n_in = 0;

	/* struct virtio_scsi_req_cmd: lun[8], id, task_attr, prio, crn, cdb[32] */
	uint8_t *h = s->req;
	memset(h, 0, VSCSI_REQ_BYTES);
	put_lun(h, lun);
	uint64_t id = s->next_id++;
	memcpy(h + 8, &id, 8);
	memcpy(h + 19, cdb, cdb_len);
	/* struct virtio_scsi_cmd_resp: the device must overwrite it. */
	memset(s->resp, 0xff, VSCSI_RESP_BYTES);

	out[n_out].addr = h;
	out[n_out++].len = VSCSI_REQ_BYTES;
	in[n_in].addr = s->resp;
	in[n_in++].len = VSCSI_RESP_BYTES;
	for (unsigned i = 0; i < n; i++) {
		if (data_in)
			in[n_in++] = data[i];
		else
			out[n_out++] = data[i];
	}
	int head = virtq_add(q, out, n_out, in, n_in);
	if (head < 0) {
		check_fail("scsi %s queue %u: no free descriptors", s->name, q->index);
		s->broken = 1;
		return VSCSI_BROKEN;
	}
	vpci_notify(q);
	s->requests++;
	uint32_t len = 0;
	int st = wait_used(s, q, head, &len, "command");
	if (st != 0)
		return st;
	r->used_len = len;
	r->sense_len = get_le32(s->resp);
	r->residual = get_le32(s->resp + 4);
	r->status = s->resp[10];
	r->response = s->resp[11];
	memcpy(r->sense, s->resp + 12, VSCSI_SENSE_SIZE);
	decode_sense(r);
	return 0;
}

int vscsi_event(struct vscsi *s, uint32_t *event, uint16_t *lun, uint32_t *reason)
{
	if (s->broken)
		return 0;
	struct virtq *eq = &s->q[Q_EVENT];
	uint32_t len = 0;
	int id = virtq_get_used(eq, &len);
	if (id < 0)
		return 0;
	unsigned i = 0;
	while (i < VSCSI_EVENTS && s->ev_head[i] != id)
		i++;
	if (i == VSCSI_EVENTS) {
		check_fail("scsi %s event queue: used id %d is no event buffer", s->name, id);
		s->broken = 1;
		return 0;
	}
	barrier();
	const uint8_t *e = s->events[i];
	*event = get_le32(e);
	/* lun[8] at 4: 1, target 0, then flat (0x40) or peripheral addressing. */
	if (e[4] == 1 && e[5] == 0)
		*lun = (uint16_t)((e[6] & 0x3f) << 8 | e[7]);
	else
		*lun = 0xffff;
	*reason = get_le32(e + 12);
	if (len < 16)
		kprintf("scsi %s event of %u bytes\n", s->name, len);
	struct virtq_buf b = { s->events[i], sizeof(s->events[i]) };
	s->ev_head[i] = virtq_add(eq, 0, 0, &b, 1);
	vpci_notify(eq);
	return 1;
}

int vscsi_tmf(struct vscsi *s, uint32_t subtype, uint16_t lun)
{
	if (s->broken)
		return VSCSI_BROKEN;
	/* struct virtio_scsi_ctrl_tmf_req: type, subtype, lun[8], tag;
	 * struct virtio_scsi_ctrl_tmf_resp: response (u8). */
	static uint8_t req[24], resp[4];
	uint32_t type = VIRTIO_SCSI_T_TMF;
	memset(req, 0, sizeof(req));
	memcpy(req, &type, 4);
	memcpy(req + 4, &subtype, 4);
	put_lun(req + 8, lun);
	memset(resp, 0xff, sizeof(resp));
	struct virtq_buf out = { req, sizeof(req) }, in = { resp, 1 };
	struct virtq *q = &s->q[Q_CONTROL];
	int head = virtq_add(q, &out, 1, &in, 1);
	if (head < 0) {
		s->broken = 1;
		return VSCSI_BROKEN;
	}
	vpci_notify(q);
	s->requests++;
	uint32_t len = 0;
	int st = wait_used(s, q, head, &len, "task management");
	if (st != 0)
		return st;
	return resp[0];
}
