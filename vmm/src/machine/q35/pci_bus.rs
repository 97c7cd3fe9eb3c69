//! PCI bus 0 of the q35 machine: functions addressed by device/function
//! number, and the configuration space they share a shape of.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::devices::bus::lock;

/// Size of a PCIe function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;

/// A function on the bus, as seen through configuration space.
pub trait PciFunction: Send {
    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned) at `offset`.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` (1, 2 or 4 bytes, naturally aligned) at `offset`.
    fn write_config(&mut self, offset: u16, data: &[u8]);
}

/// A configuration space with a mask saying which bits the guest may write.
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
}

/// Standard header offsets.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Revision ID (8 bits); class code follows in the next 3 bytes.
    pub const REVISION: u16 = 0x08;
    /// Header type (8 bits).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Interrupt line (8 bits), scratch for the OS.
    pub const INTERRUPT_LINE: u16 = 0x3c;
}

impl ConfigSpace {
    /// A type-0 header with the given identity; command and interrupt line
    /// writable, everything else read-only until the caller says otherwise.
    pub fn new_type0(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut cs = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
        };
        cs.set_u16(reg::VENDOR_ID, vendor);
        cs.set_u16(reg::DEVICE_ID, device);
        cs.set_u32(reg::REVISION, (class << 8) | u32::from(revision));
        // I/O, memory, bus master, SERR, INTx disable.
        cs.set_writable(reg::COMMAND, &[0x07, 0x05]);
        cs.set_writable(reg::INTERRUPT_LINE, &[0xff]);
        cs
    }

    /// Every byte, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts saved bytes back (as many as fit).
    pub fn restore(&mut self, saved: &[u8]) {
        let n = saved.len().min(CONFIG_SPACE_SIZE);
        self.bytes[..n].copy_from_slice(&saved[..n]);
    }

    /// Sets bytes (as the device, ignoring the write mask).
    pub fn set(&mut self, offset: u16, data: &[u8]) {
        let at = usize::from(offset);
        self.bytes[at..at + data.len()].copy_from_slice(data);
    }

    /// Sets a 16-bit register.
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Sets a 32-bit register.
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        self.set(offset, &v.to_le_bytes());
    }

    /// Reads bytes as the device sees them.
    pub fn peek(&self, offset: u16, data: &mut [u8]) {
        let at = usize::from(offset);
        match self.bytes.get(at..at + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// Marks bits at `offset` as guest-writable.
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        let at = usize::from(offset);
        self.writable[at..at + mask.len()].copy_from_slice(mask);
    }
}

impl PciFunction for ConfigSpace {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        let at = usize::from(offset);
        match self.bytes.get(at..at + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let at = usize::from(offset);
        if at + data.len() > CONFIG_SPACE_SIZE {
            return;
        }
        for (i, &v) in data.iter().enumerate() {
            let m = self.writable[at + i];
            self.bytes[at + i] = (self.bytes[at + i] & !m) | (v & m);
        }
    }
}

/// A shared function on the bus.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// Errors from placing functions on the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    /// The slot/function is taken.
    #[error("PCI address 00:{dev:02x}.{func} is already in use")]
    Occupied {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
    /// Device or function number out of range.
    #[error("PCI address 00:{dev:02x}.{func} is out of range")]
    OutOfRange {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
}

/// Bus 0: every function reachable through configuration cycles.
#[derive(Default)]
pub struct PciBus {
    functions: BTreeMap<u8, SharedFunction>,
}

/// The bus shared between the CF8/CFC ports and the ECAM window.
pub type SharedPciBus = Arc<Mutex<PciBus>>;

fn devfn(dev: u8, func: u8) -> u8 {
    (dev << 3) | func
}

impl PciBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places a function at 00:dev.func.
    pub fn add(&mut self, dev: u8, func: u8, f: SharedFunction) -> Result<(), PciBusError> {
        if dev >= 32 || func >= 8 {
            return Err(PciBusError::OutOfRange { dev, func });
        }
        let key = devfn(dev, func);
        if self.functions.contains_key(&key) {
            return Err(PciBusError::Occupied { dev, func });
        }
        self.functions.insert(key, f);
        Ok(())
    }

    /// Removes the function at `dev`.`func` (hot unplug); returns whether
    /// there was one.
    pub fn remove(&mut self, dev: u8, func: u8) -> bool {
        self.functions.remove(&devfn(dev, func)).is_some()
    }

    /// A configuration read; absent functions read as all ones, so the
    /// guest sees vendor 0xffff and moves on.
    pub fn read(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(f) if aligned(offset, data.len()) => lock(f).read_config(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; writes to absent functions are dropped.
    pub fn write(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.function(bus, dev, func) {
            if aligned(offset, data.len()) {
                lock(f).write_config(offset, data);
            }
        }
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&SharedFunction> {
        if bus != 0 || dev >= 32 || func >= 8 {
            return None;
        }
        self.functions.get(&devfn(dev, func))
    }
}

/// Config accesses are 1, 2 or 4 bytes and naturally aligned, within 4 KiB.
fn aligned(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(offset) % len == 0
        && usize::from(offset) + len <= CONFIG_SPACE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_functions_read_ones_and_masks_apply() {
        let mut bus = PciBus::new();
        let cs = ConfigSpace::new_type0(0x8086, 0x29c0, 0x06_00_00, 0);
        bus.add(0, 0, Arc::new(Mutex::new(cs))).unwrap();
        let mut d = [0u8; 4];
        bus.read(0, 0, 0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        bus.read(0, 1, 0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        bus.read(1, 0, 0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // Vendor ID is read-only; command is writable.
        bus.write(0, 0, 0, 0, &[0, 0, 0, 0]);
        bus.write(0, 0, 0, 4, &[0xff, 0xff]);
        bus.read(0, 0, 0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        let mut c = [0u8; 2];
        bus.read(0, 0, 0, 4, &mut c);
        assert_eq!(u16::from_le_bytes(c), 0x0507);
        assert!(bus
            .add(
                0,
                0,
                Arc::new(Mutex::new(ConfigSpace::new_type0(1, 2, 3, 4)))
            )
            .is_err());
    }
}
