//! Asynchronous I/O for raw images with Linux io_uring: many requests of one
//! queue in flight at the disk at once.
//!
//! Each queue worker owns one [`QueueAio`]: an io_uring (the
//! [`tern_image::aio::UringQueue`] engine shared with `tern-scsi`). The
//! backend adds its completion descriptor to the worker's
//! `vhost-user-backend` epoll loop as an extra listener, so completions wake
//! the same thread that handles the queue's kicks; nothing else touches the
//! ring (except `stop_vring`, which drains it under the same lock).
//!
//! READ/WRITE requests become one READV/WRITEV SQE whose iovecs point
//! straight into guest memory (the memory snapshot is kept alive with the
//! request). FLUSH becomes an fdatasync SQE with `IOSQE_IO_DRAIN`, so it
//! starts only after every SQE submitted before it completed. Short
//! transfers are resubmitted for the rest; a read hitting the end of the file
//! (the file shrank) reads zeros, as the synchronous path does.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use log::warn;
use tern_image::aio::{Done, Op, UringQueue};
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

/// What the backend remembers of a request in flight.
struct Owner {
    head: u16,
    mem: MemSnapshot,
    status: GuestAddress,
    /// The guest buffers (reads: marked dirty on completion).
    data: Vec<Segment>,
}

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

/// The io_uring of one queue (the shared [`UringQueue`] engine of
/// `tern-image`, plus what virtio-blk needs around it).
pub struct QueueAio {
    uring: UringQueue<Owner>,
    file: Arc<File>,
    direct: bool,
    metrics: Arc<Metrics>,
    /// Reused buffer for reaped requests.
    done: Vec<Done<Owner>>,
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
        Ok(QueueAio {
            uring: UringQueue::new(entries)?,
            file,
            direct,
            metrics,
            done: Vec::new(),
        })
    }

    /// The descriptor signalled (readable) on completions.
    pub fn event_fd(&self) -> RawFd {
        self.uring.event_fd()
    }

    /// How many more requests can be submitted now.
    pub fn room(&self) -> usize {
        self.uring.room()
    }

    /// See [`UringQueue::busy`].
    pub fn busy(&mut self) -> bool {
        self.uring.busy()
    }

    /// Reset the completion event (completions are then read from the ring).
    pub fn consume_event(&self) {
        self.uring.consume_event()
    }

    /// Queue a READ (`write == false`) or WRITE request. Gives the request
    /// back (and queues nothing) if it must take the synchronous path: no
    /// free slot, buffers gone, too many pieces, or buffers O_DIRECT cannot use.
    pub fn submit_rw(
        &mut self,
        mem: &MemSnapshot,
        head: u16,
        mut req: Request,
        write: bool,
    ) -> Result<(), Request> {
        if self.uring.room() == 0 {
            return Err(req);
        }
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let direct = self.direct;
        let fill = |o: &Owner, iovecs: &mut Vec<libc::iovec>| {
            for seg in &o.data {
                let Ok(slices) = o.mem.get_slices(seg.addr, seg.len as usize, access) else {
                    return false;
                };
                let mut total = 0usize;
                for slice in slices {
                    let Ok(slice) = slice else { return false };
                    let ptr = slice.ptr_guard_mut().as_ptr();
                    if direct
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
            true
        };
        let owner = Owner {
            head,
            mem: mem.clone(),
            status: req.status,
            data: std::mem::take(&mut req.data),
        };
        let op = if write { Op::Write } else { Op::Read };
        let fd = self.file.as_raw_fd();
        // SAFETY: `self.file` outlives the ring; the iovecs point into
        // guest memory mappings owned by `owner.mem`, which stays alive
        // until the request is reaped.
        let r = unsafe {
            self.uring.submit_rw(
                fd,
                op,
                req.sector << SECTOR_SHIFT,
                req.data_len,
                owner,
                fill,
            )
        };
        r.map_err(|owner| {
            req.data = owner.data;
            req
        })
    }

    /// Queue a FLUSH: an fdatasync ordered after every SQE submitted before it.
    pub fn submit_flush(&mut self, mem: &MemSnapshot, head: u16, req: &Request) -> bool {
        let owner = Owner {
            head,
            mem: mem.clone(),
            status: req.status,
            data: Vec::new(),
        };
        // SAFETY: `self.file` outlives the ring.
        unsafe { self.uring.submit_flush(self.file.as_raw_fd(), owner) }.is_ok()
    }

    /// Hand queued SQEs to the kernel.
    pub fn submit(&mut self) {
        self.uring.submit();
    }

    /// Collect the completions available now into `out`.
    pub fn reap(&mut self, out: &mut Vec<Finished>) {
        let mut done = std::mem::take(&mut self.done);
        self.uring.reap(&mut done);
        self.finish(&mut done, out);
        self.done = done;
    }

    /// Wait until nothing is in flight, collecting completions into `out`.
    pub fn wait_all(&mut self, out: &mut Vec<Finished>) {
        let mut done = std::mem::take(&mut self.done);
        self.uring.wait_all(&mut done);
        self.finish(&mut done, out);
        self.done = done;
    }

    fn finish(&self, done: &mut Vec<Done<Owner>>, out: &mut Vec<Finished>) {
        for d in done.drain(..) {
            let (status, written) = match d.result {
                Err(e) => {
                    warn!("{:?} request failed at offset {:#x}: {e}", d.op, d.offset);
                    Metrics::add(&self.metrics.io_errors, 1);
                    (VIRTIO_BLK_S_IOERR as u8, 0)
                }
                Ok(n) => {
                    match d.op {
                        Op::Read => {
                            // The kernel stored into guest memory behind
                            // vm-memory's back: log the pages for migration.
                            for seg in &d.owner.data {
                                if let Ok(slices) = d.owner.mem.get_slices(
                                    seg.addr,
                                    seg.len as usize,
                                    Permissions::Write,
                                ) {
                                    for s in slices.flatten() {
                                        s.bitmap().mark_dirty(0, s.len());
                                    }
                                }
                            }
                            Metrics::add(&self.metrics.bytes_read, n);
                        }
                        Op::Write => Metrics::add(&self.metrics.bytes_written, n),
                        Op::Flush => {}
                    }
                    let written = if d.op == Op::Read { n as u32 } else { 0 };
                    (VIRTIO_BLK_S_OK as u8, written)
                }
            };
            out.push(Finished {
                head: d.owner.head,
                mem: d.owner.mem,
                status: d.owner.status,
                completion: Completion { status, written },
            });
        }
    }
}
