/* Modern (virtio 1.x) PCI transport, polled: finds virtio functions on bus
 * 0, walks the vendor capabilities, maps (and if needed assigns) the BARs,
 * negotiates features, sets up split virtqueues and rings doorbells. MSI-X
 * stays disabled; nothing uses interrupts. Device-independent: virtio-blk
 * uses it, virtio-net and virtio-scsi can. */
#ifndef VIRTIO_PCI_H
#define VIRTIO_PCI_H

#include <stdint.h>

#include "pci.h"
#include "virtq.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_MODERN_ID(type) ((uint16_t)(0x1040 + (type))) /* 0x1042: block */

/* device_status bits */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* Device-independent feature bits */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33

/* Where BARs the firmware/VMM left unassigned get placed. */
struct vpci_window {
	uint64_t base32, end32; /* 32-bit BARs (and 64-bit ones when base64 is 0) */
	uint64_t base64, end64; /* 64-bit BARs; 0: use the 32-bit window */
	int reassign;           /* test aid: treat every BAR the device uses as unassigned */
};

struct vpci_dev {
	struct pci_access pci;
	uint16_t bdf, device_id;
	uint64_t common, isr, device_cfg, notify; /* MMIO addresses of the structures */
	uint32_t device_cfg_len, notify_len, notify_mult;
	uint8_t bars_used;     /* bit i: BAR i holds a structure */
	uint64_t bar_addr[6];
	uint8_t msix_cap;      /* config offset of the MSI-X capability, 0: none */
	uint16_t num_queues;   /* common config num_queues */
	uint64_t features;     /* offered by the device */
	uint64_t accepted;     /* driver features written */
	unsigned isr_reads, isr_set;
};

/* Bus-0 functions with vendor 0x1af4 and the given device ids (modern id,
 * and transitional id or 0). Returns how many (at most max). */
int vpci_find(const struct pci_access *a, uint16_t modern_id, uint16_t transitional_id,
	      uint16_t *bdfs, int max);

/* Walk the capabilities, check/assign/map the BARs, enable memory space and
 * bus mastering, leave MSI-X off. 0 on success; on failure a CHECK FAIL was
 * printed (prefix `who`). */
int vpci_open(struct vpci_dev *d, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w, const char *who);

/* Spec 3.1.1 steps 1-4: reset (and wait for 0), ACKNOWLEDGE, DRIVER, read
 * the 64 device feature bits into d->features. 0 ok, -1 reset timed out. */
int vpci_begin_init(struct vpci_dev *d);
/* Steps 5-6: write the driver features, set FEATURES_OK, check it stuck.
 * 0 ok, -1 the device refused (FAILED is then set). */
int vpci_set_features(struct vpci_dev *d, uint64_t features);
/* Step 7 for one queue: size = min(device max, max_size) rounded down to a
 * power of 2; rings in mem (page-aligned, below 4 GiB, virtq_mem_size bytes).
 * 0 ok, -1 queue missing or notify offset out of range. */
int vpci_setup_queue(struct vpci_dev *d, struct virtq *q, uint16_t index, uint16_t max_size,
		     void *mem);
/* Step 8. */
void vpci_driver_ok(struct vpci_dev *d);
/* Reset the device (stops all DMA); 0 ok, -1 timed out. */
int vpci_reset(struct vpci_dev *d);
uint8_t vpci_status(const struct vpci_dev *d);
void vpci_add_status(struct vpci_dev *d, uint8_t bits);

/* Doorbell: write the queue index at its notify address. */
void vpci_notify(const struct virtq *q);
/* Read (and so clear) the ISR status byte; counted in isr_reads/isr_set. */
uint8_t vpci_read_isr(struct vpci_dev *d);

/* Device-specific configuration, natural-width accesses; cfg64 reads the two
 * halves until config_generation is stable. */
uint8_t vpci_cfg8(const struct vpci_dev *d, uint32_t off);
uint16_t vpci_cfg16(const struct vpci_dev *d, uint32_t off);
uint32_t vpci_cfg32(const struct vpci_dev *d, uint32_t off);
uint64_t vpci_cfg64(const struct vpci_dev *d, uint32_t off);

#endif
