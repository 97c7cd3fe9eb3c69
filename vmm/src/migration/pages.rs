//! Moving pages: the source gathers the pages of a round into batches and
//! writes each as a `Pages` header, the raw bytes and their CRC (see
//! [`super::protocol`]); the destination reads the bytes into a few
//! reused buffers that a second thread writes into guest memory.
//!
//! Why a buffer on both sides rather than straight from and to guest
//! memory: on the source the guest keeps writing its pages during
//! pre-copy, and the CRC must cover the very bytes sent, so each page is
//! copied once into a buffer that the CRC and the socket then read while
//! it is still in cache. On the destination, writing the buffer into the
//! memory file (pwrite) lets the kernel allocate the page without zeroing
//! it and without a page fault per 4 KiB, which on this kind of host costs
//! more than the copy (reading straight into a fresh memfd mapping ran at
//! about half the speed in the bench's raw baseline).
//!
//! Huge-page memory is the exception: a fault brings in 2 MiB, and
//! hugetlbfs has no write(2) anyway, so the destination reads the bytes
//! straight into guest memory, one copy fewer, with no writer thread
//! (measured in `tern-bench migrate --huge`).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Frame, PageRun, MAX_BATCH, MAX_RUNS};
use super::{MigrationError, SharedMigration};
use crate::memory::GuestRam;

/// Bytes copied, written or read at a time on either side: big enough that
/// a system call moves a lot, small enough to stay in the CPU's cache
/// between the copy, the CRC and the kernel's copy.
const CHUNK: usize = 1 << 20;

/// What a page is, as the source sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Its bytes go.
    Data,
    /// All zeros: the destination zeroes it, no bytes go.
    Zero,
}

/// A run waiting in the current batch: where its bytes are in the
/// source's memory.
struct Pending {
    run: PageRun,
    src: *const u8,
}

/// Batches pages and writes them to the destination, at most `rate`
/// bytes/s.
pub(super) struct PageSender<'a, W: Write> {
    out: &'a mut W,
    shared: &'a SharedMigration,
    rate: Option<f64>,
    started: Instant,
    /// Data bytes sent so far.
    pub(super) sent: u64,
    runs: Vec<Pending>,
    data: usize,
    buf: Vec<u8>,
    head: Vec<u8>,
}

impl<'a, W: Write> PageSender<'a, W> {
    /// A sender on `out`; `rate` caps the data rate (bytes/s).
    pub(super) fn new(out: &'a mut W, shared: &'a SharedMigration, rate: Option<f64>) -> Self {
        Self {
            out,
            shared,
            rate,
            started: Instant::now(),
            sent: 0,
            runs: Vec::new(),
            data: 0,
            buf: Vec::with_capacity(CHUNK + 4096),
            head: Vec::new(),
        }
    }

    /// Adds `len` bytes at `offset` in RAM's file order, mapped at `src`,
    /// to the batch (merged with the run before when they touch and are of
    /// the same kind). The bytes are read when the batch goes, not now.
    ///
    /// # Safety
    ///
    /// `src` must stay mapped and readable for `len` bytes until the batch
    /// is flushed (guest RAM, which outlives the migration).
    pub(super) unsafe fn add(
        &mut self,
        offset: u64,
        src: *const u8,
        len: usize,
        kind: Kind,
    ) -> Result<(), MigrationError> {
        let zero = kind == Kind::Zero;
        if let Some(last) = self.runs.last_mut() {
            let end = last.run.offset + u64::from(last.run.len);
            let fits = zero || self.data + len <= MAX_BATCH;
            // Adjacent in the file is not enough: RAM's regions are
            // separate mappings (low RAM ends where high RAM starts in the
            // file, not in the address space).
            let follows = last.src.wrapping_add(last.run.len as usize) == src;
            if end == offset
                && follows
                && last.run.zero == zero
                && fits
                && last.run.len as usize + len <= MAX_BATCH
            {
                last.run.len += len as u32;
                if !zero {
                    self.data += len;
                }
                return Ok(());
            }
        }
        if self.runs.len() == MAX_RUNS || (!zero && self.data + len > MAX_BATCH) {
            self.flush()?;
        }
        self.runs.push(Pending {
            run: PageRun {
                offset,
                len: len as u32,
                zero,
            },
            src,
        });
        if !zero {
            self.data += len;
        }
        Ok(())
    }

