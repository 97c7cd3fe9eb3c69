//! Pausing and resuming vCPUs. The VMM thread asks for a pause, then kicks
//! each vCPU thread out of KVM_RUN with a signal until every vCPU has
//! parked; resuming wakes them. The kick repeats because a signal that lands
//! just before a vCPU enters KVM_RUN would otherwise be lost.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// The signal that kicks a vCPU out of KVM_RUN (its handler does nothing;
/// the interrupted ioctl returns EINTR).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler (once per process; idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), noop_handler)
}

#[derive(Debug, Default)]
struct State {
    pause: bool,
    parked: u32,
}

/// Shared between the VMM thread and the vCPU threads.
#[derive(Debug, Default)]
pub struct VcpuControl {
    state: Mutex<State>,
    changed: Condvar,
}

/// Errors pausing.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Not every vCPU parked in time.
    #[error("only {parked} of {total} vCPUs paused within {timeout:?}")]
    Timeout {
        /// vCPUs parked.
        parked: u32,
        /// vCPUs in all.
        total: u32,
        /// How long we waited.
        timeout: Duration,
    },
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const KICK_INTERVAL: Duration = Duration::from_millis(1);

impl VcpuControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU thread before each KVM_RUN: parks while a pause is
    /// asked for.
    pub fn park_if_paused(&self) {
        let mut s = self.lock();
        if !s.pause {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.pause {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.changed.notify_all();
    }

    /// Pauses every vCPU whose thread is in `threads`; returns when all have
    /// parked.
    pub fn pause<T>(&self, threads: &[JoinHandle<T>]) -> Result<(), PauseError> {
        let total = threads.len() as u32;
        self.lock().pause = true;
        let start = Instant::now();
        loop {
            for t in threads {
                // A thread that already ended cannot be signalled; it will
                // not run the guest either.
                let _ = t.kill(kick_signal());
            }
            let s = self.lock();
            let (s, _) = self
                .changed
                .wait_timeout_while(s, KICK_INTERVAL, |s| s.parked < total)
                .unwrap_or_else(|e| e.into_inner());
            if s.parked >= total {
                return Ok(());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                let parked = s.parked;
                drop(s);
                self.resume();
                return Err(PauseError::Timeout {
                    parked,
                    total,
                    timeout: PAUSE_TIMEOUT,
                });
            }
        }
    }

    /// Asks for a pause without kicking anyone: vCPU threads started after
    /// this park before their first run (a VM restored paused).
    pub fn hold(&self) {
        self.lock().pause = true;
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) {
        self.lock().pause = false;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn parks_and_releases_spinning_threads() {
        install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (c, w) = (control.clone(), work.clone());
                std::thread::spawn(move || loop {
                    c.park_if_paused();
                    w.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(50));
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(10));
        control.pause(&threads).unwrap();
        let at_pause = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            work.load(Ordering::Relaxed),
            at_pause,
            "no work while paused"
        );
        control.resume();
        // A loaded machine may take a while to schedule the threads again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while work.load(Ordering::Relaxed) == at_pause && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(work.load(Ordering::Relaxed) > at_pause, "work resumes");
        // Pausing twice is fine.
        control.pause(&threads).unwrap();
        control.pause(&threads).unwrap();
        control.resume();
    }
}
