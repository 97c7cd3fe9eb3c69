//! A virtio device whose queues a vhost-user backend serves: virtio-blk
//! (tern-blk, or any vhost-user-blk backend), virtio-net (tern-net) and
//! virtio-scsi (tern-scsi, or any vhost-user-scsi backend). tern only relays
//! configuration: capacity, MAC, queue counts, SCSI limits and features come
//! from the backend.

use vm_memory::GuestMemoryMmap;

use super::backend_process::BackendProcess;
use super::handle::{VhostUserError, VhostUserHandle, VringSetup};
use crate::devices::virtio::{ActivateError, ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device type of a network device.
pub const VIRTIO_ID_NET: u16 = 1;
/// virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// virtio device type of a SCSI host.
pub const VIRTIO_ID_SCSI: u16 = 8;
/// Bytes of `struct virtio_scsi_config`: num_queues, seg_max, max_sectors,
/// cmd_per_lun, event_info_size, sense_size, cdb_size, max_channel,
/// max_target, max_lun.
const SCSI_CONFIG_LEN: u32 = 36;
/// virtio-scsi queues before the request queues: control and event.
pub const SCSI_FIXED_QUEUES: usize = 2;
/// Bytes of `struct virtio_net_config` tern reads: mac, status,
/// max_virtqueue_pairs, mtu.
const NET_CONFIG_LEN: u32 = 12;
/// Bytes of `struct virtio_blk_config` tern reads: the virtio 1.1 layout,
/// up to `write_zeroes_may_unmap` and its padding. Newer fields (secure
/// erase, zoned) are not offered, and backends built against older headers
/// (QEMU 7's qemu-storage-daemon) refuse a longer read.
const BLK_CONFIG_LEN: u32 = 60;
/// Offset of `num_queues` in `struct virtio_blk_config`.
const NUM_QUEUES_OFFSET: usize = 34;
/// Largest queue tern offers.
const QUEUE_MAX: u16 = 256;
/// Features tern's transport can carry: the device's own (bits 0-31, which
/// include indirect descriptors and event index) and VERSION_1. Packed
/// rings, notification data, queue reset and the platform IOMMU are not
/// offered.
const TRANSPORT_FEATURES: u64 = 0xffff_ffff | VIRTIO_F_VERSION_1;

/// The device.
pub struct VhostUserDevice {
    device_type: u16,
    handle: VhostUserHandle,
    config: Vec<u8>,
    features: u64,
    /// The dirty log the backend writes to, while pages are tracked.
    dirty_log: Option<std::sync::Arc<super::dirty_log::DirtyLog>>,
    /// The managed backend process, if tern started it; ends with the device.
    _process: Option<BackendProcess>,
}

impl VhostUserDevice {
    /// Connects to the backend at `socket`, reads `config_len` bytes of its
    /// config and shares guest memory with it.
    fn connect(
        device_type: u16,
        config_len: u32,
        socket: &std::path::Path,
        max_queues: usize,
        mem: &GuestMemoryMmap,
        process: Option<BackendProcess>,
    ) -> Result<Self, VhostUserError> {
        let mut handle = VhostUserHandle::connect(socket, max_queues)?;
        let config = handle.get_config(config_len)?;
        handle.set_mem_table(mem)?;
        if handle.features() & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Missing("VIRTIO_F_VERSION_1"));
        }
        let features = handle.features() & TRANSPORT_FEATURES;
        Ok(Self {
            device_type,
            handle,
            config,
            features,
            dirty_log: None,
            _process: process,
        })
    }

    /// A virtio-blk device served by the backend at `socket`.
    pub fn blk(
        socket: &std::path::Path,
        max_queues: usize,
        mem: &GuestMemoryMmap,
        process: Option<BackendProcess>,
    ) -> Result<Self, VhostUserError> {
        let mut d = Self::connect(
            VIRTIO_ID_BLOCK,
            BLK_CONFIG_LEN,
            socket,
            max_queues,
            mem,
            process,
        )?;
        // The config's num_queues must agree with the queues tern exposes
        // (fewer when the drive asked for fewer than the backend serves).
        let queues = d.handle.queue_num() as u16;
        if let Some(nq) = d.config.get_mut(NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2) {
            let backend = u16::from_le_bytes([nq[0], nq[1]]);
            nq.copy_from_slice(&queues.min(backend.max(1)).to_le_bytes());
        }
        Ok(d)
    }

    /// A virtio-net device served by the backend at `socket` (queues: rx
    /// and tx per pair, then the control queue, as the backend says).
    pub fn net(
        socket: &std::path::Path,
        max_queues: usize,
        mem: &GuestMemoryMmap,
        process: Option<BackendProcess>,
    ) -> Result<Self, VhostUserError> {
        Self::connect(
            VIRTIO_ID_NET,
            NET_CONFIG_LEN,
            socket,
            max_queues,
            mem,
            process,
        )
    }

    /// A virtio-scsi controller served by the backend at `socket`: the
    /// control queue, the event queue, then the request queues (at most
    /// `max_queues` in all). The config's `num_queues` (request queues) is
    /// set to the request queues tern exposes.
    pub fn scsi(
        socket: &std::path::Path,
        max_queues: usize,
        mem: &GuestMemoryMmap,
        process: Option<BackendProcess>,
    ) -> Result<Self, VhostUserError> {
        let mut d = Self::connect(
            VIRTIO_ID_SCSI,
            SCSI_CONFIG_LEN,
            socket,
            max_queues,
            mem,
            process,
        )?;
        let queues = d.handle.queue_num();
        if queues <= SCSI_FIXED_QUEUES {
            return Err(VhostUserError::Missing(
                "a request queue (virtio-scsi needs control, event and request queues; is VHOST_USER_PROTOCOL_F_MQ offered?)",
            ));
        }
        let request = u32::try_from(queues - SCSI_FIXED_QUEUES).unwrap_or(u32::MAX);
        if let Some(nq) = d.config.get_mut(..4) {
            let backend = u32::from_le_bytes([nq[0], nq[1], nq[2], nq[3]]);
            nq.copy_from_slice(&request.min(backend.max(1)).to_le_bytes());
        }
        Ok(d)
    }

    /// A field of a virtio-scsi controller's config (`offset` in bytes).
    fn config_u32(&self, offset: usize) -> u32 {
        self.config
            .get(offset..offset + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0)
    }

    /// Request queues of a virtio-scsi controller, from its config.
    pub fn scsi_request_queues(&self) -> u32 {
        self.config_u32(0)
    }

    /// Highest LUN a virtio-scsi controller's config announces.
    pub fn scsi_max_lun(&self) -> u32 {
        self.config_u32(32)
    }

    /// The MAC address in the backend's config (net devices).
    pub fn mac(&self) -> Option<[u8; 6]> {
        (self.device_type == VIRTIO_ID_NET)
            .then(|| self.config.get(..6)?.try_into().ok())
            .flatten()
    }

    /// Capacity in 512-byte sectors, from the backend's config.
    pub fn capacity(&self) -> u64 {
        self.config
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.handle.queue_num()
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = offset as usize;
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio-blk's only writable field is writeback (with CONFIG_WCE).
        if let Err(e) = self.handle.set_config(offset as u32, data) {
            log::warn!("vhost-user device {}: {e}", self.handle.socket().display());
            return;
        }
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..) {
            let n = dst.len().min(data.len());
            dst[..n].copy_from_slice(&data[..n]);
        }
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        queues: &[ActiveQueue],
    ) -> Result<(), ActivateError> {
        let vrings: Vec<VringSetup> = queues
            .iter()
            .map(|q| VringSetup {
                index: q.index,
                size: q.size,
                max_size: q.max_size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: q.kick,
                call: q.call,
                base: q.base,
            })
            .collect();
        self.handle
            .start(mem, features, &vrings)
            .map_err(|e| ActivateError::Backend(e.to_string()))
    }

    fn reconnect(
        &mut self,
        mem: &GuestMemoryMmap,
        active: Option<(u64, &[ActiveQueue])>,
    ) -> Result<bool, ActivateError> {
        if !self.handle.is_gone() {
            return Ok(false);
        }
        // A managed backend that died is started again on the same socket.
        if let Some(p) = self._process.as_mut() {
            p.restart_if_exited()
                .map_err(|e| ActivateError::Backend(e.to_string()))?;
        }
        let socket = self.handle.socket().to_owned();
        let handle = match VhostUserHandle::try_connect(&socket, self.handle.queue_num()) {
            Ok(h) => h,
            // Nobody listening yet: try again later.
            Err(VhostUserError::Connect { .. }) => return Ok(false),
            Err(e) => return Err(ActivateError::Backend(e.to_string())),
        };
        let err = |e: VhostUserError| ActivateError::Backend(e.to_string());
        if handle.features() & self.features != self.features
            || handle.queue_num() < self.handle.queue_num()
        {
            return Err(ActivateError::Backend(format!(
                "the backend at {} now offers different features or fewer queues",
                socket.display()
            )));
        }
        handle.set_mem_table(mem).map_err(err)?;
        self.handle = handle;
        // The new backend logs into the same dirty log as the old one.
        self.handle
            .set_dirty_log(self.dirty_log.clone())
            .map_err(err)?;
        if let Some((features, queues)) = active {
            self.activate(mem, features, queues)?;
        }
        log::info!(
            "vhost-user device {}: backend reconnected",
            socket.display()
        );
        Ok(true)
    }

    fn set_dirty_log(
        &mut self,
        log: Option<std::sync::Arc<super::dirty_log::DirtyLog>>,
    ) -> Result<(), ActivateError> {
        self.handle
            .set_dirty_log(log.clone())
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        self.dirty_log = log;
        Ok(())
    }

    fn pause(&mut self) -> Result<Vec<(usize, u16)>, ActivateError> {
        self.handle
            .stop()
            .map_err(|e| ActivateError::Backend(e.to_string()))
    }

    fn reset(&mut self) {
        if let Err(e) = self.handle.stop() {
            log::warn!(
                "vhost-user device {}: stopping the rings: {e}",
                self.handle.socket().display()
            );
        }
    }

    fn state(&self) -> &'static str {
        if self.handle.is_gone() {
            "disconnected"
        } else {
            "attached"
        }
    }

    fn backend_pid(&self) -> Option<u32> {
        self._process.as_ref().map(BackendProcess::pid)
    }

    fn backend(&self) -> Option<String> {
        Some(self.handle.socket().display().to_string())
    }
}
