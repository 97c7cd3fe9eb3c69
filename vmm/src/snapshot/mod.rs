//! Snapshots: a paused VM's state (vCPUs, irqchip, PIT, clock, devices,
//! vhost-user ring positions) in a versioned, checksummed state file, and
//! its memory in a separate, sparse memory file; and bringing a VM back
//! from them in a fresh tern. See `docs/snapshot.md`.

pub mod file;
mod hot_pages;
pub mod lazy;
pub mod memory;
mod restore;
mod uffd;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPmSnapshot;
use crate::devices::bus::lock;
use crate::devices::i8042::I8042Snapshot;
use crate::devices::rtc::RtcSnapshot;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::pci::persist::VirtioPciSnapshot;
use crate::kvm::state::{VcpuState, VmState};
use crate::vmm::Vmm;

pub use restore::{Platform, RestoreOptions, RestoreSource};

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SnapshotKind {
    /// All of memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot (or the restore).
    Diff,
}

/// A virtio function's state, with where it sat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioState {
    /// Drive or interface id.
    pub id: String,
    /// PCI slot on bus 0.
    pub slot: u8,
    /// Transport and ring state.
    pub state: VirtioPciSnapshot,
}

/// The legacy devices' and virtio functions' state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialSnapshot,
    /// CMOS RTC.
    pub rtc: RtcSnapshot,
    /// Keyboard controller.
    pub i8042: I8042Snapshot,
    /// ACPI PM block.
    pub acpi_pm: AcpiPmSnapshot,
    /// virtio functions, in slot order.
    pub virtio: Vec<VirtioState>,
}

/// Everything in a state file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Full or diff (a diff's memory file only holds changed pages).
    pub kind: SnapshotKind,
    /// The VM's configuration (the CPU template resolved).
    pub config: VmConfig,
    /// Guest RAM in bytes: the memory file's size.
    pub mem_size: u64,
    /// Ties the memory file to this state file (also stored as the memory
    /// file's `user.tern.snapshot` extended attribute where supported).
    pub mem_id: u64,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DeviceStates,
}

/// Errors taking or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM must be paused first.
    #[error("the VM must be paused (PATCH /vm {{\"state\": \"Paused\"}}) before a snapshot")]
    NotPaused,
    /// A diff needs dirty tracking.
    #[error("a Diff snapshot needs dirty page tracking (machine-config track_dirty_pages, or snapshot/load with track_dirty_pages)")]
    NoDirtyTracking,
    /// State or memory file trouble.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// Memory could not be written.
    #[error("{path}: {err}")]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        err: memory::MemoryFileError,
    },
    /// KVM state could not be read or set.
    #[error("KVM state: {0}")]
    Kvm(#[from] crate::kvm::state::StateError),
    /// The dirty log could not be read.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] crate::kvm::vm::VmError),
    /// A device could not be saved or restored.
    #[error("device {id}: {err}")]
    Device {
        /// The device.
        id: String,
        /// What failed.
        err: String,
    },
    /// The memory file does not fit the state file.
    #[error("{path}: {why}")]
    MemoryFile {
        /// The memory file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The snapshot does not fit this tern or this request.
    #[error("{0}")]
    Incompatible(String),
    /// Building the VM failed.
    #[error(transparent)]
    Vmm(#[from] Box<crate::vmm::VmmError>),
    /// A lazy restore could not bring the VM's memory in.
    #[error("the VM's memory could not be restored from its snapshot, so it cannot be saved")]
    MemoryNotFilled,
}

/// What a snapshot wrote, for the log and the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Memory bytes written.
    pub mem_bytes_written: u64,
    /// Time taken, in milliseconds.
    pub duration_ms: f64,
}

/// The extended attribute naming the snapshot a memory file belongs to.
const MEM_ID_XATTR: &std::ffi::CStr = c"user.tern.snapshot";
/// Set (to "diff") on a diff snapshot's own memory file, which holds only
/// changed pages and must be merged into its base before a load; the merged
/// base does not carry it.
const LAYER_XATTR: &std::ffi::CStr = c"user.tern.layer";

/// Marks a memory file as a diff layer (best effort, as the id tag).
fn mark_diff_layer(f: &std::fs::File) {
    set_xattr(f, LAYER_XATTR, b"diff");
}

/// Whether a memory file is marked as an unmerged diff layer.
fn is_diff_layer(f: &std::fs::File) -> bool {
    get_xattr::<4>(f, LAYER_XATTR) == Some(*b"diff")
}

/// Sets extended attribute `name` of `f` (best effort: file systems
/// without user xattrs only get the size check).
fn set_xattr(f: &std::fs::File, name: &std::ffi::CStr, value: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd, NUL-terminated name, value pointer and length of a
    // live slice.
    unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
}

/// Extended attribute `name` of `f` if it is exactly `N` bytes long.
fn get_xattr<const N: usize>(f: &std::fs::File, name: &std::ffi::CStr) -> Option<[u8; N]> {
    use std::os::fd::AsRawFd;
    let mut v = [0u8; N];
    // SAFETY: valid fd, NUL-terminated name, buffer of the given length.
    let n = unsafe { libc::fgetxattr(f.as_raw_fd(), name.as_ptr(), v.as_mut_ptr().cast(), N) };
    (n == N as isize).then_some(v)
}

/// Tags a memory file with its snapshot's id.
fn tag_memory_file(f: &std::fs::File, id: u64) {
    set_xattr(f, MEM_ID_XATTR, &id.to_le_bytes());
}

/// The id a memory file was tagged with, if any.
fn memory_file_tag(f: &std::fs::File) -> Option<u64> {
    get_xattr::<8>(f, MEM_ID_XATTR).map(u64::from_le_bytes)
}

/// A fresh id for a snapshot.
fn new_id() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: writes at most 8 bytes into the buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(v)
}

