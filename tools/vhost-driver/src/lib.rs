//! A minimal vhost-user frontend and virtio-blk driver for driving the real
//! `tern-blk` binary without a VMM: memfd-backed "guest" memory handed over
//! with SET_MEM_TABLE, split virtqueues laid out by hand, kicks and calls via
//! eventfds.
//!
//! Two levels of API:
//! - [`BlkFrontend`] with [`BlkFrontend::request`]: one request at a time,
//!   convenient and fully checked (used by tern-blk's integration tests);
//! - [`QueueDriver`]: a borrowed, raw-pointer view of one queue's rings for
//!   drivers that keep many requests in flight (fixed descriptors per slot,
//!   batched avail-index updates, kick/interrupt suppression with EVENT_IDX);
//!   used by `tern-bench blk`. It is `Send`-free by design: build one per
//!   thread from `&GuestMemoryMmap` and `&mut VirtQueue`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub use vm_memory;

pub mod net;
pub mod scsi;

/// virtio-blk request types and status values (virtio 1.2 §5.2.6).
pub mod blk {
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const T_DISCARD: u32 = 11;
    pub const T_WRITE_ZEROES: u32 = 13;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
    pub const F_RO: u64 = 1 << 5;
    pub const F_MQ: u64 = 1 << 12;
    pub const F_VERSION_1: u64 = 1 << 32;
    pub const F_EVENT_IDX: u64 = 1 << 29;
    pub const SECTOR_SHIFT: u32 = 9;
}

