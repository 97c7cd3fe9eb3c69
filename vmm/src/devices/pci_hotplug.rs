//! ACPI PCI hot plug registers at `layout::PCI_HOTPLUG_PORT`, the device
//! side of the DSDT's PCNT/`_EJ0` methods (see `machine::q35::acpi::dsdt`):
//!
//! | offset | name | access                                                |
//! |--------|------|-------------------------------------------------------|
//! | 0x0    | PCIU | read: slots that gained a device since the last read  |
//! | 0x4    | PCID | read: slots whose device the VMM wants removed        |
//! | 0x8    | B0EJ | write: slots the OS has let go of (eject them)        |
//! | 0xc    | SLOT | read: slots that hold a hot-pluggable device now      |
//!
//! Bit n is slot n on bus 0. Setting PCIU or PCID raises GPE 1 (the SCI);
//! a write to B0EJ queues the ejects for the VMM thread, which removes the
//! devices and frees their resources.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::acpi_pm::AcpiPm;
use super::bus::{lock, BusDevice};
use crate::machine::layout::PCI_HOTPLUG_GPE;

const PCIU: u64 = 0x0;
const PCID: u64 = 0x4;
const B0EJ: u64 = 0x8;
const SLOT: u64 = 0xc;

/// Ejects the guest asked for, waiting for the VMM thread.
#[derive(Default)]
pub struct EjectQueue {
    slots: Mutex<u32>,
}

impl EjectQueue {
    /// Takes the slots ejected since the last call.
    pub fn take(&self) -> u32 {
        std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The registers.
pub struct PciHotplug {
    up: u32,
    down: u32,
    present: u32,
    ejects: Arc<EjectQueue>,
    /// Signalled when `ejects` has something.
    eject_evt: EventFd,
    acpi_pm: Arc<Mutex<AcpiPm>>,
}

impl PciHotplug {
    /// Registers that raise GPE 1 through `acpi_pm` and report ejects
    /// through `eject_evt`.
    pub fn new(acpi_pm: Arc<Mutex<AcpiPm>>, eject_evt: EventFd) -> Self {
        Self {
            up: 0,
            down: 0,
            present: 0,
            ejects: Arc::default(),
            eject_evt,
            acpi_pm,
        }
    }

    /// The queue the VMM thread drains when the eject eventfd fires.
    pub fn ejects(&self) -> Arc<EjectQueue> {
        self.ejects.clone()
    }

    /// Marks hot-pluggable devices present from the start (boot, restore),
    /// without telling the guest: they are in its first bus scan.
    pub fn set_present(&mut self, slot: u8) {
        self.present |= 1 << slot;
    }

    /// A device went into `slot`: tell the guest.
    pub fn plug(&mut self, slot: u8) {
        let bit = 1 << slot;
        self.present |= bit;
        self.down &= !bit;
        self.up |= bit;
        lock(&self.acpi_pm).raise_gpe(PCI_HOTPLUG_GPE);
    }

    /// Asks the guest to let go of the device in `slot`.
    pub fn request_unplug(&mut self, slot: u8) {
        self.down |= 1 << slot;
        lock(&self.acpi_pm).raise_gpe(PCI_HOTPLUG_GPE);
    }

    /// The device in `slot` is gone (after its eject).
    pub fn removed(&mut self, slot: u8) {
        let bit = 1 << slot;
        self.present &= !bit;
        self.down &= !bit;
        self.up &= !bit;
    }

    fn eject(&mut self, slots: u32) {
        let slots = slots & self.present;
        if slots == 0 {
            return;
        }
        self.down &= !slots;
        *self.ejects.slots.lock().unwrap_or_else(|e| e.into_inner()) |= slots;
        let _ = self.eject_evt.write(1);
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            PCIU => std::mem::take(&mut self.up),
            PCID => self.down,
            SLOT => self.present,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let at = (offset & 3) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(at + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != B0EJ || data.is_empty() {
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.eject(u32::from_le_bytes(b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::exit_channel;

    fn device() -> (PciHotplug, Arc<Mutex<AcpiPm>>) {
        let (tx, _rx) = exit_channel().unwrap();
        let pm = Arc::new(Mutex::new(AcpiPm::new(tx)));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (PciHotplug::new(pm.clone(), evt), pm)
    }

    fn read32(d: &mut PciHotplug, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn plug_unplug_and_eject() {
        let (mut d, _pm) = device();
        d.plug(5);
        assert_eq!(read32(&mut d, PCIU), 1 << 5);
        assert_eq!(read32(&mut d, PCIU), 0, "PCIU clears on read");
        assert_eq!(read32(&mut d, SLOT), 1 << 5);
        d.request_unplug(5);
        assert_eq!(read32(&mut d, PCID), 1 << 5);
        // An eject of an empty slot is ignored; of slot 5 it is queued.
        d.write(B0EJ, &(1u32 << 7).to_le_bytes());
        assert_eq!(d.ejects().take(), 0);
        d.write(B0EJ, &(1u32 << 5).to_le_bytes());
        assert_eq!(read32(&mut d, PCID), 0);
        assert_eq!(d.ejects().take(), 1 << 5);
        assert_eq!(d.ejects().take(), 0);
        d.removed(5);
        assert_eq!(read32(&mut d, SLOT), 0);
    }
}
