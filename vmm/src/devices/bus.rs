//! Port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! vCPU threads look up the device for each PIO/MMIO exit here. Devices sit
//! behind a `Mutex` because several vCPUs may touch the same device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from bus registration.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
/// Ranges can change while vCPUs run (a guest moving a PCI BAR): lookups
/// take a read lock only long enough to clone the device's handle, so a
/// device may remap ranges from inside its own handler.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unmaps the range starting at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&base)
            .is_some()
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (addr - base, entry.device.clone()))
    }

    /// Reads from the device at `addr`; returns false (and fills `data` with
    /// ones, like an unclaimed bus) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler
/// panicked on one vCPU must not take every other vCPU down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_and_rejects_overlap() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 8).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x17, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x8, 9).is_err());
        bus.insert(Arc::new(Mutex::new(Echo(2))), 0x18, 2).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x1a, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x18, &[9]));
        assert!(bus.read(0x19, &mut b));
        assert_eq!(b[0], 10);
        assert!(bus.remove(0x18));
        assert!(!bus.read(0x19, &mut b));
    }
}
