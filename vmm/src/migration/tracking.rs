//! Dirty page tracking switched on and off at run time, for migration and
//! dirty-rate measurement: KVM's per-slot log for what the vCPUs write and
//! the vhost-user backends' shared log for what they write.

use std::sync::Arc;

use crate::devices::bus::lock;
use crate::kvm::vm;
use crate::vhost_user::dirty_log::{merge_bitmaps, DirtyLog};
use crate::vmm::Vmm;

/// Errors switching tracking.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// KVM refused.
    #[error("dirty logging: {0}")]
    Kvm(#[from] vm::VmError),
    /// The shared log could not be made.
    #[error(transparent)]
    Log(#[from] crate::vhost_user::dirty_log::DirtyLogError),
    /// A backend cannot log.
    #[error("device {id}: {err}")]
    Device {
        /// The device.
        id: String,
        /// Why.
        err: String,
    },
}

impl Vmm {
    /// Starts logging dirty pages (if not on already) and clears the logs,
    /// so the next [`Self::take_dirty`] reports writes from now on.
    pub(crate) fn start_tracking(&mut self) -> Result<(), TrackingError> {
        if !self.config.machine_config.track_dirty_pages {
            vm::register_memory(&self.vm, &self.ram.memory, true)?;
        }
        if self.dirty_log.is_none() && !self.virtio.is_empty() {
            let log = Arc::new(DirtyLog::new(&self.ram.memory)?);
            for v in &self.virtio {
                lock(&v.device)
                    .set_dirty_log(Some(log.clone()))
                    .map_err(|e| TrackingError::Device {
                        id: v.id.clone(),
                        err: e.to_string(),
                    })?;
            }
            self.dirty_log = Some(log);
        }
        self.take_dirty()?;
        Ok(())
    }

    /// Stops logging where only [`Self::start_tracking`] turned it on
    /// (a VM configured with `track_dirty_pages` keeps its logs).
    pub(crate) fn stop_tracking(&mut self) {
        if self.config.machine_config.track_dirty_pages {
            return;
        }
        if let Err(e) = vm::register_memory(&self.vm, &self.ram.memory, false) {
            log::warn!("cannot turn KVM dirty logging off: {e}");
        }
        if self.dirty_log.take().is_some() {
            for v in &self.virtio {
                if let Err(e) = lock(&v.device).set_dirty_log(None) {
                    log::warn!("device {}: cannot stop its dirty log: {e}", v.id);
                }
            }
        }
    }

    /// Reads and clears the pages written since the last call: one bitmap
    /// per RAM region, a bit per 4 KiB page.
    pub(crate) fn take_dirty(&self) -> Result<Vec<Vec<u64>>, TrackingError> {
        let mut bitmaps = vm::dirty_bitmaps(&self.vm, &self.ram.memory)?;
        if let Some(log) = &self.dirty_log {
            merge_bitmaps(&mut bitmaps, &log.take(&self.ram.memory));
        }
        Ok(bitmaps)
    }
}

/// Pages set in `bitmaps`.
pub fn count(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}
