//! Bringing a VM back from a snapshot in a fresh tern: check the files,
//! map or load the memory, rebuild the machine and its devices (backends
//! started or reconnected), then put every piece of state back before the
//! vCPUs first run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{check_memory_file, file, SnapshotError, SnapshotState};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::exit::ExitSender;
use crate::kvm::{state, vcpu, vm};
use crate::memory;
use crate::vmm::{build_platform, Vmm, VmmError};

/// Where a snapshot is.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file (a full memory file, or a base with diffs merged).
    pub mem_path: PathBuf,
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Run the vCPUs at once (else the VM comes back paused).
    pub resume: bool,
    /// Log dirty pages from the start, for diff snapshots later.
    pub track_dirty_pages: bool,
    /// Where the console goes (else as the snapshot's VM had it).
    pub serial: Option<SerialOutput>,
    /// Drives to serve from another file (a clone's own overlay):
    /// (drive id, path).
    pub drive_overrides: Vec<(String, PathBuf)>,
    /// NICs to put on another tap: (interface id, tap name).
    pub network_overrides: Vec<(String, String)>,
}

fn vmm_err(e: VmmError) -> SnapshotError {
    SnapshotError::Vmm(Box::new(e))
}

/// The snapshot's configuration with the caller's overrides applied.
fn restored_config(
    state: &SnapshotState,
    opts: &RestoreOptions,
) -> Result<VmConfig, SnapshotError> {
    let mut config = state.config.clone();
    config.machine_config.track_dirty_pages = opts.track_dirty_pages;
    if let Some(s) = &opts.serial {
        config.serial = s.clone();
    }
    for (id, path) in &opts.drive_overrides {
        let Some(d) = config.drives.iter_mut().find(|d| &d.drive_id == id) else {
            return Err(SnapshotError::Incompatible(format!(
                "drive override: the snapshot has no drive {id}"
            )));
        };
        if d.socket.is_some() {
            return Err(SnapshotError::Incompatible(format!(
                "drive override: drive {id} is served by an external backend; start that backend on the new file instead"
            )));
        }
        d.path_on_host = Some(path.clone());
    }
    for (id, tap) in &opts.network_overrides {
        let Some(n) = config
            .network_interfaces
            .iter_mut()
            .find(|n| &n.iface_id == id)
        else {
            return Err(SnapshotError::Incompatible(format!(
                "network override: the snapshot has no network interface {id}"
            )));
        };
        n.host_dev_name = Some(tap.clone());
    }
    let mc = &config.machine_config;
    if state.vcpus.len() != mc.vcpu_count as usize {
        return Err(SnapshotError::Incompatible(format!(
            "the state file holds {} vCPUs but its configuration says {}",
            state.vcpus.len(),
            mc.vcpu_count
        )));
    }
    if state.mem_size != mc.mem_size_mib << 20 {
        return Err(SnapshotError::Incompatible(format!(
            "the state file's memory size {} does not match its configuration's {} MiB",
            state.mem_size, mc.mem_size_mib
        )));
    }
    config.validate().map_err(|e| vmm_err(e.into()))?;
    Ok(config)
}