    /// The connection.
    pub(super) fn out(&mut self) -> &mut W {
        self.out
    }

    /// Writes the batch so far, then `frame`.
    pub(super) fn frame(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        self.flush()?;
        protocol::send(self.out, frame)?;
        Ok(())
    }

    /// Writes the batch: header, data (copied through the buffer, the CRC
    /// taken over the copy) and CRC.
    pub(super) fn flush(&mut self) -> Result<(), MigrationError> {
        if self.runs.is_empty() {
            return Ok(());
        }
        if self.shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let frame = Frame::Pages {
            runs: self.runs.iter().map(|p| p.run).collect(),
            data: std::borrow::Cow::Borrowed(&[]),
        };
        self.head.clear();
        protocol::encode_head(&mut self.head, &frame)?;
        self.buf.clear();
        self.buf.extend_from_slice(&self.head);
        let mut crc = crc32fast::Hasher::new();
        for p in self.runs.iter().filter(|p| !p.run.zero) {
            let mut done = 0usize;
            let len = p.run.len as usize;
            while done < len {
                let n = (len - done).min(CHUNK.saturating_sub(self.buf.len()).max(4096));
                let at = self.buf.len();
                // SAFETY: `add`'s caller promised `src` readable for the
                // run's length; `buf` has room (reserved below). The guest
                // may write these bytes meanwhile: a torn copy is fine, as
                // the page is then dirty again and goes in a later round,
                // and the CRC covers the copy, which is what is sent.
                unsafe {
                    self.buf.reserve(n);
                    std::ptr::copy_nonoverlapping(
                        p.src.add(done),
                        self.buf.as_mut_ptr().add(at),
                        n,
                    );
                    self.buf.set_len(at + n);
                }
                crc.update(&self.buf[at..]);
                done += n;
                if self.buf.len() >= CHUNK {
                    self.out
                        .write_all(&self.buf)
                        .map_err(protocol::ProtocolError::Io)?;
                    self.buf.clear();
                }
            }
        }
        self.buf.extend_from_slice(&crc.finalize().to_le_bytes());
        self.out
            .write_all(&self.buf)
            .map_err(protocol::ProtocolError::Io)?;
        self.buf.clear();
        let data = self.data as u64;
        self.sent += data;
        self.runs.clear();
        self.data = 0;
        self.shared.update(|s| s.bytes_sent += data);
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(self.sent as f64 / rate);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

/// Buffers between the destination's reader and writer: enough for the
/// writer to catch up on a burst, few enough to stay in the CPU's cache.
const BUFFERS: usize = 4;

/// A piece of a batch for the destination's writer.
enum Piece {
    /// `len` bytes of `buf` go at `offset`.
    Data {
        buf: Vec<u8>,
        len: usize,
        offset: u64,
    },
    /// `len` zero bytes go at `offset`.
    Zero { len: usize, offset: u64 },
}

/// The destination's page path: this thread reads the bytes off the
/// stream (and checks their CRC while they are in cache), either into a
/// few reused buffers that a writer thread puts into guest memory, or, for
/// huge-page memory, straight into guest memory. Writing into fresh 4 KiB
/// pages is the larger half of the work (the kernel allocates each page),
/// so the two halves run on two cores when the host has them.
pub(super) struct PageReceiver<'a> {
    path: Path<'a>,
}

enum Path<'a> {
    /// Through buffers and the writer thread.
    Writer {
        full: Option<SyncSender<Piece>>,
        free: Receiver<Vec<u8>>,
    },
    /// Into guest memory, mapped as (file offset, host address, length).
    Direct(&'a GuestRam, Vec<(u64, usize, u64)>),
}

/// The writer thread, when there is one.
pub(super) type WriterHandle<'scope> = ScopedJoinHandle<'scope, Result<(), MigrationError>>;

/// Returns the reader's end of the destination's page path for `ram`,
/// and, unless `huge` (pages are then read straight into memory), starts
/// the writer thread in `scope`.
pub(super) fn start_receiver<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    ram: &'env GuestRam,
    huge: bool,
) -> Result<(PageReceiver<'env>, Option<WriterHandle<'scope>>), MigrationError> {
    if huge {
        let path = Path::Direct(ram, mapped_regions(ram)?);
        return Ok((PageReceiver { path }, None));
    }
    let writer = Writer { ram };
    let (full_tx, full_rx) = sync_channel::<Piece>(BUFFERS);
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        // Cannot fail: the channel has room for them all and both ends live.
        let _ = free_tx.send(vec![0u8; CHUNK]);
    }
    let handle = std::thread::Builder::new()
        .name("migration-write".into())
        .spawn_scoped(scope, move || writer.run(full_rx, free_tx))
        .map_err(|err| MigrationError::Os {
            what: "starting the page writer thread",
            err,
        })?;
    let path = Path::Writer {
        full: Some(full_tx),
        free: free_rx,
    };
    Ok((PageReceiver { path }, Some(handle)))
}

