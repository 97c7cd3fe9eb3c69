//! The two fixed chipset functions of q35: the MCH host bridge (00:00.0)
//! and the ICH9 LPC bridge (00:1f.0). They carry identity and the few
//! registers Linux reads from them; no BARs.

use super::pci_bus::ConfigSpace;
use crate::machine::layout::{ACPI_PM_BASE, ECAM_START};

/// Intel's vendor ID.
pub const VENDOR_INTEL: u16 = 0x8086;
/// Q35 MCH host bridge device ID.
pub const DEVICE_Q35_MCH: u16 = 0x29c0;
/// ICH9 LPC bridge device ID.
pub const DEVICE_ICH9_LPC: u16 = 0x2918;
/// Host bridge position.
pub const HOST_BRIDGE_DEVFN: (u8, u8) = (0, 0);
/// LPC bridge position.
pub const LPC_DEVFN: (u8, u8) = (0x1f, 0);

/// Red Hat's subsystem IDs, as QEMU's q35 uses, so guests' quirk tables
/// treat the machine as a virtual q35.
const SUBSYS_VENDOR: u16 = 0x1af4;
const SUBSYS_ID: u16 = 0x1100;

/// MCH PCIEXBAR register: ECAM base, 256 buses, enabled.
const MCH_PCIEXBAR: u16 = 0x60;
/// ICH9 LPC PMBASE and ACPI control registers.
const LPC_PMBASE: u16 = 0x40;
const LPC_ACPI_CNTL: u16 = 0x44;
const ACPI_CNTL_ACPI_EN: u8 = 0x80;

/// The host bridge's configuration space.
pub fn host_bridge() -> ConfigSpace {
    let mut cs = ConfigSpace::new_type0(VENDOR_INTEL, DEVICE_Q35_MCH, 0x06_00_00, 0);
    cs.set_u16(super::pci_bus::reg::SUBSYSTEM_VENDOR_ID, SUBSYS_VENDOR);
    cs.set_u16(super::pci_bus::reg::SUBSYSTEM_ID, SUBSYS_ID);
    // Bits 2:1 = 00 select 256 buses; bit 0 enables the window.
    cs.set_u32(MCH_PCIEXBAR, (ECAM_START as u32) | 1);
    cs.set_u32(MCH_PCIEXBAR + 4, (ECAM_START >> 32) as u32);
    cs
}

/// The LPC bridge's configuration space.
pub fn lpc_bridge() -> ConfigSpace {
    let mut cs = ConfigSpace::new_type0(VENDOR_INTEL, DEVICE_ICH9_LPC, 0x06_01_00, 2);
    cs.set_u16(super::pci_bus::reg::SUBSYSTEM_VENDOR_ID, SUBSYS_VENDOR);
    cs.set_u16(super::pci_bus::reg::SUBSYSTEM_ID, SUBSYS_ID);
    // PMBASE (bit 0: I/O space) so that Linux's ICH quirk claims the PM
    // block the FADT points at.
    cs.set_u32(LPC_PMBASE, u32::from(ACPI_PM_BASE) | 1);
    cs.set(LPC_ACPI_CNTL, &[ACPI_CNTL_ACPI_EN]);
    cs
}
