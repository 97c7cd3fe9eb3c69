//! Dirty-rate measurement (`PUT /dirty-rate`, `GET /dirty-rate`), as
//! libvirt's `domdirtyrate-calc`: log dirty pages for a period, count them,
//! report MB/s. The VM keeps running; logging is its only cost.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::tracking::count;
use crate::snapshot::memory::PAGE;
use crate::vmm::Vmm;

/// Longest measurement accepted.
pub const MAX_PERIOD_S: u64 = 60;

/// `PUT /dirty-rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyRateRequest {
    /// Seconds to measure over (1 to 60).
    pub calc_period_s: u64,
}

/// `GET /dirty-rate`.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct DirtyRateStatus {
    /// 0: never measured, 1: measuring, 2: done.
    pub calc_status: u8,
    /// When the last measurement started (seconds since the epoch).
    pub calc_start_time: u64,
    /// Its period in seconds.
    pub calc_period: u64,
    /// The result, in MB/s (10^6 bytes), once done.
    pub megabytes_per_second: f64,
}

/// A measurement in progress or done.
#[derive(Debug, Default)]
pub struct DirtyRate {
    status: DirtyRateStatus,
    started: Option<Instant>,
}

impl DirtyRate {
    /// What `GET /dirty-rate` shows.
    pub fn status(&self) -> DirtyRateStatus {
        self.status.clone()
    }

    /// Starts measuring on `vmm`; returns when the result is due.
    pub fn start(&mut self, vmm: &mut Vmm, period_s: u64) -> Result<Duration, String> {
        if self.started.is_some() {
            return Err("a measurement is already running".into());
        }
        if !(1..=MAX_PERIOD_S).contains(&period_s) {
            return Err(format!("calc_period_s must be 1 to {MAX_PERIOD_S}"));
        }
        vmm.start_tracking().map_err(|e| e.to_string())?;
        self.started = Some(Instant::now());
        self.status = DirtyRateStatus {
            calc_status: 1,
            calc_start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            calc_period: period_s,
            megabytes_per_second: 0.0,
        };
        Ok(Duration::from_secs(period_s))
    }

    /// Finishes a measurement whose period has passed (else does nothing).
    pub fn poll(&mut self, vmm: &mut Vmm) {
        let Some(started) = self.started else {
            return;
        };
        let elapsed = started.elapsed();
        if elapsed < Duration::from_secs(self.status.calc_period) {
            return;
        }
        let pages = match vmm.take_dirty() {
            Ok(b) => count(&b),
            Err(e) => {
                log::warn!("dirty rate: {e}");
                0
            }
        };
        vmm.stop_tracking();
        self.started = None;
        self.status.calc_status = 2;
        self.status.megabytes_per_second =
            (pages * PAGE) as f64 / elapsed.as_secs_f64().max(1e-3) / 1e6;
    }

    /// Drops a measurement (the VM went away or is migrating).
    pub fn abandon(&mut self) {
        self.started = None;
        if self.status.calc_status == 1 {
            self.status.calc_status = 0;
        }
    }
}
