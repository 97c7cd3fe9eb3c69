//! Asynchronous file I/O with Linux io_uring, shared by the disk
//! backends (`tern-blk`, `tern-scsi`): one [`UringQueue`] per queue worker,
//! many requests of that queue in flight at the disk at once.
//!
//! The queue knows nothing of virtio: each request carries an opaque owner
//! `T` (the backend's record of the request: descriptor head, guest memory
//! snapshot, where the status goes) that comes back with its result from
//! [`UringQueue::reap`]. READ/WRITE requests become one READV/WRITEV SQE
//! whose iovecs the caller fills (pointing straight into guest memory; the
//! owner keeps that memory alive). FLUSH is an fdatasync SQE with
//! `IOSQE_IO_DRAIN`, so it starts only after every SQE submitted before it
//! completed. Short transfers are resubmitted for the rest; a read hitting
//! the end of the file (the file shrank) reads zeros, as the synchronous
//! path does; EAGAIN/EINTR are retried.
//!
//! Cost per request is kept low for the 4 KiB QD32 case: no allocation per
//! request once the slots' iovec vectors have grown (they keep their
//! capacity), each SQE goes to the kernel as soon as it is pushed (a
//! batch submitted with one `io_uring_enter` is held back by the block
//! layer's plug until all of it is prepared: slower at QD32), and
//! completions are reaped in batches. The worker
//! sleeps in its epoll loop on [`UringQueue::event_fd`], which is the ring's
//! own descriptor (readable while completions wait in the CQ ring: no
//! eventfd to signal and drain), unless `TERN_AIO_EVENTFD=1` asks for a
//! registered eventfd. The ring is set up with `IORING_SETUP_COOP_TASKRUN`
//! (no inter-processor interrupt to post a completion) where the kernel has
//! it. `SINGLE_ISSUER`/`DEFER_TASKRUN` are not used: `stop_vring` drains the
//! ring from the vhost-user thread, not the queue's worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

/// Most iovecs in one READV/WRITEV (the kernel's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// What a request does at the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read into the iovecs.
    Read,
    /// Write the iovecs.
    Write,
    /// fdatasync, after everything submitted before it.
    Flush,
}

/// A finished request.
pub struct Done<T> {
    /// The owner given at submission.
    pub owner: T,
    /// What the request was.
    pub op: Op,
    /// Bytes transferred (all of them), or the error that ended it.
    pub result: io::Result<u64>,
    /// File offset the request started at.
    pub offset: u64,
}

struct Slot<T> {
    owner: Option<T>,
    op: Op,
    fd: RawFd,
    /// Host buffers; `iovecs[first..]` is what remains to transfer (the
    /// first of them possibly advanced past a short transfer). Keeps its
    /// capacity from request to request.
    iovecs: Vec<libc::iovec>,
    first: usize,
    /// File offset of the request and of the next byte to transfer.
    start: u64,
    offset: u64,
    done: u64,
    total: u64,
}

/// The io_uring of one queue worker.
pub struct UringQueue<T> {
    ring: IoUring,
    /// The registered completion eventfd, if one is used instead of the ring fd.
    event: Option<OwnedFd>,
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    in_flight: usize,
    /// SQEs pushed but not yet accepted by the kernel.
    unsubmitted: bool,
    /// Reused buffer for reaped CQEs.
    cqes: Vec<(u64, i32)>,
    /// Most requests in flight since the queue last ran empty.
    peak: usize,
    /// Hand SQEs to the kernel every this many (0: only in `submit`).
    /// Default 1: io_uring plugs the block layer for a submission of more
    /// than two SQEs, so the device would see none of a batch's requests
    /// until the kernel has prepared all of them (measured: 4 KiB QD32
    /// random reads 1.22x faster submitting each SQE at once than the
    /// whole batch with one `io_uring_enter`). `TERN_AIO_SUBMIT_EVERY`
    /// overrides (0: one submission per batch).
    submit_every: usize,
    /// SQEs pushed since the last submission.
    queued: usize,
}

// SAFETY: the raw pointers in the slots' iovecs point into memory the
// owners keep alive (the caller's contract in `submit_rw`); they travel with
// the owners, and nothing else in this process aliases them.
unsafe impl<T: Send> Send for UringQueue<T> {}

