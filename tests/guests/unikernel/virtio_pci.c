/* Modern virtio-pci transport (virtio 1.x, section 4.1), polled. See
 * virtio_pci.h. Configuration space goes through ports 0xCF8/0xCFC (the
 * structures all live in the first 256 bytes), so no ECAM base is needed. */
#include "io.h"
#include "kernel.h"
#include "lib.h"
#include "mem.h"
#include "serial.h"
#include "virtio_pci.h"

#define PCI_COMMAND 0x04
#define PCI_CMD_MEM 0x0002
#define PCI_CMD_MASTER 0x0004
#define PCI_CMD_INTX_DISABLE 0x0400
#define PCI_STATUS 0x06
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define PCI_CAP_VNDR 0x09
#define PCI_CAP_MSIX 0x11
#define MSIX_ENABLE 0x8000

/* virtio_pci_cap.cfg_type */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4
#define CAP_PCI_CFG 5

/* struct virtio_pci_common_cfg */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX 0x10
#define CC_NUMQ 0x12
#define CC_STATUS 0x14
#define CC_CFGGEN 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESCLO 0x20
#define CC_Q_DESCHI 0x24
#define CC_Q_AVAILLO 0x28
#define CC_Q_AVAILHI 0x2c
#define CC_Q_USEDLO 0x30
#define CC_Q_USEDHI 0x34
#define CC_SIZE 0x38
#define NO_VECTOR 0xffff

#define GIB ((uint64_t)1 << 30)

int vpci_find(const struct pci_access *a, uint16_t modern_id, uint16_t transitional_id,
	      uint16_t *bdfs, int max)
{
	static struct pci_func f[64];
	int n = pci_scan_bus(a, 0, f, 64), found = 0;
	for (int i = 0; i < n && found < max; i++)
		if (f[i].vendor == VIRTIO_PCI_VENDOR &&
		    (f[i].device == modern_id || (transitional_id && f[i].device == transitional_id)))
			bdfs[found++] = f[i].bdf;
	return found;
}

/* ---- BARs ---- */

struct region {
	uint64_t base, size;
};

static struct region used_regions[96];
static int n_used = -1; /* -1: not collected yet */
static uint64_t cursor32, cursor64;

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

/* Address of BAR i (with the upper half of a 64-bit BAR); sets *is64, *io. */
static uint64_t bar_addr(const struct pci_access *a, uint16_t bdf, int i, int *is64, int *io)
{
	uint32_t lo = pci_read32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * i));
	*io = lo & 1;
	*is64 = !*io && ((lo >> 1) & 3) == 2;
	if (*io)
		return lo & ~3u;
	uint64_t v = lo & ~0xfu;
	if (*is64 && i < 5)
		v |= (uint64_t)pci_read32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * (i + 1))) << 32;
	return v;
}

/* Size of memory BAR i; memory decoding must be off. Restores the BAR. */
static uint64_t bar_size(const struct pci_access *a, uint16_t bdf, int i, int is64)
{
	uint16_t off = (uint16_t)(PCI_BAR0 + 4 * i);
	uint32_t lo = pci_read32(a, bdf, off), hi = 0;
	pci_write32(a, bdf, off, 0xffffffffu);
	uint64_t mask = pci_read32(a, bdf, off) & ~0xfu;
	pci_write32(a, bdf, off, lo);
	if (is64) {
		hi = pci_read32(a, bdf, (uint16_t)(off + 4));
		pci_write32(a, bdf, (uint16_t)(off + 4), 0xffffffffu);
		mask |= (uint64_t)pci_read32(a, bdf, (uint16_t)(off + 4)) << 32;
		pci_write32(a, bdf, (uint16_t)(off + 4), hi);
	} else {
		mask |= 0xffffffff00000000ull;
	}
	return mask ? ~mask + 1 : 0;
}

/* The memory BARs already assigned on bus 0, to keep new ones clear of them. */
static void collect_used(const struct pci_access *a)
{
	static struct pci_func f[64];
	int n = pci_scan_bus(a, 0, f, 64);
	n_used = 0;
	for (int k = 0; k < n; k++) {
		int nbars = (f[k].header_type & 0x7f) == 0 ? 6 : (f[k].header_type & 0x7f) == 1 ? 2 : 0;
		uint16_t cmd = pci_read16(a, f[k].bdf, PCI_COMMAND);
		pci_write16(a, f[k].bdf, PCI_COMMAND, cmd & ~PCI_CMD_MEM);
		for (int i = 0; i < nbars; i++) {
			int is64, io;
			uint64_t base = bar_addr(a, f[k].bdf, i, &is64, &io);
			if (!io && base && n_used < (int)(sizeof(used_regions) / sizeof(used_regions[0]))) {
				uint64_t size = bar_size(a, f[k].bdf, i, is64);
				if (size) {
					used_regions[n_used].base = base;
					used_regions[n_used].size = size;
					n_used++;
				}
			}
			if (is64)
				i++;
		}
		pci_write16(a, f[k].bdf, PCI_COMMAND, cmd);
	}
}

