//! Execution of parsed virtio-blk requests against a disk image.
//!
//! Data moves directly between the image and guest memory: each guest buffer
//! is resolved to host mappings with `get_slices` and handed to the image's
//! `read_at`/`write_at` as a byte slice (no intermediate copy). With
//! `--direct` (O_DIRECT), a request with any buffer not 4 KiB aligned in host
//! address and length goes through an aligned bounce buffer instead, in 1 MiB
//! chunks (file offsets are the guest's: sector multiples).

use std::ops::Deref;
use std::sync::Arc;

use log::{debug, warn};
use tern_image::DiskImage;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use crate::metrics::Metrics;
use crate::request::{self, Limits, ParseError, Request, RequestType, Segment, ID_BYTES};

/// Alignment required of buffers handed to an O_DIRECT image.
pub const DIRECT_ALIGN: usize = 4096;

/// Errors of one request's execution; each completes the request with IOERR.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The image refused the operation.
    #[error("image {op} at offset {offset:#x}: {source}")]
    Image {
        /// Operation name.
        op: &'static str,
        /// Byte offset on the disk.
        offset: u64,
        /// The image's error.
        source: tern_image::ImageError,
    },
    /// A mutating request on a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// Guest memory changed under us (e.g. a memory table update) and a
    /// checked buffer is gone.
    #[error("guest buffer {0:#x} is no longer mapped")]
    GuestMemory(u64),
}

/// The outcome of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// `VIRTIO_BLK_S_*` status.
    pub status: u8,
    /// Bytes written into the guest's data buffers (not counting the status byte).
    pub written: u32,
}

/// Executes requests of one disk; shared by all queue workers.
pub struct Executor {
    image: Arc<dyn DiskImage>,
    serial: [u8; ID_BYTES as usize],
    read_only: bool,
    direct: bool,
    metrics: Arc<Metrics>,
}

impl Executor {
    /// An executor over `image`. `serial` is truncated to 20 bytes and
    /// zero-padded. `read_only` refuses OUT/DISCARD/WRITE_ZEROES even if the
    /// image itself is writable. `direct` enables aligned bounce buffers for
    /// O_DIRECT images.
    pub fn new(
        image: Arc<dyn DiskImage>,
        serial: &str,
        read_only: bool,
        direct: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut id = [0u8; ID_BYTES as usize];
        let s = serial.as_bytes();
        let n = s.len().min(id.len());
        id[..n].copy_from_slice(&s[..n]);
        let read_only = read_only || image.is_read_only();
        Executor {
            image,
            serial: id,
            read_only,
            direct,
            metrics,
        }
    }

    /// Whether mutating requests are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Parse, execute and answer one descriptor chain. Returns the used
    /// length for the used ring: bytes written to the guest plus the status
    /// byte, or 0 for a chain that could not be answered.
    ///
    /// `mem` must be the guest memory the chain was popped with.
    pub fn process_chain<G, M>(&self, mem: &G, chain: DescriptorChain<M>, limits: &Limits) -> u32
    where
        G: GuestMemory + ?Sized,
        M: Deref,
        M::Target: GuestMemory,
    {
        match request::parse(chain, limits) {
            Ok(req) => self.execute_and_finish(mem, &req),
            Err(rej) => self.reject(mem, rej),
        }
    }

