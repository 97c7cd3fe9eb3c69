//! Counters shared by all queue workers, logged at exit and on SIGUSR1.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Lock-free counters; every field only ever increases.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Command requests answered (any response).
    pub commands: AtomicU64,
    /// READ(6/10/12/16) commands.
    pub reads: AtomicU64,
    /// WRITE(6/10/12/16) commands.
    pub writes: AtomicU64,
    /// Commands completed with CHECK CONDITION.
    pub check_conditions: AtomicU64,
    /// Commands answered VIRTIO_SCSI_S_BAD_TARGET (no such target or LUN).
    pub bad_target: AtomicU64,
    /// Commands answered VIRTIO_SCSI_S_OVERRUN (buffers too small).
    pub overruns: AtomicU64,
    /// Bytes copied from images into guest memory.
    pub bytes_read: AtomicU64,
    /// Bytes written to images.
    pub bytes_written: AtomicU64,
    /// Blocks deallocated by UNMAP or WRITE SAME with UNMAP.
    pub unmapped_blocks: AtomicU64,
    /// Writes refused with DATA PROTECT.
    pub read_only_rejections: AtomicU64,
    /// Image or guest-memory failures during a command.
    pub io_errors: AtomicU64,
    /// Malformed requests answered VIRTIO_SCSI_S_FAILURE.
    pub invalid_requests: AtomicU64,
    /// Chains that could not even be answered: returned with used length 0.
    pub skipped_chains: AtomicU64,
    /// Task management functions answered.
    pub tmfs: AtomicU64,
    /// Asynchronous notification queries and subscriptions answered.
    pub an_requests: AtomicU64,
    /// Events delivered on the event queue.
    pub events: AtomicU64,
    /// Events dropped for lack of an event buffer (reported as EVENTS_MISSED).
    pub events_missed: AtomicU64,
    /// Failures to access a virtqueue itself (ring indices, used ring writes).
    pub queue_errors: AtomicU64,
    /// Interrupts (call eventfd writes) sent to the frontend.
    pub notifications: AtomicU64,
}

impl Metrics {
    /// A fresh set of zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "commands={} (read={} write={}) check_condition={} bad_target={} overrun={}; \
             bytes: read={} written={} unmapped_blocks={}; tmf={} an={} events={} missed={}; \
             errors: read_only={} io={} invalid={} skipped={} queue={}; notifications={}",
            g(&self.commands),
            g(&self.reads),
            g(&self.writes),
            g(&self.check_conditions),
            g(&self.bad_target),
            g(&self.overruns),
            g(&self.bytes_read),
            g(&self.bytes_written),
            g(&self.unmapped_blocks),
            g(&self.tmfs),
            g(&self.an_requests),
            g(&self.events),
            g(&self.events_missed),
            g(&self.read_only_rejections),
            g(&self.io_errors),
            g(&self.invalid_requests),
            g(&self.skipped_chains),
            g(&self.queue_errors),
            g(&self.notifications),
        )
    }
}

static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// Register the process-wide metrics (for the signal handler thread).
pub fn set_global(m: Arc<Metrics>) {
    let _ = GLOBAL.set(m);
}

/// The process-wide metrics, once registered.
pub fn global() -> Option<&'static Metrics> {
    GLOBAL.get().map(|m| &**m)
}