/// Guest RAM as (file offset, host address, length) per region.
fn mapped_regions(ram: &GuestRam) -> Result<Vec<(u64, usize, u64)>, MigrationError> {
    let mut v = Vec::new();
    let mut off = 0u64;
    for r in ram.memory.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MigrationError::Os {
                what: "guest memory",
                err: std::io::Error::other(e.to_string()),
            })?;
        v.push((off, host as usize, r.len()));
        off += r.len();
    }
    Ok(v)
}

/// Where the bytes of guest RAM from file offset `offset` are mapped, by
/// `regions`, and how many of the next `len` lie in that region (a run
/// may go on into the next one: the file lays the regions end to end).
fn guest_ptr(
    regions: &[(u64, usize, u64)],
    offset: u64,
    len: usize,
) -> Result<(*mut u8, usize), MigrationError> {
    let (start, host, rlen) = regions
        .iter()
        .copied()
        .find(|&(s, _, l)| offset >= s && offset - s < l)
        .ok_or_else(|| outside(offset, len as u64))?;
    let fits = (rlen - (offset - start)).min(len as u64) as usize;
    Ok(((host + (offset - start) as usize) as *mut u8, fits))
}

/// The writer went away: it failed, and its own error says why.
fn writer_gone() -> MigrationError {
    MigrationError::Os {
        what: "writing guest memory",
        err: std::io::Error::other("the page writer stopped"),
    }
}

impl PageReceiver<'_> {
    /// Reads the data and CRC of a `Pages` batch with `runs` from `r` and
    /// hands them to the writer (every run already checked to lie inside
    /// RAM, see [`check_runs`]). Returns the data bytes.
    pub(super) fn batch(
        &mut self,
        r: &mut impl Read,
        runs: &[PageRun],
    ) -> Result<u64, MigrationError> {
        let (full, free) = match &self.path {
            Path::Writer { full, free } => (full.as_ref().ok_or_else(writer_gone)?, free),
            Path::Direct(ram, regions) => return read_direct(r, runs, ram, regions),
        };
        let mut crc = crc32fast::Hasher::new();
        let mut data = 0u64;
        for run in runs {
            let len = run.len as usize;
            if run.zero {
                full.send(Piece::Zero {
                    len,
                    offset: run.offset,
                })
                .map_err(|_| writer_gone())?;
                continue;
            }
            let mut done = 0usize;
            while done < len {
                let mut buf = free.recv().map_err(|_| writer_gone())?;
                let n = (len - done).min(buf.len());
                protocol::read_payload(r, &mut buf[..n])?;
                crc.update(&buf[..n]);
                full.send(Piece::Data {
                    buf,
                    len: n,
                    offset: run.offset + done as u64,
                })
                .map_err(|_| writer_gone())?;
                done += n;
            }
            data += len as u64;
        }
        protocol::check_trailer(r, crc)?;
        Ok(data)
    }

    /// No more pages: the writer finishes what it holds and ends.
    pub(super) fn close(&mut self) {
        if let Path::Writer { full, .. } = &mut self.path {
            *full = None;
        }
    }
}

