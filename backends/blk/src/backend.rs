//! The vhost-user device: features, configuration space and the per-queue
//! request loop, plugged into `vhost-user-backend`'s daemon.

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::aio::{Finished, MemSnapshot, QueueAio};
use crate::config::{BlkConfig, MAX_QUEUE_SIZE};
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::request::{self, Limits, RequestType};
use tern_image::aio::AdaptivePoll;

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
    /// Per queue (= per worker thread): its io_uring, when enabled.
    aio: Vec<Mutex<AioQueue>>,
}

/// Most time a queue worker spins for the driver's next request before
/// sleeping (µs; `TERN_BLK_POLL_US` overrides, 0 disables).
const POLL_MAX_US: u64 = 200;

/// The asynchronous state of one queue.
struct AioQueue {
    aio: Option<QueueAio>,
    /// The queue's vring, remembered at the first kick (for `stop_vring`).
    vring: Option<Vring>,
    /// Chains were left in the avail ring for lack of ring slots.
    throttled: bool,
    /// Driver notifications are suppressed (requests in flight).
    notify_off: bool,
    /// Spinning for the driver's next request before sleeping.
    poll: AdaptivePoll,
}

impl Default for AioQueue {
    fn default() -> Self {
        AioQueue {
            aio: None,
            vring: None,
            throttled: false,
            notify_off: false,
            poll: AdaptivePoll::from_env("TERN_BLK_POLL_US", POLL_MAX_US),
        }
    }
}

/// Whether the driver has added chains not yet popped.
fn avail_pending(mem: &GuestMem, vring: &Vring) -> bool {
    let mem = mem.memory();
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(&*mem, Ordering::Acquire)
        .is_ok_and(|i| i.0 != queue.next_avail())
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
            aio: (0..config.num_queues)
                .map(|_| Mutex::new(AioQueue::default()))
                .collect(),
        }
    }

    /// Serve reads, writes and flushes of a raw image asynchronously through
    /// one io_uring per queue on `file` (the image file opened like the
    /// image: read-only or not, O_DIRECT when `direct`). If io_uring cannot
    /// be set up, logs one line and keeps the synchronous path.
    pub fn with_io_uring(self, file: Arc<File>, direct: bool) -> Self {
        for (i, q) in self.aio.iter().enumerate() {
            match QueueAio::new(
                file.clone(),
                u32::from(MAX_QUEUE_SIZE),
                direct,
                self.metrics.clone(),
            ) {
                Ok(aio) => lock(q).aio = Some(aio),
                Err(e) => {
                    info!("io_uring unavailable ({e}); using synchronous I/O");
                    for q in &self.aio[..i] {
                        lock(q).aio = None;
                    }
                    break;
                }
            }
        }
        self
    }

    /// The `data` of the worker epoll listener for io_uring completions:
    /// above the range `vhost-user-backend` reserves for queues and its exit event.
    pub fn completion_event(&self) -> u16 {
        self.num_queues + 1
    }

    /// The completion eventfd of worker thread `thread`, if it uses io_uring.
    pub fn completion_fd(&self, thread: usize) -> Option<RawFd> {
        self.aio
            .get(thread)
            .and_then(|q| lock(q).aio.as_ref().map(QueueAio::event_fd))
    }

    /// Go back to synchronous I/O on worker thread `thread` (its completion
    /// eventfd could not be watched).
    pub fn disable_io_uring(&self, thread: usize) {
        if let Some(q) = self.aio.get(thread) {
            lock(q).aio = None;
        }
    }

    /// Whether worker thread `thread` uses io_uring.
    pub fn uses_io_uring(&self, thread: usize) -> bool {
        self.completion_fd(thread).is_some()
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
            self.add_used(vring, done);
        }
    }
}

impl BlkBackend {
    /// A kick on an io_uring queue (or room again after throttling): start
    /// every available request.
    fn kick_async(&self, vring: &Vring, q: &mut AioQueue) {
        q.poll.kicked();
        self.serve_async(vring, q);
    }

