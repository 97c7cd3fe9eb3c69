/* PCI configuration space through ports 0xCF8/0xCFC or PCIe ECAM MMIO. */
#ifndef PCI_H
#define PCI_H

#include <stdint.h>

#define PCI_ECAM_DEFAULT 0xb0000000ull

enum pci_mech { PCI_CF8, PCI_ECAM };

struct pci_access {
	enum pci_mech mech;
	uint64_t ecam_base; /* PCI_ECAM only: bus 0 base */
};

#define PCI_BDF(bus, dev, fn) ((uint16_t)(((bus) << 8) | ((dev) << 3) | (fn)))
#define PCI_BUS(bdf) ((bdf) >> 8)
#define PCI_DEV(bdf) (((bdf) >> 3) & 0x1f)
#define PCI_FN(bdf) ((bdf) & 7)

uint32_t pci_read32(const struct pci_access *a, uint16_t bdf, uint16_t off);
uint16_t pci_read16(const struct pci_access *a, uint16_t bdf, uint16_t off);
uint8_t pci_read8(const struct pci_access *a, uint16_t bdf, uint16_t off);
void pci_write32(const struct pci_access *a, uint16_t bdf, uint16_t off, uint32_t v);
void pci_write16(const struct pci_access *a, uint16_t bdf, uint16_t off, uint16_t v);
void pci_write8(const struct pci_access *a, uint16_t bdf, uint16_t off, uint8_t v);

struct pci_func {
	uint16_t bdf;
	uint16_t vendor, device;
	uint32_t class; /* base << 16 | sub << 8 | prog-if */
	uint8_t header_type;
};

/* Enumerate the functions present on one bus; returns how many (at most max). */
int pci_scan_bus(const struct pci_access *a, uint8_t bus, struct pci_func *out, int max);

/* The "pci" check: enumerate bus 0 with both mechanisms, print, compare. */
void pci_check(uint64_t ecam_base);

#endif
