//! ACPI tables for the q35 machine: RSDP, XSDT, FADT (+ FACS, DSDT), MADT and
//! MCFG, written into the BIOS area of guest memory.
//!
//! Linux finds the RSDP either through the boot protocol (`acpi_rsdp_addr` /
//! PVH `rsdp_paddr`) or by scanning 0xE0000-0xFFFFF, so the RSDP goes first,
//! at [`ACPI_START`], and every other table follows it inside
//! [`ACPI_START`, `ACPI_END`).
//!
//! The tables describe a legacy (not hardware-reduced) ACPI platform: the
//! guest powers off through the PM1a control block, resets through the
//! 0xCF9 reset register, and gets its SCI as ISA IRQ 9. Every address and
//! port comes from [`crate::machine::layout`], so the tables always agree with
//! the devices that the rest of the VMM places there.

mod dsdt;
mod fadt;
mod madt;
mod mcfg;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::layout::{ACPI_END, ACPI_START, HIGH_RAM_START};

/// OEM id in every table header (six bytes, space padded).
const OEM_ID: [u8; 6] = *b"TERN  ";
/// OEM table id in every table header (eight bytes, space padded). One id for
/// all tables: ACPICA only uses it to tell tables apart for overrides.
const OEM_TABLE_ID: [u8; 8] = *b"TERNVM  ";
/// OEM revision in every table header; bump it when the tables change in a
/// way a guest could care about.
const OEM_REVISION: u32 = 1;

/// Largest vCPU count the tables can name: processor devices are called
/// `Cxxx` with three hex digits. KVM's own limit is lower on most hosts, and
/// the area fills up well before this (see [`AcpiError::TooLarge`]).
pub const MAX_CPUS: u32 = 0x1000;

/// Alignment of each table in guest memory. ACPI only requires the FACS to
/// be aligned (to 64 bytes); 16 keeps the others tidy and cache friendly.
const TABLE_ALIGN: u64 = 16;
/// The FACS must sit on a 64-byte boundary (ACPI 6.5, 5.2.10).
const FACS_ALIGN: u64 = 64;

/// What the tables describe: the parts of the machine that vary per VM.
/// Everything fixed (ports, ECAM, APIC addresses) comes from the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, `1..=MAX_CPUS`. vCPU `i` has APIC id and ACPI
    /// processor UID `i`; ids up to 254 get xAPIC MADT entries, ids from 255
    /// x2APIC entries (type 9), as the ACPI spec requires.
    pub num_cpus: u32,
    /// The 64-bit PCI MMIO window `[start, end)` above RAM. An empty range
    /// (`start == end`) leaves it out of the host bridge's `_CRS`.
    pub mmio64: (u64, u64),
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is zero or too large to describe.
    #[error("cannot describe {0} vCPUs in ACPI (supported: 1 to {MAX_CPUS})")]
    BadCpuCount(u32),
    /// The 64-bit PCI window is reversed or reaches below 4 GiB, where it
    /// would overlap the 32-bit hole or low RAM.
    #[error("invalid 64-bit PCI window [{start:#x}, {end:#x})")]
    BadMmio64 {
        /// Start of the window.
        start: u64,
        /// End (exclusive) of the window.
        end: u64,
    },
    /// The tables do not fit in the area reserved for them.
    #[error(
        "ACPI tables need {needed} bytes (table {table} does not fit) but the ACPI area holds {available}"
    )]
    TooLarge {
        /// The first table that did not fit.
        table: &'static str,
        /// Bytes needed up to and including that table.
        needed: u64,
        /// Size of the ACPI area.
        available: u64,
    },
    /// Writing a table into guest memory failed (the ACPI area is not RAM).
    #[error("cannot write ACPI table {table} at {addr:#x}: {err}")]
    GuestMemory {
        /// The table being written.
        table: &'static str,
        /// Its guest physical address.
        addr: u64,
        /// The vm-memory error.
        err: vm_memory::GuestMemoryError,
    },
}

/// Serialises any acpi_tables object into bytes.
fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Lays tables out one after another in the ACPI area, so that each table's
/// address is known before the tables that point to it are built.
struct Placer {
    /// First free byte.
    next: u64,
    /// Tables placed so far: name (for errors), address, contents.
    tables: Vec<(&'static str, u64, Vec<u8>)>,
}

impl Placer {
    /// Starts placing at `start`.
    fn new(start: u64) -> Self {
        Placer {
            next: start,
            tables: Vec::new(),
        }
    }

    /// Reserves `len` bytes aligned to `align`, checking that they stay
    /// inside the ACPI area, and returns their address.
    fn reserve(&mut self, table: &'static str, len: usize, align: u64) -> Result<u64, AcpiError> {
        let available = ACPI_END - ACPI_START;
        let too_large = |needed| AcpiError::TooLarge {
            table,
            needed,
            available,
        };
        let addr = self
            .next
            .checked_next_multiple_of(align)
            .ok_or(too_large(u64::MAX))?;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| addr.checked_add(len))
            .ok_or(too_large(u64::MAX))?;
        if end > ACPI_END {
            return Err(too_large(end - ACPI_START));
        }
        self.next = end;
        Ok(addr)
    }

    /// Places `bytes` at the next `align`ed free address and returns it.
    fn place(&mut self, table: &'static str, bytes: Vec<u8>, align: u64) -> Result<u64, AcpiError> {
        let addr = self.reserve(table, bytes.len(), align)?;
        self.tables.push((table, addr, bytes));
        Ok(addr)
    }
}

/// Checks the parts of the configuration that the tables cannot represent.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::BadCpuCount(cfg.num_cpus));
    }
    let (start, end) = cfg.mmio64;
    if start > end || (start < end && start < HIGH_RAM_START) {
        return Err(AcpiError::BadMmio64 { start, end });
    }
    Ok(())
}

/// Writes RSDP at [`ACPI_START`] and the other tables after it, all inside
/// [`ACPI_START`, `ACPI_END`). Returns the RSDP's guest address, which the
/// boot code hands to the kernel (boot_params `acpi_rsdp_addr` or PVH
/// `rsdp_paddr`); a guest that scans the BIOS area finds it there too.
///
/// Nothing is written unless every table fits in the area.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    validate(cfg)?;

    let mut placer = Placer::new(ACPI_START);
    // The RSDP points to the XSDT, which is built last; keep its place at
    // the start of the area (16-byte aligned, as the BIOS-area scan needs).
    let rsdp_addr = placer.reserve("RSDP", Rsdp::len(), TABLE_ALIGN)?;

    let dsdt_addr = placer.place("DSDT", dsdt::build(cfg), TABLE_ALIGN)?;
    let facs_addr = placer.place("FACS", fadt::build_facs(), FACS_ALIGN)?;
    let fadt_addr = placer.place("FACP", fadt::build(dsdt_addr, facs_addr), TABLE_ALIGN)?;
    let madt_addr = placer.place("APIC", madt::build(cfg), TABLE_ALIGN)?;
    let mcfg_addr = placer.place("MCFG", mcfg::build(), TABLE_ALIGN)?;

    // The DSDT and FACS are reached through the FADT, not listed here.
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = placer.place("XSDT", to_bytes(&xsdt), TABLE_ALIGN)?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    placer.tables.push(("RSDP", rsdp_addr, to_bytes(&rsdp)));

    for (table, addr, bytes) in &placer.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|err| AcpiError::GuestMemory {
                table,
                addr: *addr,
                err,
            })?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests;
