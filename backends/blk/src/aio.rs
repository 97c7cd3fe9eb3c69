//! Asynchronous I/O for raw images with Linux io_uring: many requests of one
//! queue in flight at the disk at once.
//!
//! Each queue worker owns one [`QueueAio`]: an io_uring plus an eventfd
//! registered with it (`IORING_REGISTER_EVENTFD`). The backend adds that
//! eventfd to the worker's `vhost-user-backend` epoll loop as an extra
//! listener, so completions wake the same thread that handles the queue's
//! kicks; nothing else touches the ring (except `stop_vring`, which drains
//! it under the same lock).
//!
//! READ/WRITE requests become one READV/WRITEV SQE whose iovecs point
//! straight into guest memory (the memory snapshot is kept alive with the
//! request). FLUSH becomes an fdatasync SQE with `IOSQE_IO_DRAIN`, so it
//! starts only after every SQE submitted before it completed. Short
//! transfers are resubmitted for the rest; a read hitting the end of the file
//! (the file shrank) reads zeros, as the synchronous path does.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::warn;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::backend::MemBitmap;
use crate::config::SECTOR_SHIFT;
use crate::executor::{Completion, DIRECT_ALIGN};
use crate::metrics::Metrics;
use crate::request::{Request, Segment};

/// A snapshot of guest memory, kept alive while the kernel may access it.
pub type MemSnapshot = Arc<GuestMemoryMmap<MemBitmap>>;

/// Most iovecs in one READV/WRITEV (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// One request in flight.
struct InFlight {
    head: u16,
    op: Op,
    mem: MemSnapshot,
    /// Host buffers; `iovecs[first..]` is what remains to transfer (the
    /// first of them possibly advanced past a short transfer).
    iovecs: Vec<libc::iovec>,
    first: usize,
    /// File offset of the next byte to transfer.
    offset: u64,
    /// Bytes transferred so far and in total.
    done: u64,
    total: u64,
    status: GuestAddress,
    /// The guest buffers (reads: marked dirty on completion).
    data: Vec<Segment>,
}

// SAFETY: the raw pointers in `iovecs` point into the guest memory mappings
// owned by `mem`, which travels with them; nothing else aliases them in this
// process except the guest (which owns the buffers' contents).
unsafe impl Send for InFlight {}

/// A finished request: the backend writes its status and adds it to the used ring.
pub struct Finished {
    /// Descriptor chain head.
    pub head: u16,
    /// The memory the request was submitted with.
    pub mem: MemSnapshot,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// The outcome.
    pub completion: Completion,
}

/// The io_uring of one queue.
pub struct QueueAio {
    ring: IoUring,
    event: OwnedFd,
    file: Arc<File>,
    direct: bool,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// SQEs pushed but not yet accepted by the kernel.
    unsubmitted: bool,
    metrics: Arc<Metrics>,
}

impl QueueAio {
    /// A ring of `entries` SQEs for requests on `file` (the raw image,
    /// opened with O_DIRECT when `direct`).
    pub fn new(
        file: Arc<File>,
        entries: u32,
        direct: bool,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let n = ring.params().sq_entries() as usize;
        Ok(QueueAio {
            ring,
            event,
            file,
            direct,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            in_flight: 0,
            unsubmitted: false,
            metrics,
        })
    }

