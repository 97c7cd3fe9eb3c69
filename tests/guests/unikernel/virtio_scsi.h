/* virtio-scsi driver (virtio 1.x, section 5.6) on the modern PCI
 * transport, polled, one command in flight. Queue 0 is the control queue,
 * 1 the event queue, 2.. the request queues; commands go to the first
 * request queue. LUNs of target 0 are addressed flat (SAM-5, as Linux's
 * virtio_scsi does): lun[0]=1, lun[1]=target, lun[2..3]=0x4000|lun. */
#ifndef VIRTIO_SCSI_H
#define VIRTIO_SCSI_H

#include <stdint.h>

#include "virtio_pci.h"
#include "virtq.h"

#define VIRTIO_ID_SCSI 8
#define VIRTIO_SCSI_PCI_ID VIRTIO_PCI_MODERN_ID(VIRTIO_ID_SCSI) /* 0x1048 */
#define VIRTIO_SCSI_PCI_TRANSITIONAL_ID 0x1004

/* Feature bits */
#define VIRTIO_SCSI_F_INOUT 0
#define VIRTIO_SCSI_F_HOTPLUG 1
#define VIRTIO_SCSI_F_CHANGE 2
#define VIRTIO_SCSI_F_T10_PI 3

/* Response codes (virtio_scsi_cmd_resp.response) */
#define VIRTIO_SCSI_S_OK 0
#define VIRTIO_SCSI_S_OVERRUN 1
#define VIRTIO_SCSI_S_ABORTED 2
#define VIRTIO_SCSI_S_BAD_TARGET 3
#define VIRTIO_SCSI_S_RESET 4
#define VIRTIO_SCSI_S_BUSY 5
#define VIRTIO_SCSI_S_TRANSPORT_FAILURE 6
#define VIRTIO_SCSI_S_TARGET_FAILURE 7
#define VIRTIO_SCSI_S_NEXUS_FAILURE 8
#define VIRTIO_SCSI_S_FAILURE 9
#define VIRTIO_SCSI_S_FUNCTION_SUCCEEDED 10
#define VIRTIO_SCSI_S_FUNCTION_REJECTED 11
#define VIRTIO_SCSI_S_INCORRECT_LUN 12

/* Control queue: task management */
#define VIRTIO_SCSI_T_TMF 0
#define VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET 5

/* SCSI status */
#define SCSI_GOOD 0x00
#define SCSI_CHECK_CONDITION 0x02

/* The sizes this driver uses; the device's defaults. */
#define VSCSI_CDB_SIZE 32
#define VSCSI_SENSE_SIZE 96
#define VSCSI_REQ_BYTES (8 + 8 + 3 + VSCSI_CDB_SIZE)       /* 51 */
#define VSCSI_RESP_BYTES (4 + 4 + 2 + 1 + 1 + VSCSI_SENSE_SIZE) /* 108 */

#define VSCSI_MAX_QUEUES 4 /* request queues set up, at most */
#define VSCSI_QUEUE_SIZE 64
#define VSCSI_RING_BYTES 4096
#define VSCSI_EVENTS 4
#define VSCSI_MAX_BUFS 32 /* data descriptors per command */

/* Result of a command that did not complete: */
#define VSCSI_TIMEOUT (-1) /* no used entry within the timeout (CHECK FAIL printed) */
#define VSCSI_BROKEN (-2)  /* the device misbehaved earlier or now */

/* What one command came back with. */
struct vscsi_result {
	uint8_t response;   /* VIRTIO_SCSI_S_* */
	uint8_t status;     /* SCSI status */
	uint32_t sense_len;
	uint32_t residual;
	uint32_t used_len;  /* bytes the device says it wrote */
	uint8_t sense[VSCSI_SENSE_SIZE];
	/* Decoded fixed or descriptor format sense (0 when none). */
	uint8_t key, asc, ascq;
};

struct vscsi {
	/* Rings: control, event, then request queues, one page each. */
	uint8_t ring_mem[2 + VSCSI_MAX_QUEUES][VSCSI_RING_BYTES] __attribute__((aligned(4096)));
	uint8_t req[VSCSI_REQ_BYTES];
	uint8_t resp[VSCSI_RESP_BYTES];
	uint8_t events[VSCSI_EVENTS][16];
	struct virtq q[2 + VSCSI_MAX_QUEUES];
	struct vpci_dev pci;
	char name[16]; /* "00:04.0" */
	uint32_t num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size;
	uint32_t sense_size, cdb_size, max_lun;
	uint16_t max_channel, max_target;
	uint16_t nq; /* request queues set up */
	int hotplug; /* set before vscsi_init: negotiate VIRTIO_SCSI_F_HOTPLUG */
	int ev_head[VSCSI_EVENTS]; /* chain head of each posted event buffer */
	uint64_t next_id;
	int broken;
	unsigned requests;
};

/* How long a command may take before it counts as timed out (scsitimeout=). */
extern uint32_t vscsi_timeout_ms;

/* Open the PCI function, run the init sequence (VERSION_1, ACCESS_PLATFORM
 * if offered, HOTPLUG if s->hotplug; no T10 PI), read the config, set up the control,
 * event (with a few event buffers) and request queues, DRIVER_OK. 0 on
 * success; otherwise a CHECK FAIL was printed. */
int vscsi_init(struct vscsi *s, const struct pci_access *a, uint16_t bdf,
	       const struct vpci_window *w);
/* Reset the device (stops it touching our memory). */
void vscsi_close(struct vscsi *s);

/* One command to target 0, `lun`, on request queue qi: the CDB (at most 32
 * bytes, zero-padded), then data: n device-readable buffers when !data_in,
 * device-writable ones when data_in. Returns 0 with *r filled in, or
 * VSCSI_TIMEOUT / VSCSI_BROKEN. */
int vscsi_cmd(struct vscsi *s, unsigned qi, uint16_t lun, const uint8_t *cdb, unsigned cdb_len,
	      const struct virtq_buf *data, unsigned n, int data_in, struct vscsi_result *r);

/* Event types and transport reset reasons (struct virtio_scsi_event). */
#define VIRTIO_SCSI_T_TRANSPORT_RESET 1
#define VIRTIO_SCSI_T_EVENTS_MISSED 0x80000000u
#define VIRTIO_SCSI_EVT_RESET_RESCAN 1
#define VIRTIO_SCSI_EVT_RESET_REMOVED 2

/* Takes one event the device delivered, if any: 1 with *event, *lun (of
 * target 0; 0xffff if it addresses something else) and *reason filled in,
 * the buffer posted again; 0 when none is waiting. */
int vscsi_event(struct vscsi *s, uint32_t *event, uint16_t *lun, uint32_t *reason);

/* A task management function on the control queue; returns its response
 * byte, or VSCSI_TIMEOUT / VSCSI_BROKEN. */
int vscsi_tmf(struct vscsi *s, uint32_t subtype, uint16_t lun);

#endif
