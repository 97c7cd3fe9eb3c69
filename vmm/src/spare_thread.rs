//! Threads started before their work is known. Starting a thread costs a
//! stack mapping, a clone and, above all, loading its seccomp filter (the
//! kernel checks and compiles the program for each thread: 0.2-0.4 ms
//! here). A restore starts about eight threads (vCPUs, memory fill,
//! backend logs, interrupt relay, stdin...), and on a two-core host that
//! work delayed the vCPUs' first run by a millisecond or more.
//!
//! So a tern that waits for its VM (an API socket, an incoming migration)
//! keeps a small stock of confined threads, made while it is idle
//! ([`stock`]); [`spawn`] hands work to one of them, or starts a thread
//! when the stock is out. A vCPU's thread is started with the vCPU
//! ([`SpareThread::get`]) and given its loop when the VM starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// Confined threads waiting for work, with their seccomp thread kind.
static STOCK: Mutex<Vec<(&'static str, SpareThread)>> = Mutex::new(Vec::new());

/// A started, confined thread waiting for its one job.
pub struct SpareThread {
    job: SyncSender<Job>,
    handle: JoinHandle<()>,
    /// The name to take when given work (a stocked thread has a
    /// placeholder until then).
    rename: Option<String>,
}

impl SpareThread {
    /// Starts thread `name` under seccomp thread kind `kind`; it waits for
    /// [`Self::run`], or ends when dropped first.
    fn start(name: String, kind: &'static str) -> std::io::Result<Self> {
        let (job, jobs) = sync_channel::<Job>(1);
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            tern_seccomp::enter_or_exit(kind);
            if let Ok(job) = jobs.recv() {
                job();
            }
        })?;
        Ok(Self {
            job,
            handle,
            rename: None,
        })
    }

    /// A thread of `kind` to be called `name`: one from the stock, else a
    /// new one.
    pub fn get(name: String, kind: &'static str) -> std::io::Result<Self> {
        let mut stock = STOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = stock.iter().position(|(k, _)| *k == kind) {
            let (_, mut t) = stock.swap_remove(i);
            t.rename = Some(name);
            return Ok(t);
        }
        drop(stock);
        Self::start(name, kind)
    }

    /// Runs `f` on the thread; its handle ends when `f` returns.
    pub fn run(self, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
        let rename = self.rename;
        // The thread only ends early if confining it failed, and then the
        // process exits: nothing to report here.
        let _ = self.job.send(Box::new(move || {
            if let Some(name) = rename {
                set_name(&name);
            }
            f()
        }));
        self.handle
    }
}

/// Names the calling thread (as seen in /proc and by debuggers).
fn set_name(name: &str) {
    // The kernel keeps 15 bytes and a NUL.
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes from `buf`, which outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Set once a VM's build begins: stocking stops, so that it does not take
/// CPU from the build it was meant to speed up.
static BUILDING: AtomicBool = AtomicBool::new(false);

/// Stops [`stock`]: a VM's build has begun.
pub fn stop_stocking() {
    BUILDING.store(true, Ordering::Relaxed);
}

/// Whether [`stop_stocking`] was called.
pub fn stocking_stopped() -> bool {
    BUILDING.load(Ordering::Relaxed)
}

/// Adds up to `n` threads of seccomp kind `kind` to the stock, until a
/// build begins.
pub fn stock(kind: &'static str, n: usize) {
    for _ in 0..n {
        if stocking_stopped() {
            return;
        }
        match SpareThread::start(format!("spare-{kind}"), kind) {
            Ok(t) => STOCK
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((kind, t)),
            Err(e) => {
                log::debug!("cannot start a spare thread: {e}");
                return;
            }
        }
    }
}

/// Runs `f` on a thread named `name` confined as `kind`: a stocked one if
/// there is one.
pub fn spawn(
    name: &str,
    kind: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    Ok(SpareThread::get(name.to_owned(), kind)?.run(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm() -> String {
        std::fs::read_to_string("/proc/thread-self/comm")
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn a_new_thread_runs_its_job_under_its_name() {
        let (tx, rx) = std::sync::mpsc::channel();
        SpareThread::get("spare-test".into(), "test-new")
            .unwrap()
            .run(move || tx.send(comm()).unwrap())
            .join()
            .unwrap();
        assert_eq!(rx.recv().unwrap(), "spare-test");
    }

    #[test]
    fn a_stocked_thread_takes_the_name_of_its_work() {
        stock("test-stock", 1);
        let t = SpareThread::get("named-later".into(), "test-stock").unwrap();
        assert!(t.rename.is_some(), "the stocked thread was not used");
        let (tx, rx) = std::sync::mpsc::channel();
        t.run(move || tx.send(comm()).unwrap()).join().unwrap();
        assert_eq!(rx.recv().unwrap(), "named-later");
    }

    #[test]
    fn ends_when_dropped_without_work() {
        let t = SpareThread::get("spare-idle".into(), "test-idle").unwrap();
        let handle = t.handle;
        drop(t.job);
        handle.join().unwrap();
    }
}