    /// The eventfd signalled on completions.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// How many more requests can be submitted now.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Reset the completion eventfd (completions are then read from the ring).
    pub fn consume_event(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`; the fd is a non-blocking eventfd.
        unsafe { libc::read(self.event.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Queue a READ (`write == false`) or WRITE request. Returns false (and
    /// queues nothing) if the request must take the synchronous path: no free
    /// slot, buffers gone, too many pieces, or buffers O_DIRECT cannot use.
    pub fn submit_rw(&mut self, mem: &MemSnapshot, head: u16, req: &Request, write: bool) -> bool {
        if self.free.is_empty() {
            return false;
        }
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iovecs = Vec::with_capacity(req.data.len());
        for seg in &req.data {
            let Ok(slices) = mem.get_slices(seg.addr, seg.len as usize, access) else {
                return false;
            };
            let mut total = 0usize;
            for slice in slices {
                let Ok(slice) = slice else { return false };
                let ptr = slice.ptr_guard_mut().as_ptr();
                if self.direct
                    && (!(ptr as usize).is_multiple_of(DIRECT_ALIGN)
                        || !slice.len().is_multiple_of(DIRECT_ALIGN))
                {
                    return false;
                }
                total += slice.len();
                iovecs.push(libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: slice.len(),
                });
            }
            if total != seg.len as usize {
                return false;
            }
        }
        if iovecs.len() > MAX_IOVECS {
            return false;
        }
        if iovecs.is_empty() {
            // Zero-length transfer: nothing to do at the disk.
            return false;
        }
        let req = InFlight {
            head,
            op: if write { Op::Write } else { Op::Read },
            mem: mem.clone(),
            iovecs,
            first: 0,
            offset: req.sector << SECTOR_SHIFT,
            done: 0,
            total: req.data_len,
            status: req.status,
            data: req.data.clone(),
        };
        self.start(req);
        true
    }

    /// Queue a FLUSH: an fdatasync ordered after every SQE submitted before it.
    pub fn submit_flush(&mut self, mem: &MemSnapshot, head: u16, req: &Request) -> bool {
        if self.free.is_empty() {
            return false;
        }
        let req = InFlight {
            head,
            op: Op::Flush,
            mem: mem.clone(),
            iovecs: Vec::new(),
            first: 0,
            offset: 0,
            done: 0,
            total: 0,
            status: req.status,
            data: Vec::new(),
        };
        self.start(req);
        true
    }

    fn start(&mut self, req: InFlight) {
        let slot = self.free.pop().expect("caller checked for a free slot");
        self.slots[slot] = Some(req);
        self.in_flight += 1;
        self.push(slot);
    }

    /// Push the SQE for the remaining part of the request in `slot`.
    fn push(&mut self, slot: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let r = self.slots[slot].as_ref().expect("slot in use");
        let sqe = match r.op {
            Op::Read | Op::Write => {
                let iov = &r.iovecs[r.first..];
                let (ptr, len) = (iov.as_ptr(), iov.len() as u32);
                if r.op == Op::Read {
                    opcode::Readv::new(fd, ptr, len).offset(r.offset).build()
                } else {
                    opcode::Writev::new(fd, ptr, len).offset(r.offset).build()
                }
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the SQE's iovecs and the buffers they point to live in
            // `self.slots[slot]` (the Vec's heap storage does not move) and
            // its memory snapshot until the CQE for `slot` is reaped.
            let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
            if pushed {
                break;
            }
            // SQ full: hand what is queued to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit: {e}");
                let _ = self.ring.submit_and_wait(1);
            }
        }
        self.unsubmitted = true;
    }

    /// Hand queued SQEs to the kernel.
    pub fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    // Completions must be reaped first; they are, by the
                    // caller, and the next submit retries.
                    return;
                }
                Err(e) => {
                    warn!("io_uring submit: {e}");
                    return;
                }
            }
        }
        self.unsubmitted = !self.ring.submission().is_empty();
    }

    /// Collect the completions available now into `out` (resubmitting the
    /// rest of short transfers).
    pub fn reap(&mut self, out: &mut Vec<Finished>) {
        loop {
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                break;
            }
            for (slot, res) in cqes {
                self.complete(slot as usize, res, out);
            }
        }
        self.submit();
    }

    /// Wait until nothing is in flight, collecting completions into `out`.
    pub fn wait_all(&mut self, out: &mut Vec<Finished>) {
        while self.in_flight > 0 {
            self.submit();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    warn!("io_uring wait: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.reap(out);
        }
    }

    fn complete(&mut self, slot: usize, res: i32, out: &mut Vec<Finished>) {
        let Some(r) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            warn!("io_uring completion for unknown slot {slot}");
            return;
        };
        let status = if res == -libc::EAGAIN || res == -libc::EINTR {
            // Transient: try the same transfer again.
            self.push(slot);
            return;
        } else if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            warn!("{:?} request failed at offset {:#x}: {e}", r.op, r.offset);
            Metrics::add(&self.metrics.io_errors, 1);
            VIRTIO_BLK_S_IOERR as u8
        } else if r.op == Op::Flush {
            VIRTIO_BLK_S_OK as u8
        } else {
            let mut n = res as u64;
            if n == 0 {
                if r.op == Op::Read {
                    // Past the end of a file that shrank: zeros, like the sync path.
                    for iov in &r.iovecs[r.first..] {
                        // SAFETY: the iovec is a live guest buffer of `iov_len` bytes.
                        unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                    }
                    n = r.total - r.done;
                } else {
                    warn!("write at offset {:#x} made no progress", r.offset);
                    Metrics::add(&self.metrics.io_errors, 1);
                    n = 0;
                }
            }
            if n == 0 {
                VIRTIO_BLK_S_IOERR as u8
            } else {
                r.done += n;
                r.offset += n;
                if r.done < r.total {
                    advance(&mut r.iovecs, &mut r.first, n as usize);
                    self.push(slot);
                    return;
                }
                VIRTIO_BLK_S_OK as u8
            }
        };
        let r = self.slots[slot].take().expect("slot in use");
        self.free.push(slot);
        self.in_flight -= 1;
        let ok = status == VIRTIO_BLK_S_OK as u8;
        let mut written = 0;
        match r.op {
            Op::Read if ok => {
                // The kernel stored into guest memory behind vm-memory's back:
                // log the pages for migration.
                for seg in &r.data {
                    if let Ok(slices) =
                        r.mem
                            .get_slices(seg.addr, seg.len as usize, Permissions::Write)
                    {
                        for s in slices.flatten() {
                            s.bitmap().mark_dirty(0, s.len());
                        }
                    }
                }
                written = r.total as u32;
                Metrics::add(&self.metrics.bytes_read, r.total);
            }
            Op::Write if ok => Metrics::add(&self.metrics.bytes_written, r.total),
            _ => {}
        }
        out.push(Finished {
            head: r.head,
            mem: r.mem,
            status: r.status,
            completion: Completion { status, written },
        });
    }
}

/// Drop `n` transferred bytes from the front of `iovecs[*first..]`.
fn advance(iovecs: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iovecs.len() {
        let iov = &mut iovecs[*first];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            *first += 1;
        } else {
            // SAFETY: stays inside the same buffer (n < iov_len).
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
            iov.iov_len -= n;
            n = 0;
        }
    }
}

impl Drop for QueueAio {
    fn drop(&mut self) {
        // The kernel may still write into guest memory we hold: wait for it
        // before the snapshots (and the ring) go away.
        let mut sink = Vec::new();
        self.wait_all(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_over_iovecs() {
        let mut a = [0u8; 16];
        let base = a.as_mut_ptr();
        let mut v = vec![
            libc::iovec {
                iov_base: base.cast(),
                iov_len: 4,
            },
            libc::iovec {
                iov_base: unsafe { base.add(4) }.cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: unsafe { base.add(12) }.cast(),
                iov_len: 4,
            },
        ];
        let mut first = 0;
        advance(&mut v, &mut first, 6);
        assert_eq!(first, 1);
        assert_eq!(v[1].iov_len, 6);
        assert_eq!(v[1].iov_base as usize, base as usize + 6);
        advance(&mut v, &mut first, 6);
        assert_eq!(first, 2);
        assert_eq!(v[2].iov_len, 4);
    }
}