/// Opens and checks the memory file, then maps it: private (pages read
/// when first touched) when nothing else needs to share guest memory, or
/// as a memfd the vhost-user backends can map, filled lazily (`lazy.rs`)
/// or, where userfaultfd is not available, copied in now.
fn load_memory(
    state: &SnapshotState,
    config: &VmConfig,
    path: &Path,
    exit: &ExitSender,
) -> Result<memory::GuestRam, SnapshotError> {
    let mem_file = std::fs::File::open(path).map_err(|e| SnapshotError::MemoryFile {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    check_memory_file(state, path, &mem_file)?;
    let shared = !config.drives.is_empty() || !config.network_interfaces.is_empty();
    if !shared {
        return memory::ram_from_file_private(mem_file, state.mem_size)
            .map_err(|e| vmm_err(e.into()));
    }
    let mut ram = memory::ram_empty(state.mem_size).map_err(|e| vmm_err(e.into()))?;
    let hot = super::hot_pages::of_vcpus(&state.vcpus, |gpa| {
        read_saved_u64(&mem_file, state.mem_size, gpa)
    });
    let lazy = mem_file
        .try_clone()
        .and_then(|f| super::lazy::LazyFill::start(&ram, f, hot, exit.clone()));
    match lazy {
        Ok(fill) => ram.filler = Some(fill),
        Err(e) => {
            log::info!("lazy restore unavailable ({e}): copying the memory file in first");
            ram = memory::ram_from_file_copy(&mem_file, state.mem_size)
                .map_err(|e| vmm_err(e.into()))?;
        }
    }
    Ok(ram)
}

/// The 8 bytes at guest-physical `gpa` in a memory file (RAM ranges laid
/// end to end), or None outside RAM or on a read error.
fn read_saved_u64(file: &std::fs::File, mem_size: u64, gpa: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut offset = 0;
    for (start, len) in memory::ram_ranges(mem_size) {
        if (start.0..start.0 + len).contains(&gpa) && gpa + 8 <= start.0 + len {
            let mut b = [0u8; 8];
            file.read_exact_at(&mut b, offset + gpa - start.0).ok()?;
            return Some(u64::from_le_bytes(b));
        }
        offset += len;
    }
    None
}

impl Vmm {
    /// Builds a VM from a snapshot. On error nothing is left running (the
    /// backends started for it stop) and the caller can try again.
    pub fn restore(
        src: &RestoreSource,
        opts: &RestoreOptions,
        exit: &ExitSender,
    ) -> Result<Self, SnapshotError> {
        let started = Instant::now();
        let state: SnapshotState = file::read_state(&src.state_path)?;
        let config = restored_config(&state, opts)?;
        let t_state = started.elapsed();
        // The backends start up while memory and the VM are made.
        crate::vmm::prelaunch_backends(&config);
        let built = load_memory(&state, &config, &src.mem_path, exit)
            .map(|ram| (started.elapsed(), ram))
            .and_then(|(t_mem, ram)| Ok((t_mem, Platform::build(config, ram, exit)?)));
        // Whatever was not taken (an error on the way) is stopped.
        crate::vhost_user::backend_process::BackendProcess::discard_prelaunched();
        let (t_mem, platform) = built?;
        let t_build = started.elapsed();
        let vmm = platform.finish(&state, !opts.resume, started)?;
        if let Some(fill) = &vmm.ram.filler {
            fill.begin();
        }
        log::debug!(
            "restore phases: state file {t_state:?}, memory {:?}, VM and devices {:?}, state put back {:?}",
            t_mem - t_state,
            t_build - t_mem,
            started.elapsed() - t_build
        );
        log::info!(
            "restored from {} in {:.2} ms ({})",
            src.state_path.display(),
            started.elapsed().as_secs_f64() * 1e3,
            if opts.resume { "running" } else { "paused" }
        );
        Ok(vmm)
    }
}

/// A VM built for a restore or an incoming migration, before its state is
/// put back: memory mapped, devices and backends up, vCPUs created.
pub struct Platform {
    config: VmConfig,
    ram: memory::GuestRam,
    kvm: kvm_ioctls::Kvm,
    vm_fd: std::sync::Arc<kvm_ioctls::VmFd>,
    built: crate::vmm::Built,
}

impl Platform {
    /// Creates the VM for `config` around `ram` and starts or connects its
    /// backends.
    pub fn build(
        config: VmConfig,
        ram: memory::GuestRam,
        exit: &ExitSender,
    ) -> Result<Self, SnapshotError> {
        let mc = &config.machine_config;
        let template = crate::vmm::cpu_template(&config);
        let kvm = vm::open_kvm().map_err(|e| vmm_err(e.into()))?;
        let vm_fd = std::sync::Arc::new(
            vm::create_vm(&kvm, mc.vcpu_count, &ram.memory, mc.track_dirty_pages)
                .map_err(|e| vmm_err(e.into()))?,
        );
        let built = build_platform(&kvm, &vm_fd, &config, &ram, template, exit).map_err(vmm_err)?;
        Ok(Self {
            config,
            ram,
            kvm,
            vm_fd,
            built,
        })
    }

    /// Guest memory (an incoming migration writes pages into it).
    pub fn ram(&self) -> &memory::GuestRam {
        &self.ram
    }

    /// Puts `state` back and starts the vCPUs (parked when `paused`).
    pub fn finish(
        self,
        state: &SnapshotState,
        paused: bool,
        started: Instant,
    ) -> Result<Vmm, SnapshotError> {
        let Self {
            config,
            ram,
            kvm,
            vm_fd,
            built,
        } = self;
        if state.vcpus.len() != built.2.len() {
            return Err(SnapshotError::Incompatible(format!(
                "the state holds {} vCPUs, the VM has {}",
                state.vcpus.len(),
                built.2.len()
            )));
        }
        let (machine, virtio, vcpus) = (&built.0, &built.1, &built.2);
        // Backends wait for a lazy fill to complete before their rings run
        // (it begins only once the vCPUs do, so it is never done yet here).
        let gate = ram.filler.as_ref().map(|f| f.gate());
        state::restore_vm(&vm_fd, &state.vm)?;
        for (v, s) in vcpus.iter().zip(&state.vcpus) {
            state::restore_vcpu(&vcpu::lock_fd(v.fd()), s)?;
        }

        let d = &state.devices;
        lock(&machine.serial)
            .restore(&d.serial)
            .map_err(|err| SnapshotError::Device {
                id: "com1".into(),
                err,
            })?;
        lock(&machine.rtc).restore(&d.rtc);
        lock(&machine.i8042).restore(&d.i8042);
        lock(&machine.acpi_pm).restore(&d.acpi_pm);
        if d.virtio.len() != virtio.len() {
            return Err(SnapshotError::Incompatible(format!(
                "the snapshot has {} virtio devices, the rebuilt VM {}",
                d.virtio.len(),
                virtio.len()
            )));
        }
        for (entry, saved) in virtio.iter().zip(&d.virtio) {
            if entry.id != saved.id || entry.slot != saved.slot {
                return Err(SnapshotError::Incompatible(format!(
                    "device {} at slot {} in the snapshot, {} at slot {} rebuilt",
                    saved.id, saved.slot, entry.id, entry.slot
                )));
            }
            lock(&entry.device)
                .restore(&saved.state, gate.is_some())
                .map_err(|e| SnapshotError::Device {
                    id: saved.id.clone(),
                    err: e.to_string(),
                })?;
            if let Some(gate) = &gate {
                let device = std::sync::Arc::downgrade(&entry.device);
                gate.after_fill(Box::new(move || {
                    if let Some(d) = device.upgrade() {
                        lock(&d).release_held();
                    }
                }));
            }
        }

        let msr_list = state::msr_index_list(&kvm).unwrap_or_default();
        Vmm::start(config, built, vm_fd, ram, msr_list, paused, started).map_err(vmm_err)
    }
}