/// [`PageReceiver::batch`] straight into guest memory.
fn read_direct(
    r: &mut impl Read,
    runs: &[PageRun],
    _ram: &GuestRam,
    regions: &[(u64, usize, u64)],
) -> Result<u64, MigrationError> {
    let mut crc = crc32fast::Hasher::new();
    let mut data = 0u64;
    for run in runs {
        let (mut offset, mut left) = (run.offset, run.len as usize);
        while left > 0 {
            let (at, len) = guest_ptr(regions, offset, left)?;
            // SAFETY: `at` starts `len` bytes inside a region's mapping,
            // which lives as long as `_ram` (borrowed for this call).
            // Nothing else touches them meanwhile: the destination's
            // vCPUs do not run yet, and this thread is the only one
            // writing pages (there is no writer thread on this path).
            let dst = unsafe { std::slice::from_raw_parts_mut(at, len) };
            if run.zero {
                dst.fill(0);
            } else {
                // In pieces, so that the CRC reads each while in cache.
                for piece in dst.chunks_mut(CHUNK) {
                    protocol::read_payload(r, piece)?;
                    crc.update(piece);
                }
                data += len as u64;
            }
            offset += len as u64;
            left -= len;
        }
    }
    protocol::check_trailer(r, crc)?;
    Ok(data)
}

/// Where the destination's writer puts page bytes: through the memory
/// file.
struct Writer<'a> {
    ram: &'a GuestRam,
}

impl Writer<'_> {
    /// Writes pieces until the reader closes its end, handing each buffer
    /// back.
    fn run(self, full: Receiver<Piece>, free: SyncSender<Vec<u8>>) -> Result<(), MigrationError> {
        let mut zeros: Vec<u8> = Vec::new();
        for piece in full {
            match piece {
                Piece::Data { buf, len, offset } => {
                    self.put(&buf[..len], offset)?;
                    // The reader may be gone (it failed): nothing to hand back.
                    let _ = free.send(buf);
                }
                Piece::Zero { len, offset } => {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(CHUNK);
                        zeros.resize(n.max(zeros.len()), 0);
                        self.put(&zeros[..n], offset + done as u64)?;
                        done += n;
                    }
                }
            }
        }
        log::debug!(
            "incoming migration: page writer thread CPU {:.0} ms",
            super::thread_cpu().as_secs_f64() * 1e3
        );
        Ok(())
    }

    /// Writes `bytes` at `offset` in guest RAM.
    fn put(&self, bytes: &[u8], offset: u64) -> Result<(), MigrationError> {
        self.ram
            .file
            .write_all_at(bytes, offset)
            .map_err(|err| MigrationError::Os {
                what: "writing guest memory",
                err,
            })
    }
}

fn outside(offset: u64, len: u64) -> MigrationError {
    protocol::ProtocolError::Unexpected {
        expected: "pages inside guest memory",
        got: format!("{len} bytes at {offset:#x}"),
    }
    .into()
}

