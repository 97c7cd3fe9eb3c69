//! Type-1 PCI configuration access through ports 0xCF8 (address) and 0xCFC
//! (data). Port 0xCF9, inside the address dword, is the ICH9 reset control
//! register when accessed as a byte, so this device forwards it.

use super::pci_bus::SharedPciBus;
use crate::devices::bus::{lock, BusDevice};
use crate::devices::reset_control::ResetControl;

const ENABLE: u32 = 1 << 31;

/// The 0xCF8-0xCFF port range.
pub struct PciConfigIo {
    address: u32,
    pci: SharedPciBus,
    reset: ResetControl,
}

impl PciConfigIo {
    /// Config ports for `pci`, with the reset register at 0xCF9.
    pub fn new(pci: SharedPciBus, reset: ResetControl) -> Self {
        Self {
            address: 0,
            pci,
            reset,
        }
    }

    /// Bus, device, function and register for a data access at byte `lane`
    /// of the data port; None when the enable bit is clear.
    fn target(&self, lane: u64) -> Option<(u8, u8, u8, u16)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let bus = (a >> 16) as u8;
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = ((a >> 8) & 0x7) as u8;
        let reg = (a & 0xfc) as u16 + lane as u16;
        Some((bus, dev, func, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            1 if data.len() == 1 => self.reset.read(0, data),
            4..=7 => match self.target(offset - 4) {
                Some((b, d, f, r)) => lock(&self.pci).read(b, d, f, r, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            1 if data.len() == 1 => self.reset.write(0, data),
            4..=7 => {
                if let Some((b, d, f, r)) = self.target(offset - 4) {
                    lock(&self.pci).write(b, d, f, r, data);
                }
            }
            _ => {}
        }
    }
}
