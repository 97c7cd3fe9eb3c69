//! The isa-debug-exit port: a test guest writes a value and tern exits with
//! status `(value << 1) | 1`, QEMU's convention, so harnesses carry over.

use super::bus::BusDevice;
use crate::exit::{ExitReason, ExitSender};

/// The debug-exit device.
pub struct DebugExit {
    exit: ExitSender,
}

impl DebugExit {
    /// A debug-exit port reporting through `exit`.
    pub fn new(exit: ExitSender) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.exit.send(ExitReason::DebugExit(v));
        }
    }
}