/// Guest physical layout used by [`BlkFrontend`].
pub mod layout {
    /// Region 0: rings and request headers.
    pub const RING_REGION: u64 = 0;
    pub const RING_REGION_SIZE: u64 = 1 << 20;
    /// Per-queue ring area inside region 0 (room for rings of up to 1024
    /// entries: descriptors at +0 (16 KiB), avail at +0x4000 (2 KiB + 6),
    /// used at +0x5000 (8 KiB + 6)).
    pub const QUEUE_STRIDE: u64 = 0x8000;
    /// Request headers / status bytes: one 0x1000 page per queue, above the rings.
    pub const HDR_BASE: u64 = 0x8_0000;
    /// Most queues that fit below `HDR_BASE` (16: e.g. 4 net queue pairs
    /// plus the control queue).
    pub const MAX_QUEUES: usize = (HDR_BASE / QUEUE_STRIDE) as usize;
    /// Region 1: data buffers (not adjacent to region 0).
    pub const DATA_REGION: u64 = 0x1000_0000;
    /// Default size of region 1.
    pub const DATA_REGION_SIZE: u64 = 16 << 20;
    /// Default queue size.
    pub const QUEUE_SIZE: u16 = 128;
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A fresh scratch directory `BASE/tern-blk-NAME-PID-N`.
pub fn scratch_dir_in(base: &Path, name: &str) -> PathBuf {
    let dir = base.join(format!(
        "tern-blk-{name}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `tern-blk` process.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
}

impl Backend {
    /// Start `BINARY --socket SOCKET ARGS...` and wait (up to 10 s) for its
    /// socket to appear.
    pub fn try_spawn(binary: &Path, socket: &Path, args: &[&str]) -> Result<Backend, String> {
        let child = Command::new(binary)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let mut b = Backend {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(st) = b.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("{} exited early: {st}", binary.display()));
            }
            if Instant::now() >= deadline {
                return Err(format!("{} did not create its socket", binary.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(b)
    }

    /// [`try_spawn`](Self::try_spawn), panicking on failure.
    pub fn spawn(binary: &Path, socket: &Path, args: &[&str]) -> Backend {
        Self::try_spawn(binary, socket, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Wait for the process to exit, or `None` after `timeout`.
    pub fn try_wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().ok().flatten() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the process to exit (panics after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.try_wait_for(timeout).expect("tern-blk did not exit")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `BINARY ARGS...` to completion, capturing stderr.
pub fn run_to_exit(binary: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern-blk");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A memfd of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid C string; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Shared guest memory: two memfd-backed regions (default data region size).
pub fn guest_memory() -> GuestMemoryMmap {
    guest_memory_sized(layout::DATA_REGION_SIZE)
}

/// Shared guest memory with a data region of `data_size` bytes.
pub fn guest_memory_sized(data_size: u64) -> GuestMemoryMmap {
    use layout::*;
    GuestMemoryMmap::from_ranges_with_files(&[
        (
            GuestAddress(RING_REGION),
            RING_REGION_SIZE as usize,
            Some(FileOffset::new(memfd("ring", RING_REGION_SIZE), 0)),
        ),
        (
            GuestAddress(DATA_REGION),
            data_size as usize,
            Some(FileOffset::new(memfd("data", data_size), 0)),
        ),
    ])
    .unwrap()
}

/// One descriptor of a chain, as the driver builds it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub write: bool,
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u16,
    pub len: u32,
}

/// A split virtqueue driven from the "guest" side.
pub struct VirtQueue {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
    event_idx: bool,
    /// Number of call-eventfd signals observed.
    pub calls: u64,
    /// Number of kicks sent.
    pub kicks: u64,
}

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
/// used->flags: the device does not need kicks (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// virtio's `vring_need_event`: whether moving the index from `old` to
/// `new` crossed `event`.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl VirtQueue {
    fn new(index: usize, size: u16, event_idx: bool) -> Self {
        use layout::*;
        let base = RING_REGION + index as u64 * QUEUE_STRIDE;
        VirtQueue {
            index,
            size,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x5000,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            event_idx,
            calls: 0,
            kicks: 0,
        }
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in use on this queue.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Write a chain into the descriptor table and publish it; returns its head.
    /// Descriptors are allocated round-robin: keep fewer than `size` in flight.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u16 {
        assert!(!chain.is_empty() && chain.len() < self.size as usize);
        let head = self.next_desc;
        for (i, d) in chain.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let at = GuestAddress(self.desc + 16 * u64::from(idx));
            mem.write_obj(d.addr.to_le(), at).unwrap();
            mem.write_obj(d.len.to_le(), at.unchecked_add(8)).unwrap();
            mem.write_obj(flags.to_le(), at.unchecked_add(12)).unwrap();
            mem.write_obj(next.to_le(), at.unchecked_add(14)).unwrap();
            self.next_desc = next;
        }
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    /// Notify the device.
    pub fn kick(&mut self) {
        self.kicks += 1;
        self.kick.write(1).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Take the next used element, waiting on the call eventfd up to `timeout`.
    pub fn wait_used(&mut self, mem: &GuestMemoryMmap, timeout: Duration) -> Option<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.used_idx(mem) != self.last_used {
                let slot = u64::from(self.last_used % self.size);
                let at = GuestAddress(self.used + 4 + 8 * slot);
                let id = u32::from_le(mem.read_obj(at).unwrap());
                let len = u32::from_le(mem.read_obj(at.unchecked_add(4)).unwrap());
                self.last_used = self.last_used.wrapping_add(1);
                if self.event_idx {
                    // used_event: interrupt me when the next element is used.
                    let ue = GuestAddress(self.avail + 4 + 2 * u64::from(self.size));
                    mem.write_obj(self.last_used.to_le(), ue).unwrap();
                    fence(Ordering::SeqCst);
                }
                return Some(Used { id: id as u16, len });
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let ms = (deadline - now).as_millis().min(100) as i32;
            if wait_fd(&self.call, ms) {
                self.calls += 1;
            }
        }
    }
}

/// Poll `fd` for up to `ms` milliseconds and consume its count; true if it fired.
fn wait_fd(fd: &EventFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    r > 0 && fd.read().is_ok()
}

/// A raw view of one queue's rings for many-in-flight drivers.
///
/// The caller owns descriptor allocation: write descriptors with
/// [`set_desc`](Self::set_desc) (e.g. a fixed chain per request slot), put
/// heads on the avail ring with [`push`](Self::push), publish them all with
/// one [`commit`](Self::commit) (which kicks only when the device asked for
/// it), and reap with [`pop_used`](Self::pop_used) /
/// [`arm_and_check`](Self::arm_and_check) / [`wait_call`](Self::wait_call).
pub struct QueueDriver<'a> {
    q: &'a mut VirtQueue,
    desc: *mut u8,
    avail: *mut u8,
    used: *const u8,
    /// avail index last made visible to the device.
    published: u16,
}

impl<'a> QueueDriver<'a> {
    /// Borrow `q`'s rings in `mem` (the memory the queue was set up in).
    pub fn new(mem: &'a GuestMemoryMmap, q: &'a mut VirtQueue) -> Self {
        let ptr = |gpa: u64, len: u64| -> *mut u8 {
            let s = mem
                .get_slice(GuestAddress(gpa), len as usize)
                .expect("ring inside guest memory");
            s.ptr_guard_mut().as_ptr()
        };
        let n = u64::from(q.size);
        let desc = ptr(q.desc, 16 * n);
        let avail = ptr(q.avail, 6 + 2 * n);
        let used = ptr(q.used, 6 + 8 * n) as *const u8;
        let published = q.avail_idx;
        QueueDriver {
            q,
            desc,
            avail,
            used,
            published,
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.q.size
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.q.event_idx
    }

    /// Write descriptor `idx`.
    pub fn set_desc(&mut self, idx: u16, d: Desc, next: Option<u16>) {
        assert!(idx < self.q.size);
        let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT;
        }
        // SAFETY: idx < size, the table spans 16 * size bytes of mapped memory.
        unsafe {
            let p = self.desc.add(16 * usize::from(idx));
            std::ptr::write_volatile(p as *mut u64, d.addr.to_le());
            std::ptr::write_volatile(p.add(8) as *mut u32, d.len.to_le());
            std::ptr::write_volatile(p.add(12) as *mut u16, flags.to_le());
            std::ptr::write_volatile(p.add(14) as *mut u16, next.unwrap_or(0).to_le());
        }
    }

    /// Put chain `head` on the avail ring (not yet visible to the device).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.q.avail_idx % self.q.size);
        // SAFETY: slot < size; the ring entries follow the 4-byte header.
        unsafe {
            std::ptr::write_volatile(self.avail.add(4 + 2 * slot) as *mut u16, head.to_le());
        }
        self.q.avail_idx = self.q.avail_idx.wrapping_add(1);
    }

    /// Make every pushed head visible (one avail-index store) and kick if the
    /// device wants a notification. Returns whether it kicked.
    pub fn commit(&mut self) -> bool {
        let old = self.published;
        let new = self.q.avail_idx;
        if old == new {
            return false;
        }
        fence(Ordering::SeqCst);
        // SAFETY: avail->idx at offset 2.
        unsafe { std::ptr::write_volatile(self.avail.add(2) as *mut u16, new.to_le()) };
        self.published = new;
        fence(Ordering::SeqCst);
        let need = if self.q.event_idx {
            // avail_event lives after the used ring entries.
            let off = 4 + 8 * usize::from(self.q.size);
            // SAFETY: inside the used area mapped in `new`.
            let ev =
                u16::from_le(unsafe { std::ptr::read_volatile(self.used.add(off) as *const u16) });
            vring_need_event(ev, new, old)
        } else {
            // SAFETY: used->flags at offset 0.
            let flags = u16::from_le(unsafe { std::ptr::read_volatile(self.used as *const u16) });
            flags & VRING_USED_F_NO_NOTIFY == 0
        };
        if need {
            self.q.kick();
        }
        need
    }

    /// Take the next used element if there is one.
    pub fn pop_used(&mut self) -> Option<Used> {
        fence(Ordering::SeqCst);
        // SAFETY: used->idx at offset 2.
        let idx = u16::from_le(unsafe { std::ptr::read_volatile(self.used.add(2) as *const u16) });
        if idx == self.q.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = usize::from(self.q.last_used % self.q.size);
        // SAFETY: slot < size.
        let (id, len) = unsafe {
            let p = self.used.add(4 + 8 * slot);
            (
                u32::from_le(std::ptr::read_volatile(p as *const u32)),
                u32::from_le(std::ptr::read_volatile(p.add(4) as *const u32)),
            )
        };
        self.q.last_used = self.q.last_used.wrapping_add(1);
        Some(Used { id: id as u16, len })
    }

    /// Ask for an interrupt on the next used element (EVENT_IDX: used_event =
    /// last seen) and return whether elements arrived meanwhile, i.e. whether
    /// the caller must not sleep.
    pub fn arm_and_check(&mut self) -> bool {
        if self.q.event_idx {
            let off = 4 + 2 * usize::from(self.q.size);
            // SAFETY: used_event follows the avail ring entries.
            unsafe {
                std::ptr::write_volatile(self.avail.add(off) as *mut u16, self.q.last_used.to_le())
            };
        }
        fence(Ordering::SeqCst);
        // SAFETY: used->idx at offset 2.
        let idx = u16::from_le(unsafe { std::ptr::read_volatile(self.used.add(2) as *const u16) });
        idx != self.q.last_used
    }

    /// Block on the call eventfd up to `ms` milliseconds; true if signalled.
    pub fn wait_call(&mut self, ms: i32) -> bool {
        let fired = wait_fd(&self.q.call, ms);
        if fired {
            self.q.calls += 1;
        }
        fired
    }

    /// Call-eventfd signals observed so far on this queue.
    pub fn calls(&self) -> u64 {
        self.q.calls
    }

    /// Kicks sent so far on this queue.
    pub fn kicks(&self) -> u64 {
        self.q.kicks
    }
}

/// How to connect a [`BlkFrontend`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Queues to set up (at most [`layout::MAX_QUEUES`]).
    pub queues: usize,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if the backend offers it.
    pub event_idx: bool,
    /// Negotiate dirty logging (VHOST_F_LOG_ALL and LOG_SHMFD).
    pub dirty_log: bool,
    /// Entries per queue (power of two, at most 1024).
    pub queue_size: u16,
    /// Bytes of the data region.
    pub data_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 1,
            event_idx: false,
            dirty_log: false,
            queue_size: layout::QUEUE_SIZE,
            data_size: layout::DATA_REGION_SIZE,
        }
    }
}

/// A connected vhost-user frontend with guest memory and configured queues.
pub struct BlkFrontend {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<VirtQueue>,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    /// Bytes of the data region.
    pub data_size: u64,
    /// Bump allocator over the data region.
    next_data: u64,
}

impl BlkFrontend {
    /// Connect to `socket`, negotiate, share memory and start `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize, event_idx: bool) -> BlkFrontend {
        Self::connect_opts(socket, num_queues, event_idx, false)
    }

    /// [`connect`](Self::connect), optionally also negotiating dirty logging
    /// (VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD).
    pub fn connect_opts(
        socket: &Path,
        num_queues: usize,
        event_idx: bool,
        dirty_log: bool,
    ) -> BlkFrontend {
        let o = Options {
            queues: num_queues,
            event_idx,
            dirty_log,
            ..Options::default()
        };
        Self::connect_with(socket, &o).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Connect with explicit [`Options`].
    pub fn connect_with(socket: &Path, o: &Options) -> Result<BlkFrontend, String> {
        let num_queues = o.queues;
        if num_queues == 0 || num_queues > layout::MAX_QUEUES {
            return Err(format!(
                "{num_queues} queues (1..={} supported)",
                layout::MAX_QUEUES
            ));
        }
        if !o.queue_size.is_power_of_two() || o.queue_size > 1024 {
            return Err(format!(
                "queue size {} (power of two <= 1024)",
                o.queue_size
            ));
        }
        let e = |what: &'static str| move |err: vhost::Error| format!("vhost-user {what}: {err}");
        let mut frontend = Frontend::connect(socket, num_queues as u64).map_err(e("connect"))?;
        frontend.set_owner().map_err(e("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(e("GET_FEATURES"))?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES".into());
        }
        let mut features = offered;
        if !o.dirty_log {
            features &= !VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        if !o.event_idx {
            features &= !blk::F_EVENT_IDX;
        }
        frontend.set_features(features).map_err(e("SET_FEATURES"))?;
        let proto = frontend
            .get_protocol_features()
            .map_err(e("GET_PROTOCOL_FEATURES"))?;
        let mut wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if o.dirty_log {
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        if !proto.contains(wanted) {
            return Err(format!("protocol features {proto:?} lack {wanted:?}"));
        }
        frontend
            .set_protocol_features(proto & wanted)
            .map_err(e("SET_PROTOCOL_FEATURES"))?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let qnum = frontend.get_queue_num().map_err(e("GET_QUEUE_NUM"))?;
        if (qnum as usize) < num_queues {
            return Err(format!("backend has {qnum} queues, {num_queues} wanted"));
        }

        let mem = guest_memory_sized(o.data_size);
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;

        let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let mut queues = Vec::new();
        let use_event_idx = o.event_idx && features & blk::F_EVENT_IDX != 0;
        for i in 0..num_queues {
            let q = VirtQueue::new(i, o.queue_size, use_event_idx);
            frontend
                .set_vring_num(i, q.size)
                .map_err(e("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(
                    i,
                    &VringConfigData {
                        queue_max_size: q.size,
                        queue_size: q.size,
                        flags: 0,
                        desc_table_addr: hva(q.desc),
                        used_ring_addr: hva(q.used),
                        avail_ring_addr: hva(q.avail),
                        log_addr: None,
                    },
                )
                .map_err(e("SET_VRING_ADDR"))?;
            frontend.set_vring_base(i, 0).map_err(e("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(i, &q.call)
                .map_err(e("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(i, &q.kick)
                .map_err(e("SET_VRING_KICK"))?;
            frontend
                .set_vring_enable(i, true)
                .map_err(e("SET_VRING_ENABLE"))?;
            queues.push(q);
        }
        Ok(BlkFrontend {
            frontend,
            mem,
            queues,
            features,
            protocol_features: proto,
            data_size: o.data_size,
            next_data: layout::DATA_REGION,
        })
    }

    /// Whether EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & blk::F_EVENT_IDX != 0
    }

    /// Start dirty logging into a fresh memfd bitmap (one bit per 4 KiB
    /// guest page) and return it.
    pub fn start_dirty_log(&self) -> File {
        use layout::*;
        let pages = (DATA_REGION + self.data_size) / 4096;
        let size = (pages / 8).div_ceil(4096) * 4096;
        let log = memfd("dirty-log", size);
        self.frontend
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: size,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .unwrap();
        log
    }

    /// Read `size` bytes of device configuration space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .unwrap();
        data
    }

    /// Device capacity in sectors from the configuration space.
    pub fn capacity(&mut self) -> u64 {
        u64::from_le_bytes(self.config(0, 8).try_into().unwrap())
    }

    /// Allocate `len` bytes of data-region guest memory at `align` alignment (plus `skew`).
    pub fn alloc(&mut self, len: u64, align: u64, skew: u64) -> u64 {
        let a = self.next_data.div_ceil(align) * align + skew;
        assert!(
            a + len <= layout::DATA_REGION + self.data_size,
            "data region exhausted"
        );
        self.next_data = a + len;
        a
    }

    /// Reset the data allocator.
    pub fn free_all(&mut self) {
        self.next_data = layout::DATA_REGION;
    }

    /// Host address of guest address `gpa` (inside one region).
    pub fn host_ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        self.mem
            .get_slice(GuestAddress(gpa), len)
            .expect("inside guest memory")
            .ptr_guard_mut()
            .as_ptr()
    }

    /// Address of queue `q`'s request header page (header at +0, status at +0x100).
    pub fn header_addr(q: usize) -> u64 {
        layout::HDR_BASE + q as u64 * 0x1000
    }

    /// Publish a virtio-blk request on queue `q` (without kicking): header,
    /// `data` descriptors, then a status descriptor (device-writable unless
    /// `status_writable` is false). Returns the chain head.
    pub fn submit(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: &[Desc],
        status_writable: bool,
    ) -> u16 {
        let hdr = Self::header_addr(q);
        self.mem
            .write_slice(&request_header(kind, sector), GuestAddress(hdr))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(hdr + 0x100))
            .unwrap();
        let mut chain = vec![Desc {
            addr: hdr,
            len: 16,
            write: false,
        }];
        chain.extend_from_slice(data);
        chain.push(Desc {
            addr: hdr + 0x100,
            len: 1,
            write: status_writable,
        });
        let mem = &self.mem;
        self.queues[q].add_chain(mem, &chain)
    }

    /// Submit a request, kick, and wait for its completion: (status byte, used length).
    pub fn request(&mut self, q: usize, kind: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
        let head = self.submit(q, kind, sector, data, true);
        self.queues[q].kick();
        let used = self.queues[q]
            .wait_used(&self.mem, Duration::from_secs(10))
            .expect("request timed out");
        assert_eq!(used.id, head, "completed chain");
        let st: u8 = self
            .mem
            .read_obj(GuestAddress(Self::header_addr(q) + 0x100))
            .unwrap();
        (st, used.len)
    }

    /// Write `bytes` into guest memory at `addr`.
    pub fn poke(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// Read `len` bytes of guest memory at `addr`.
    pub fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// The 16-byte virtio-blk request header.
pub fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Device-readable data descriptor.
pub fn rd(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// Device-writable data descriptor.
pub fn wr(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// One DISCARD/WRITE_ZEROES segment.
pub fn discard_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b
}

/// A deterministic byte pattern.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Whether guest page `gpa / 4096` is marked in a dirty log.
pub fn page_dirty(log: &File, gpa: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let page = gpa / 4096;
    let mut b = [0u8; 1];
    log.read_exact_at(&mut b, page / 8).unwrap();
    b[0] & (1 << (page % 8)) != 0
}

/// Allocated size of a file in bytes (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Guest memory region sizes sanity: `GuestMemoryRegion` is used for `len`.
pub fn region_sizes(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter().map(|r| r.len()).collect()
}

#[cfg(test)]
mod tests {
    use super::vring_need_event;

    #[test]
    fn need_event() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(5, 3, 0));
        assert!(vring_need_event(2, 3, 0));
        assert!(vring_need_event(0xffff, 1, 0xfffe));
    }
}
