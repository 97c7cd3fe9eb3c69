//! Request counters shared by all queue workers, logged at exit and on SIGUSR1.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::RequestType;

/// Lock-free counters; every field only ever increases.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Completed `VIRTIO_BLK_T_IN` requests (any status).
    pub reads: AtomicU64,
    /// Completed `VIRTIO_BLK_T_OUT` requests.
    pub writes: AtomicU64,
    /// Completed `VIRTIO_BLK_T_FLUSH` requests.
    pub flushes: AtomicU64,
    /// Completed `VIRTIO_BLK_T_GET_ID` requests.
    pub get_ids: AtomicU64,
    /// Completed `VIRTIO_BLK_T_DISCARD` requests.
    pub discards: AtomicU64,
    /// Completed `VIRTIO_BLK_T_WRITE_ZEROES` requests.
    pub write_zeroes: AtomicU64,
    /// Requests of a type the device does not implement (answered UNSUPP).
    pub unsupported: AtomicU64,
    /// Bytes copied from the image into guest memory.
    pub bytes_read: AtomicU64,
    /// Bytes copied from guest memory into the image.
    pub bytes_written: AtomicU64,
    /// Requests rejected by the parser and answered with IOERR/UNSUPP.
    pub invalid_requests: AtomicU64,
    /// Chains that could not even be answered (no usable status byte): used with length 0.
    pub skipped_chains: AtomicU64,
    /// Requests whose image operation failed (answered IOERR).
    pub io_errors: AtomicU64,
    /// Mutating requests refused because the disk is read-only (answered IOERR).
    pub read_only_rejections: AtomicU64,
    /// Failures to access the virtqueue itself (bad ring indices, used ring writes).
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

    /// Count one request of type `kind`.
    pub fn count_request(&self, kind: RequestType) {
        let c = match kind {
            RequestType::In => &self.reads,
            RequestType::Out => &self.writes,
            RequestType::Flush => &self.flushes,
            RequestType::GetId => &self.get_ids,
            RequestType::Discard => &self.discards,
            RequestType::WriteZeroes => &self.write_zeroes,
            RequestType::Unsupported(_) => &self.unsupported,
        };
        Self::add(c, 1);
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "requests: in={} out={} flush={} get_id={} discard={} write_zeroes={} unsupported={}; \
             bytes: read={} written={}; errors: invalid={} skipped={} io={} read_only={} queue={}; \
             notifications={}",
            g(&self.reads),
            g(&self.writes),
            g(&self.flushes),
            g(&self.get_ids),
            g(&self.discards),
            g(&self.write_zeroes),
            g(&self.unsupported),
            g(&self.bytes_read),
            g(&self.bytes_written),
            g(&self.invalid_requests),
            g(&self.skipped_chains),
            g(&self.io_errors),
            g(&self.read_only_rejections),
            g(&self.queue_errors),
            g(&self.notifications),
        )
    }
}

static GLOBAL: std::sync::OnceLock<std::sync::Arc<Metrics>> = std::sync::OnceLock::new();

/// Register the process-wide metrics (for the signal handler thread).
pub fn set_global(m: std::sync::Arc<Metrics>) {
    let _ = GLOBAL.set(m);
}

/// The process-wide metrics, once registered.
pub fn global() -> Option<&'static Metrics> {
    GLOBAL.get().map(|m| &**m)
}
