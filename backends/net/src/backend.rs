//! The vhost-user device: features, configuration space and the per-pair
//! rx/tx loops (plus the control queue), plugged into `vhost-user-backend`.
//!
//! Queue layout: rx0, tx0, rx1, tx1, ..., ctrl. Worker thread `i` serves
//! pair `i` (local vrings 0 = rx, 1 = tx) and thread 0 also the control
//! queue (local vring 2). The tap fd of pair `i` is watched (edge-triggered)
//! on worker `i`'s epoll with event [`NetBackend::tap_event`].

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::chain::{self, CtrlEffect, RxChain, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::config::{tap_offloads, NetConfig, MAX_QUEUE_SIZE};
use crate::metrics::Metrics;
use crate::tap::Tap;

/// Dirty-page bitmap of guest memory: real `VHOST_USER_SET_LOG_BASE` logging.
pub type MemBitmap = BitmapMmapRegion;
/// Guest memory as the daemon maps it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<MemBitmap>>;
/// One virtqueue.
pub type Vring = VringRwLock<GuestMem>;

/// Bytes of the rx bounce buffer: header + the largest GSO frame the tap hands over.
const RX_BUF: usize = VNET_HDR_LEN + 65536 + 256;
/// Chains served per batch before completing them.
const BATCH: usize = 64;

/// Receive state of one queue pair.
struct RxState {
    buf: Vec<u8>,
    /// Length of a frame read from the tap but not delivered yet (no buffers).
    pending: Option<usize>,
}

/// The virtio-net vhost-user backend of one tap.
pub struct NetBackend {
    config: NetConfig,
    offered: u64,
    tap: Arc<Tap>,
    mem: GuestMem,
    metrics: Arc<Metrics>,
    acked: AtomicU64,
    event_idx: AtomicBool,
    active_pairs: AtomicU16,
    contacted: AtomicBool,
    rx: Vec<Mutex<RxState>>,
}

enum Delivery {
    Delivered,
    NoBuffers,
    Dropped,
}

impl NetBackend {
    /// A backend for `config` on `tap`, reading rings through `mem`.
    pub fn new(config: NetConfig, tap: Arc<Tap>, mem: GuestMem, metrics: Arc<Metrics>) -> Self {
        NetBackend {
            offered: config.device_features(tap.offloads),
            config,
            rx: (0..config.queue_pairs)
                .map(|_| {
                    Mutex::new(RxState {
                        buf: vec![0; RX_BUF],
                        pending: None,
                    })
                })
                .collect(),
            tap,
            mem,
            metrics,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            active_pairs: AtomicU16::new(1),
            contacted: AtomicBool::new(false),
        }
    }

    /// The `data` of the worker epoll listener for the tap: above the range
    /// `vhost-user-backend` reserves for queues and its exit event.
    pub fn tap_event(&self) -> u16 {
        self.total_queues() + 1
    }

    /// The tap fd served by worker `thread`.
    pub fn tap_fd(&self, thread: usize) -> Option<&File> {
        self.tap.fds.get(thread)
    }

    /// Whether the peer negotiated anything (a connection that did not is a probe).
    pub fn was_contacted(&self) -> bool {
        self.contacted.load(Ordering::Relaxed)
    }

    fn total_queues(&self) -> u16 {
        2 * self.config.queue_pairs + 1
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Relaxed) & (1u64 << bit) != 0
    }

    /// Add `done` to the used ring and notify if needed.
    fn complete(&self, vring: &Vring, done: &mut Vec<(u16, u32)>) {
        if done.is_empty() {
            return;
        }
        {
            let mut state = vring.get_mut();
            for &(head, len) in done.iter() {
                if let Err(e) = state.add_used(head, len) {
                    warn!("cannot add to the used ring: {e}");
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
            }
        }
        done.clear();
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

    /// Run `f` until the driver stopped adding chains while notifications were off.
    fn drain(&self, vring: &Vring, f: impl Fn()) {
        if !self.event_idx.load(Ordering::Relaxed) {
            f();
            return;
        }
        loop {
            if let Err(e) = vring.disable_notification() {
                debug!("cannot disable notifications: {e}");
                Metrics::add(&self.metrics.queue_errors, 1);
            }
            f();
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

    /// Pop up to [`BATCH`] chains.
    fn pop_batch(
        &self,
        vring: &Vring,
    ) -> Vec<virtio_queue::DescriptorChain<<GuestMem as GuestAddressSpace>::T>> {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let mut v = Vec::new();
        while v.len() < BATCH {
            match q.pop_descriptor_chain(mem.clone()) {
                Some(c) => v.push(c),
                None => break,
            }
        }
        v
    }

    /// Transmit every available chain of pair `pair`.
    fn process_tx(&self, pair: usize, vring: &Vring) {
        let Some(tap) = self.tap.fds.get(pair) else {
            return;
        };
        let mem = self.mem.memory();
        let mut done = Vec::new();
        loop {
            let chains = self.pop_batch(vring);
            if chains.is_empty() {
                break;
            }
            for c in chains {
                match chain::parse_tx(c) {
                    Ok(tx) => {
                        self.transmit(&*mem, tap, &tx);
                        done.push((tx.head, 0));
                    }
                    Err(m) => {
                        debug!("tx{pair}: malformed chain {}: {}", m.head, m.error);
                        Metrics::add(&self.metrics.malformed_chains, 1);
                        done.push((m.head, 0));
                    }
                }
            }
            self.complete(vring, &mut done);
        }
    }

    fn transmit<G: GuestMemory>(&self, mem: &G, tap: &File, tx: &chain::TxChain) {
        let mut iov = Vec::with_capacity(tx.segments.len());
        for s in &tx.segments {
            let Ok(slices) = mem.get_slices(s.addr, s.len as usize, Permissions::Read) else {
                Metrics::add(&self.metrics.malformed_chains, 1);
                return;
            };
            for sl in slices {
                let Ok(sl) = sl else {
                    Metrics::add(&self.metrics.malformed_chains, 1);
                    return;
                };
                iov.push(libc::iovec {
                    iov_base: sl.ptr_guard().as_ptr() as *mut libc::c_void,
                    iov_len: sl.len(),
                });
            }
        }
        // SAFETY: the iovecs point into guest memory mapped for the lifetime
        // of `mem`; writev only reads them.
        let r = unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r < 0 {
            debug!("tap write: {}", io::Error::last_os_error());
            Metrics::add(&self.metrics.tx_drops, 1);
        } else {
            Metrics::add(&self.metrics.tx_frames, 1);
            Metrics::add(&self.metrics.tx_bytes, tx.len - VNET_HDR_LEN as u64);
        }
    }

    /// Move frames from the tap of pair `pair` into its rx queue until the
    /// tap is empty or the guest has no buffers left.
    fn process_rx(&self, pair: usize, vring: &Vring) {
        let (Some(tap), Some(rx)) = (self.tap.fds.get(pair), self.rx.get(pair)) else {
            return;
        };
        {
            let state = vring.get_ref();
            if !state.get_queue().ready() || !state.is_enabled() {
                return;
            }
        }
        let mut rx = lock(rx);
        let rx = &mut *rx;
        let mrg = self.acked(VIRTIO_NET_F_MRG_RXBUF);
        let mut done = Vec::new();
        loop {
            let len = match rx.pending {
                Some(n) => n,
                None => match (&*tap).read(&mut rx.buf) {
                    Ok(n) if n > VNET_HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("tap read: {e}");
                        break;
                    }
                },
            };
            rx.pending = Some(len);
            match self.deliver(vring, &mut rx.buf[..len], mrg, &mut done) {
                Delivery::Delivered => {
                    rx.pending = None;
                    Metrics::add(&self.metrics.rx_frames, 1);
                    Metrics::add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Delivery::Dropped => {
                    rx.pending = None;
                    Metrics::add(&self.metrics.rx_drops, 1);
                }
                Delivery::NoBuffers => {
                    // Back-pressure: keep the frame, stop reading the tap and
                    // ask for a kick when buffers are posted.
                    self.complete(vring, &mut done);
                    match vring.enable_notification() {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            debug!("cannot enable notifications: {e}");
                            Metrics::add(&self.metrics.queue_errors, 1);
                        }
                    }
                    Metrics::add(&self.metrics.rx_stalls, 1);
                    break;
                }
            }
            if done.len() >= BATCH {
                self.complete(vring, &mut done);
            }
        }
        self.complete(vring, &mut done);
    }

    /// Put one frame (with its header) into the guest's posted buffers.
    fn deliver(
        &self,
        vring: &Vring,
        frame: &mut [u8],
        mrg: bool,
        done: &mut Vec<(u16, u32)>,
    ) -> Delivery {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let qsize = usize::from(q.size());
        let mut taken: Vec<RxChain> = Vec::new();
        let mut capacity = 0u64;
        let len = frame.len() as u64;
        while capacity < len {
            let Some(c) = q.pop_descriptor_chain(mem.clone()) else {
                if taken.len() >= qsize {
                    // A full ring cannot hold it: it never will.
                    for _ in &taken {
                        q.go_to_previous_position();
                    }
                    return Delivery::Dropped;
                }
                for _ in &taken {
                    q.go_to_previous_position();
                }
                return Delivery::NoBuffers;
            };
            match chain::parse_rx(c) {
                Ok(c) => {
                    capacity += c.capacity;
                    taken.push(c);
                    if !mrg {
                        break;
                    }
                }
                Err(m) => {
                    debug!("rx: malformed chain {}: {}", m.head, m.error);
                    Metrics::add(&self.metrics.malformed_chains, 1);
                    if taken.is_empty() {
                        done.push((m.head, 0));
                        continue;
                    }
                    // Mid-frame: give everything back empty and drop the frame.
                    done.extend(taken.iter().map(|c| (c.head, 0)));
                    done.push((m.head, 0));
                    return Delivery::Dropped;
                }
            }
        }
        if capacity < len {
            debug!("rx: {len}-byte frame does not fit a {capacity}-byte buffer");
            done.push((taken[0].head, 0));
            return Delivery::Dropped;
        }
        let n = taken.len() as u16;
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        let mut off = 0usize;
        for c in &taken {
            let start = off;
            for s in &c.segments {
                if off == frame.len() {
                    break;
                }
                let k = (s.len as usize).min(frame.len() - off);
                if mem.write_slice(&frame[off..off + k], s.addr).is_err() {
                    Metrics::add(&self.metrics.queue_errors, 1);
                }
                off += k;
            }
            done.push((c.head, (off - start) as u32));
        }
        Delivery::Delivered
    }

    /// Answer every control command.
    fn process_ctrl(&self, vring: &Vring) {
        let mem = self.mem.memory();
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let mut done = Vec::new();
        loop {
            let chains = self.pop_batch(vring);
            if chains.is_empty() {
                break;
            }
            for c in chains {
                match chain::parse_ctrl(c) {
                    Ok(cmd) => {
                        let (ack, effect) = chain::ctrl_answer(&cmd, self.config.queue_pairs, mq);
                        if let CtrlEffect::SetPairs(n) = effect {
                            info!("driver uses {n} queue pair(s)");
                            self.active_pairs.store(n, Ordering::Relaxed);
                        }
                        debug!("ctrl class {} cmd {}: ack {ack}", cmd.class, cmd.cmd);
                        Metrics::add(&self.metrics.ctrl_commands, 1);
                        let used = match mem.write_obj(ack, cmd.ack) {
                            Ok(()) => 1,
                            Err(_) => 0,
                        };
                        done.push((cmd.head, used));
                    }
                    Err(m) => {
                        debug!("ctrl: malformed chain {}: {}", m.head, m.error);
                        Metrics::add(&self.metrics.malformed_chains, 1);
                        done.push((m.head, 0));
                    }
                }
            }
            self.complete(vring, &mut done);
        }
    }
}

fn lock(m: &Mutex<RxState>) -> MutexGuard<'_, RxState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for NetBackend {
    type Bitmap = MemBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.total_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.contacted.store(true, Ordering::Relaxed);
        self.offered
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let flags = tap_offloads(features);
        if let Err(e) = self.tap.set_offload(flags) {
            warn!("tap {}: TUNSETOFFLOAD {flags:#x}: {e}", self.tap.name);
        } else {
            debug!("features {features:#x}; tap offloads {flags:#x}");
        }
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
        self.acked.store(0, Ordering::Relaxed);
        for rx in &self.rx {
            lock(rx).pending = None;
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.contacted.store(true, Ordering::Relaxed);
        self.config.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-net configuration space is read-only",
        ))
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let pairs = self.config.queue_pairs;
        (0..pairs)
            .map(|i| {
                let mut m = 0b11u64 << (2 * i);
                if i == 0 {
                    m |= 1 << (2 * pairs);
                }
                m
            })
            .collect()
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
        thread_id: usize,
    ) -> io::Result<()> {
        // The queue worker's own, narrower filter, before it reads a queue.
        tern_seccomp::enter_once("worker");
        if device_event == self.tap_event() {
            if let Some(rx) = vrings.first() {
                self.process_rx(thread_id, rx);
            }
            return Ok(());
        }
        if !evset.contains(EventSet::IN) {
            warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event {device_event} for an unknown queue");
            return Ok(());
        };
        match device_event {
            0 => self.process_rx(thread_id, vring),
            1 => self.drain(vring, || self.process_tx(thread_id, vring)),
            _ => self.drain(vring, || self.process_ctrl(vring)),
        }
        Ok(())
    }
}
