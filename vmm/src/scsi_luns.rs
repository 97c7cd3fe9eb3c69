//! LUNs of the virtio-scsi controller, and adding and removing them while
//! the VM runs. The controller stays where it is on the PCI bus; tern asks
//! its managed tern-scsi over the backend's control socket (`--control`,
//! newline-delimited JSON, see `tern_scsi::hotplug`) to open or drop the
//! unit, and tern-scsi tells the guest's driver with a transport reset
//! event (RESCAN or REMOVED), on which Linux's virtio_scsi scans or removes
//! the LUN. vhost-user itself has no message for this. See
//! `docs/hotplug.md`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{DriveConfig, DriveFormat, MAX_SCSI_LUNS};
use crate::devices::bus::lock;
use crate::hotplug::HotplugError;
use crate::vmm::{record_slots, Vmm};

/// How long tern waits for tern-scsi to answer a control request (opening
/// an image is quick; a hung backend must not hang the VMM thread).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control request to tern-scsi failed.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    /// The socket could not be used.
    #[error("tern-scsi control socket {path}: {err}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The answer was not what the protocol says.
    #[error("tern-scsi control socket {path}: unexpected answer {answer:?}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What came back.
        answer: String,
    },
    /// tern-scsi refused (its reason).
    #[error("tern-scsi: {0}")]
    Refused(String),
}

/// One LUN of the controller.
#[derive(Debug)]
pub struct ScsiLun {
    /// The drive id.
    pub id: String,
    /// Its LUN number.
    pub lun: u16,
    /// Hot added and the guest has not addressed it yet.
    pub plugging: AtomicBool,
}

impl ScsiLun {
    /// LUN `lun` of drive `id`, `plugging` when hot added.
    pub fn new(id: &str, lun: u16, plugging: bool) -> Self {
        Self {
            id: id.to_string(),
            lun,
            plugging: AtomicBool::new(plugging),
        }
    }
}

/// The control side of a managed tern-scsi.
pub struct ScsiControl {
    path: PathBuf,
    /// The backend's arguments for a restart: they follow the LUNs.
    args: Arc<Mutex<Vec<String>>>,
    request_queues: u16,
}

impl ScsiControl {
    /// The control socket at `path` of the tern-scsi started with `args`
    /// (shared with its process) serving `request_queues` queues.
    pub fn new(path: PathBuf, args: Arc<Mutex<Vec<String>>>, request_queues: u16) -> Self {
        Self {
            path,
            args,
            request_queues,
        }
    }