    /// Serve the available ring. While the queue is busy (many requests in
    /// flight, see [`UringQueue::busy`](tern_image::aio::UringQueue::busy))
    /// the driver's notifications (kicks) stay off: the worker looks at the
    /// avail ring again at each completion anyway, so kicks would only cost
    /// the driver a syscall and this thread a wakeup. Otherwise they are
    /// turned back on, re-checking the ring so that a chain added
    /// meanwhile is not missed.
    fn serve_async(&self, vring: &Vring, q: &mut AioQueue) {
        loop {
            if !q.notify_off {
                if let Err(e) = vring.disable_notification() {
                    debug!("cannot disable notifications: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
                q.notify_off = true;
            }
            self.process_queue_async(vring, q);
            if q.throttled {
                // Resumed by a completion; no need for kicks meanwhile.
                return;
            }
            if q.aio.as_mut().is_some_and(QueueAio::busy) {
                // The next completion looks at the ring again.
                return;
            }
            if q.poll.poll(|| avail_pending(&self.mem, vring)) {
                continue;
            }
            q.notify_off = false;
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => {
                    q.poll.sleeping();
                    return;
                }
                Err(e) => {
                    debug!("cannot enable notifications: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                    return;
                }
            }
        }
    }

    /// Pop the available chains (as many as the ring has room for), submit
    /// reads/writes/flushes to the ring (one `io_uring_enter` for the
    /// batch), run the rest synchronously, and complete whatever has finished.
    fn process_queue_async(&self, vring: &Vring, q: &mut AioQueue) {
        let Some(aio) = q.aio.as_mut() else { return };
        let mem: MemSnapshot = self.mem.memory().into_inner();
        loop {
            let room = aio.room();
            if room == 0 {
                q.throttled = true;
                return;
            }
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(mem.clone()) {
                    Ok(iter) => iter.take(room).collect(),
                    Err(e) => {
                        debug!("cannot read the available ring: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                        return;
                    }
                }
            };
            if chains.is_empty() {
                return;
            }
            let mut done = Vec::new();
            let mut finished = Vec::new();
            for chain in chains {
                let head = chain.head_index();
                let req = match request::parse(chain, &self.limits) {
                    Ok(req) => req,
                    Err(rej) => {
                        done.push((head, self.executor.reject(&*mem, rej)));
                        continue;
                    }
                };
                let kind = req.kind;
                let queued = match kind {
                    RequestType::In => aio.submit_rw(&mem, head, req, false),
                    RequestType::Out if !self.read_only => aio.submit_rw(&mem, head, req, true),
                    RequestType::Flush => {
                        if aio.submit_flush(&mem, head, &req) {
                            Ok(())
                        } else {
                            Err(req)
                        }
                    }
                    RequestType::Discard | RequestType::WriteZeroes => {
                        // Run after everything submitted before has finished.
                        aio.wait_all(&mut finished);
                        Err(req)
                    }
                    _ => Err(req),
                };
                match queued {
                    Ok(()) => self.metrics.count_request(kind),
                    Err(req) => done.push((head, self.executor.execute_and_finish(&*mem, &req))),
                }
            }
            aio.submit();
            aio.reap(&mut finished);
            self.complete(vring, finished, done, false);
        }
    }

    /// io_uring completions arrived for worker `thread`: complete them,
    /// then serve whatever the driver added meanwhile.
    fn handle_completions(&self, thread: usize) {
        let Some(q) = self.aio.get(thread) else {
            return;
        };
        let mut q = lock(q);
        let q = &mut *q;
        let (Some(aio), Some(vring)) = (q.aio.as_mut(), q.vring.clone()) else {
            return;
        };
        aio.consume_event();
        let mut finished = Vec::new();
        aio.reap(&mut finished);
        if !finished.is_empty() {
            self.complete(&vring, finished, Vec::new(), false);
        }
        if aio.room() > 0 {
            q.throttled = false;
        }
        if !q.throttled && vring.get_ref().get_queue().ready() {
            self.serve_async(&vring, q);
        }
    }

    /// Write the status of finished requests, add them and the synchronously
    /// `done` ones to the used ring, and notify the driver if needed. Unless
    /// `force`, finished requests of a queue that is no longer ready (reset
    /// under them) are dropped.
    fn complete(
        &self,
        vring: &Vring,
        finished: Vec<Finished>,
        mut done: Vec<(u16, u32)>,
        force: bool,
    ) {
        if !finished.is_empty() {
            if !force && !vring.get_ref().get_queue().ready() {
                debug!("dropping {} completions of a stopped queue", finished.len());
            } else {
                for f in finished {
                    let used = self.executor.finish(&*f.mem, f.status, f.completion);
                    done.push((f.head, used));
                }
            }
        }
        self.add_used(vring, done);
    }

    /// Add `done` (head, used length) to the used ring and notify if needed.
    fn add_used(&self, vring: &Vring, done: Vec<(u16, u32)>) {
        if done.is_empty() {
            return;
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

/// Lock a queue's state, ignoring poisoning (a panicking worker aborts in release).
fn lock(q: &Mutex<AioQueue>) -> MutexGuard<'_, AioQueue> {
    q.lock().unwrap_or_else(|e| e.into_inner())
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: finish every accepted request before the frontend
        // reads the ring state (the queue is already marked not ready).
        if let Some(q) = self.aio.get(queue_index as usize) {
            let mut q = lock(q);
            let q = &mut *q;
            if let (Some(aio), Some(vring)) = (q.aio.as_mut(), q.vring.clone()) {
                let mut finished = Vec::new();
                aio.wait_all(&mut finished);
                self.complete(&vring, finished, Vec::new(), true);
                if q.notify_off {
                    // Leave the ring asking for kicks, as a fresh queue does.
                    let _ = vring.enable_notification();
                }
            }
            q.throttled = false;
            q.notify_off = false;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // The queue worker's own, narrower filter, before it reads a queue.
        tern_seccomp::enter_once("worker");
        if device_event == self.completion_event() {
            self.handle_completions(thread_id);
            return Ok(());
        }
        if !evset.contains(EventSet::IN) {
            warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        // One queue per thread: `device_event` indexes this thread's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event {device_event} for an unknown queue");
            return Ok(());
        };
        if let Some(q) = self.aio.get(thread_id) {
            let mut q = lock(q);
            if q.aio.is_some() {
                if q.vring.is_none() {
                    q.vring = Some(vring.clone());
                }
                self.kick_async(vring, &mut q);
                return Ok(());
            }
        }
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
