//! Lazy restore of shared guest memory.
//!
//! A VM with vhost-user devices needs its RAM in a memfd the backends can
//! map, so the snapshot's memory file cannot simply be mapped private (as
//! a VM without devices has it). Copying the whole file in before the
//! vCPUs run made restore time grow with the snapshot's size (1.7 s for
//! 1 GiB). Instead the memfd starts empty, registered with a userfaultfd:
//!
//! - a fault thread answers each missing-page fault of the vCPUs (through
//!   KVM) and of tern itself by copying that page, and the next few, in
//!   from the memory file;
//! - a fill thread copies every data extent of the file in, in the
//!   background, skipping pages a fault already brought;
//! - the backends map the memfd but their rings stay stopped until the
//!   fill is complete ([`FillGate`]): their accesses would not fault
//!   through tern's userfaultfd, so they must not touch memory before it
//!   holds the snapshot's data. Kicks the guest makes meanwhile wait in
//!   the ioeventfds and are served when the rings start.
//!
//! Holes in the memory file (pages that were zero) are never copied: an
//! untouched page of the memfd reads as zeros, which is what they held.
//! Once the fill is done the range is unregistered and the threads end.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use super::uffd::{Copied, Uffd};
use crate::exit::{ExitReason, ExitSender};
use crate::memory::{data_extents, GuestRam};

const PAGE: u64 = 4096;
/// Bytes brought in per fault: the faulting page and those after it, as
/// a guest touching memory tends to go on in order.
const FAULT_CHUNK: u64 = 64 << 10;
/// Bytes per background copy, between checks for a stop.
const FILL_CHUNK: u64 = 2 << 20;
/// The background copy waits until the vCPUs have gone this long without
/// a fault: their first run after the restore touches a few scattered
/// pages, and each such fault waits for a CPU that a copy in progress, or
/// the scan of a large file for its data, would take (this host's kernel
/// does not preempt system calls).
const FILL_QUIET: Duration = Duration::from_millis(2);
/// ... but no longer than this after the vCPUs start.
const FILL_DEFER_MAX: Duration = Duration::from_millis(20);

/// Work to run once guest memory holds all of the snapshot's data.
type Waiter = Box<dyn FnOnce() + Send>;

/// Holds work (starting the backends' rings) until the fill is complete.
#[derive(Default)]
pub struct FillGate {
    state: Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    done: bool,
    failed: bool,
    waiting: Vec<Waiter>,
}

impl FillGate {
    /// Runs `f` once the fill is complete: now if it already is, else on
    /// the fill thread when it completes.
    pub fn after_fill(&self, f: Waiter) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.done {
            drop(s);
            f();
        } else {
            s.waiting.push(f);
        }
    }

    /// Blocks until the fill is complete (true) or has failed (false).
    pub fn wait(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !s.done && !s.failed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.done
    }

    fn complete(&self) {
        let waiting = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.done = true;
            std::mem::take(&mut s.waiting)
        };
        for f in waiting {
            f();
        }
        self.changed.notify_all();
    }

    fn fail(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).failed = true;
        self.changed.notify_all();
    }
}

