//! Hot plug and unplug of virtio-blk and virtio-net devices on a running VM,
//! by ACPI PCI hot plug (`devices::pci_hotplug`, the DSDT's PCNT/`_EJ0`):
//! a plug builds the device (its backend started or connected), puts it in
//! a free slot and tells the guest; an unplug asks the guest to let go and,
//! when it ejects the slot, takes the device off the machine and frees
//! everything it held. See `docs/hotplug.md`.

use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::config::{DriveConfig, DriveInterface, NetConfig};
use crate::devices::bus::lock;
use crate::devices::virtio::pci::BAR_SIZE;
use crate::machine::layout::{MMIO32_END, MMIO32_START};
use crate::vmm::{attach, blk_function, net_function, SlotPicker, VirtioEntry, Vmm, VmmError};

/// Why a plug or unplug was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// Not allowed now, or not for this device.
    #[error("{0}")]
    Refused(String),
    /// Building the device failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

fn refused(msg: impl Into<String>) -> HotplugError {
    HotplugError::Refused(msg.into())
}

impl Vmm {
    fn check_can_plug(&self) -> Result<(), HotplugError> {
        if self.paused {
            return Err(refused(
                "the VM is paused; resume it before plugging or unplugging devices",
            ));
        }
        Ok(())
    }

