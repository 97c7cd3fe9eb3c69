//! The vhost-user device: features, configuration space and the per-queue
//! request loop, plugged into `vhost-user-backend`'s daemon.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{BlkConfig, MAX_QUEUE_SIZE};
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::request::Limits;

/// Dirty-page bitmap of guest memory: real `VHOST_USER_SET_LOG_BASE` logging.
pub type MemBitmap = BitmapMmapRegion;
/// Guest memory as the daemon maps it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<MemBitmap>>;
/// One virtqueue.
pub type Vring = VringRwLock<GuestMem>;

/// Most queues a device may have: `queues_per_thread` masks are 64-bit.
pub const MAX_QUEUES: u16 = 64;

/// The virtio-blk vhost-user backend of one disk.
pub struct BlkBackend {
    config: BlkConfig,
    limits: Limits,
    num_queues: u16,
    read_only: bool,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    mem: GuestMem,
    executor: Executor,
    metrics: Arc<Metrics>,
    contacted: AtomicBool,
}

impl BlkBackend {
    /// A backend serving `config.num_queues` queues with `executor`, reading
    /// rings through `mem` (the same object handed to the daemon).
    pub fn new(
        config: BlkConfig,
        executor: Executor,
        mem: GuestMem,
        metrics: Arc<Metrics>,
    ) -> Self {
        BlkBackend {
            limits: Limits::from(&config),
            num_queues: config.num_queues,
            read_only: executor.is_read_only(),
            config,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            mem,
            executor,
            metrics,
            contacted: AtomicBool::new(false),
        }
    }

    /// Whether the peer negotiated anything (asked for features, protocol
    /// features or configuration). A connection that ends without doing so
    /// is a liveness probe (e.g. another `tern-blk` checking whether the
    /// socket is in use), not a frontend.
    pub fn was_contacted(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    /// Virtio device features offered (plus the vhost-user specific bits).
    pub fn device_features(num_queues: u16, read_only: bool) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        if num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// Serve every available chain of `vring`, then notify the driver if needed.
    fn process_queue(&self, vring: &Vring) {
        let mem = self.mem.memory();
        loop {
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(mem.clone()) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        // A broken avail index: nothing we can serve until the driver resets.
                        debug!("cannot read the available ring: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                        return;
                    }
                }
            };
            if chains.is_empty() {
                return;
            }
            let mut done = Vec::with_capacity(chains.len());
            for chain in chains {
                let head = chain.head_index();
                let used = self.executor.process_chain(&*mem, chain, &self.limits);
                done.push((head, used));
            }
            {
                let mut state = vring.get_mut();
                for (head, used) in done {
                    if let Err(e) = state.add_used(head, used) {
                        warn!("cannot add to the used ring: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                    }
                }
            }
            match vring.needs_notification() {
                Ok(true) => match vring.signal_used_queue() {
                    Ok(()) => Metrics::add(&self.metrics.notifications, 1),
                    Err(e) => {
                        warn!("cannot signal the used queue: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    debug!("cannot read used_event: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = MemBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.contacted.store(true, Ordering::Relaxed);
        Self::device_features(self.num_queues, self.read_only)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.contacted.store(true, Ordering::Relaxed);
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.event_idx.store(false, Ordering::Relaxed);
        self.acked_features.store(0, Ordering::Relaxed);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in virtio_blk_config is driver-writable without CONFIG_WCE.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk configuration space is read-only",
        ))
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // `_mem` is the atomic we already hold; its content was just replaced.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty())
            .inspect_err(|e| warn!("cannot create a worker exit event: {e}"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        // One queue per thread: `device_event` indexes this thread's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event {device_event} for an unknown queue");
            return Ok(());
        };
        if self.event_idx.load(Ordering::Relaxed) {
            // Process until the driver has stopped adding while notifications were off.
            loop {
                if let Err(e) = vring.disable_notification() {
                    debug!("cannot disable notifications: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
                self.process_queue(vring);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        debug!("cannot enable notifications: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                        break;
                    }
                }
            }
        } else {
            self.process_queue(vring);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features() {
        let f = BlkBackend::device_features(1, false);
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let f = BlkBackend::device_features(4, true);
        assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    }
}
