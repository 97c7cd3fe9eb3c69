//! The PCIe enhanced configuration access mechanism (ECAM/MMCONFIG): each
//! function's 4 KiB configuration space mapped at
//! `ECAM_START + (bus << 20 | dev << 15 | func << 12)`.

use super::pci_bus::SharedPciBus;
use crate::devices::bus::{lock, BusDevice};

/// The ECAM MMIO window.
pub struct Ecam {
    pci: SharedPciBus,
}

impl Ecam {
    /// An ECAM window over `pci`.
    pub fn new(pci: SharedPciBus) -> Self {
        Self { pci }
    }
}

fn decode(offset: u64) -> (u8, u8, u8, u16) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r) = decode(offset);
        lock(&self.pci).read(b, d, f, r, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, r) = decode(offset);
        lock(&self.pci).write(b, d, f, r, data);
    }
}