    /// Count, execute and answer a parsed request synchronously; returns the
    /// used length.
    pub(crate) fn execute_and_finish<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        req: &Request,
    ) -> u32 {
        self.metrics.count_request(req.kind);
        let c = self.execute(mem, req);
        self.finish(mem, req.status, c)
    }

    /// Answer a chain the parser rejected; returns the used length (0 for an
    /// unanswerable chain).
    pub(crate) fn reject<G: GuestMemory + ?Sized>(&self, mem: &G, rej: request::Rejection) -> u32 {
        match rej.error {
            ParseError::UnsupportedType(_) => {
                Metrics::add(&self.metrics.unsupported, 1);
            }
            _ => Metrics::add(&self.metrics.invalid_requests, 1),
        }
        match rej.status {
            Some(status) => {
                debug!("invalid request: {}", rej.error);
                let c = Completion {
                    status: rej.error.status(),
                    written: 0,
                };
                self.finish(mem, status, c)
            }
            None => {
                debug!("skipping unanswerable chain: {}", rej.error);
                Metrics::add(&self.metrics.skipped_chains, 1);
                0
            }
        }
    }

    /// Write the status byte (last) and compute the used length.
    pub(crate) fn finish<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        status: vm_memory::GuestAddress,
        c: Completion,
    ) -> u32 {
        if mem.write_obj(c.status, status).is_err() {
            // Checked by the parser; only a concurrent memory table change gets here.
            Metrics::add(&self.metrics.queue_errors, 1);
            return 0;
        }
        c.written.saturating_add(1)
    }

    /// Execute a parsed request. The status byte is not written here.
    pub fn execute<G: GuestMemory + ?Sized>(&self, mem: &G, req: &Request) -> Completion {
        let mut written = 0u32;
        let result = match req.kind {
            RequestType::In => self.read(mem, req, &mut written),
            RequestType::Out => self.write(mem, req),
            RequestType::Flush => self.image.flush().map_err(|source| ExecError::Image {
                op: "flush",
                offset: 0,
                source,
            }),
            RequestType::GetId => self.get_id(mem, req, &mut written),
            RequestType::Discard => self.discard(req),
            RequestType::WriteZeroes => self.write_zeroes(req),
            // The parser rejects these; answer defensively anyway.
            RequestType::Unsupported(_) => {
                return Completion {
                    status: virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8,
                    written: 0,
                }
            }
        };
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(ExecError::ReadOnly) => {
                Metrics::add(&self.metrics.read_only_rejections, 1);
                VIRTIO_BLK_S_IOERR as u8
            }
            Err(e) => {
                warn!("{:?} request failed: {e}", req.kind);
                Metrics::add(&self.metrics.io_errors, 1);
                VIRTIO_BLK_S_IOERR as u8
            }
        };
        Completion { status, written }
    }

    fn read<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        req: &Request,
        written: &mut u32,
    ) -> Result<(), ExecError> {
        let offset = req.sector << crate::config::SECTOR_SHIFT;
        let slices = request_slices(mem, &req.data, Permissions::Write)?;
        let err = |offset| {
            move |source| ExecError::Image {
                op: "read",
                offset,
                source,
            }
        };
        if self.needs_bounce(&slices) {
            let mut cursor = Cursor::default();
            let mut bounce = AlignedBuf::new(BOUNCE_CHUNK.min(req.data_len as usize));
            let mut done = 0u64;
            while done < req.data_len {
                let n = (req.data_len - done).min(BOUNCE_CHUNK as u64) as usize;
                let buf = &mut bounce.as_mut()[..n];
                self.image
                    .read_at(buf, offset + done)
                    .map_err(err(offset + done))?;
                // copy_from (inside scatter) marks the pages dirty.
                cursor.scatter(&slices, buf);
                done += n as u64;
                *written = written.saturating_add(n as u32);
                Metrics::add(&self.metrics.bytes_read, n as u64);
            }
            return Ok(());
        }
        let mut pos = offset;
        for slice in &slices {
            let guard = slice.ptr_guard_mut();
            // SAFETY: `guard` points to `slice.len()` bytes of mapped guest
            // memory that stay mapped while `mem` (the memory snapshot) and the
            // guard live. The bytes are plain `u8` without validity invariants;
            // the guest handed this buffer to the device and does not access
            // it until the request completes (if it does, it only garbles its
            // own data).
            let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
            self.image.read_at(buf, pos).map_err(err(pos))?;
            // The store bypassed VolatileSlice: log it for migration ourselves.
            slice.bitmap().mark_dirty(0, slice.len());
            pos += slice.len() as u64;
            *written = written.saturating_add(slice.len() as u32);
            Metrics::add(&self.metrics.bytes_read, slice.len() as u64);
        }
        Ok(())
    }

    fn write<G: GuestMemory + ?Sized>(&self, mem: &G, req: &Request) -> Result<(), ExecError> {
        if self.read_only {
            return Err(ExecError::ReadOnly);
        }
        let offset = req.sector << crate::config::SECTOR_SHIFT;
        let slices = request_slices(mem, &req.data, Permissions::Read)?;
        let err = |offset| {
            move |source| ExecError::Image {
                op: "write",
                offset,
                source,
            }
        };
        if self.needs_bounce(&slices) {
            let mut cursor = Cursor::default();
            let mut bounce = AlignedBuf::new(BOUNCE_CHUNK.min(req.data_len as usize));
            let mut done = 0u64;
            while done < req.data_len {
                let n = (req.data_len - done).min(BOUNCE_CHUNK as u64) as usize;
                let buf = &mut bounce.as_mut()[..n];
                cursor.gather(&slices, buf);
                self.image
                    .write_at(buf, offset + done)
                    .map_err(err(offset + done))?;
                done += n as u64;
                Metrics::add(&self.metrics.bytes_written, n as u64);
            }
            return Ok(());
        }
        let mut pos = offset;
        for slice in &slices {
            let guard = slice.ptr_guard();
            // SAFETY: `guard` points to `slice.len()` bytes of mapped guest
            // memory that stay mapped while `mem` and the guard live; `u8` has
            // no invalid values. A guest modifying a buffer it submitted for
            // writing only affects the data written to its own disk.
            let buf = unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) };
            self.image.write_at(buf, pos).map_err(err(pos))?;
            pos += slice.len() as u64;
            Metrics::add(&self.metrics.bytes_written, slice.len() as u64);
        }
        Ok(())
    }

    /// With O_DIRECT, buffers must be aligned in address and length; when a
    /// request has any unaligned piece the whole request goes through an
    /// aligned bounce buffer (whose chunks have sector-multiple lengths).
    fn needs_bounce<B: BitmapSlice>(&self, slices: &[VolatileSlice<B>]) -> bool {
        self.direct
            && slices.iter().any(|s| {
                !(s.ptr_guard().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
                    || !s.len().is_multiple_of(DIRECT_ALIGN)
            })
    }

    fn get_id<G: GuestMemory + ?Sized>(
        &self,
        mem: &G,
        req: &Request,
        written: &mut u32,
    ) -> Result<(), ExecError> {
        let mut id: &[u8] = &self.serial;
        for seg in &req.data {
            if id.is_empty() {
                break;
            }
            let n = id.len().min(seg.len as usize);
            mem.write_slice(&id[..n], seg.addr)
                .map_err(|_| ExecError::GuestMemory(seg.addr.0))?;
            id = &id[n..];
            *written += n as u32;
        }
        Ok(())
    }

    fn discard(&self, req: &Request) -> Result<(), ExecError> {
        if self.read_only {
            return Err(ExecError::ReadOnly);
        }
        for r in req.ranges.iter().filter(|r| !r.is_empty()) {
            self.image
                .discard(r.offset(), r.len())
                .map_err(|source| ExecError::Image {
                    op: "discard",
                    offset: r.offset(),
                    source,
                })?;
        }
        Ok(())
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), ExecError> {
        if self.read_only {
            return Err(ExecError::ReadOnly);
        }
        for r in req.ranges.iter().filter(|r| !r.is_empty()) {
            self.image
                .write_zeroes(r.offset(), r.len(), r.unmap)
                .map_err(|source| ExecError::Image {
                    op: "write_zeroes",
                    offset: r.offset(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// The host slices of a request's (already validated) guest buffers, in order.
fn request_slices<'a, G: GuestMemory + ?Sized>(
    mem: &'a G,
    data: &[Segment],
    access: Permissions,
) -> Result<Vec<VolatileSlice<'a, vm_memory::bitmap::BS<'a, G::Bitmap>>>, ExecError> {
    let mut v = Vec::with_capacity(data.len());
    for seg in data {
        let gone = || ExecError::GuestMemory(seg.addr.0);
        let mut total = 0usize;
        for slice in mem
            .get_slices(seg.addr, seg.len as usize, access)
            .map_err(|_| gone())?
        {
            let slice = slice.map_err(|_| gone())?;
            total += slice.len();
            v.push(slice);
        }
        if total != seg.len as usize {
            return Err(gone());
        }
    }
    Ok(v)
}

/// Bytes per bounce-buffer round trip (a multiple of [`DIRECT_ALIGN`]).
const BOUNCE_CHUNK: usize = 1 << 20;

/// A position in a list of guest slices, for scatter/gather through a bounce buffer.
#[derive(Default)]
struct Cursor {
    index: usize,
    offset: usize,
}

impl Cursor {
    /// Copy `buf` into the slices from the cursor on, advancing it.
    fn scatter<B: BitmapSlice>(&mut self, slices: &[VolatileSlice<B>], mut buf: &[u8]) {
        while !buf.is_empty() && self.index < slices.len() {
            let s = &slices[self.index];
            let n = (s.len() - self.offset).min(buf.len());
            if let Ok(sub) = s.subslice(self.offset, n) {
                sub.copy_from(&buf[..n]);
            }
            self.advance(s.len(), n);
            buf = &buf[n..];
        }
    }

    /// Fill `buf` from the slices from the cursor on, advancing it.
    fn gather<B: BitmapSlice>(&mut self, slices: &[VolatileSlice<B>], mut buf: &mut [u8]) {
        while !buf.is_empty() && self.index < slices.len() {
            let s = &slices[self.index];
            let n = (s.len() - self.offset).min(buf.len());
            if let Ok(sub) = s.subslice(self.offset, n) {
                sub.copy_to(&mut buf[..n]);
            }
            self.advance(s.len(), n);
            buf = &mut buf[n..];
        }
    }

    fn advance(&mut self, slice_len: usize, n: usize) {
        self.offset += n;
        if self.offset == slice_len {
            self.index += 1;
            self.offset = 0;
        }
    }
}

/// A zeroed heap buffer whose start is [`DIRECT_ALIGN`]-aligned.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlkConfig;
    use crate::request::tests::{rd, test_mem, wr, write_header, DATA, HDR, STATUS};
    use std::sync::Mutex;
    use tern_image::ImageError;
    use virtio_bindings::virtio_blk::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// An in-memory raw disk for unit tests.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        ro: bool,
        fail: bool,
    }

    impl MemDisk {
        fn new(size: usize) -> Arc<Self> {
            let data = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
            Arc::new(MemDisk {
                data: Mutex::new(data),
                ro: false,
                fail: false,
            })
        }
    }

    /// Some `ImageError`, whatever its variants: opening a missing file.
    fn io_err() -> ImageError {
        match tern_image::open(
            std::path::Path::new("/nonexistent/tern-blk-test"),
            tern_image::Format::Raw,
            true,
            false,
        ) {
            Err(e) => e,
            Ok(_) => unreachable!("opened a missing file"),
        }
    }

    impl DiskImage for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
            if self.fail {
                return Err(io_err());
            }
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
            if self.fail {
                return Err(io_err());
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
            self.write_zeroes(offset, len, true)
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), ImageError> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn is_read_only(&self) -> bool {
            self.ro
        }
    }

    const SIZE: usize = 1 << 20;

    fn run(ex: &Executor, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u8) {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let limits = Limits::from(&BlkConfig::new(ex.image.size(), 1));
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let used = ex.process_chain(mem, chain, &limits);
        (used, mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn executor(disk: Arc<MemDisk>, ro: bool, direct: bool) -> Executor {
        Executor::new(
            disk,
            "serial-0123456789abcdef",
            ro,
            direct,
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn write_then_read_multi_segment() {
        for direct in [false, true] {
            let disk = MemDisk::new(SIZE);
            let ex = executor(disk.clone(), false, direct);
            let mem = test_mem();
            let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
            mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
            write_header(&mem, VIRTIO_BLK_T_OUT, 4);
            // Second segment lives in the other guest memory region; odd sizes.
            mem.write_slice(&pattern[1000..], GuestAddress(0x20_0010))
                .unwrap();
            let (used, st) = run(
                &ex,
                &mem,
                &[
                    rd(HDR, 16),
                    rd(DATA, 1000),
                    rd(0x20_0010, 1048),
                    wr(STATUS, 1),
                ],
            );
            assert_eq!((used, st), (1, VIRTIO_BLK_S_OK as u8));
            assert_eq!(&disk.data.lock().unwrap()[2048..4096], &pattern[..]);

            write_header(&mem, VIRTIO_BLK_T_IN, 4);
            let (used, st) = run(
                &ex,
                &mem,
                &[
                    rd(HDR, 16),
                    wr(0x4_0000, 512),
                    wr(0x5_0000, 1536),
                    wr(STATUS, 1),
                ],
            );
            assert_eq!((used, st), (2049, VIRTIO_BLK_S_OK as u8));
            let mut back = vec![0u8; 2048];
            mem.read_slice(&mut back[..512], GuestAddress(0x4_0000))
                .unwrap();
            mem.read_slice(&mut back[512..], GuestAddress(0x5_0000))
                .unwrap();
            assert_eq!(back, pattern);
            assert_eq!(
                ex.metrics
                    .bytes_read
                    .load(std::sync::atomic::Ordering::Relaxed),
                2048
            );
        }
    }

    #[test]
    fn direct_bounce_in_chunks() {
        // 2.5 MiB through five overlapping 512 KiB guest buffers: three bounce chunks.
        let disk = MemDisk::new(4 << 20);
        let ex = executor(disk.clone(), false, true);
        let mem = test_mem();
        let pattern: Vec<u8> = (0..0x8_0000u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x20_0100)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 1);
        let d: Vec<_> = std::iter::once(rd(HDR, 16))
            .chain((0..5).map(|_| rd(0x20_0100, 0x8_0000)))
            .chain(std::iter::once(wr(STATUS, 1)))
            .collect();
        assert_eq!(run(&ex, &mem, &d), (1, 0));
        {
            let data = disk.data.lock().unwrap();
            for k in 0..5 {
                let off = 512 + k * 0x8_0000;
                assert!(data[off..off + 0x8_0000] == pattern[..], "copy {k}");
            }
        }
        write_header(&mem, VIRTIO_BLK_T_IN, 1 + 0x8_0000 / 512 * 2);
        let d = [
            rd(HDR, 16),
            wr(0x2f_0001, 0x1000),
            wr(0x20_0000, 0x7_f000),
            wr(STATUS, 1),
        ];
        assert_eq!(run(&ex, &mem, &d), (0x8_0001, 0));
        let mut back = vec![0u8; 0x8_0000];
        mem.read_slice(&mut back[..0x1000], GuestAddress(0x2f_0001))
            .unwrap();
        mem.read_slice(&mut back[0x1000..], GuestAddress(0x20_0000))
            .unwrap();
        assert!(back == pattern);
    }

    #[test]
    fn read_past_end_is_ioerr() {
        let ex = executor(MemDisk::new(SIZE), false, false);
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, (SIZE / 512) as u64);
        let (used, st) = run(&ex, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert_eq!((used, st), (1, VIRTIO_BLK_S_IOERR as u8));
    }

    #[test]
    fn get_id_and_flush() {
        let ex = executor(MemDisk::new(SIZE), false, false);
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xaa; 64], GuestAddress(DATA)).unwrap();
        let (used, st) = run(
            &ex,
            &mem,
            &[rd(HDR, 16), wr(DATA, 8), wr(DATA + 32, 32), wr(STATUS, 1)],
        );
        assert_eq!((used, st), (21, VIRTIO_BLK_S_OK as u8));
        let mut id = [0u8; 64];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..8], b"serial-0");
        assert_eq!(&id[32..44], b"123456789abc");
        assert_eq!(id[44], 0xaa, "only 20 bytes written");
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&ex, &mem, &[rd(HDR, 16), wr(STATUS, 1)]), (1, 0));
    }

    #[test]
    fn read_only_refuses_mutation() {
        let disk = MemDisk::new(SIZE);
        let before = disk.data.lock().unwrap().clone();
        let ex = executor(disk.clone(), true, false);
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (_, st) = run(&ex, &mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        mem.write_slice(
            &[0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
            GuestAddress(DATA),
        )
        .unwrap();
        let (_, st) = run(&ex, &mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(*disk.data.lock().unwrap(), before);
        // Reads still work.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&ex, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]),
            (513, 0)
        );
    }

    #[test]
    fn discard_and_write_zeroes() {
        let disk = MemDisk::new(SIZE);
        let ex = executor(disk.clone(), false, false);
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&2u64.to_le_bytes());
        seg[8..12].copy_from_slice(&3u32.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(
            run(&ex, &mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]),
            (1, 0)
        );
        let d = disk.data.lock().unwrap();
        assert!(d[1024..2560].iter().all(|&b| b == 0));
        assert_ne!(d[1023], 0);
        assert_ne!(d[2561], 0);
    }

    #[test]
    fn image_error_is_ioerr_and_unanswerable_is_skipped() {
        let disk = Arc::new(MemDisk {
            data: Mutex::new(vec![0; SIZE]),
            ro: false,
            fail: true,
        });
        let ex = executor(disk, false, false);
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let (_, st) = run(&ex, &mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
        let (used, st) = run(&ex, &mem, &[rd(HDR, 16), wr(DATA, 512), rd(STATUS, 1)]);
        assert_eq!((used, st), (0, 0xff), "status untouched");
        assert_eq!(
            ex.metrics
                .skipped_chains
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        write_header(&mem, 0x1234, 0);
        let (used, st) = run(&ex, &mem, &[rd(HDR, 16), wr(STATUS, 1)]);
        assert_eq!((used, st), (1, VIRTIO_BLK_S_UNSUPP as u8));
    }
}
