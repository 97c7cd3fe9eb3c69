//! One vhost-user connection, as every vhost-user device (blk, net, scsi)
//! uses it: connect, negotiate features and protocol features, share guest
//! memory, set up and stop vrings, read the device config, and notice when
//! the backend goes away.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket cannot be reached.
    #[error("cannot connect to vhost-user backend {path}: {err}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// A protocol step failed (the backend refused, or is gone).
    #[error("vhost-user {step} failed: {err}")]
    Protocol {
        /// What we were doing.
        step: &'static str,
        /// The vhost crate's error.
        err: vhost::Error,
    },
    /// The backend lacks something the device needs.
    #[error("vhost-user backend lacks {0}")]
    Missing(&'static str),
    /// A guest address of a ring is not in guest memory.
    #[error("queue {queue}: ring address {addr:#x} is not in guest memory")]
    BadRingAddress {
        /// Queue index.
        queue: usize,
        /// The guest physical address.
        addr: u64,
    },
    /// The memory cannot be shared (not file-backed).
    #[error("guest memory region at {0:#x} is not backed by a file and cannot be shared")]
    NotShareable(u64),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |err| VhostUserError::Protocol { step, err }
}

/// VHOST_F_LOG_ALL: the backend logs every page it writes.
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// How long a backend may take to answer one message.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects, retrying briefly while the backend has bound its socket but
/// not yet started listening.
fn connect_with_retry(path: &Path) -> std::io::Result<UnixStream> {
    let mut tries = 0;
    loop {
        match UnixStream::connect(path) {
            // 1 s in all, in short steps: a restore waits on this.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 5000 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            other => return other,
        }
    }
}

/// Protocol features tern asks for (each only if the backend offers it).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// A queue the driver enabled, as the backend needs it.
pub struct VringSetup<'a> {
    /// Queue index.
    pub index: usize,
    /// Size the driver chose.
    pub size: u16,
    /// Largest size the device offers.
    pub max_size: u16,
    /// Guest physical addresses of the descriptor table, avail and used rings.
    pub desc: u64,
    /// Avail (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
    /// Kick eventfd (a KVM ioeventfd on the notify address).
    pub kick: &'a EventFd,
    /// Call eventfd (an irqfd, or tern's INTx relay).
    pub call: &'a EventFd,
    /// Next avail index to process: 0 for a fresh ring; the ring's used
    /// index when a restarted backend takes over a running ring (requests
    /// the old one took but did not complete are processed again).
    pub base: u16,
}

/// A connected backend.
pub struct VhostUserHandle {
    frontend: Frontend,
    socket: PathBuf,
    /// A second handle on the socket, only polled for hang-up.
    monitor: UnixStream,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: usize,
    started: Vec<usize>,
    /// The shared dirty log, while dirty pages are tracked.
    dirty_log: Option<std::sync::Arc<super::dirty_log::DirtyLog>>,
    /// The features last acked (without LOG_ALL).
    acked: u64,
}

impl VhostUserHandle {
    /// Connects and negotiates: owner, features, protocol features, queue
    /// count (at most `max_queues`).
    pub fn connect(path: &Path, max_queues: usize) -> Result<Self, VhostUserError> {
        Self::connect_stream(path, max_queues, connect_with_retry(path))
    }

    /// Connects once, without waiting for a backend that is not listening
    /// (for reconnect attempts).
    pub fn try_connect(path: &Path, max_queues: usize) -> Result<Self, VhostUserError> {
        Self::connect_stream(path, max_queues, UnixStream::connect(path))
    }