/* A naturally aligned, unused range of `size` in [*cursor, end); 0 if none. */
static uint64_t alloc_range(uint64_t *cursor, uint64_t end, uint64_t size)
{
	uint64_t cand = align_up(*cursor, size);
again:
	if (cand + size > end || cand + size < cand)
		return 0;
	for (int r = 0; r < n_used; r++)
		if (cand < used_regions[r].base + used_regions[r].size &&
		    used_regions[r].base < cand + size) {
			cand = align_up(used_regions[r].base + used_regions[r].size, size);
			goto again;
		}
	if (n_used < (int)(sizeof(used_regions) / sizeof(used_regions[0]))) {
		used_regions[n_used].base = cand;
		used_regions[n_used].size = size;
		n_used++;
	}
	*cursor = cand + size;
	return cand;
}

/* ---- capabilities ---- */

struct cap_loc {
	int found;
	uint8_t bar;
	uint32_t offset, length;
};

int vpci_open(struct vpci_dev *d, const struct pci_access *a, uint16_t bdf,
	      const struct vpci_window *w, const char *who)
{
	struct cap_loc caps[6];
	memset(d, 0, sizeof(*d));
	memset(caps, 0, sizeof(caps));
	d->pci = *a;
	d->bdf = bdf;
	d->device_id = pci_read16(a, bdf, 0x02);

	if (!(pci_read16(a, bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST)) {
		check_fail("%s no capability list", who);
		return -1;
	}
	uint8_t ptr = pci_read8(a, bdf, PCI_CAP_PTR) & 0xfc;
	for (int guard = 0; ptr >= 0x40 && guard < 48; guard++) {
		uint8_t id = pci_read8(a, bdf, ptr), next = pci_read8(a, bdf, (uint16_t)(ptr + 1));
		if (id == PCI_CAP_MSIX && !d->msix_cap) {
			d->msix_cap = ptr;
		} else if (id == PCI_CAP_VNDR && pci_read8(a, bdf, (uint16_t)(ptr + 2)) >= 16) {
			uint8_t type = pci_read8(a, bdf, (uint16_t)(ptr + 3));
			uint8_t bar = pci_read8(a, bdf, (uint16_t)(ptr + 4));
			/* The first capability of each type wins; PCI_CFG (5) is not used. */
			if (type >= CAP_COMMON && type <= CAP_DEVICE && bar <= 5 && !caps[type].found) {
				caps[type].found = 1;
				caps[type].bar = bar;
				caps[type].offset = pci_read32(a, bdf, (uint16_t)(ptr + 8));
				caps[type].length = pci_read32(a, bdf, (uint16_t)(ptr + 12));
				if (type == CAP_NOTIFY)
					d->notify_mult = pci_read32(a, bdf, (uint16_t)(ptr + 16));
			}
		}
		ptr = next & 0xfc;
	}
	if (!caps[CAP_COMMON].found || !caps[CAP_NOTIFY].found || !caps[CAP_ISR].found) {
		check_fail("%s missing virtio capabilities common=%d notify=%d isr=%d", who,
			   caps[CAP_COMMON].found, caps[CAP_NOTIFY].found, caps[CAP_ISR].found);
		return -1;
	}
	if (caps[CAP_COMMON].length < CC_SIZE) {
		check_fail("%s common config too short (%u bytes)", who, caps[CAP_COMMON].length);
		return -1;
	}
	for (int t = CAP_COMMON; t <= CAP_DEVICE; t++)
		if (caps[t].found)
			d->bars_used |= (uint8_t)(1u << caps[t].bar);

	/* The BARs: use what the VMM/firmware assigned; assign the rest. */
	uint16_t cmd = pci_read16(a, bdf, PCI_COMMAND);
	pci_write16(a, bdf, PCI_COMMAND, cmd & ~PCI_CMD_MEM);
	/* On failure: the old command register, but memory decoding stays off
	 * once a BAR was cleared (a BAR at 0 must not decode). */
#define FAIL_CMD() pci_write16(a, bdf, PCI_COMMAND, touched ? cmd & ~PCI_CMD_MEM : cmd)
	int touched = 0;
	for (int i = 0; i < 6; i++) {
		if (!(d->bars_used & (1u << i)))
			continue;
		int is64, io;
		uint64_t base = bar_addr(a, bdf, i, &is64, &io);
		if (io) {
			check_fail("%s BAR%d is an I/O BAR (unsupported)", who, i);
			FAIL_CMD();
			return -1;
		}
		if (is64 && i == 5) {
			check_fail("%s BAR5 claims to be 64-bit", who);
			FAIL_CMD();
			return -1;
		}
		if (w->reassign && base) {
			touched = 1;
			pci_write32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * i), 0);
			if (is64)
				pci_write32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * i + 4), 0);
			base = 0;
		}
		if (!base) {
			touched = 1;
			uint64_t size = bar_size(a, bdf, i, is64);
			if (size < 16) {
				check_fail("%s BAR%d does not decode (size 0x%lx)", who, i, size);
				FAIL_CMD();
				return -1;
			}
			if (n_used < 0)
				collect_used(a);
			if (!cursor32)
				cursor32 = w->base32;
			if (!cursor64)
				cursor64 = w->base64;
			if (is64 && w->base64)
				base = alloc_range(&cursor64, w->end64, size);
			else
				base = alloc_range(&cursor32, w->end32, size);
			if (!base) {
				check_fail("%s no room for BAR%d (0x%lx bytes)", who, i, size);
				FAIL_CMD();
				return -1;
			}
			pci_write32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * i), (uint32_t)base);
			if (is64)
				pci_write32(a, bdf, (uint16_t)(PCI_BAR0 + 4 * i + 4), (uint32_t)(base >> 32));
			uint64_t back = bar_addr(a, bdf, i, &is64, &io);
			if (back != base) {
				check_fail("%s BAR%d wrote 0x%lx, reads 0x%lx", who, i, base, back);
				FAIL_CMD();
				return -1;
			}
			kprintf("VIRTIO %02x:%02x.%x BAR%d assigned 0x%lx size 0x%lx\n", PCI_BUS(bdf),
				PCI_DEV(bdf), PCI_FN(bdf), i, base, size);
		}
		d->bar_addr[i] = base;
		if (is64)
			i++;
	}
	/* Memory space and bus mastering on; INTx off: this driver polls. */
	pci_write16(a, bdf, PCI_COMMAND,
		    (uint16_t)(cmd | PCI_CMD_MEM | PCI_CMD_MASTER | PCI_CMD_INTX_DISABLE));
