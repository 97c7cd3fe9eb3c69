#include "io.h"
#include "kernel.h"
#include "pci.h"
#include "serial.h"

#define PCI_CONFIG_ADDR 0xcf8
#define PCI_CONFIG_DATA 0xcfc

static uint32_t cf8_addr(uint16_t bdf, uint16_t off)
{
	return 0x80000000u | ((uint32_t)bdf << 8) | (off & 0xfc);
}

static uint64_t ecam_addr(const struct pci_access *a, uint16_t bdf, uint16_t off)
{
	return a->ecam_base + ((uint64_t)bdf << 12) + (off & 0xfff);
}

uint32_t pci_read32(const struct pci_access *a, uint16_t bdf, uint16_t off)
{
	if (a->mech == PCI_ECAM)
		return mmio_read32(ecam_addr(a, bdf, off & ~3));
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	return inl(PCI_CONFIG_DATA);
}

uint16_t pci_read16(const struct pci_access *a, uint16_t bdf, uint16_t off)
{
	if (a->mech == PCI_ECAM)
		return mmio_read16(ecam_addr(a, bdf, off & ~1));
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	return inw(PCI_CONFIG_DATA + (off & 2));
}

uint8_t pci_read8(const struct pci_access *a, uint16_t bdf, uint16_t off)
{
	if (a->mech == PCI_ECAM)
		return mmio_read8(ecam_addr(a, bdf, off));
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	return inb(PCI_CONFIG_DATA + (off & 3));
}

void pci_write32(const struct pci_access *a, uint16_t bdf, uint16_t off, uint32_t v)
{
	if (a->mech == PCI_ECAM) {
		mmio_write32(ecam_addr(a, bdf, off & ~3), v);
		return;
	}
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	outl(PCI_CONFIG_DATA, v);
}

void pci_write16(const struct pci_access *a, uint16_t bdf, uint16_t off, uint16_t v)
{
	if (a->mech == PCI_ECAM) {
		mmio_write16(ecam_addr(a, bdf, off & ~1), v);
		return;
	}
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	outw(PCI_CONFIG_DATA + (off & 2), v);
}

void pci_write8(const struct pci_access *a, uint16_t bdf, uint16_t off, uint8_t v)
{
	if (a->mech == PCI_ECAM) {
		mmio_write8(ecam_addr(a, bdf, off), v);
		return;
	}
	outl(PCI_CONFIG_ADDR, cf8_addr(bdf, off));
	outb(PCI_CONFIG_DATA + (off & 3), v);
}

int pci_scan_bus(const struct pci_access *a, uint8_t bus, struct pci_func *out, int max)
{
	int n = 0;
	for (uint8_t dev = 0; dev < 32; dev++) {
		for (uint8_t fn = 0; fn < 8; fn++) {
			uint16_t bdf = PCI_BDF(bus, dev, fn);
			uint32_t id = pci_read32(a, bdf, 0x00);
			uint16_t vendor = (uint16_t)id;
			if (vendor == 0xffff || vendor == 0x0000) {
				if (fn == 0)
					break; /* no device: skip its other functions */
				continue;
			}
			uint8_t ht = (uint8_t)(pci_read32(a, bdf, 0x0c) >> 16);
			if (n < max) {
				out[n].bdf = bdf;
				out[n].vendor = vendor;
				out[n].device = (uint16_t)(id >> 16);
				out[n].class = pci_read32(a, bdf, 0x08) >> 8;
				out[n].header_type = ht;
				n++;
			}
			if (fn == 0 && !(ht & 0x80))
				break; /* single-function device */
		}
	}
	return n;
}

#define MAX_FUNCS 64

static void print_funcs(const char *mech, const struct pci_func *f, int n)
{
	for (int i = 0; i < n; i++)
		kprintf("PCI %s %02x:%02x.%x %04x:%04x class=%06x\n", mech, PCI_BUS(f[i].bdf),
			PCI_DEV(f[i].bdf), PCI_FN(f[i].bdf), f[i].vendor, f[i].device, f[i].class);
	kprintf("PCI devices=%d\n", n);
}

static const struct pci_func *find(const struct pci_func *f, int n, uint16_t bdf)
{
	for (int i = 0; i < n; i++)
		if (f[i].bdf == bdf)
			return &f[i];
	return 0;
}

static void expect(const char *mech, const struct pci_func *f, int n, uint16_t bdf,
		   uint16_t vendor, uint16_t device, uint32_t class)
{
	const struct pci_func *p = find(f, n, bdf);
	if (!p) {
		check_fail("pci %s %02x:%02x.%x missing (want %04x:%04x)", mech, PCI_BUS(bdf),
			   PCI_DEV(bdf), PCI_FN(bdf), vendor, device);
		return;
	}
	if (p->vendor != vendor || p->device != device || p->class != class)
		check_fail("pci %s %02x:%02x.%x is %04x:%04x class=%06x (want %04x:%04x class=%06x)",
			   mech, PCI_BUS(bdf), PCI_DEV(bdf), PCI_FN(bdf), p->vendor, p->device,
			   p->class, vendor, device, class);
}

void pci_check(uint64_t ecam_base)
{
	static struct pci_func cf8[MAX_FUNCS], ecam[MAX_FUNCS];
	const struct pci_access a_cf8 = { PCI_CF8, 0 };
	const struct pci_access a_ecam = { PCI_ECAM, ecam_base };

	int n_cf8 = pci_scan_bus(&a_cf8, 0, cf8, MAX_FUNCS);
	print_funcs("cf8", cf8, n_cf8);
	int n_ecam = pci_scan_bus(&a_ecam, 0, ecam, MAX_FUNCS);
	print_funcs("ecam", ecam, n_ecam);

	const char *mechs[2] = { "cf8", "ecam" };
	const struct pci_func *lists[2] = { cf8, ecam };
	const int counts[2] = { n_cf8, n_ecam };
	for (int m = 0; m < 2; m++) {
		expect(mechs[m], lists[m], counts[m], PCI_BDF(0, 0, 0), 0x8086, 0x29c0, 0x060000);
		expect(mechs[m], lists[m], counts[m], PCI_BDF(0, 0x1f, 0), 0x8086, 0x2918, 0x060100);
	}

	/* Both mechanisms must see the same functions with the same identity. */
	for (int i = 0; i < n_cf8; i++) {
		const struct pci_func *e = find(ecam, n_ecam, cf8[i].bdf);
		if (!e)
			check_fail("pci %02x:%02x.%x seen by cf8 but not by ecam", PCI_BUS(cf8[i].bdf),
				   PCI_DEV(cf8[i].bdf), PCI_FN(cf8[i].bdf));
		else if (e->vendor != cf8[i].vendor || e->device != cf8[i].device ||
			 e->class != cf8[i].class)
			check_fail("pci %02x:%02x.%x differs: cf8 %04x:%04x class=%06x ecam %04x:%04x class=%06x",
				   PCI_BUS(cf8[i].bdf), PCI_DEV(cf8[i].bdf), PCI_FN(cf8[i].bdf),
				   cf8[i].vendor, cf8[i].device, cf8[i].class, e->vendor, e->device,
				   e->class);
	}
	for (int i = 0; i < n_ecam; i++)
		if (!find(cf8, n_cf8, ecam[i].bdf))
			check_fail("pci %02x:%02x.%x seen by ecam but not by cf8", PCI_BUS(ecam[i].bdf),
				   PCI_DEV(ecam[i].bdf), PCI_FN(ecam[i].bdf));
}
