//! virtio devices: the device-side trait that a transport (virtio-pci)
//! drives, and the feature bits tern's transport itself cares about.

pub mod pci;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM / IOMMU: never offered.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// A queue the driver enabled, handed to the device at activation.
pub struct ActiveQueue<'a> {
    /// Queue index.
    pub index: usize,
    /// Size the driver chose.
    pub size: u16,
    /// Largest size the device offers.
    pub max_size: u16,
    /// Descriptor table (guest physical).
    pub desc: u64,
    /// Driver (avail) ring.
    pub avail: u64,
    /// Device (used) ring.
    pub used: u64,
    /// Signalled when the driver notifies this queue.
    pub kick: &'a EventFd,
    /// To be signalled when the device used buffers.
    pub call: &'a EventFd,
    /// Next avail index the device should process (0 on activation).
    pub base: u16,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The backend could not be set up.
    #[error("{0}")]
    Backend(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 = block, 1 = net, 8 = scsi).
    fn device_type(&self) -> u16;
    /// How many queues the device has.
    fn num_queues(&self) -> usize;
    /// The largest size of each queue.
    fn queue_max_size(&self) -> u16;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific config space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving these queues.
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[ActiveQueue],
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving the queues.
    fn reset(&mut self);
    /// `attached`, or `disconnected` when the backend went away.
    fn state(&self) -> &'static str;
    /// If the device's backend went away and a new one listens, connects
    /// to it and, when the driver had the device running (`active`: the
    /// acked features and the queues, with their bases), restarts the rings.
    /// Returns whether it reconnected.
    fn reconnect(
        &mut self,
        _mem: &GuestMemoryMmap,
        _active: Option<(u64, &[ActiveQueue])>,
    ) -> Result<bool, ActivateError> {
        Ok(false)
    }
    /// Stops serving the queues for a snapshot or migration (the driver's
    /// setup stays). Returns each stopped queue's next avail index.
    fn pause(&mut self) -> Result<Vec<(usize, u16)>, ActivateError> {
        Ok(Vec::new())
    }
    /// Starts (Some) or stops (None) logging the guest pages the device's
    /// backend writes into `log`, for diff snapshots and migration.
    fn set_dirty_log(
        &mut self,
        _log: Option<std::sync::Arc<crate::vhost_user::dirty_log::DirtyLog>>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The managed backend's process ID, if tern started one.
    fn backend_pid(&self) -> Option<u32> {
        None
    }
    /// Who serves the device (a backend socket), for `GET /devices`.
    fn backend(&self) -> Option<String> {
        None
    }
}