impl<T> UringQueue<T> {
    /// A ring of `entries` SQEs (and as many request slots).
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().build(entries))?;
        let event = if std::env::var_os("TERN_AIO_EVENTFD").is_some_and(|v| v == "1") {
            // SAFETY: eventfd has no memory arguments; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            let event = unsafe { OwnedFd::from_raw_fd(fd) };
            ring.submitter().register_eventfd(event.as_raw_fd())?;
            Some(event)
        } else {
            None
        };
        let n = ring.params().sq_entries() as usize;
        Ok(UringQueue {
            ring,
            event,
            slots: (0..n)
                .map(|_| Slot {
                    owner: None,
                    op: Op::Read,
                    fd: -1,
                    iovecs: Vec::new(),
                    first: 0,
                    start: 0,
                    offset: 0,
                    done: 0,
                    total: 0,
                })
                .collect(),
            free: (0..n).rev().collect(),
            in_flight: 0,
            unsubmitted: false,
            cqes: Vec::with_capacity(n),
            peak: 0,
            submit_every: std::env::var("TERN_AIO_SUBMIT_EVERY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            queued: 0,
        })
    }

    /// The descriptor to watch (EPOLLIN) for completions.
    pub fn event_fd(&self) -> RawFd {
        match &self.event {
            Some(e) => e.as_raw_fd(),
            None => self.ring.as_raw_fd(),
        }
    }

    /// How many more requests can be submitted now.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the queue is busy enough that the caller may leave the
    /// driver's kicks off and look for new requests at the next completion
    /// instead: at least half as many requests in flight as at the peak
    /// since it last ran empty. With fewer (say the one straggler of a
    /// batch), new requests should not wait for them: take kicks.
    pub fn busy(&mut self) -> bool {
        if self.in_flight == 0 {
            self.peak = 0;
            return false;
        }
        self.peak = self.peak.max(self.in_flight);
        self.in_flight * 2 >= self.peak
    }

    /// Reset the completion eventfd, if one is used (completions are then
    /// read from the ring). The ring fd needs nothing: it stays readable
    /// exactly while the CQ ring has entries.
    pub fn consume_event(&self) {
        if let Some(e) = &self.event {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v`; the fd is a non-blocking eventfd.
            unsafe { libc::read(e.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Queue a READ or WRITE of `total` bytes at `offset` of file `fd`: `fill`
    /// (given the owner) appends the host buffers to the (empty) iovec list and returns
    /// false to refuse the request. Returns the owner back (and queues
    /// nothing) if there is no free slot, `fill` refused, the iovecs are
    /// none or more than [`MAX_IOVECS`], or they do not add up to `total`.
    ///
    /// # Safety
    ///
    /// `fd` must stay open, and the buffers the iovecs describe valid (mapped, and not
    /// otherwise accessed by this process in a way that conflicts with the
    /// kernel's reads or writes) until this request comes back from
    /// [`reap`](Self::reap) or [`wait_all`](Self::wait_all) — typically
    /// because `owner` keeps the memory they point into alive.
    pub unsafe fn submit_rw<F>(
        &mut self,
        fd: RawFd,
        op: Op,
        offset: u64,
        total: u64,
        owner: T,
        fill: F,
    ) -> Result<(), T>
    where
        F: FnOnce(&T, &mut Vec<libc::iovec>) -> bool,
    {
        debug_assert!(op != Op::Flush);
        let Some(&slot) = self.free.last() else {
            return Err(owner);
        };
        let s = &mut self.slots[slot];
        s.iovecs.clear();
        if !fill(&owner, &mut s.iovecs) || s.iovecs.is_empty() || s.iovecs.len() > MAX_IOVECS {
            s.iovecs.clear();
            return Err(owner);
        }
        let sum: u64 = s.iovecs.iter().map(|v| v.iov_len as u64).sum();
        if sum != total {
            s.iovecs.clear();
            return Err(owner);
        }
        self.free.pop();
        s.owner = Some(owner);
        s.op = op;
        s.fd = fd;
        s.first = 0;
        s.start = offset;
        s.offset = offset;
        s.done = 0;
        s.total = total;
        self.in_flight += 1;
        self.push(slot);
        Ok(())
    }

    /// Queue a FLUSH of file `fd` (fdatasync ordered after every SQE
    /// submitted before it). Returns the owner back if there is no free slot.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until the request is reaped.
    pub unsafe fn submit_flush(&mut self, fd: RawFd, owner: T) -> Result<(), T> {
        let Some(slot) = self.free.pop() else {
            return Err(owner);
        };
        let s = &mut self.slots[slot];
        s.iovecs.clear();
        s.owner = Some(owner);
        s.op = Op::Flush;
        s.fd = fd;
        s.first = 0;
        s.start = 0;
        s.offset = 0;
        s.done = 0;
        s.total = 0;
        self.in_flight += 1;
        self.push(slot);
        Ok(())
    }

    /// Push the SQE for the remaining part of the request in `slot`.
    fn push(&mut self, slot: usize) {
        let s = &self.slots[slot];
        let fd = types::Fd(s.fd);
        let sqe = match s.op {
            Op::Read | Op::Write => {
                let iov = &s.iovecs[s.first..];
                let (ptr, len) = (iov.as_ptr(), iov.len() as u32);
                if s.op == Op::Read {
                    opcode::Readv::new(fd, ptr, len).offset(s.offset).build()
                } else {
                    opcode::Writev::new(fd, ptr, len).offset(s.offset).build()
                }
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the SQE's iovec array lives in `self.slots[slot]`
            // (its heap storage does not move until the slot is reused,
            // after its CQE), and the buffers are the caller's contract.
            let pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
            if pushed {
                break;
            }
            // SQ full: hand what is queued to the kernel and retry.
            if self.ring.submit().is_err() {
                let _ = self.ring.submit_and_wait(1);
            }
        }
        self.unsubmitted = true;
        self.queued += 1;
        if self.submit_every > 0 && self.queued >= self.submit_every {
            self.submit();
        }
    }

    /// Hand every queued SQE to the kernel (one `io_uring_enter`).
    pub fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        self.queued = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: completions must be reaped first; they
                // are, by the caller, and the next submit retries.
                Err(_) => return,
            }
        }
        self.unsubmitted = !self.ring.submission().is_empty();
    }

    /// Collect the completions available now into `out` (resubmitting the
    /// rest of short transfers and retried ones, then submitting).
    pub fn reap(&mut self, out: &mut Vec<Done<T>>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(slot, res) in &cqes {
                self.complete(slot as usize, res, out);
            }
        }
        self.cqes = cqes;
        self.submit();
    }

    /// Wait until nothing is in flight, collecting completions into `out`.
    pub fn wait_all(&mut self, out: &mut Vec<Done<T>>) {
        while self.in_flight > 0 {
            self.submit();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
            self.reap(out);
        }
    }

    fn complete(&mut self, slot: usize, res: i32, out: &mut Vec<Done<T>>) {
        let Some(s) = self.slots.get_mut(slot).filter(|s| s.owner.is_some()) else {
            // Not ours (cannot happen: user_data is always a live slot).
            return;
        };
        let result = if res == -libc::EAGAIN || res == -libc::EINTR {
            // Transient: try the same transfer again.
            self.push(slot);
            return;
        } else if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else if s.op == Op::Flush {
            Ok(0)
        } else {
            let mut n = res as u64;
            if n == 0 && s.op == Op::Read {
                // Past the end of a file that shrank: zeros, like the sync path.
                for iov in &s.iovecs[s.first..] {
                    // SAFETY: the iovec is a live buffer of `iov_len` bytes
                    // (the caller's contract in `submit_rw`).
                    unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                }
                n = s.total - s.done;
            }
            if n == 0 {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write made no progress",
                ))
            } else {
                s.done += n;
                s.offset += n;
                if s.done < s.total {
                    advance(&mut s.iovecs, &mut s.first, n as usize);
                    self.push(slot);
                    return;
                }
                Ok(s.total)
            }
        };
        let s = &mut self.slots[slot];
        let owner = s.owner.take().expect("checked above");
        // Drop the pointers now; the capacity stays for the next request.
        s.iovecs.clear();
        self.free.push(slot);
        self.in_flight -= 1;
        out.push(Done {
            owner,
            op: s.op,
            result,
            offset: s.start,
        });
    }
}

/// Adaptive polling for the driver's next request, as QEMU's iothreads
/// do (`poll-max-ns`): before a queue worker turns kicks back on and goes
/// to sleep, it may spin for a while on the avail ring, which saves the
/// driver a kick and the worker a wakeup when the driver answers a batch
/// of completions quickly. The window adapts: a kick that arrives soon
/// after the worker went to sleep (within the maximum) doubles it (from
/// 4 µs); one that takes longer than the maximum halves it, so a driver
/// that is slow (or a host with no CPU to spare) costs no spinning.
#[derive(Debug)]
pub struct AdaptivePoll {
    max_ns: u64,
    ns: u64,
    slept_at: Option<std::time::Instant>,
}

impl AdaptivePoll {
    /// Polling up to `max_ns` (0: never).
    pub fn new(max_ns: u64) -> Self {
        AdaptivePoll {
            max_ns,
            ns: 0,
            slept_at: None,
        }
    }

    /// The maximum from environment variable `var` in µs, else `default_us`.
    pub fn from_env(var: &str, default_us: u64) -> Self {
        let us = std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default_us);
        Self::new(us.saturating_mul(1000))
    }

    /// The current window in ns.
    pub fn window_ns(&self) -> u64 {
        self.ns
    }

    /// Spin up to the current window until `ready()`; returns whether it became ready.
    pub fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        if self.ns == 0 {
            return false;
        }
        let start = std::time::Instant::now();
        loop {
            if ready() {
                return true;
            }
            if start.elapsed().as_nanos() as u64 >= self.ns {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The worker turned kicks on and is going to sleep.
    pub fn sleeping(&mut self) {
        if self.max_ns > 0 {
            self.slept_at = Some(std::time::Instant::now());
        }
    }

    /// A kick woke the worker: adapt the window to how long it slept.
    pub fn kicked(&mut self) {
        let Some(t) = self.slept_at.take() else {
            return;
        };
        let slept = t.elapsed().as_nanos() as u64;
        if slept > self.max_ns {
            self.ns /= 2;
        } else if slept > self.ns {
            self.ns = (self.ns * 2).clamp(4_000, self.max_ns);
        }
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

impl<T> Drop for UringQueue<T> {
    fn drop(&mut self) {
        // The kernel may still access buffers the owners keep alive: wait
        // for it before they (and the ring) go away.
        let mut sink = Vec::new();
        self.wait_all(&mut sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn adaptive_poll_grows_and_shrinks() {
        let spin = |us| {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_micros(us) {}
        };
        let mut p = AdaptivePoll::new(10_000_000);
        assert!(!p.poll(|| true), "no window yet");
        p.sleeping();
        p.kicked();
        assert_eq!(p.window_ns(), 4_000, "a quick kick opens the window");
        p.sleeping();
        spin(10);
        p.kicked();
        assert_eq!(
            p.window_ns(),
            8_000,
            "a kick just after the window widens it"
        );
        p.sleeping();
        p.kicked();
        assert_eq!(p.window_ns(), 8_000, "a kick within the window keeps it");
        assert!(p.poll(|| true));
        p.sleeping();
        std::thread::sleep(std::time::Duration::from_millis(20));
        p.kicked();
        assert_eq!(p.window_ns(), 4_000, "a slow kick halves it");
        let mut off = AdaptivePoll::new(0);
        off.sleeping();
        off.kicked();
        assert_eq!(off.window_ns(), 0);
    }

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

    fn temp_file(tag: &str, data: &[u8]) -> (std::path::PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!("tern-image-aio-{}-{tag}", std::process::id()));
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    #[test]
    fn read_write_flush_and_short_file() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let (path, file) = temp_file("rw", &data);
        let fd = file.as_raw_fd();
        let Ok(mut q) = UringQueue::<u32>::new(8) else {
            // No io_uring here (seccomp, old kernel): nothing to test.
            let _ = std::fs::remove_file(&path);
            return;
        };
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 3096];
        let mut out = Vec::new();
        // SAFETY: `a` and `b` outlive the request (wait_all below).
        unsafe {
            q.submit_rw(fd, Op::Read, 100, 4096, 1, |_, v| {
                v.push(iov(&mut a));
                v.push(iov(&mut b));
                true
            })
        }
        .unwrap();
        q.submit();
        q.wait_all(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].owner, 1);
        assert_eq!(out[0].result.as_ref().unwrap(), &4096);
        assert_eq!(&a[..], &data[100..1100]);
        assert_eq!(&b[..], &data[1100..4196]);
        // Write, flush, then read past the end: zeros.
        let mut w = vec![0xabu8; 512];
        let mut tail = vec![0xffu8; 1024];
        out.clear();
        // SAFETY: as above.
        unsafe {
            q.submit_rw(fd, Op::Write, 0, 512, 2, |_, v| {
                v.push(iov(&mut w));
                true
            })
            .unwrap();
            q.submit_flush(fd, 3).unwrap();
            q.submit_rw(fd, Op::Read, 8192, 1024, 4, |_, v| {
                v.push(iov(&mut tail));
                true
            })
            .unwrap();
        }
        q.submit();
        q.wait_all(&mut out);
        let mut owners: Vec<u32> = out.iter().map(|d| d.owner).collect();
        owners.sort();
        assert_eq!(owners, vec![2, 3, 4]);
        assert!(out.iter().all(|d| d.result.is_ok()));
        assert!(tail.iter().all(|&x| x == 0));
        assert_eq!(&std::fs::read(&path).unwrap()[..512], &w[..]);
        // Refusals give the owner back.
        // SAFETY: nothing is queued.
        unsafe {
            assert_eq!(q.submit_rw(fd, Op::Read, 0, 10, 5, |_, _| false), Err(5));
            assert_eq!(q.submit_rw(fd, Op::Read, 0, 10, 6, |_, _| true), Err(6));
            assert_eq!(
                q.submit_rw(fd, Op::Read, 0, 10, 7, |_, v| {
                    v.push(iov(&mut w));
                    true
                }),
                Err(7),
                "iovecs do not add up to the total"
            );
        }
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.room(), 8);
        assert!(!q.busy());
        drop(q);
        drop(file);
        let _ = std::fs::remove_file(&path);
    }
}
