//! Snapshot state of a virtio-pci function: its config space, the common
//! configuration the driver wrote, the MSI-X table, and where each queue's
//! backend had got to. The backend's own state stays in the backend (the
//! disk image, the tap); only the ring positions cross a snapshot.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::common_cfg::{status, CommonCfg};
use super::msix::MsixTable;
use super::VirtioPciDevice;
use crate::devices::virtio::ActiveQueue;

/// A virtio-pci function's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioPciSnapshot {
    /// The virtio device type, checked on restore.
    pub device_type: u16,
    /// PCI config space bytes.
    pub config: Vec<u8>,
    /// Where BAR 0 was mapped.
    pub bar: u64,
    /// Features, status and queue setup.
    pub common: CommonCfg,
    /// The MSI-X table.
    pub msix: MsixTable,
    /// The ISR status bits.
    pub isr: u8,
    /// Each running queue's next avail index, from the backend.
    pub bases: Vec<(usize, u16)>,
}

/// Errors saving or restoring a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The backend could not stop or start its rings.
    #[error("backend: {0}")]
    Backend(String),
    /// The snapshot is for another kind of device or queue count.
    #[error("snapshot holds a device of type {saved} with {saved_queues} queues; this VM has type {actual} with {actual_queues}")]
    Mismatch {
        /// Type in the snapshot.
        saved: u16,
        /// Queues in the snapshot.
        saved_queues: usize,
        /// Type here.
        actual: u16,
        /// Queues here.
        actual_queues: usize,
    },
    /// The BAR could not be mapped where the snapshot had it.
    #[error("BAR: {0}")]
    Bar(String),
}

/// How long a snapshot waits for requests in flight to complete.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

