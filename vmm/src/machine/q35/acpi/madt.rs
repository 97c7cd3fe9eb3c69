//! MADT (signature "APIC"): the local APICs, the IOAPIC and how ISA IRQs
//! reach it.
//!
//! acpi_tables has types for the Processor Local APIC and IOAPIC entries but
//! not for the x86 interrupt source override, local APIC NMI and x2APIC
//! entries, so the table is assembled as a generic [`Sdt`] and those entries
//! are encoded here from the ACPI 6.5 layouts (5.2.12).

use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::{to_bytes, AcpiConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::machine::layout::{ACPI_SCI_IRQ, IOAPIC_START, LAPIC_START};

// The MADT's address fields are 32 bits; the `as u32` below cannot truncate.
const _: () = assert!(LAPIC_START <= u32::MAX as u64);
const _: () = assert!(IOAPIC_START <= u32::MAX as u64);
// The override's source is an ISA IRQ byte.
const _: () = assert!(ACPI_SCI_IRQ < 16);

/// MADT revision 5 (ACPI 6.3+). Linux reads any revision; it matters only for
/// flags we do not use (online-capable).
const MADT_REVISION: u8 = 5;
/// Length of the fixed part: header, local APIC address, flags.
const MADT_HEADER_LEN: u32 = 44;
/// Offset of the local interrupt controller address.
const LAPIC_ADDRESS_OFFSET: usize = 36;
/// Offset of the MADT flags.
const FLAGS_OFFSET: usize = 40;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip
/// emulates them), so the OS must mask them when it uses the IOAPIC.
const PCAT_COMPAT: u32 = 1;

/// Entry type: Interrupt Source Override.
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// Entry type: Local APIC NMI.
const TYPE_LOCAL_APIC_NMI: u8 = 4;
/// Entry type: Processor Local x2APIC.
const TYPE_LOCAL_X2APIC: u8 = 9;
/// Entry type: Local x2APIC NMI.
const TYPE_LOCAL_X2APIC_NMI: u8 = 0xa;

/// MPS INTI flags: active-high polarity.
const MPS_INTI_POLARITY_HIGH: u16 = 0b01;
/// MPS INTI flags: level trigger.
const MPS_INTI_TRIGGER_LEVEL: u16 = 0b11 << 2;
/// MPS INTI flags: conforms to the bus (used for the LINT1 NMI).
const MPS_INTI_CONFORMS: u16 = 0;

/// Processor UID meaning "all processors" in a Local APIC NMI entry.
const ALL_PROCESSORS_UID8: u8 = 0xff;
/// Processor UID meaning "all processors" in a Local x2APIC NMI entry.
const ALL_PROCESSORS_UID32: u32 = u32::MAX;
/// The local APIC pin wired to NMI on PC-compatible machines.
const LINT1: u8 = 1;

/// Highest APIC id described by a (8-bit) Processor Local APIC entry; 255 is
/// the xAPIC broadcast id, so ids from 255 need x2APIC entries.
pub(super) const MAX_XAPIC_ID: u32 = 254;

/// Local APIC flag: the processor is usable.
const LAPIC_ENABLED: u32 = 1;

/// A Processor Local x2APIC entry (16 bytes).
fn local_x2apic(apic_id: u32, uid: u32) -> Vec<u8> {
    let mut e = vec![TYPE_LOCAL_X2APIC, 16, 0, 0];
    e.extend_from_slice(&apic_id.to_le_bytes());
    e.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    e.extend_from_slice(&uid.to_le_bytes());
    e
}

/// An Interrupt Source Override entry (10 bytes) for ISA bus 0.
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut e = vec![TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq];
    e.extend_from_slice(&gsi.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

/// A Local APIC NMI entry (6 bytes).
fn local_apic_nmi(uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut e = vec![TYPE_LOCAL_APIC_NMI, 6, uid];
    e.extend_from_slice(&flags.to_le_bytes());
    e.push(lint);
    e
}

/// A Local x2APIC NMI entry (12 bytes).
fn local_x2apic_nmi(uid: u32, flags: u16, lint: u8) -> Vec<u8> {
    let mut e = vec![TYPE_LOCAL_X2APIC_NMI, 12];
    e.extend_from_slice(&flags.to_le_bytes());
    e.extend_from_slice(&uid.to_le_bytes());
    e.extend_from_slice(&[lint, 0, 0, 0]);
    e
}

/// The IOAPIC id: one past the last xAPIC id, so it does not repeat a CPU's
/// APIC id. With more than 254 vCPUs every 8-bit id is taken; 0 is then as
/// good as any, because on x86-64 neither Linux nor KVM's in-kernel IOAPIC
/// routes by this id (Linux only keeps IOAPIC ids unique among IOAPICs).
fn ioapic_id(num_cpus: u32) -> u8 {
    u8::try_from(num_cpus)
        .ok()
        .filter(|&id| u32::from(id) <= MAX_XAPIC_ID)
        .unwrap_or(0)
}

/// Builds the MADT for `cfg.num_cpus` vCPUs (already validated as >= 1).
pub(super) fn build(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(LAPIC_ADDRESS_OFFSET, LAPIC_START as u32);
    madt.write_u32(FLAGS_OFFSET, PCAT_COMPAT);

    // Entries are collected first and appended once: `Sdt` re-checksums the
    // whole table on every append.
    let mut entries = Vec::new();

    // vCPU i: APIC id i (as the vCPU setup programs it) and processor UID i
    // (as the DSDT's processor devices say in _UID).
    for id in 0..cfg.num_cpus {
        let entry = match u8::try_from(id) {
            Ok(id8) if id <= MAX_XAPIC_ID => {
                to_bytes(&ProcessorLocalApic::new(id8, id8, EnabledStatus::Enabled))
            }
            _ => local_x2apic(id, id),
        };
        entries.extend_from_slice(&entry);
    }

    // One IOAPIC with all GSIs from 0: KVM's in-kernel IOAPIC (IOAPIC_PINS).
    let ioapic = IoApic::new(ioapic_id(cfg.num_cpus), IOAPIC_START as u32, 0);
    entries.extend_from_slice(&to_bytes(&ioapic));

    // The SCI is level triggered, active high, as on ICH9. Without this
    // override Linux would assume the ACPI default for the SCI (level, active
    // low) and the line would look permanently asserted. There is no
    // override for IRQ 0: KVM's default routing puts the PIT on IOAPIC pin 0,
    // which is what Linux assumes for an ISA IRQ without an override.
    entries.extend_from_slice(&interrupt_source_override(
        ACPI_SCI_IRQ as u8,
        ACPI_SCI_IRQ,
        MPS_INTI_POLARITY_HIGH | MPS_INTI_TRIGGER_LEVEL,
    ));

    // NMIs come in on LINT1 of every local APIC, as on real PCs.
    entries.extend_from_slice(&local_apic_nmi(
        ALL_PROCESSORS_UID8,
        MPS_INTI_CONFORMS,
        LINT1,
    ));
    if cfg.num_cpus > MAX_XAPIC_ID + 1 {
        // The 8-bit "all processors" UID does not reach processors described
        // by x2APIC entries; they need the x2APIC form.
        entries.extend_from_slice(&local_x2apic_nmi(
            ALL_PROCESSORS_UID32,
            MPS_INTI_CONFORMS,
            LINT1,
        ));
    }

    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}