/// Checks that every run of a batch lies inside `mem_size` bytes of RAM
/// (the data length limits are [`protocol::data_len`]'s).
pub(super) fn check_runs(runs: &[PageRun], mem_size: u64) -> Result<(), MigrationError> {
    protocol::data_len(runs)?;
    for r in runs {
        let end = r.offset.checked_add(u64::from(r.len));
        if end.is_none_or(|e| e > mem_size) {
            return Err(outside(r.offset, u64::from(r.len)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_carry_the_right_bytes_across_separate_mappings() {
        // Two "regions" adjacent in the file but not in memory.
        let a = vec![1u8; 8192];
        let b = vec![2u8; 4096];
        let zero = vec![0u8; 4096];
        let shared = SharedMigration::default();
        let mut out = Vec::new();
        let mut tx = PageSender::new(&mut out, &shared, None);
        // SAFETY: the vectors outlive the sender.
        unsafe {
            tx.add(0, a.as_ptr(), 4096, Kind::Data).unwrap();
            tx.add(4096, a.as_ptr().add(4096), 4096, Kind::Data)
                .unwrap();
            tx.add(8192, b.as_ptr(), 4096, Kind::Data).unwrap();
            tx.add(12288, zero.as_ptr(), 4096, Kind::Zero).unwrap();
        }
        tx.frame(&Frame::Complete).unwrap();
        assert_eq!(tx.sent, 12288);
        let mut r = &out[..];
        match protocol::recv(&mut r).unwrap() {
            Frame::Pages { runs, data } => {
                assert_eq!(
                    runs.iter()
                        .map(|r| (r.offset, r.len, r.zero))
                        .collect::<Vec<_>>(),
                    [(0, 8192, false), (8192, 4096, false), (12288, 4096, true)]
                );
                assert_eq!(&data[..8192], &a[..]);
                assert_eq!(&data[8192..], &b[..]);
            }
            other => panic!("{}", protocol::name(&other)),
        }
        assert!(matches!(protocol::recv(&mut r).unwrap(), Frame::Complete));
    }

    #[test]
    fn the_destination_puts_data_and_zero_runs_into_memory_and_checks_the_crc() {
        // Through the writer thread, and straight into memory (the path
        // for huge pages, which works on any shared mapping).
        for direct in [false, true] {
            receive_into_memory(direct);
        }
    }

    fn receive_into_memory(direct: bool) {
        use std::os::unix::fs::FileExt;
        // 4 GiB: two regions, the low one ending where the high one starts
        // in the file. Sparse: only the pages written are allocated.
        let ram = crate::memory::create_guest_ram(4 << 10, false).unwrap();
        let low = ram.memory.iter().next().unwrap().len();
        ram.file.write_all_at(&[9u8; 4096], low + 4096).unwrap();
        let a = vec![5u8; 8192];
        let zero = vec![0u8; 4096];
        let shared = SharedMigration::default();
        let mut out = Vec::new();
        let mut tx = PageSender::new(&mut out, &shared, None);
        // SAFETY: the vectors outlive the sender.
        unsafe {
            tx.add(low - 4096, a.as_ptr(), 4096, Kind::Data).unwrap();
            tx.add(low, a.as_ptr().add(4096), 4096, Kind::Data).unwrap();
            tx.add(low + 4096, zero.as_ptr(), 4096, Kind::Zero).unwrap();
        }
        tx.flush().unwrap();
        let mut bad = out.clone();
        let n = bad.len();
        bad[n - 100] ^= 1;

        let run = |bytes: &[u8]| -> Result<u64, MigrationError> {
            let mut r = bytes;
            let Frame::Pages { runs, .. } = protocol::recv_head(&mut r)? else {
                panic!("not Pages");
            };
            check_runs(&runs, ram.size)?;
            std::thread::scope(|scope| {
                let (mut sink, writer) = start_receiver(scope, &ram, direct)?;
                assert_eq!(writer.is_none(), direct);
                let got = sink.batch(&mut r, &runs);
                sink.close();
                writer.map_or(Ok(()), |w| w.join().unwrap()).and(got)
            })
        };
        assert!(matches!(
            run(&bad),
            Err(MigrationError::Protocol(
                protocol::ProtocolError::Checksum { .. }
            ))
        ));
        assert_eq!(run(&out).unwrap(), 8192);
        let mut back = vec![0u8; 3 * 4096];
        ram.file.read_exact_at(&mut back, low - 4096).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 5));
        assert!(
            back[8192..].iter().all(|&b| b == 0),
            "the zero run ({direct})"
        );
        assert!(matches!(
            run(&out[..out.len() - 2]),
            Err(MigrationError::Protocol(
                protocol::ProtocolError::Truncated(_)
            ))
        ));
    }

    #[test]
    fn runs_outside_ram_are_refused() {
        let run = |offset, len| PageRun {
            offset,
            len,
            zero: false,
        };
        assert!(check_runs(&[run(0, 4096), run(8192, 4096)], 12288).is_ok());
        assert!(check_runs(&[run(8192, 8192)], 12288).is_err());
        assert!(check_runs(&[run(u64::MAX - 10, 4096)], u64::MAX).is_err());
    }
}
