//! Traffic counters shared by all queue workers, logged at exit and on SIGUSR1.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free counters; every field only ever increases.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames delivered to the guest (tap -> rx queue).
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames sent by the guest and written to the tap.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Frames read from the tap that could not be delivered (no buffer large enough).
    pub rx_drops: AtomicU64,
    /// Guest frames the tap refused.
    pub tx_drops: AtomicU64,
    /// Malformed descriptor chains (returned with used length 0).
    pub malformed_chains: AtomicU64,
    /// Times the rx path stopped reading the tap for lack of guest buffers.
    pub rx_stalls: AtomicU64,
    /// Control-queue commands answered.
    pub ctrl_commands: AtomicU64,
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
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "rx: frames={} bytes={} drops={} stalls={}; tx: frames={} bytes={} drops={}; \
             malformed={} ctrl={} queue_errors={} notifications={}",
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.rx_drops),
            g(&self.rx_stalls),
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.tx_drops),
            g(&self.malformed_chains),
            g(&self.ctrl_commands),
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