#undef FAIL_CMD
	/* MSI-X stays (or is put back) disabled. */
	if (d->msix_cap) {
		uint16_t ctl = pci_read16(a, bdf, (uint16_t)(d->msix_cap + 2));
		if (ctl & MSIX_ENABLE)
			pci_write16(a, bdf, (uint16_t)(d->msix_cap + 2), ctl & ~MSIX_ENABLE);
	}

	uint64_t *addrs[5] = { 0, &d->common, &d->notify, &d->isr, &d->device_cfg };
	for (int t = CAP_COMMON; t <= CAP_DEVICE; t++) {
		if (!caps[t].found)
			continue;
		uint64_t at = d->bar_addr[caps[t].bar] + caps[t].offset;
		*addrs[t] = at;
		if (at + caps[t].length > 4 * GIB && mem_map_mmio(at, caps[t].length ? caps[t].length : 1) != 0) {
			check_fail("%s cannot map 0x%lx", who, at);
			return -1;
		}
	}
	d->notify_len = caps[CAP_NOTIFY].length;
	d->device_cfg_len = caps[CAP_DEVICE].found ? caps[CAP_DEVICE].length : 0;
	d->num_queues = mmio_read16(d->common + CC_NUMQ);
	return 0;
}

/* ---- status, features, queues ---- */

uint8_t vpci_status(const struct vpci_dev *d) { return mmio_read8(d->common + CC_STATUS); }

void vpci_add_status(struct vpci_dev *d, uint8_t bits)
{
	mmio_write8(d->common + CC_STATUS, (uint8_t)(vpci_status(d) | bits));
}

int vpci_reset(struct vpci_dev *d)
{
	mmio_write8(d->common + CC_STATUS, 0);
	for (uint32_t i = 0; i < 101000; i++) {
		if (vpci_status(d) == 0)
			return 0;
		if (i >= 1000)
			delay_us(10);
	}
	return -1;
}

