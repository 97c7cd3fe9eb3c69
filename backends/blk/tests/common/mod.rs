//! A minimal vhost-user frontend and virtio-blk driver for exercising the real
//! `tern-blk` binary without a VMM: memfd-backed "guest" memory handed over
//! with SET_MEM_TABLE, split virtqueues laid out by hand, kicks and calls via
//! eventfds. Reusable by benchmark drivers (`mod common;`).

#![allow(dead_code)]

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
}

/// Guest physical layout used by [`TestFrontend`].
pub mod layout {
    /// Region 0: rings and request headers.
    pub const RING_REGION: u64 = 0;
    pub const RING_REGION_SIZE: u64 = 1 << 20;
    /// Per-queue ring area inside region 0.
    pub const QUEUE_STRIDE: u64 = 0x1_0000;
    /// Request headers / status bytes: one 0x1000 page per queue, above the rings.
    pub const HDR_BASE: u64 = 0x8_0000;
    /// Region 1: data buffers (not adjacent to region 0).
    pub const DATA_REGION: u64 = 0x1000_0000;
    pub const DATA_REGION_SIZE: u64 = 16 << 20;
    /// Queue size used.
    pub const QUEUE_SIZE: u16 = 128;
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
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
    /// Path of the binary under test.
    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_tern-blk")
    }

    /// Start `tern-blk --socket SOCKET ARGS...` and wait for its socket.
    pub fn spawn(socket: &Path, args: &[&str]) -> Backend {
        let child = Command::new(Self::binary())
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn tern-blk");
        let mut b = Backend {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(st) = b.child.try_wait().unwrap() {
                panic!("tern-blk exited early: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "tern-blk did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    /// Wait for the process to exit (panics after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "tern-blk did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
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

/// Run `tern-blk` with `args` to completion, capturing stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(Backend::binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern-blk");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid C string; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Shared guest memory: two memfd-backed regions.
pub fn guest_memory() -> GuestMemoryMmap {
    use layout::*;
    GuestMemoryMmap::from_ranges_with_files(&[
        (
            GuestAddress(RING_REGION),
            RING_REGION_SIZE as usize,
            Some(FileOffset::new(memfd("ring", RING_REGION_SIZE), 0)),
        ),
        (
            GuestAddress(DATA_REGION),
            DATA_REGION_SIZE as usize,
            Some(FileOffset::new(memfd("data", DATA_REGION_SIZE), 0)),
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
}

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

impl VirtQueue {
    fn new(index: usize, event_idx: bool) -> Self {
        use layout::*;
        let base = RING_REGION + index as u64 * QUEUE_STRIDE;
        VirtQueue {
            index,
            size: QUEUE_SIZE,
            desc: base,
            avail: base + 0x4000,
            used: base + 0x8000,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
            event_idx,
            calls: 0,
        }
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
    pub fn kick(&self) {
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
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 && self.call.read().is_ok() {
                self.calls += 1;
            }
        }
    }
}

/// A connected vhost-user frontend with guest memory and configured queues.
pub struct TestFrontend {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<VirtQueue>,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    /// Bump allocator over the data region.
    next_data: u64,
}

impl TestFrontend {
    /// Connect to `socket`, negotiate, share memory and start `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize, event_idx: bool) -> TestFrontend {
        Self::connect_opts(socket, num_queues, event_idx, false)
    }

    /// [`connect`](Self::connect), optionally also negotiating dirty logging
    /// (VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD).
    pub fn connect_opts(
        socket: &Path,
        num_queues: usize,
        event_idx: bool,
        dirty_log: bool,
    ) -> TestFrontend {
        use layout::*;
        let mut frontend = Frontend::connect(socket, num_queues as u64).expect("connect");
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let mut features = offered;
        if !dirty_log {
            features &= !VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        if !event_idx {
            features &= !blk::F_EVENT_IDX;
        }
        frontend.set_features(features).unwrap();
        let proto = frontend.get_protocol_features().unwrap();
        let mut wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if dirty_log {
            wanted |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        assert!(proto.contains(wanted), "protocol features {proto:?}");
        frontend.set_protocol_features(proto & wanted).unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let qnum = frontend.get_queue_num().unwrap();
        assert!(qnum as usize >= num_queues, "backend has {qnum} queues");

        let mem = guest_memory();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend.set_mem_table(&regions).unwrap();

        let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let mut queues = Vec::new();
        for i in 0..num_queues {
            let q = VirtQueue::new(i, event_idx && features & blk::F_EVENT_IDX != 0);
            frontend.set_vring_num(i, q.size).unwrap();
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
                .unwrap();
            frontend.set_vring_base(i, 0).unwrap();
            frontend.set_vring_call(i, &q.call).unwrap();
            frontend.set_vring_kick(i, &q.kick).unwrap();
            frontend.set_vring_enable(i, true).unwrap();
            queues.push(q);
        }
        TestFrontend {
            frontend,
            mem,
            queues,
            features,
            protocol_features: proto,
            next_data: DATA_REGION,
        }
    }

    /// Start dirty logging into a fresh memfd bitmap (one bit per 4 KiB
    /// guest page) and return it.
    pub fn start_dirty_log(&self) -> File {
        use layout::*;
        let pages = (DATA_REGION + DATA_REGION_SIZE) / 4096;
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
        assert!(a + len <= layout::DATA_REGION + layout::DATA_REGION_SIZE);
        self.next_data = a + len;
        a
    }

    /// Reset the data allocator.
    pub fn free_all(&mut self) {
        self.next_data = layout::DATA_REGION;
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
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
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
