//! The vhost-user device: features, configuration space and the queue
//! workers, plugged into `vhost-user-backend`'s daemon.
//!
//! Queue layout (virtio-scsi): 0 control, 1 event, 2.. request queues.
//! Worker thread 0 serves the control and event queues; each request queue
//! has a thread of its own.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};
use tern_image::aio::{AdaptivePoll, Done, Op, UringQueue};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::VIRTIO_SCSI_F_HOTPLUG;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::Permissions;
use vm_memory::{GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::command::{self, Parsed, Prepared, Sizes};
use crate::config::{ScsiConfig, MAX_QUEUE_SIZE};
use crate::control;
use crate::event::{Event, EventState};
use crate::guest::write_stream;
use crate::guest::Segment;
use crate::lun::{AsyncIo, Target};
use crate::metrics::Metrics;
use crate::request::Streams;

/// Dirty-page bitmap of guest memory: real `VHOST_USER_SET_LOG_BASE` logging.
pub type MemBitmap = BitmapMmapRegion;
/// Guest memory as the daemon maps it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<MemBitmap>>;
/// One virtqueue.
pub type Vring = VringRwLock<GuestMem>;

/// Index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Index of the first request queue.
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// A snapshot of guest memory, kept alive while the kernel may access it.
type MemSnapshot = Arc<GuestMemoryMmap<MemBitmap>>;

/// Entries of each request queue's io_uring (and most commands in flight on it).
const URING_ENTRIES: u32 = MAX_QUEUE_SIZE as u32;

/// What a request queue remembers of a command in flight at the disk.
struct InFlight {
    head: u16,
    mem: MemSnapshot,
    cmd: Parsed,
    io: AsyncIo,
}

/// Most time a request queue's worker spins for the driver's next command
/// before sleeping (µs; `TERN_SCSI_POLL_US` overrides, 0 disables).
const POLL_MAX_US: u64 = 200;

/// The asynchronous state of one request queue (= one worker thread).
struct AioQueue {
    uring: Option<UringQueue<InFlight>>,
    /// The queue's vring, remembered at the first kick.
    vring: Option<Vring>,
    /// Chains were left in the avail ring for lack of ring slots.
    throttled: bool,
    /// Driver notifications are suppressed (commands in flight).
    notify_off: bool,
    /// Reused buffer for reaped commands.
    done: Vec<Done<InFlight>>,
    /// Spinning for the driver's next command before sleeping.
    poll: AdaptivePoll,
}

impl Default for AioQueue {
    fn default() -> Self {
        AioQueue {
            uring: None,
            vring: None,
            throttled: false,
            notify_off: false,
            done: Vec::new(),
            poll: AdaptivePoll::from_env("TERN_SCSI_POLL_US", POLL_MAX_US),
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

/// The event queue's vring (known after its first kick) and its buffers.
#[derive(Default)]
struct Events {
    vring: Option<Vring>,
    state: EventState,
}

/// The virtio-scsi vhost-user backend of one controller.
pub struct ScsiBackend {
    config: Mutex<ScsiConfig>,
    num_request_queues: u16,
    target: Arc<Target>,
    mem: GuestMem,
    metrics: Arc<Metrics>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    contacted: AtomicBool,
    events: Mutex<Events>,
    /// Per worker thread: its io_uring (thread 0, control and events, has none).
    aio: Vec<Mutex<AioQueue>>,
}

impl ScsiBackend {
    /// A controller with `config.num_queues` request queues serving
    /// `target`, reading rings through `mem` (the object handed to the daemon).
    pub fn new(
        config: ScsiConfig,
        target: Arc<Target>,
        mem: GuestMem,
        metrics: Arc<Metrics>,
    ) -> Self {
        ScsiBackend {
            num_request_queues: config.num_queues as u16,
            config: Mutex::new(config),
            target,
            mem,
            metrics,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            contacted: AtomicBool::new(false),
            events: Mutex::new(Events::default()),
            aio: (0..=config.num_queues)
                .map(|_| Mutex::new(AioQueue::default()))
                .collect(),
        }
    }

    /// Serve READ/WRITE of LUNs that have an asynchronous file through one
    /// io_uring per request queue. If io_uring cannot be set up, logs one
    /// line and keeps the synchronous path.
    pub fn with_io_uring(self) -> Self {
        if !self.target.luns().iter().any(|l| l.aio_file().is_some()) {
            return self;
        }
        for q in self.aio.iter().skip(1) {
            match UringQueue::new(URING_ENTRIES) {
                Ok(u) => lock(q).uring = Some(u),
                Err(e) => {
                    info!("io_uring unavailable ({e}); using synchronous I/O");
                    for q in &self.aio {
                        lock(q).uring = None;
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
        (FIRST_REQUEST_QUEUE as u16) + self.num_request_queues + 1
    }

    /// The completion descriptor of worker thread `thread`, if it uses io_uring.
    pub fn completion_fd(&self, thread: usize) -> Option<RawFd> {
        self.aio
            .get(thread)
            .and_then(|q| lock(q).uring.as_ref().map(UringQueue::event_fd))
    }

    /// Go back to synchronous I/O on worker thread `thread`.
    pub fn disable_io_uring(&self, thread: usize) {
        if let Some(q) = self.aio.get(thread) {
            lock(q).uring = None;
        }
    }

    /// Virtio device features offered (plus the vhost-user specific bits).
    pub fn device_features() -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_SCSI_F_HOTPLUG)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    /// Whether the peer negotiated anything; a connection that ends without
    /// doing so is a liveness probe, not a frontend.
    pub fn was_contacted(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    /// Report a transport reset for `lun` on the event queue (the hot-plug
    /// hook: `removed == false` makes the driver rescan the LUN). Delivered
    /// at once if the driver has posted a buffer, else when it does.
    /// Returns false, reporting nothing, when the driver did not negotiate
    /// VIRTIO_SCSI_F_HOTPLUG: such a driver does not expect these events
    /// (it finds LUNs only when it scans).
    pub fn raise_transport_reset(&self, lun: [u8; 8], removed: bool) -> bool {
        if self.acked_features.load(Ordering::Relaxed) & (1 << VIRTIO_SCSI_F_HOTPLUG) == 0 {
            return false;
        }
        let mut ev = lock(&self.events);
        if !ev.state.raise(Event::transport_reset(lun, removed)) {
            Metrics::add(&self.metrics.events_missed, 1);
        }
        self.deliver_events(&mut ev);
        true
    }

    fn sizes(&self) -> Sizes {
        let c = lock(&self.config);
        Sizes {
            cdb: c.cdb_size as usize,
            sense: c.sense_size as usize,
        }
    }

    /// Deliver pending events into posted buffers.
    fn deliver_events(&self, ev: &mut Events) {
        let Some(vring) = ev.vring.clone() else {
            return;
        };
        let mem = self.mem.memory();
        let mut done = Vec::new();
        while let Some((posted, bytes)) = ev.state.next_delivery() {
            let used = match write_stream(&*mem, &posted.buf, 0, &bytes) {
                Ok(()) => {
                    Metrics::add(&self.metrics.events, 1);
                    bytes.len() as u32
                }
                Err(_) => {
                    Metrics::add(&self.metrics.queue_errors, 1);
                    0
                }
            };
            done.push((posted.head, used));
        }
        self.add_used(&vring, done);
    }

    /// Pop every available chain of `vring` and serve it with `serve`
    /// (which returns the used length), notifying the driver as needed.
    fn process_queue<F>(&self, vring: &Vring, mut serve: F)
    where
        F: FnMut(&mut DescriptorChain<<GuestMem as GuestAddressSpace>::T>) -> u32,
    {
        let mem = self.mem.memory();
        loop {
            let chains: Vec<_> = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().iter(mem.clone()) {
                    Ok(iter) => iter.collect(),
                    Err(e) => {
                        // A broken avail index: nothing to serve until the driver resets.
                        debug!("cannot read the available ring: {e}");
                        Metrics::add(&self.metrics.queue_errors, 1);
                        return;
                    }
                }
            };
            if chains.is_empty() {
                return;
            }
            let done: Vec<_> = chains
                .into_iter()
                .map(|mut chain| {
                    let head = chain.head_index();
                    (head, serve(&mut chain))
                })
                .collect();
            self.add_used(vring, done);
        }
    }

    /// Run `process` with notifications suppressed while it works (EVENT_IDX).
    fn with_event_idx(&self, vring: &Vring, mut process: impl FnMut()) {
        if !self.event_idx.load(Ordering::Relaxed) {
            process();
            return;
        }
        loop {
            if let Err(e) = vring.disable_notification() {
                debug!("cannot disable notifications: {e}");
                Metrics::add(&self.metrics.queue_errors, 1);
            }
            process();
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
    }

    fn serve_requests(&self, vring: &Vring, thread: usize) {
        if let Some(q) = self.aio.get(thread) {
            let mut q = lock(q);
            if q.uring.is_some() {
                if q.vring.is_none() {
                    q.vring = Some(vring.clone());
                }
                q.poll.kicked();
                self.serve_async(vring, &mut q);
                return;
            }
        }
        let sizes = self.sizes();
        self.with_event_idx(vring, || {
            self.process_queue(vring, |chain| {
                command::serve(chain, &self.target, sizes, &self.metrics)
            })
        });
    }

    /// Serve the avail ring of a request queue with io_uring. While the
    /// ring is busy ([`UringQueue::busy`]) the driver's kicks stay off (each
    /// completion looks at the ring again); otherwise they are turned back
    /// on, re-checking the ring so nothing added meanwhile is missed.
    fn serve_async(&self, vring: &Vring, q: &mut AioQueue) {
        loop {
            if !q.notify_off {
                if let Err(e) = vring.disable_notification() {
                    debug!("cannot disable notifications: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
                q.notify_off = true;
            }
            self.process_async(vring, q);
            if q.throttled {
                return;
            }
            if q.uring.as_mut().is_some_and(UringQueue::busy) {
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

    /// Pop the available chains (as many as the ring has room for),
    /// submit READ/WRITE of asynchronous LUNs (one `io_uring_enter` for the
    /// batch), run every other command synchronously, and complete
    /// whatever has finished.
    fn process_async(&self, vring: &Vring, q: &mut AioQueue) {
        let sizes = self.sizes();
        let mem: MemSnapshot = self.mem.memory().into_inner();
        let Some(uring) = q.uring.as_mut() else {
            return;
        };
        loop {
            let room = uring.room();
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
            let mut done = Vec::with_capacity(chains.len());
            for mut chain in chains {
                let head = chain.head_index();
                let p = match command::prepare(&mut chain, &self.target, sizes, &self.metrics) {
                    Prepared::Done(used) => {
                        done.push((head, used));
                        continue;
                    }
                    Prepared::Command(p) => p,
                };
                let p = match submit_async(uring, &mem, head, p) {
                    Ok(()) => continue,
                    Err(p) => p,
                };
                let used = command::execute(&*mem, &p, &self.target, sizes, &self.metrics);
                done.push((head, used));
            }
            uring.submit();
            uring.reap(&mut q.done);
            self.complete_async(vring, &mut q.done, done, sizes);
        }
    }

    /// Answer reaped commands and the synchronously `done` ones, add them
    /// to the used ring and notify the driver if needed (once).
    fn complete_async(
        &self,
        vring: &Vring,
        reaped: &mut Vec<Done<InFlight>>,
        mut done: Vec<(u16, u32)>,
        sizes: Sizes,
    ) {
        for d in reaped.drain(..) {
            let f = d.owner;
            let result = f.cmd.lun.finish_async(&f.io, d.result);
            let written = match result {
                Ok(n) => {
                    if !f.io.write {
                        // The kernel stored into guest memory behind
                        // vm-memory's back: log the pages for migration.
                        mark_dirty(&f.mem, &f.cmd.data_in, n);
                    }
                    n
                }
                Err(_) => 0,
            };
            let used = command::finish(&*f.mem, &f.cmd, result, written, sizes, &self.metrics);
            done.push((f.head, used));
        }
        self.add_used(vring, done);
    }

    /// io_uring completions arrived for worker `thread`: answer them, then
    /// serve whatever the driver added meanwhile.
    fn handle_completions(&self, thread: usize) {
        let Some(q) = self.aio.get(thread) else {
            return;
        };
        let mut q = lock(q);
        let q = &mut *q;
        let (Some(uring), Some(vring)) = (q.uring.as_mut(), q.vring.clone()) else {
            return;
        };
        uring.consume_event();
        uring.reap(&mut q.done);
        let room = uring.room();
        if !q.done.is_empty() {
            let sizes = self.sizes();
            if vring.get_ref().get_queue().ready() {
                self.complete_async(&vring, &mut q.done, Vec::new(), sizes);
            } else {
                debug!("dropping {} completions of a stopped queue", q.done.len());
                q.done.clear();
            }
        }
        if room > 0 {
            q.throttled = false;
        }
        if !q.throttled && vring.get_ref().get_queue().ready() {
            self.serve_async(&vring, q);
        }
    }

    fn serve_control(&self, vring: &Vring) {
        self.with_event_idx(vring, || {
            self.process_queue(vring, |chain| {
                serve_control_chain(chain, &self.target, &self.metrics)
            })
        });
    }

    fn serve_event_queue(&self, vring: &Vring) {
        let mut ev = lock(&self.events);
        if ev.vring.is_none() {
            ev.vring = Some(vring.clone());
        }
        // Hold every posted buffer; refuse (return empty) the unusable ones.
        let state = &mut ev.state;
        self.with_event_idx(vring, || self.process_queue_hold(vring, state));
        self.deliver_events(&mut ev);
    }

    fn process_queue_hold(&self, vring: &Vring, state: &mut EventState) {
        let mem = self.mem.memory();
        let chains: Vec<_> = {
            let mut q = vring.get_mut();
            match q.get_queue_mut().iter(mem.clone()) {
                Ok(iter) => iter.collect(),
                Err(e) => {
                    debug!("cannot read the event queue's available ring: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                    return;
                }
            }
        };
        let mut refused = Vec::new();
        for mut chain in chains {
            let head = chain.head_index();
            let s = Streams::collect(&mut chain);
            if s.error.is_some() || !s.readable.is_empty() || !state.post(head, s.writable) {
                Metrics::add(&self.metrics.skipped_chains, 1);
                refused.push((head, 0));
            }
        }
        self.add_used(vring, refused);
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

/// Submit a prepared command to `uring` if its LUN and command allow
/// (see [`crate::lun::Lun::plan_async`]) and its buffers suit the file;
/// gives it back otherwise.
fn submit_async(
    uring: &mut UringQueue<InFlight>,
    mem: &MemSnapshot,
    head: u16,
    p: Parsed,
) -> Result<(), Parsed> {
    let Some(io) = p.lun.plan_async(&p.cmd, p.in_len, p.out_len) else {
        return Err(p);
    };
    let Some(fd) = p.lun.aio_file().map(|f| f.as_raw_fd()) else {
        return Err(p);
    };
    let direct = p.lun.is_direct();
    let (op, access) = if io.write {
        (Op::Write, Permissions::Read)
    } else {
        (Op::Read, Permissions::Write)
    };
    let owner = InFlight {
        head,
        mem: mem.clone(),
        cmd: p,
        io,
    };
    let fill = |o: &InFlight, iovecs: &mut Vec<libc::iovec>| {
        let segs = if o.io.write {
            &o.cmd.data_out
        } else {
            &o.cmd.data_in
        };
        let mut left = o.io.len;
        for seg in segs {
            if left == 0 {
                break;
            }
            let n = u64::from(seg.len).min(left) as usize;
            let Ok(slices) = o.mem.get_slices(seg.addr, n, access) else {
                return false;
            };
            let mut total = 0usize;
            for slice in slices {
                let Ok(slice) = slice else { return false };
                let ptr = slice.ptr_guard_mut().as_ptr();
                if direct
                    && (!(ptr as usize).is_multiple_of(tern_image::DIRECT_ALIGN)
                        || !slice.len().is_multiple_of(tern_image::DIRECT_ALIGN))
                {
                    return false;
                }
                total += slice.len();
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
            if total != n {
                return false;
            }
            left -= n as u64;
        }
        left == 0
    };
    // SAFETY: the LUN (in `owner.cmd`) keeps `fd` open, and `owner.mem`
    // the guest memory the iovecs point into, until the command is reaped.
    unsafe { uring.submit_rw(fd, op, io.offset, io.len, owner, fill) }.map_err(|o| o.cmd)
}

/// Log the first `n` bytes of `segs` as written (dirty) for migration.
fn mark_dirty(mem: &MemSnapshot, segs: &[Segment], mut n: u64) {
    for seg in segs {
        if n == 0 {
            break;
        }
        let len = u64::from(seg.len).min(n);
        if let Ok(slices) = mem.get_slices(seg.addr, len as usize, Permissions::Write) {
            for s in slices.flatten() {
                s.bitmap().mark_dirty(0, s.len());
            }
        }
        n -= len;
    }
}

/// Serve one control-queue chain; returns the used length.
fn serve_control_chain<M>(chain: &mut DescriptorChain<M>, target: &Target, metrics: &Metrics) -> u32
where
    M: Deref,
    M::Target: GuestMemory,
{
    let s = Streams::collect(chain);
    let mem = chain.memory();
    match control::parse(mem, &s) {
        Ok(req) => {
            let c = match req {
                control::ControlRequest::Tmf { .. } => &metrics.tmfs,
                control::ControlRequest::An { .. } => &metrics.an_requests,
            };
            Metrics::add(c, 1);
            control::respond(mem, &s, &control::execute(&req, target))
        }
        Err(e) => {
            debug!("malformed control request: {e}");
            Metrics::add(&metrics.skipped_chains, 1);
            0
        }
    }
}

/// Lock, ignoring poisoning (a panicking worker aborts in release builds).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for ScsiBackend {
    type Bitmap = MemBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        FIRST_REQUEST_QUEUE + usize::from(self.num_request_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.contacted.store(true, Ordering::Relaxed);
        Self::device_features()
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
        let mut ev = lock(&self.events);
        ev.state.release_posted();
        ev.vring = None;
        *lock(&self.config) = ScsiConfig::new(self.num_request_queues);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.contacted.store(true, Ordering::Relaxed);
        lock(&self.config).read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.config)
            .write(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // `_mem` is the atomic we already hold; its content was just replaced.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut v = vec![(1u64 << CONTROL_QUEUE) | (1 << EVENT_QUEUE)];
        v.extend(
            (0..usize::from(self.num_request_queues)).map(|i| 1u64 << (FIRST_REQUEST_QUEUE + i)),
        );
        v
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty())
            .inspect_err(|e| warn!("cannot create a worker exit event: {e}"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // A request queue: finish every accepted command before the
        // frontend reads the ring state (the queue is already not ready).
        let thread = (queue_index as usize).checked_sub(FIRST_REQUEST_QUEUE - 1);
        if let Some(q) = thread.filter(|&t| t > 0).and_then(|t| self.aio.get(t)) {
            let mut q = lock(q);
            let q = &mut *q;
            if let (Some(uring), Some(vring)) = (q.uring.as_mut(), q.vring.clone()) {
                uring.wait_all(&mut q.done);
                let sizes = self.sizes();
                self.complete_async(&vring, &mut q.done, Vec::new(), sizes);
                if q.notify_off {
                    // Leave the ring asking for kicks, as a fresh queue does.
                    let _ = vring.enable_notification();
                }
            }
            q.throttled = false;
            q.notify_off = false;
        }
        // GET_VRING_BASE: held event buffers were popped but never used;
        // rewind the ring over them so whoever resumes the queue (this
        // process after a reconnect, or a migration destination) sees them
        // as available again instead of losing them. They are the most
        // recently popped chains: events are delivered in FIFO order.
        if queue_index as usize == EVENT_QUEUE {
            let mut ev = lock(&self.events);
            let held = ev.state.release_posted();
            if let (Some(vring), Ok(held)) = (ev.vring.take(), u16::try_from(held)) {
                let next = vring.queue_next_avail().wrapping_sub(held);
                vring.set_queue_next_avail(next);
            }
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
        // `device_event` indexes this thread's vrings.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event {device_event} for an unknown queue");
            return Ok(());
        };
        match (thread_id, usize::from(device_event)) {
            (0, CONTROL_QUEUE) => self.serve_control(vring),
            (0, EVENT_QUEUE) => self.serve_event_queue(vring),
            _ => self.serve_requests(vring, thread_id),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_and_threads() {
        let f = ScsiBackend::device_features();
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let b = ScsiBackend::new(
            ScsiConfig::new(3),
            Arc::new(Target::new(Vec::new())),
            mem,
            Arc::new(Metrics::new()),
        );
        assert_eq!(b.num_queues(), 5);
        assert_eq!(b.queues_per_thread(), vec![0b11, 0b100, 0b1000, 0b1_0000]);
    }
}
