//! ICH9 reset control register (port 0xCF9). Writing a value with the
//! "reset CPU" bit (bit 2) set resets the machine, which ends tern.

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSender};

const RESET_CPU: u8 = 1 << 2;

/// The 0xCF9 reset register.
pub struct ResetControl {
    value: u8,
    exit: ExitSender,
}

impl ResetControl {
    /// A reset register reporting through `exit`.
    pub fn new(exit: ExitSender) -> Self {
        Self { value: 0, exit }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a byte write to 0xCF9 itself is the register; a dword write at
        // 0xCF8 is PCI config addressing and never reaches this device.
        if offset != 0 || data.len() != 1 {
            return;
        }
        self.value = data[0] & !RESET_CPU;
        if data[0] & RESET_CPU != 0 {
            self.exit.send(ExitReason::Reset("0xcf9 reset control"));
        }
    }
}
