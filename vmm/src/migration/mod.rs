//! Live migration: the source streams a running VM's memory in pre-copy
//! rounds driven by the dirty logs, then pauses it for a short final copy
//! of the last dirty pages and the vCPU and device state; the destination
//! builds the same VM, takes the pages and resumes it. Also the dirty-rate
//! measurement operators use to decide whether a link is fast enough.
//! See `docs/migration.md`.

pub mod dirty_rate;
mod pages;
pub mod protocol;
mod receive;
mod send;
mod stream;
pub mod tracking;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use receive::{receive, Listener, PreparedRam};
pub use send::{send, Outcome, SendParams};
pub use stream::{MigrationUrl, Stream};

/// Where a migration stands, as `GET /migration` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    /// `source` or `destination` (empty: no migration yet).
    pub role: &'static str,
    /// `none`, `setup`, `active`, `completing`, `completed`, `failed` or
    /// `cancelled`.
    pub status: &'static str,
    /// The pre-copy round (0 = all of memory).
    pub round: u32,
    /// Memory bytes sent (source) or received (destination).
    pub bytes_sent: u64,
    /// Dirty bytes still to send, as of the last round.
    pub bytes_remaining: u64,
    /// The guest's dirty rate in the last round, MB/s.
    pub dirty_rate_mbps: f64,
    /// Measured throughput of the last round, MB/s.
    pub bandwidth_mbps: f64,
    /// How much of each period the vCPUs are held back (auto-converge).
    pub throttle_percent: u8,
    /// Total time, once finished (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<f64>,
    /// The VM's pause, from the source pausing it to the destination
    /// running it (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Default for MigrationStatus {
    /// No migration yet.
    fn default() -> Self {
        Self {
            role: "",
            status: "none",
            round: 0,
            bytes_sent: 0,
            bytes_remaining: 0,
            dirty_rate_mbps: 0.0,
            bandwidth_mbps: 0.0,
            throttle_percent: 0,
            total_time_ms: None,
            downtime_ms: None,
            error: None,
        }
    }
}

/// Shared between a migration thread and the VMM thread.
#[derive(Default)]
pub struct MigrationShared {
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    /// The connection, so a cancel can break a blocked read or write.
    stream: Mutex<Option<Stream>>,
}

impl MigrationShared {
    /// A copy of the status.
    pub fn status(&self) -> MigrationStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Asks the migration to stop; it fails at its next step (a blocked
    /// transfer is broken off) and the source VM goes on.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(s) = self
            .stream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.shutdown();
        }
    }

    /// Whether a cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn set_stream(&self, s: Option<Stream>) {
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// CPU time this thread has used, for the debug log (where a migration's
/// time goes on a busy host).
pub(crate) fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A migration's shared state.
pub type SharedMigration = Arc<MigrationShared>;

/// Errors migrating.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream failed.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The URL is not usable.
    #[error("migration URL {url}: {why}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The peer refused or failed.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// This side cannot take the VM.
    #[error("incompatible: {0}")]
    Incompatible(String),
    /// Cancelled.
    #[error("migration cancelled")]
    Cancelled,
    /// Did not converge within max_iterations and `on_max_iterations` says fail.
    #[error("did not converge in {0} rounds (dirty rate above the bandwidth); raise max_iterations or downtime_limit_ms, or allow stop-and-copy")]
    NoConvergence(u32),
    /// Dirty tracking.
    #[error(transparent)]
    Tracking(#[from] tracking::TrackingError),
    /// Saving or restoring state.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Pausing.
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    /// OS error.
    #[error("{what}: {err}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}