impl Vmm {
    /// Saves the paused VM: its state to `state_path` and its memory (all,
    /// or what changed since the last snapshot) to `mem_path`. Both files
    /// appear only once complete; on any error the files already at those
    /// paths are untouched. The backends' rings are restarted afterwards,
    /// so the VM can be resumed.
    pub fn snapshot(
        &mut self,
        kind: SnapshotKind,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotInfo, SnapshotError> {
        if !self.paused {
            return Err(SnapshotError::NotPaused);
        }
        if kind == SnapshotKind::Diff && !self.config.machine_config.track_dirty_pages {
            return Err(SnapshotError::NoDirtyTracking);
        }
        let started = Instant::now();
        let result = self.stop_devices().and_then(|virtio| {
            let r = self.write_snapshot(kind, state_path, mem_path, &virtio);
            // Whatever happened, the backends go on where they stopped.
            self.restart_devices(&virtio);
            r
        });
        let mem_bytes_written = result?;
        let info = SnapshotInfo {
            mem_bytes_written,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        log::info!(
            "snapshot ({kind:?}) written to {} and {}: {} MiB of memory in {:.1} ms",
            state_path.display(),
            mem_path.display(),
            info.mem_bytes_written >> 20,
            info.duration_ms
        );
        Ok(info)
    }

    /// With the vCPUs paused: lets each virtio device's requests in flight
    /// finish, stops its backend's rings and returns its state. On error the
    /// devices already stopped are restarted.
    pub(crate) fn stop_devices(&mut self) -> Result<Vec<VirtioState>, SnapshotError> {
        // After a lazy restore the backends start only once memory is in;
        // their state is only final from then on.
        if !self.ram.wait_filled() {
            return Err(SnapshotError::MemoryNotFilled);
        }
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for v in &self.virtio {
            let mut dev = lock(&v.device);
            match dev.quiesce().and_then(|()| dev.save()) {
                Ok(state) => virtio.push(VirtioState {
                    id: v.id.clone(),
                    slot: v.slot,
                    state,
                }),
                Err(e) => {
                    drop(dev);
                    self.restart_devices(&virtio);
                    return Err(SnapshotError::Device {
                        id: v.id.clone(),
                        err: e.to_string(),
                    });
                }
            }
        }
        Ok(virtio)
    }

    /// Restarts the rings [`Self::stop_devices`] stopped.
    pub(crate) fn restart_devices(&self, saved: &[VirtioState]) {
        for (v, s) in self.virtio.iter().zip(saved) {
            if let Err(e) = lock(&v.device).resume_queues(&s.state.bases) {
                log::error!("device {}: cannot restart after the snapshot: {e}", v.id);
            }
        }
    }

    /// The paused VM's state, with the devices' state from
    /// [`Self::stop_devices`].
    pub(crate) fn capture_state(
        &self,
        kind: SnapshotKind,
        virtio: &[VirtioState],
    ) -> Result<SnapshotState, SnapshotError> {
        let mut vcpus = Vec::with_capacity(self.vcpu_fds.len());
        for fd in &self.vcpu_fds {
            vcpus.push(crate::kvm::state::save_vcpu(
                &crate::kvm::vcpu::lock_fd(fd),
                &self.msr_list,
            )?);
        }
        let vm = crate::kvm::state::save_vm(&self.vm)?;
        let devices = DeviceStates {
            serial: lock(&self.machine.serial).save(),
            rtc: lock(&self.machine.rtc).save(),
            i8042: lock(&self.machine.i8042).save(),
            acpi_pm: lock(&self.machine.acpi_pm).save(),
            virtio: virtio.to_vec(),
        };
        Ok(SnapshotState {
            kind,
            config: self.config.clone(),
            mem_size: self.ram.size,
            mem_id: new_id(),
            vm,
            vcpus,
            devices,
        })
    }

    fn write_snapshot(
        &mut self,
        kind: SnapshotKind,
        state_path: &Path,
        mem_path: &Path,
        virtio: &[VirtioState],
    ) -> Result<u64, SnapshotError> {
        let state = self.capture_state(kind, virtio)?;
        let mem_id = state.mem_id;

        let mem_err = |err| SnapshotError::Memory {
            path: mem_path.to_owned(),
            err,
        };
        let mem_file = file::AtomicFile::create(mem_path)?;
        // With dirty tracking on, the bitmap is read (and cleared) by every
        // snapshot, so the next diff holds what changed after this one.
        let dirty = if self.config.machine_config.track_dirty_pages {
            let kvm = crate::kvm::vm::dirty_bitmaps(&self.vm, &self.ram.memory)?;
            Some(self.with_backend_dirty_pages(kvm))
        } else {
            None
        };
        let written = match (kind, dirty) {
            (SnapshotKind::Diff, Some(bitmaps)) => {
                memory::write_diff(&self.ram, mem_file.file(), &bitmaps).map_err(mem_err)?
            }
            _ => memory::write_full(&self.ram, mem_file.file()).map_err(mem_err)?,
        };
        tag_memory_file(mem_file.file(), mem_id);
        if kind == SnapshotKind::Diff {
            mark_diff_layer(mem_file.file());
        }
        mem_file.sync()?;
        let state_file = file::write_state(state_path, &state)?;
        // Memory first: a crash between the two renames leaves a memory file
        // whose tag no longer matches the old state file, which a load
        // refuses rather than mixing two snapshots.
        mem_file.rename()?;
        state_file.rename()?;
        Ok(written)
    }

    /// Adds to KVM's dirty bitmaps the pages the vhost-user backends wrote
    /// (used rings, buffers they filled), which KVM does not see: from the
    /// shared dirty log they mark. A backend without one would leave the
    /// diff unsafe, so then every page the memfd holds counts as dirty.
    fn with_backend_dirty_pages(&self, mut bitmaps: Vec<Vec<u64>>) -> Vec<Vec<u64>> {
        match &self.dirty_log {
            Some(log) => {
                let theirs = log.take(&self.ram.memory);
                crate::vhost_user::dirty_log::merge_bitmaps(&mut bitmaps, &theirs);
            }
            None if !self.virtio.is_empty() => {
                for b in bitmaps.iter_mut() {
                    b.iter_mut().for_each(|w| *w = u64::MAX);
                }
            }
            None => {}
        }
        bitmaps
    }
}

/// Merges diff memory files (oldest first) into `base` in place.
pub fn merge_memory_files(base: &Path, diffs: &[PathBuf]) -> std::io::Result<u64> {
    let b = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)?;
    let d: Vec<std::fs::File> = diffs
        .iter()
        .map(std::fs::File::open)
        .collect::<Result<_, _>>()?;
    let copied = memory::merge(&b, &d)?;
    // The merged file is now the newest diff's memory.
    if let Some(tag) = d.last().and_then(memory_file_tag) {
        tag_memory_file(&b, tag);
    }
    Ok(copied)
}

/// Checks that `mem` can be the memory of `state`: its size, and its tag
/// where the file system kept one.
pub(crate) fn check_memory_file(
    state: &SnapshotState,
    path: &Path,
    mem: &std::fs::File,
) -> Result<(), SnapshotError> {
    let size = mem
        .metadata()
        .map_err(|e| SnapshotError::MemoryFile {
            path: path.to_owned(),
            why: e.to_string(),
        })?
        .len();
    if size != state.mem_size {
        return Err(SnapshotError::MemoryFile {
            path: path.to_owned(),
            why: format!(
                "memory file is {size} bytes but the snapshot's VM has {} bytes of RAM (truncated, or another snapshot's file)",
                state.mem_size
            ),
        });
    }
    if is_diff_layer(mem) {
        return Err(SnapshotError::MemoryFile {
            path: path.to_owned(),
            why: "this is a diff snapshot's memory layer: merge it into its base first (tern --merge-memory BASE,DIFF...)".into(),
        });
    }
    if let Some(tag) = memory_file_tag(mem) {
        if tag != state.mem_id {
            return Err(SnapshotError::MemoryFile {
                path: path.to_owned(),
                why: match state.kind {
                    SnapshotKind::Full => "memory file belongs to another snapshot".into(),
                    SnapshotKind::Diff => "memory file is not this diff snapshot's base with the diff merged in (tern --merge-memory BASE,DIFF...)".into(),
                },
            });
        }
    }
    Ok(())
}