/// The memory file, mapped read-only: the source of every copy.
struct Source {
    addr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until `Source` is dropped,
// after every thread using it has been joined.
unsafe impl Send for Source {}
// SAFETY: as above; shared reads of read-only memory.
unsafe impl Sync for Source {}

impl Source {
    fn map(file: &File, len: u64) -> io::Result<Self> {
        // SAFETY: a fresh read-only mapping of `len` bytes of an open file;
        // nothing else is at the address the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as *const u8,
            len: len as usize,
        })
    }

    fn at(&self, offset: u64) -> u64 {
        self.addr as u64 + offset
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once no thread
        // copies from it.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A region of guest RAM: where it is mapped here and where its bytes are
/// in the memory file.
#[derive(Clone, Copy)]
struct Span {
    gpa: u64,
    host: u64,
    len: u64,
    file_offset: u64,
}

struct Shared {
    uffd: Uffd,
    source: Source,
    spans: Vec<Span>,
    stop: AtomicBool,
    stop_evt: EventFd,
    /// When the fault thread last served a fault, in microseconds since
    /// `epoch`.
    last_fault_us: AtomicU64,
    epoch: Instant,
    /// Set when the background copy may begin.
    go: (Mutex<bool>, std::sync::Condvar),
    gate: Arc<FillGate>,
    exit: ExitSender,
}

impl Shared {
    /// Copies `[off, off + len)` of the file into place, skipping pages
    /// already present.
    fn copy_range(&self, span: &Span, off: u64, len: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let dst = span.host + off + done;
            let src = self.source.at(span.file_offset + off + done);
            // SAFETY: the source range lies inside the file mapping (the
            // spans cover the file, whose size was checked on load).
            match unsafe { self.uffd.copy(dst, src, len - done) } {
                Ok(Copied::Bytes(n)) => done += n,
                Ok(Copied::FirstPresent) => done += PAGE,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Brings in the guest-physical ranges `hot` (start, length) ahead
    /// of the vCPUs' first run.
    fn prefetch(&self, hot: &[(u64, u64)]) {
        for &(gpa, len) in hot {
            let Some(span) = self
                .spans
                .iter()
                .find(|s| (s.gpa..s.gpa + s.len).contains(&gpa))
            else {
                continue;
            };
            let off = gpa - span.gpa;
            if let Err(e) = self.copy_range(span, off, len.min(span.len - off)) {
                return self.fail("bringing in the vCPUs' first pages", e);
            }
        }
    }

    /// Brings in the page at `addr` (and up to [`FAULT_CHUNK`] after it).
    fn resolve(&self, addr: u64) -> io::Result<()> {
        let page = addr & !(PAGE - 1);
        let Some(span) = self
            .spans
            .iter()
            .find(|s| (s.host..s.host + s.len).contains(&page))
        else {
            return Err(io::Error::other(format!(
                "fault at {addr:#x} outside guest memory"
            )));
        };
        let off = page - span.host;
        let len = FAULT_CHUNK.min(span.len - off);
        loop {
            let src = self.source.at(span.file_offset + off);
            // SAFETY: inside the file mapping, as in `copy_range`.
            match unsafe { self.uffd.copy(page, src, len) } {
                Ok(Copied::Bytes(_)) => return Ok(()),
                // The fill thread got there first: just wake the waiter.
                Ok(Copied::FirstPresent) => return self.uffd.wake(page, PAGE),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
        }
    }

    fn fail(&self, what: &str, e: io::Error) {
        log::error!("lazy restore: {what}: {e}");
        self.gate.fail();
        self.exit
            .send(ExitReason::MemoryFill(format!("{what}: {e}")));
    }

    fn serve_faults(&self) {
        let mut faults = Vec::new();
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        while !self.stop.load(Ordering::Acquire) {
            // SAFETY: polls two valid descriptors described by `fds`.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                continue;
            }
            faults.clear();
            self.last_fault_us
                .store(self.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
            if let Err(e) = self.uffd.read_faults(&mut faults) {
                return self.fail("reading page faults", e);
            }
            for &addr in &faults {
                if let Err(e) = self.resolve(addr) {
                    return self.fail("bringing in a faulting page", e);
                }
            }
        }
    }

    /// Waits until the copy may begin; false when stopped first.
    fn wait_for_go(&self) -> bool {
        let (lock, cv) = &self.go;
        let mut go = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*go && !self.stop.load(Ordering::Acquire) {
            go = cv.wait(go).unwrap_or_else(|e| e.into_inner());
        }
        if !*go || self.stop.load(Ordering::Acquire) {
            return false;
        }
        drop(go);
        // Let the vCPUs' first burst of faults pass (see FILL_QUIET): wait
        // for a fault, then for a quiet spell.
        let go_at = self.epoch.elapsed();
        while self.epoch.elapsed() - go_at < FILL_DEFER_MAX {
            let last = Duration::from_micros(self.last_fault_us.load(Ordering::Relaxed));
            if last > go_at && self.epoch.elapsed().saturating_sub(last) >= FILL_QUIET {
                break;
            }
            if self.stop.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        !self.stop.load(Ordering::Acquire)
    }

    fn set_go(&self) {
        let (lock, cv) = &self.go;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn fill(&self, file: &File) {
        let started = Instant::now();
        let mut bytes = 0u64;
        for span in &self.spans {
            let (start, end) = (span.file_offset, span.file_offset + span.len);
            for (at, len) in data_extents(file, start, end) {
                let mut off = at - start;
                let end = off + len;
                while off < end {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let n = FILL_CHUNK.min(end - off);
                    if let Err(e) = self.copy_range(span, off, n) {
                        return self.fail("copying the memory file in", e);
                    }
                    off += n;
                    bytes += n;
                }
            }
        }
        // Every byte of data is in: faults from now on are on holes, which
        // the memfd answers with zeros by itself.
        for span in &self.spans {
            if let Err(e) = self.uffd.unregister(span.host, span.len) {
                return self.fail("unregistering guest memory", e);
            }
        }
        log::info!(
            "lazy restore: {} MiB of guest memory filled in {:.1} ms; backends started",
            bytes >> 20,
            started.elapsed().as_secs_f64() * 1e3
        );
        self.gate.complete();
    }
}

/// The fault and fill threads of one lazily restored guest memory. Dropped
/// (threads stopped and joined) before the memory is unmapped.
pub struct LazyFill {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl LazyFill {
    /// Registers `ram` (an empty memfd of the snapshot's size) and starts
    /// bringing in `file`'s data: first the chunks holding the
    /// guest-physical ranges `hot` (see `hot_pages.rs`), the rest once
    /// [`Self::begin`] is called. Fails, with nothing started, where
    /// userfaultfd is not available; the caller then copies eagerly.
    pub fn start(
        ram: &GuestRam,
        file: File,
        hot: Vec<(u64, u64)>,
        exit: ExitSender,
    ) -> io::Result<Self> {
        let uffd = Uffd::new()?;
        let mut spans = Vec::new();
        let mut file_offset = 0;
        for r in ram.memory.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| io::Error::other(e.to_string()))? as u64;
            uffd.register(host, r.len())?;
            spans.push(Span {
                gpa: r.start_addr().0,
                host,
                len: r.len(),
                file_offset,
            });
            file_offset += r.len();
        }
        let source = Source::map(&file, ram.size)?;
        let shared = Arc::new(Shared {
            uffd,
            source,
            spans,
            stop: AtomicBool::new(false),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            last_fault_us: AtomicU64::new(0),
            epoch: Instant::now(),
            go: (Mutex::new(false), std::sync::Condvar::new()),
            gate: Arc::new(FillGate::default()),
            exit,
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(crate::spare_thread::spawn("mem-fault", "vmm", move || {
            s.serve_faults()
        })?);
        let s = shared.clone();
        let filler = crate::spare_thread::spawn("mem-fill", "vmm", move || {
            s.prefetch(&hot);
            if s.wait_for_go() {
                s.fill(&file);
            }
            // Done (or stopped): the fault thread is no longer needed.
            s.stop.store(true, Ordering::Release);
            let _ = s.stop_evt.write(1);
        });
        match filler {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.stop.store(true, Ordering::Release);
                let _ = shared.stop_evt.write(1);
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
        Ok(Self { shared, threads })
    }

    /// Lets the background copy begin. A restore calls it once the vCPUs
    /// run, so the copy does not compete with building the VM.
    pub fn begin(&self) {
        self.shared.set_go();
    }

    /// The gate the backends' rings wait behind.
    pub fn gate(&self) -> Arc<FillGate> {
        self.shared.gate.clone()
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        // Nobody waits on a fill that will not complete.
        self.shared.gate.fail();
        {
            // Under the lock, so a fill thread about to wait sees the stop.
            let _go = self.shared.go.0.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.go.1.notify_all();
        let _ = self.shared.stop_evt.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
