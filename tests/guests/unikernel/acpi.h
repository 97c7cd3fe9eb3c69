/* ACPI table discovery and the few fields the unikernel needs. */
#ifndef ACPI_H
#define ACPI_H

#include <stdint.h>

#include "kernel.h"

struct acpi_gas { /* Generic Address Structure */
	uint8_t space; /* 0 memory, 1 system I/O, 2 PCI config */
	uint8_t bit_width;
	uint8_t bit_offset;
	uint8_t access_size;
	uint64_t address;
};

struct acpi_info {
	int found;             /* RSDP found and usable */
	uint64_t rsdp;
	uint8_t rsdp_rev;
	uint64_t root;         /* XSDT (rev >= 2) or RSDT */
	uint64_t fadt, madt, mcfg, dsdt, facs;

	/* FADT */
	uint32_t pm1a_cnt, pm1b_cnt; /* I/O ports, 0 if absent */
	int reset_supported;
	struct acpi_gas reset_reg;
	uint8_t reset_value;

	/* DSDT: SLP_TYPa of \_S5_, -1 if not found */
	int s5_slp_typ;

	/* MADT */
	uint32_t lapic_addr;
	int madt_cpus;                /* enabled processors */
	int ioapics;
	int n_apic_ids;
	uint32_t apic_ids[MAX_CPUS];  /* of the enabled processors */

	/* MCFG (first segment-0 entry) */
	uint64_t mcfg_base;
	uint8_t mcfg_bus_start, mcfg_bus_end;
};

extern struct acpi_info acpi;

/* Find and parse the tables into `acpi`. With verbose set, prints the "ACPI ..."
 * lines and reports failed expectations via check_fail(); otherwise silent.
 * Re-parses on every call. */
void acpi_parse(uint64_t rsdp_hint, int verbose);

#endif
