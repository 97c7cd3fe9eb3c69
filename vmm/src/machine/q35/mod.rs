//! The q35 chipset: MCH host bridge, ICH9 LPC, PCIe configuration access
//! (ports and ECAM) and the ACPI tables that describe the machine.

pub mod acpi;
pub mod chipset;
pub mod config_io;
pub mod ecam;
pub mod pci_bus;
