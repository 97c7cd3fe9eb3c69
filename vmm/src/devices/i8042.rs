//! The i8042 keyboard controller, as far as reset goes: the guest writes
//! 0xFE to port 0x64 to pulse the CPU reset line (vm-superio's device).

use vm_superio::I8042Device;

use super::bus::BusDevice;
use crate::exit::ExitTrigger;

/// The i8042 on ports 0x60-0x64.
pub struct I8042 {
    dev: I8042Device<ExitTrigger>,
}

impl I8042 {
    /// An i8042 whose reset line fires `reset`.
    pub fn new(reset: ExitTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.dev.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let _ = self.dev.write(off, v);
        }
    }
}