int vpci_begin_init(struct vpci_dev *d)
{
	if (vpci_reset(d) != 0)
		return -1;
	vpci_add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	vpci_add_status(d, VIRTIO_STATUS_DRIVER);
	mmio_write32(d->common + CC_DFSELECT, 0);
	uint64_t lo = mmio_read32(d->common + CC_DF);
	mmio_write32(d->common + CC_DFSELECT, 1);
	uint64_t hi = mmio_read32(d->common + CC_DF);
	d->features = lo | hi << 32;
	return 0;
}

int vpci_set_features(struct vpci_dev *d, uint64_t features)
{
	d->accepted = features;
	mmio_write32(d->common + CC_GFSELECT, 0);
	mmio_write32(d->common + CC_GF, (uint32_t)features);
	mmio_write32(d->common + CC_GFSELECT, 1);
	mmio_write32(d->common + CC_GF, (uint32_t)(features >> 32));
	vpci_add_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(vpci_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		vpci_add_status(d, VIRTIO_STATUS_FAILED);
		return -1;
	}
	return 0;
}

int vpci_setup_queue(struct vpci_dev *d, struct virtq *q, uint16_t index, uint16_t max_size,
		     void *mem)
{
	mmio_write16(d->common + CC_Q_SELECT, index);
	uint16_t dev_max = mmio_read16(d->common + CC_Q_SIZE);
	if (dev_max == 0)
		return -1;
	uint16_t size = dev_max < max_size ? dev_max : max_size;
	if (size > VIRTQ_MAX_SIZE)
		size = VIRTQ_MAX_SIZE;
	while (size & (size - 1)) /* round down to a power of 2 */
		size &= (uint16_t)(size - 1);
	virtq_init(q, index, size, mem);
	mmio_write16(d->common + CC_Q_SIZE, size);
	mmio_write16(d->common + CC_Q_MSIX, NO_VECTOR);
	uint64_t da = virtq_desc_addr(q), aa = virtq_avail_addr(q), ua = virtq_used_addr(q);
	mmio_write32(d->common + CC_Q_DESCLO, (uint32_t)da);
	mmio_write32(d->common + CC_Q_DESCHI, (uint32_t)(da >> 32));
	mmio_write32(d->common + CC_Q_AVAILLO, (uint32_t)aa);
	mmio_write32(d->common + CC_Q_AVAILHI, (uint32_t)(aa >> 32));
	mmio_write32(d->common + CC_Q_USEDLO, (uint32_t)ua);
	mmio_write32(d->common + CC_Q_USEDHI, (uint32_t)(ua >> 32));
	uint32_t noff = (uint32_t)mmio_read16(d->common + CC_Q_NOFF) * d->notify_mult;
	if (noff + 2 > d->notify_len)
		return -1;
	q->notify_addr = d->notify + noff;
	barrier();
	mmio_write16(d->common + CC_Q_ENABLE, 1);
	return 0;
}

void vpci_driver_ok(struct vpci_dev *d)
{
	mmio_write16(d->common + CC_MSIX, NO_VECTOR);
	vpci_add_status(d, VIRTIO_STATUS_DRIVER_OK);
}

void vpci_notify(const struct virtq *q)
{
	barrier();
	mmio_write16(q->notify_addr, q->index);
}

uint8_t vpci_read_isr(struct vpci_dev *d)
{
	uint8_t v = mmio_read8(d->isr);
	d->isr_reads++;
	if (v & 1)
		d->isr_set++;
	return v;
}

/* ---- device-specific configuration ---- */

static int cfg_ok(const struct vpci_dev *d, uint32_t off, uint32_t width)
{
	return d->device_cfg && off + width <= d->device_cfg_len;
}

uint8_t vpci_cfg8(const struct vpci_dev *d, uint32_t off)
{
	return cfg_ok(d, off, 1) ? mmio_read8(d->device_cfg + off) : 0;
}

uint16_t vpci_cfg16(const struct vpci_dev *d, uint32_t off)
{
	return cfg_ok(d, off, 2) ? mmio_read16(d->device_cfg + off) : 0;
}

uint32_t vpci_cfg32(const struct vpci_dev *d, uint32_t off)
{
	return cfg_ok(d, off, 4) ? mmio_read32(d->device_cfg + off) : 0;
}

uint64_t vpci_cfg64(const struct vpci_dev *d, uint32_t off)
{
	uint64_t v = 0;
	for (int tries = 0; tries < 100; tries++) {
		uint8_t gen = mmio_read8(d->common + CC_CFGGEN);
		v = vpci_cfg32(d, off) | (uint64_t)vpci_cfg32(d, off + 4) << 32;
		if (mmio_read8(d->common + CC_CFGGEN) == gen)
			break;
	}
	return v;
}