    /// A BAR allocator over the 32-bit window without the BARs in use now
    /// (where the guest has them).
    fn bar_allocator(&self) -> Result<AddressAllocator, VmmError> {
        let mut bars = AddressAllocator::new(MMIO32_START, MMIO32_END - MMIO32_START)
            .map_err(VmmError::Bar)?;
        for v in &self.virtio {
            let bar = lock(&v.device).bar();
            if bar != 0 {
                // A BAR the guest moved outside the window is not ours to track.
                let _ = bars.allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::ExactMatch(bar));
            }
        }
        Ok(bars)
    }

    fn slot_for(&self, pinned: Option<u8>) -> Result<u8, HotplugError> {
        let mut slots = SlotPicker::in_use(&self.virtio);
        if let Some(p) = pinned {
            if self.virtio.iter().any(|v| v.slot == p) {
                return Err(refused(format!("PCI slot {p} is in use")));
            }
        }
        slots.pick(pinned).map_err(|e| refused(e.to_string()))
    }

    fn plug(&mut self, entry: VirtioEntry) {
        let slot = entry.slot;
        if let Some(log) = &self.dirty_log {
            if let Err(e) = lock(&entry.device).set_dirty_log(Some(log.clone())) {
                log::warn!("device {}: no dirty log: {e}", entry.id);
            }
        }
        lock(&self.watched).push(std::sync::Arc::downgrade(&entry.device));
        let mut entry = entry;
        entry.plugging = true;
        self.virtio.push(entry);
        self.build_order();
        crate::vmm::record_slots(&mut self.config, &self.virtio);
        lock(&self.machine.hotplug).plug(slot);
    }

    /// Puts the devices in the order a VM built from the configuration has
    /// them (virtio-blk drives, root first, then the virtio-scsi controller,
    /// then NICs, each in configuration order): a snapshot or migration
    /// stream lists device states in this order and the restoring side
    /// rebuilds the devices from the configuration in it.
    fn build_order(&mut self) {
        let config = &self.config;
        let rank = |v: &VirtioEntry| -> (u8, bool, usize) {
            if !v.luns.is_empty() {
                return (1, false, 0);
            }
            if let Some(i) = config.drives.iter().position(|d| d.drive_id == v.id) {
                return (0, !config.drives[i].is_root_device, i);
            }
            let i = config
                .network_interfaces
                .iter()
                .position(|n| n.iface_id == v.id)
                .unwrap_or(usize::MAX);
            (2, false, i)
        };
        self.virtio.sort_by_cached_key(rank);
    }

    /// Hot plugs a virtio-blk drive.
    pub fn hotplug_drive(&mut self, d: DriveConfig) -> Result<(), HotplugError> {
        self.check_can_plug()?;
        if d.is_root_device {
            return Err(refused("a root device cannot be hot plugged"));
        }
        if self.config.drives.iter().any(|x| x.drive_id == d.drive_id) {
            return Err(refused(format!(
                "drive {} exists; a running VM's drives cannot be changed",
                d.drive_id
            )));
        }
        if d.interface == DriveInterface::VirtioScsi {
            return self.hotplug_lun(d);
        }
        let mut next = self.config.clone();
        next.drives.push(d.clone());
        next.validate_drives().map_err(|e| refused(e.to_string()))?;
        let slot = self.slot_for(d.pci_slot)?;
        let mut bars = self.bar_allocator()?;
        let (blk, pid) = blk_function(&d, slot, &self.pci_env)?;
        let label = format!("drive {}", d.drive_id);
        let entry = attach(
            &mut bars,
            slot,
            &label,
            &d.drive_id,
            blk,
            pid,
            &self.pci_env,
            &self.machine,
        )?;
        self.config.drives.push(d);
        self.plug(entry);
        log::info!("hot plugged drive at 00:{slot:02x}.0");
        Ok(())
    }

    /// Hot plugs a virtio-net NIC.
    pub fn hotplug_net(&mut self, n: NetConfig) -> Result<(), HotplugError> {
        self.check_can_plug()?;
        if self
            .config
            .network_interfaces
            .iter()
            .any(|x| x.iface_id == n.iface_id)
        {
            return Err(refused(format!(
                "network interface {} exists; a running VM's NICs cannot be changed",
                n.iface_id
            )));
        }
        let mut next = self.config.clone();
        next.network_interfaces.push(n.clone());
        next.validate_drives().map_err(|e| refused(e.to_string()))?;
        let slot = self.slot_for(n.pci_slot)?;
        let mut bars = self.bar_allocator()?;
        let (net, pid) = net_function(&n, slot, &self.pci_env)?;
        let label = format!("network interface {}", n.iface_id);
        let entry = attach(
            &mut bars,
            slot,
            &label,
            &n.iface_id,
            net,
            pid,
            &self.pci_env,
            &self.machine,
        )?;
        self.config.network_interfaces.push(n);
        self.plug(entry);
        log::info!("hot plugged network interface at 00:{slot:02x}.0");
        Ok(())
    }

    /// Asks the guest to let go of drive or NIC `id`; it is removed when
    /// the guest ejects it.
    pub fn request_unplug(&mut self, id: &str) -> Result<(), HotplugError> {
        self.check_can_plug()?;
        if self
            .config
            .drives
            .iter()
            .any(|d| d.drive_id == id && d.is_root_device)
        {
            return Err(refused(format!("drive {id} is the root device")));
        }
        if self.is_lun(id) {
            return self.remove_lun(id);
        }
        let Some(entry) = self.virtio.iter_mut().find(|v| v.id == id) else {
            return Err(refused(format!("no drive or network interface {id}")));
        };
        if entry.unplugging {
            return Ok(());
        }
        entry.unplugging = true;
        let slot = entry.slot;
        lock(&self.machine.hotplug).request_unplug(slot);
        log::info!("asked the guest to release {id} at 00:{slot:02x}.0");
        Ok(())
    }

    /// Removes the devices the guest ejected: their rings stop, their
    /// interrupts, ioeventfds, BAR and slot are freed, their backends stop.
    /// Returns the ids removed.
    pub fn complete_ejects(&mut self) -> Vec<String> {
        let slots = lock(&self.machine.hotplug).ejects().take();
        let mut removed = Vec::new();
        for slot in (0..32u8).filter(|s| slots & (1 << s) != 0) {
            let Some(i) = self.virtio.iter().position(|v| v.slot == slot) else {
                continue;
            };
            let entry = self.virtio.remove(i);
            lock(&entry.device).detach();
            lock(&self.machine.pci).remove(slot, 0);
            lock(&self.machine.hotplug).removed(slot);
            self.config.drives.retain(|d| d.drive_id != entry.id);
            self.config
                .network_interfaces
                .retain(|n| n.iface_id != entry.id);
            log::info!("{} removed from 00:{slot:02x}.0", entry.id);
            removed.push(entry.id.clone());
            // Dropping the entry drops the device and stops its backend.
        }
        removed
    }
}