impl VirtioPciDevice {
    /// Whether the driver has the device running.
    pub(super) fn running(&self) -> bool {
        self.common.status & status::DRIVER_OK != 0
            && self.common.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Queues whose every request gets an answer (block and SCSI request
    /// queues, SCSI control, net transmit and control), as opposed to net
    /// receive queues that hold buffers until packets arrive and the SCSI
    /// event queue (1) that holds them until a LUN is added or removed.
    fn completes_everything(&self, queue: usize) -> bool {
        match self.device.device_type() {
            1 => !(queue.is_multiple_of(2) && queue + 1 != self.common.queues.len()),
            8 => queue != 1,
            _ => true,
        }
    }

    /// With the vCPUs paused, waits until the backend has completed every
    /// request the guest made available (used index = avail index) on
    /// queues that complete everything, so no request is half-done in the
    /// snapshot. Gives up after a bound and says which queue still had
    /// requests in flight.
    pub fn quiesce(&self) -> Result<(), PersistError> {
        // A held backend has not started: nothing of it is in flight.
        if !self.running() || self.device.state() == "disconnected" || self.held.is_some() {
            return Ok(());
        }
        let mem = &self.env.mem;
        let start = Instant::now();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.enabled || !self.completes_everything(i) {
                continue;
            }
            loop {
                let avail: u16 = mem.read_obj(GuestAddress(q.avail + 2)).unwrap_or(0);
                let used: u16 = mem.read_obj(GuestAddress(q.used + 2)).unwrap_or(0);
                if avail == used {
                    break;
                }
                if start.elapsed() > QUIESCE_TIMEOUT {
                    return Err(PersistError::Backend(format!(
                        "queue {i} still has {} requests in flight after {QUIESCE_TIMEOUT:?}",
                        avail.wrapping_sub(used)
                    )));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Stops the backend's rings and returns the function's state. The
    /// rings stay stopped until [`Self::resume_queues`] (the VM goes on) or
    /// the process ends.
    pub fn save(&mut self) -> Result<VirtioPciSnapshot, PersistError> {
        let bases = if let Some(held) = &self.held {
            held.clone()
        } else if self.running() && self.device.state() != "disconnected" {
            self.device
                .pause()
                .map_err(|e| PersistError::Backend(e.to_string()))?
        } else {
            Vec::new()
        };
        Ok(VirtioPciSnapshot {
            device_type: self.device.device_type(),
            config: self.config.save(),
            bar: self.bar,
            common: self.common.clone(),
            msix: self.msix.clone(),
            isr: self.isr.load(Ordering::SeqCst),
            bases,
        })
    }

    /// The queues the driver enabled, each starting at its base from
    /// `bases` (queues not listed start at the used index in memory).
    pub(super) fn active_queues<'a>(
        common: &CommonCfg,
        kicks: &'a [vmm_sys_util::eventfd::EventFd],
        calls: &'a [vmm_sys_util::eventfd::EventFd],
        mem: &vm_memory::GuestMemoryMmap,
        bases: &[(usize, u16)],
    ) -> Vec<ActiveQueue<'a>> {
        common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(i, q)| ActiveQueue {
                index: i,
                size: q.size,
                max_size: q.max_size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &kicks[i],
                call: &calls[i],
                base: bases
                    .iter()
                    .find(|(q, _)| *q == i)
                    .map(|(_, b)| *b)
                    .unwrap_or_else(|| mem.read_obj(GuestAddress(q.used + 2)).unwrap_or(0)),
            })
            .collect()
    }

    /// Has the backend log the pages it writes into `log` (None: stop).
    pub fn set_dirty_log(
        &mut self,
        log: Option<std::sync::Arc<crate::vhost_user::dirty_log::DirtyLog>>,
    ) -> Result<(), PersistError> {
        self.device
            .set_dirty_log(log)
            .map_err(|e| PersistError::Backend(e.to_string()))
    }

    /// Restarts the rings a snapshot stopped, where they were.
    pub fn resume_queues(&mut self, bases: &[(usize, u16)]) -> Result<(), PersistError> {
        if !self.running() || self.device.state() == "disconnected" || self.held.is_some() {
            return Ok(());
        }
        let features = self.common.driver_features;
        let mem = self.env.mem.clone();
        let queues = Self::active_queues(&self.common, &self.kicks, &self.calls, &mem, bases);
        let r = self.device.activate(&mem, features, &queues);
        drop(queues);
        r.map_err(|e| PersistError::Backend(e.to_string()))?;
        // Anything the guest queued while the rings were stopped.
        for k in &self.kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// Starts the rings of a device restored with `hold`, where they were.
    pub fn release_held(&mut self) {
        let Some(bases) = self.held.take() else {
            return;
        };
        if let Err(e) = self.resume_queues(&bases) {
            log::error!(
                "virtio device {:#x}: starting the backend after restore: {e}",
                self.device.device_type()
            );
        }
    }

    /// Puts a freshly built function (same device, new backend connection)
    /// into the saved state and, if the driver had it running, starts its
    /// interrupts and, unless `hold`, the backend's rings where they were
    /// (held: at [`Self::release_held`]).
    pub fn restore(&mut self, snap: &VirtioPciSnapshot, hold: bool) -> Result<(), PersistError> {
        if snap.device_type != self.device.device_type()
            || snap.common.queues.len() != self.common.queues.len()
        {
            return Err(PersistError::Mismatch {
                saved: snap.device_type,
                saved_queues: snap.common.queues.len(),
                actual: self.device.device_type(),
                actual_queues: self.common.queues.len(),
            });
        }
        self.config.restore(&snap.config);
        self.common = snap.common.clone();
        self.msix = snap.msix.clone();
        self.isr.store(snap.isr, Ordering::SeqCst);
        self.map_bar(snap.bar)
            .map_err(|e| PersistError::Bar(e.to_string()))?;
        if !self.running() {
            return Ok(());
        }
        let wiring = if self.msix_enabled() {
            self.bind_msix()
        } else {
            self.start_intx()
        };
        wiring.map_err(PersistError::Backend)?;
        if hold {
            self.held = Some(snap.bases.clone());
            return Ok(());
        }
        self.resume_queues(&snap.bases)
    }
}