    fn connect_stream(
        path: &Path,
        max_queues: usize,
        stream: std::io::Result<UnixStream>,
    ) -> Result<Self, VhostUserError> {
        let stream = stream.map_err(|err| VhostUserError::Connect {
            path: path.to_owned(),
            err,
        })?;
        // A backend that stops answering mid-message must not hang tern.
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|err| VhostUserError::Connect {
                path: path.to_owned(),
                err,
            })?;
        let monitor = stream.try_clone().map_err(|err| VhostUserError::Connect {
            path: path.to_owned(),
            err,
        })?;
        let mut frontend = Frontend::from_stream(stream, max_queues as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            (frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))? as usize).min(max_queues)
        } else {
            1
        };
        Ok(Self {
            frontend,
            socket: path.to_owned(),
            monitor,
            backend_features,
            protocol,
            queue_num,
            started: Vec::new(),
            dirty_log: None,
            acked: 0,
        })
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Virtio features the backend offers, without the vhost-user-only bits
    /// (PROTOCOL_FEATURES, and LOG_ALL which tern sets itself for
    /// migration): those are never offered to the guest.
    pub fn features(&self) -> u64 {
        self.backend_features
            & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            & !VHOST_F_LOG_ALL
    }

    /// Queues the backend serves.
    pub fn queue_num(&self) -> usize {
        self.queue_num
    }

    /// The negotiated protocol features.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Reads `len` bytes of the device's config space.
    pub fn get_config(&mut self, len: u32) -> Result<Vec<u8>, VhostUserError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Missing("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        let buf = vec![0u8; len as usize];
        let (_, payload) = self
            .frontend
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(step("GET_CONFIG"))?;
        Ok(payload.to_vec())
    }

    /// Writes the device's config space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), VhostUserError> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(step("SET_CONFIG"))
    }

    /// Shares guest memory (every region is a window of tern's memfd).
    pub fn set_mem_table(&self, mem: &GuestMemoryMmap) -> Result<(), VhostUserError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let fo = r
                .file_offset()
                .ok_or(VhostUserError::NotShareable(r.start_addr().0))?;
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VhostUserError::NotShareable(r.start_addr().0))?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            });
        }
        self.frontend
            .set_mem_table(&regions)
            .map(|_| ())
            .map_err(step("SET_MEM_TABLE"))
    }

    /// Acks `features` and starts the given vrings.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        features: u64,
        vrings: &[VringSetup],
    ) -> Result<(), VhostUserError> {
        self.acked = features;
        self.ack_features()?;
        self.set_mem_table(mem)?;
        // A new memory table replaces the backend's regions and with them
        // its log mappings: point it at the log again.
        self.send_log_base()?;
        let host = |queue: usize, addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|_| VhostUserError::BadRingAddress { queue, addr })
        };
        for v in vrings {
            let config = VringConfigData {
                queue_max_size: v.max_size,
                queue_size: v.size,
                flags: 0,
                desc_table_addr: host(v.index, v.desc)?,
                used_ring_addr: host(v.index, v.used)?,
                avail_ring_addr: host(v.index, v.avail)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(v.index, v.size)
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(v.index, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(v.index, v.base)
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(v.index, v.call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(v.index, v.kick)
                .map_err(step("SET_VRING_KICK"))?;
        }
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for v in vrings {
                self.frontend
                    .set_vring_enable(v.index, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        self.started = vrings.iter().map(|v| v.index).collect();
        Ok(())
    }

    /// SET_FEATURES with what the driver acked, plus PROTOCOL_FEATURES and,
    /// while dirty pages are tracked, LOG_ALL.
    fn ack_features(&mut self) -> Result<(), VhostUserError> {
        let mut f = self.acked;
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            f |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        if self.dirty_log.is_some() {
            f |= VHOST_F_LOG_ALL;
        }
        self.frontend.set_features(f).map_err(step("SET_FEATURES"))
    }

    fn send_log_base(&mut self) -> Result<(), VhostUserError> {
        let Some(log) = &self.dirty_log else {
            return Ok(());
        };
        let region = vhost::VhostUserDirtyLogRegion {
            mmap_size: log.size(),
            mmap_offset: 0,
            mmap_handle: log.fd(),
        };
        self.frontend
            .set_log_base(0, Some(region))
            .map_err(step("SET_LOG_BASE"))
    }

    /// Whether the backend can log the pages it writes to a shared log.
    pub fn can_log(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD)
            && self.backend_features & VHOST_F_LOG_ALL != 0
    }

    /// Starts (with a log) or stops (None) the backend's dirty logging. A
    /// running device is told at once; otherwise at its next start.
    pub fn set_dirty_log(
        &mut self,
        log: Option<std::sync::Arc<super::dirty_log::DirtyLog>>,
    ) -> Result<(), VhostUserError> {
        if log.is_some() && !self.can_log() {
            return Err(VhostUserError::Missing(
                "VHOST_USER_PROTOCOL_F_LOG_SHMFD and VHOST_F_LOG_ALL (dirty page logging)",
            ));
        }
        self.dirty_log = log;
        if !self.started.is_empty() {
            self.send_log_base()?;
            self.ack_features()?;
        }
        Ok(())
    }

    /// Stops every started vring (GET_VRING_BASE), as for a device reset
    /// or a snapshot. Returns each ring's index and the next avail index
    /// the backend would have processed.
    pub fn stop(&mut self) -> Result<Vec<(usize, u16)>, VhostUserError> {
        let mut bases = Vec::new();
        for i in std::mem::take(&mut self.started) {
            if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
                self.frontend
                    .set_vring_enable(i, false)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
            let base = self
                .frontend
                .get_vring_base(i)
                .map_err(step("GET_VRING_BASE"))?;
            bases.push((i, base as u16));
        }
        Ok(bases)
    }

    /// Whether the backend has hung up (its end of the socket closed).
    pub fn is_gone(&self) -> bool {
        let mut fds = libc::pollfd {
            fd: self.monitor.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut fds, 1, 0) };
        n > 0 && fds.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The socket fd to watch for hang-up.
    pub fn monitor_fd(&self) -> std::os::fd::RawFd {
        self.monitor.as_raw_fd()
    }
}