    /// Sends `req` and returns the answer, or tern-scsi's refusal.
    fn request(&self, req: &Value) -> Result<Value, LunError> {
        let io = |err| LunError::Io {
            path: self.path.clone(),
            err,
        };
        let stream = UnixStream::connect(&self.path).map_err(io)?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
        stream
            .set_write_timeout(Some(CONTROL_TIMEOUT))
            .map_err(io)?;
        let mut out = &stream;
        out.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).map_err(io)?;
        let answer: Value = serde_json::from_str(line.trim()).map_err(|_| LunError::Protocol {
            path: self.path.clone(),
            answer: line.clone(),
        })?;
        if let Some(e) = answer.get("error") {
            return Err(LunError::Refused(
                e.as_str().unwrap_or_default().to_string(),
            ));
        }
        if answer.get("ok") != Some(&Value::Bool(true)) {
            return Err(LunError::Protocol {
                path: self.path.clone(),
                answer: line,
            });
        }
        Ok(answer)
    }

    fn add(&self, d: &DriveConfig, lun: u16, path: &Path) -> Result<(), LunError> {
        let format = match d.format {
            DriveFormat::Raw => "raw",
            DriveFormat::Qcow2 => "qcow2",
        };
        self.request(&json!({
            "op": "add_lun",
            "lun": lun,
            "path": path,
            "format": format,
            "ro": d.is_read_only,
            "serial": d.serial.as_deref().unwrap_or(&d.drive_id),
        }))
        .map(|_| ())
    }

    fn remove(&self, lun: u16) -> Result<(), LunError> {
        self.request(&json!({ "op": "remove_lun", "lun": lun }))
            .map(|_| ())
    }

    /// The LUNs the guest has addressed.
    fn seen(&self) -> Result<Vec<u16>, LunError> {
        let answer = self.request(&json!({ "op": "list" }))?;
        Ok(answer["luns"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|l| l["seen"] == true)
                    .filter_map(|l| l["lun"].as_u64())
                    .filter_map(|n| u16::try_from(n).ok())
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// LUN numbers for the controller's drives, in their order: a drive's
/// `lun` if it names one, else the lowest number nobody named or took.
pub(crate) fn assign_luns(drives: &[&DriveConfig]) -> Vec<u16> {
    let mut taken: Vec<u16> = drives.iter().filter_map(|d| d.lun).collect();
    let mut next = 0u16;
    drives
        .iter()
        .map(|d| match d.lun {
            Some(n) => n,
            None => {
                while taken.contains(&next) {
                    next += 1;
                }
                taken.push(next);
                next
            }
        })
        .collect()
}

/// tern-scsi's arguments for `luns` (drive and LUN number pairs).
pub(crate) fn scsi_args(
    luns: &[(&DriveConfig, u16)],
    request_queues: u16,
    control: &Path,
) -> Result<Vec<String>, crate::vmm::VmmError> {
    let mut args = Vec::with_capacity(2 * luns.len() + 4);
    for (d, n) in luns {
        args.push("--lun".to_string());
        args.push(format!("{},lun={n}", crate::vmm::lun_arg(d)?));
    }
    args.push("--queues".into());
    args.push(request_queues.to_string());
    args.push("--control".into());
    args.push(control.display().to_string());
    Ok(args)
}

fn refused(msg: impl Into<String>) -> HotplugError {
    HotplugError::Refused(msg.into())
}

impl Vmm {
    /// The virtio-scsi controller's entry, if the VM has one.
    fn scsi_index(&self) -> Option<usize> {
        self.virtio.iter().position(|v| !v.luns.is_empty())
    }

    /// Adds virtio-scsi drive `d` as a LUN of the running controller.
    pub(crate) fn hotplug_lun(&mut self, d: DriveConfig) -> Result<(), HotplugError> {
        let Some(i) = self.scsi_index() else {
            return Err(refused(
                "the VM has no virtio-scsi controller to add a LUN to (tern does not hot plug \
                 a controller: configure a virtio-scsi drive before InstanceStart, or plug a \
                 virtio-blk drive)",
            ));
        };
        let entry = &self.virtio[i];
        let Some(control) = &entry.scsi_control else {
            return Err(refused(
                "the virtio-scsi controller is served by an external backend (socket); tern \
                 adds LUNs only to the tern-scsi it manages",
            ));
        };
        if d.socket.is_some() {
            return Err(refused(
                "a LUN added at run time is served by the controller's tern-scsi: give \
                 path_on_host, not socket",
            ));
        }
        let Some(path) = d.path_on_host.clone() else {
            return Err(refused("a LUN needs path_on_host"));
        };
        if d.pci_slot.is_some_and(|s| s != entry.slot) {
            return Err(refused(format!(
                "a LUN sits on the controller at slot {}; pci_slot cannot move it",
                entry.slot
            )));
        }
        if entry.luns.len() >= MAX_SCSI_LUNS {
            return Err(refused(format!(
                "the virtio-scsi controller has its {MAX_SCSI_LUNS} LUNs (its maximum)"
            )));
        }
        let lun = match d.lun {
            Some(n) => {
                if let Some(other) = entry.luns.iter().find(|l| l.lun == n) {
                    return Err(refused(format!("LUN {n} is in use by drive {}", other.id)));
                }
                n
            }
            None => (0..MAX_SCSI_LUNS as u16)
                .find(|n| !entry.luns.iter().any(|l| l.lun == *n))
                .ok_or_else(|| refused("no free LUN on the virtio-scsi controller"))?,
        };
        let mut d = d;
        d.lun = Some(lun);
        d.pci_slot = None;
        let mut next = self.config.clone();
        next.drives.push(d.clone());
        next.validate_drives().map_err(|e| refused(e.to_string()))?;
        control
            .add(&d, lun, &path)
            .map_err(|e| refused(e.to_string()))?;
        let (queues, control_path) = (control.request_queues, control.path.clone());
        let entry = &mut self.virtio[i];
        let at = entry.luns.partition_point(|l| l.lun < lun);
        entry.luns.insert(at, ScsiLun::new(&d.drive_id, lun, true));
        self.config.drives.push(d);
        self.update_scsi_args(i, queues, &control_path);
        log::info!(
            "virtio-scsi: drive {} added as LUN {lun}",
            self.virtio[i].luns[at].id
        );
        Ok(())
    }

    /// Whether `id` is a LUN of the controller.
    pub(crate) fn is_lun(&self, id: &str) -> bool {
        self.virtio
            .iter()
            .any(|v| v.luns.iter().any(|l| l.id == id))
    }

    /// Removes LUN drive `id` from the running controller. The unit is gone
    /// at once (commands in flight finish); the guest is told by event.
    pub(crate) fn remove_lun(&mut self, id: &str) -> Result<(), HotplugError> {
        let Some(i) = self.scsi_index() else {
            return Err(refused(format!("no drive or network interface {id}")));
        };
        let entry = &self.virtio[i];
        let Some(at) = entry.luns.iter().position(|l| l.id == id) else {
            return Err(refused(format!("no drive or network interface {id}")));
        };
        let Some(control) = &entry.scsi_control else {
            return Err(refused(format!(
                "drive {id} is a LUN of an external backend (socket); tern removes LUNs only \
                 from the tern-scsi it manages"
            )));
        };
        if entry.luns.len() == 1 {
            return Err(refused(format!(
                "drive {id} is the controller's last LUN; a controller without LUNs would not \
                 come back after a snapshot or migration"
            )));
        }
        let lun = entry.luns[at].lun;
        control.remove(lun).map_err(|e| refused(e.to_string()))?;
        let (queues, control_path) = (control.request_queues, control.path.clone());
        self.virtio[i].luns.remove(at);
        self.config.drives.retain(|d| d.drive_id != id);
        self.update_scsi_args(i, queues, &control_path);
        log::info!("virtio-scsi: LUN {lun} (drive {id}) removed");
        Ok(())
    }

    /// After a LUN change: the controller's slot recorded on a drive still
    /// there, and tern-scsi's restart arguments naming the LUNs it serves.
    fn update_scsi_args(&mut self, i: usize, queues: u16, control_path: &Path) {
        for d in self.config.drives.iter_mut() {
            if self.virtio[i].luns.iter().any(|l| l.id == d.drive_id) {
                d.pci_slot = None;
            }
        }
        record_slots(&mut self.config, &self.virtio);
        let entry = &self.virtio[i];
        let luns: Vec<(&DriveConfig, u16)> = entry
            .luns
            .iter()
            .filter_map(|l| {
                let d = self.config.drives.iter().find(|d| d.drive_id == l.id)?;
                Some((d, l.lun))
            })
            .collect();
        match (scsi_args(&luns, queues, control_path), &entry.scsi_control) {
            (Ok(args), Some(c)) => *lock(&c.args) = args,
            (Err(e), _) => log::warn!("tern-scsi restart arguments not updated: {e}"),
            _ => {}
        }
    }

    /// Hot added LUNs the guest has addressed since stop `plugging`.
    pub(crate) fn refresh_lun_states(&self) {
        for v in &self.virtio {
            let Some(c) = &v.scsi_control else { continue };
            if !v.luns.iter().any(|l| l.plugging.load(Ordering::Relaxed)) {
                continue;
            }
            match c.seen() {
                Ok(seen) => {
                    for l in &v.luns {
                        if seen.contains(&l.lun) {
                            l.plugging.store(false, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => log::debug!("LUN states: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luns_pinned_first_then_lowest_free() {
        let mk = |id: &str, lun: Option<u16>| DriveConfig {
            lun,
            ..serde_json::from_value(json!({"drive_id": id, "path_on_host": "/x",
                "interface": "virtio-scsi"}))
            .unwrap()
        };
        let (a, b, c, e) = (
            mk("a", None),
            mk("b", Some(0)),
            mk("c", None),
            mk("e", Some(2)),
        );
        assert_eq!(assign_luns(&[&a, &b, &c, &e]), [1, 0, 3, 2]);
        let args = scsi_args(&[(&a, 1), (&e, 2)], 1, Path::new("/c")).unwrap();
        assert_eq!(
            args,
            [
                "--lun",
                "/x,format=raw,serial=a,lun=1",
                "--lun",
                "/x,format=raw,serial=e,lun=2",
                "--queues",
                "1",
                "--control",
                "/c"
            ]
        );
    }
}
