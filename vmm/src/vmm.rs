//! A running VM: built from a [`VmConfig`], with its vCPU threads started,
//! and the operations the VMM thread performs on it (pause, resume,
//! Ctrl-Alt-Del, reporting).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::boot::{self, BootSpec};
use crate::config::{DriveCache, DriveConfig, DriveFormat, DriveInterface};
use crate::config::{HugePages, SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::devices::serial::{forward_stdin, SerialOut};
use crate::devices::virtio::pci::{PciEnv, VirtioPciDevice, BAR_SIZE};
use crate::exit::ExitSender;
use crate::kvm::cpuid::{self, CpuTemplate};
use crate::kvm::irq::GsiRouter;
use crate::kvm::pause::{self, PauseError, VcpuControl};
use crate::kvm::regs;
use crate::kvm::vcpu::{ExitCounters, SharedVcpuFd, Vcpu, VcpuShared};
use crate::kvm::vm;
use crate::machine::layout::{
    pci_intx_gsi, MMIO32_END, MMIO32_START, MMIO64_SIZE, PCI_FIRST_DEVICE_SLOT,
    PCI_LAST_DEVICE_SLOT,
};
use crate::machine::q35::acpi::{self, AcpiConfig};
use crate::machine::{self, layout::HIGH_RAM_START, DeviceInfo};
use crate::memory;
use crate::scsi_luns::{assign_luns, scsi_args, ScsiControl, ScsiLun};
use crate::terminal::RawTerminal;
use crate::vhost_user::backend_process::{backend_binary, BackendProcess};
use crate::vhost_user::device::{VhostUserDevice, SCSI_FIXED_QUEUES};
use crate::vhost_user::dirty_log::DirtyLog;
use std::sync::Mutex;
use vm_allocator::{AddressAllocator, AllocPolicy};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// KVM VM setup.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Machine assembly.
    #[error(transparent)]
    Machine(#[from] machine::MachineError),
    /// ACPI tables.
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    /// Kernel/initrd/cmdline.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] crate::kvm::vcpu::VcpuError),
    /// Boot register setup.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output file {path}: {err}")]
    SerialFile {
        /// The path.
        path: std::path::PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The vCPU kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// Pausing failed.
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// A managed backend did not start.
    #[error("{drive}: {err}")]
    Backend {
        /// The drive.
        drive: String,
        /// What went wrong.
        err: crate::vhost_user::backend_process::BackendError,
    },
    /// A vhost-user backend could not be set up.
    #[error("{drive}: {err}")]
    VhostUser {
        /// The drive.
        drive: String,
        /// What went wrong.
        err: crate::vhost_user::handle::VhostUserError,
    },
    /// A virtio-pci function could not be created.
    #[error("{drive}: {err}")]
    VirtioPci {
        /// The drive.
        drive: String,
        /// What went wrong.
        err: crate::devices::virtio::pci::VirtioPciError,
    },
    /// The vhost-user dirty log could not be made.
    #[error(transparent)]
    DirtyLog(#[from] crate::vhost_user::dirty_log::DirtyLogError),
    /// Every PCI slot is in use.
    #[error("no free PCI slot on bus 0 (slots {PCI_FIRST_DEVICE_SLOT}-{PCI_LAST_DEVICE_SLOT} are all in use)")]
    NoFreeSlot,
    /// No room for a BAR.
    #[error("no room for a PCI BAR in the MMIO window: {0:?}")]
    Bar(vm_allocator::Error),
}

fn serial_out(out: &SerialOutput) -> Result<SerialOut, VmmError> {
    let sink: Box<dyn Write + Send> = match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => return Ok(SerialOut::discard()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| VmmError::SerialFile {
                    path: path.clone(),
                    err,
                })?,
        ),
    };
    Ok(SerialOut::new(sink))
}

/// The 64-bit PCI window: after RAM, aligned to 1 GiB.
fn mmio64_window(ram_size: u64) -> (u64, u64) {
    let ram_end = memory::ram_ranges(ram_size)
        .last()
        .map(|(a, l)| a.0 + l)
        .unwrap_or(0)
        .max(HIGH_RAM_START);
    let start = (ram_end + (1 << 30) - 1) & !((1 << 30) - 1);
    (start, start + MMIO64_SIZE)
}

/// The CPU template for `config` on this host, announcing the pvm one.
pub(crate) fn cpu_template(config: &VmConfig) -> CpuTemplate {
    let template = config
        .machine_config
        .cpu_template
        .unwrap_or_else(CpuTemplate::default_for_host);
    if cpuid::is_pvm_host() && template == CpuTemplate::Pvm {
        log::info!(
            "kvm_pvm (software KVM) host: CPU template 'pvm' hides cx16, popcnt, xsave/avx, pcid, \
             rdrand, rdseed, fsgsbase, smep, smap, invpcid, rdpid, rdtscp and PV hypercall features; \
             Linux guests also need: {}",
            cpuid::PVM_GUEST_CMDLINE
        );
    }
    template
}

/// A virtio device of the VM, as `GET /devices` reports it.
pub struct VirtioEntry {
    /// The drive (or interface) id.
    pub id: String,
    /// Its PCI slot on bus 0.
    pub slot: u8,
    /// The function.
    pub device: Arc<Mutex<VirtioPciDevice>>,
    /// The managed backend's process ID, if tern started it.
    pub backend_pid: Option<u32>,
    /// A virtio-scsi controller's LUNs, by LUN number; empty for other
    /// devices.
    pub luns: Vec<ScsiLun>,
    /// A managed virtio-scsi controller's control socket (LUN hot plug).
    pub scsi_control: Option<ScsiControl>,
    /// Hot plugged and the guest's driver has not set DRIVER_OK yet.
    pub plugging: bool,
    /// The guest was asked to let go of it (hot unplug under way).
    pub unplugging: bool,
}

/// A VM whose vCPUs are running (or paused).
pub struct Vmm {
    pub(crate) config: VmConfig,
    pub(crate) machine: machine::Machine,
    pub(crate) virtio: Vec<VirtioEntry>,
    pub(crate) vcpu_threads: Vec<JoinHandle<()>>,
    pub(crate) vcpu_fds: Vec<SharedVcpuFd>,
    /// The MSRs a snapshot saves.
    pub(crate) msr_list: Vec<u32>,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) counters: Arc<ExitCounters>,
    pub(crate) paused: bool,
    pub(crate) boot_duration: Duration,
    // Dropped last: the vCPU threads and devices use the VM and its memory
    // until the process ends.
    pub(crate) vm: Arc<kvm_ioctls::VmFd>,
    pub(crate) ram: memory::GuestRam,
    /// The log the vhost-user backends mark their writes in, while dirty
    /// pages are tracked.
    pub(crate) dirty_log: Option<Arc<DirtyLog>>,
    /// Dirty pages read but not yet sent (a migration's last pre-copy round).
    pub(crate) pending_dirty: Option<Vec<Vec<u64>>>,
    /// What a hot-plugged virtio-pci function needs from the VM.
    pub(crate) pci_env: PciEnv,
    /// The devices the reconnector thread watches.
    pub(crate) watched: Watched,
    pub(crate) _raw_terminal: Option<RawTerminal>,
}

impl Vmm {
    /// Builds the VM described by `config` and starts its vCPUs. The VM's
    /// end is reported through `exit`.
    pub fn boot(config: &VmConfig, exit: &ExitSender) -> Result<Self, VmmError> {
        let started = Instant::now();
        config.validate()?;
        let mut config = config.clone();
        let template = cpu_template(&config);
        config.machine_config.cpu_template = Some(template);

        // The backends start up while memory and the VM are made.
        prelaunch_backends(&config);
        let built = Self::build_for_boot(&config, template, exit);
        // Whatever was not taken (an error on the way) is stopped.
        BackendProcess::discard_prelaunched();
        let (kvm, vm_fd, ram, built) = built?;
        let msr_list = crate::kvm::state::msr_index_list(&kvm).unwrap_or_default();
        Self::start(config, built, vm_fd, ram, msr_list, false, started)
    }

    /// KVM, the VM with its memory, devices and vCPUs, for a boot.
    #[allow(clippy::type_complexity)]
    fn build_for_boot(
        config: &VmConfig,
        template: CpuTemplate,
        exit: &ExitSender,
    ) -> Result<
        (
            kvm_ioctls::Kvm,
            Arc<kvm_ioctls::VmFd>,
            memory::GuestRam,
            Built,
        ),
        VmmError,
    > {
        let mc = &config.machine_config;
        let kvm = vm::open_kvm()?;
        let ram = memory::create_guest_ram(mc.mem_size_mib, mc.huge_pages == HugePages::Huge2M)?;
        let vm_fd = Arc::new(vm::create_vm(
            &kvm,
            mc.vcpu_count,
            &ram.memory,
            mc.track_dirty_pages,
        )?);
        let built = build_rest(&kvm, &vm_fd, config, &ram, template, exit)?;
        Ok((kvm, vm_fd, ram, built))
    }

    /// Starts the vCPU threads of a built VM (paused first when `paused`:
    /// they park before their first KVM_RUN).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        config: VmConfig,
        built: Built,
        vm_fd: Arc<kvm_ioctls::VmFd>,
        ram: memory::GuestRam,
        msr_list: Vec<u32>,
        paused: bool,
        started: Instant,
    ) -> Result<Self, VmmError> {
        let (machine, virtio, vcpus, control, counters, dirty_log, pci_env) = built;
        let mut config = config;
        record_slots(&mut config, &virtio);
        {
            let mut hp = lock(&machine.hotplug);
            for v in &virtio {
                hp.set_present(v.slot);
            }
        }
        pause::install_kick_handler().map_err(VmmError::Signal)?;
        if paused {
            control.hold();
        }
        let raw_terminal = match config.serial {
            SerialOutput::Stdout => RawTerminal::enter(),
            _ => None,
        };
        let vcpu_fds = vcpus.iter().map(|v| v.fd().clone()).collect();
        let mut vcpu_threads = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            vcpu_threads.push(v.start()?);
        }
        if paused {
            // Returns once every vCPU has parked before its first run.
            control.pause(&vcpu_threads)?;
        }
        // Threads started after the vCPUs, whose first run (a restore's
        // time to running) should not wait for their start-up.
        let serial = machine.serial.clone();
        let _ = crate::spare_thread::spawn("stdin", "vmm", move || forward_stdin(serial));
        let watched = spawn_reconnector(&virtio);
        crate::kvm::warm::release_unused();
        let boot_duration = started.elapsed();
        log::debug!("VM built and started in {boot_duration:?}");
        Ok(Self {
            config,
            machine,
            virtio,
            vcpu_threads,
            vcpu_fds,
            msr_list,
            control,
            counters,
            paused,
            boot_duration,
            vm: vm_fd,
            ram,
            dirty_log,
            pending_dirty: None,
            pci_env,
            watched,
            _raw_terminal: raw_terminal,
        })
    }

    /// The effective configuration (the CPU template filled in).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU; they leave KVM_RUN and wait. Pausing a paused VM
    /// does nothing.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if !self.paused {
            self.control.pause(&self.vcpu_threads)?;
            self.paused = true;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&mut self) {
        self.control.resume();
        self.paused = false;
    }

    /// Presses Ctrl-Alt-Del on the i8042 keyboard.
    pub fn send_ctrl_alt_del(&self) {
        lock(&self.machine.i8042).send_ctrl_alt_del();
    }

    /// Every device of the machine, virtio devices with their live state:
    /// `plugging` from a hot plug until the guest's driver has the device
    /// running (DRIVER_OK; for a LUN, its first command), `unplugging` from
    /// an unplug request until the guest ejects it.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.refresh_lun_states();
        let mut all = self.machine.devices.clone();
        for v in &self.virtio {
            let dev = lock(&v.device);
            let lun_state = |l: &ScsiLun| {
                if l.plugging.load(Ordering::Relaxed) {
                    "plugging"
                } else {
                    "attached"
                }
            };
            all.push(DeviceInfo {
                id: v.id.clone(),
                kind: match dev.device_type() {
                    1 => "virtio-net",
                    8 => "virtio-scsi",
                    _ => "virtio-blk",
                },
                pci_address: Some(format!("0000:00:{:02x}.0", v.slot)),
                io_port: None,
                mmio_address: None,
                state: if v.unplugging {
                    "unplugging"
                } else if v.plugging && !dev.driver_ok() {
                    "plugging"
                } else {
                    dev.state()
                },
                backend: dev.backend(),
                backend_pid: dev.backend_pid().or(v.backend_pid),
                luns: (!v.luns.is_empty()).then(|| v.luns.iter().map(|l| l.id.clone()).collect()),
                scsi_luns: (!v.luns.is_empty()).then(|| {
                    v.luns
                        .iter()
                        .map(|l| machine::LunInfo {
                            id: l.id.clone(),
                            lun: l.lun,
                            state: lun_state(l),
                        })
                        .collect()
                }),
            });
        }
        all
    }

    /// Time from `boot` being called to the vCPUs running.
    pub fn boot_duration(&self) -> Duration {
        self.boot_duration
    }

    /// vCPU exit counts as JSON.
    pub fn exit_counts(&self) -> serde_json::Value {
        let c = &self.counters;
        serde_json::json!({
            "io": c.io.load(Ordering::Relaxed),
            "mmio": c.mmio.load(Ordering::Relaxed),
            "unhandled_io": c.unhandled_io.load(Ordering::Relaxed),
            "unhandled_mmio": c.unhandled_mmio.load(Ordering::Relaxed),
            "other": c.other.load(Ordering::Relaxed),
        })
    }

    /// Flushes console output (at the VM's end).
    pub fn flush_serial(&self) {
        lock(&self.machine.serial).flush();
    }
}

pub(crate) type Built = (
    machine::Machine,
    Vec<VirtioEntry>,
    Vec<Vcpu>,
    Arc<VcpuControl>,
    Arc<ExitCounters>,
    Option<Arc<DirtyLog>>,
    PciEnv,
);

/// How often devices whose backend went away look for a new one.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// Watches the vhost-user devices: one whose backend went away reconnects
/// when a backend listens on its socket again (a restarted external
/// backend), and its queues resume where the guest left them.
fn spawn_reconnector(virtio: &[VirtioEntry]) -> Watched {
    let watched: Watched = Arc::new(Mutex::new(
        virtio.iter().map(|v| Arc::downgrade(&v.device)).collect(),
    ));
    let list = Arc::downgrade(&watched);
    let _ = crate::spare_thread::spawn("vhost-reconnect", "vmm", move || loop {
        std::thread::sleep(RECONNECT_INTERVAL);
        // The VM is gone: so is the list.
        let Some(list) = list.upgrade() else { return };
        let devices: Vec<_> = {
            let mut l = lock(&list);
            // Unplugged devices drop out.
            l.retain(|d| d.strong_count() > 0);
            l.iter().filter_map(|d| d.upgrade()).collect()
        };
        drop(list);
        for d in devices {
            let mut dev = lock(&d);
            if dev.state() == "disconnected" {
                dev.try_reconnect();
            }
        }
    });
    watched
}

/// The devices the reconnector watches; hot plug adds to it.
pub(crate) type Watched = Arc<Mutex<Vec<std::sync::Weak<Mutex<VirtioPciDevice>>>>>;

/// The virtio-blk drives, root device first.
fn ordered_drives(config: &VmConfig) -> Vec<&DriveConfig> {
    let mut v: Vec<&DriveConfig> = config
        .drives
        .iter()
        .filter(|d| d.interface == DriveInterface::VirtioBlk)
        .collect();
    v.sort_by_key(|d| !d.is_root_device);
    v
}

/// The kernel command line, with `root=/dev/vda` for a root drive unless
/// the user named a root already (as Firecracker does).
fn effective_cmdline(config: &VmConfig) -> String {
    let base = config
        .boot_source
        .as_ref()
        .and_then(|b| b.boot_args.clone())
        .unwrap_or_default();
    match config.drives.iter().find(|d| d.is_root_device) {
        Some(d) if !base.split_whitespace().any(|w| w.starts_with("root=")) => format!(
            "{base} root=/dev/vda {}",
            if d.is_read_only { "ro" } else { "rw" }
        )
        .trim()
        .to_string(),
        _ => base,
    }
}

/// Puts a vhost-user device on bus 0 at `slot`, with a BAR from `bars`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attach(
    bars: &mut AddressAllocator,
    slot: u8,
    label: &str,
    id: &str,
    device: VhostUserDevice,
    backend_pid: Option<u32>,
    env: &PciEnv,
    machine: &machine::Machine,
) -> Result<VirtioEntry, VmmError> {
    let bar = bars
        .allocate(BAR_SIZE, BAR_SIZE, AllocPolicy::FirstMatch)
        .map_err(VmmError::Bar)?
        .start();
    let device = VirtioPciDevice::new(Box::new(device), bar, pci_intx_gsi(slot, 0), env.clone())
        .map_err(|err| VmmError::VirtioPci {
            drive: label.to_string(),
            err,
        })?;
    lock(&machine.pci)
        .add(slot, 0, device.clone())
        .map_err(|e| VmmError::Machine(machine::MachineError::Pci(e)))?;
    Ok(VirtioEntry {
        id: id.to_string(),
        slot,
        device,
        backend_pid,
        luns: Vec::new(),
        scsi_control: None,
        plugging: false,
        unplugging: false,
    })
}

/// The id of the virtio-scsi controller in `GET /devices`.
pub const SCSI_CONTROLLER_ID: &str = "scsi0";
/// The name of the managed tern-scsi's socket in the runtime directory (a
/// `.` so that it cannot be a drive's or NIC's id).
const SCSI_RUNTIME_ID: &str = "scsi.0";

/// The `--lun` value of tern-scsi for a managed virtio-scsi drive.
pub(crate) fn lun_arg(d: &DriveConfig) -> Result<String, VmmError> {
    let Some(path) = &d.path_on_host else {
        return Err(crate::config::ConfigError::Invalid(format!(
            "drive {} has no backend",
            d.drive_id
        ))
        .into());
    };
    let mut lun = format!(
        "{},format={},serial={}",
        path.display(),
        match d.format {
            DriveFormat::Raw => "raw",
            DriveFormat::Qcow2 => "qcow2",
        },
        d.serial.as_deref().unwrap_or(&d.drive_id)
    );
    if d.is_read_only {
        lun.push_str(",ro=on");
    }
    Ok(lun)
}

/// Starts (or connects to) the backend of the virtio-scsi controller whose
/// LUNs are `drives` (in LUN order) and puts it on bus 0 at `slot`.
fn build_scsi(
    config: &VmConfig,
    drives: &[&DriveConfig],
    slot: u8,
    bars: &mut AddressAllocator,
    env: &PciEnv,
    machine: &machine::Machine,
) -> Result<VirtioEntry, VmmError> {
    let ids: Vec<String> = drives.iter().map(|d| d.drive_id.clone()).collect();
    let numbers = assign_luns(drives);
    let label = format!("virtio-scsi drives {}", ids.join(", "));
    let requested = config.scsi_queues();
    let external = drives.first().and_then(|d| d.socket.clone());
    let mut control = None;
    let (socket, process) = match external {
        Some(s) => (s, None),
        None => {
            let queues = requested.unwrap_or(1);
            let control_path = crate::vhost_user::backend_process::runtime_dir()
                .join(format!("{SCSI_RUNTIME_ID}.ctl"));
            let pairs: Vec<(&DriveConfig, u16)> = drives
                .iter()
                .copied()
                .zip(numbers.iter().copied())
                .collect();
            let args = scsi_args(&pairs, queues, &control_path)?;
            let p = BackendProcess::start(&backend_binary("tern-scsi"), SCSI_RUNTIME_ID, &args)
                .map_err(|err| VmmError::Backend {
                    drive: label.clone(),
                    err,
                })?;
            control = Some(ScsiControl::new(control_path, p.shared_args(), queues));
            (p.socket().to_owned(), Some(p))
        }
    };
    let backend_pid = process.as_ref().map(BackendProcess::pid);
    // A managed backend serves what the drives ask (default 1); an
    // external one says itself how many queues it has.
    let request_queues = match (requested, process.is_some()) {
        (Some(n), _) => n,
        (None, true) => 1,
        (None, false) => crate::config::MAX_DRIVE_QUEUES,
    };
    let max_queues = SCSI_FIXED_QUEUES + usize::from(request_queues);
    let scsi = VhostUserDevice::scsi(&socket, max_queues, &env.mem, process).map_err(|err| {
        VmmError::VhostUser {
            drive: label.clone(),
            err,
        }
    })?;
    log::info!(
        "virtio-scsi controller {SCSI_CONTROLLER_ID}: LUNs {} ({} request queues, max_lun {}) at 00:{slot:02x}.0 via {}",
        ids.join(", "),
        scsi.scsi_request_queues(),
        scsi.scsi_max_lun(),
        socket.display()
    );
    let mut entry = attach(
        bars,
        slot,
        &label,
        SCSI_CONTROLLER_ID,
        scsi,
        backend_pid,
        env,
        machine,
    )?;
    let mut luns: Vec<ScsiLun> = ids
        .iter()
        .zip(&numbers)
        .map(|(id, n)| ScsiLun::new(id, *n, false))
        .collect();
    luns.sort_by_key(|l| l.lun);
    entry.luns = luns;
    entry.scsi_control = control;
    Ok(entry)
}

/// The virtio-blk queues of drive `d`: a managed backend serves what the
/// drive asks (default 1); an external one says itself how many it has.
fn blk_queues(d: &DriveConfig) -> usize {
    match (&d.socket, d.num_queues) {
        (_, Some(n)) => usize::from(n),
        (Some(_), None) => usize::from(crate::config::MAX_DRIVE_QUEUES),
        (None, None) => 1,
    }
}

/// tern-blk's arguments for drive `d` (its image at `path`).
fn blk_backend_args(d: &DriveConfig, path: &std::path::Path, queues: usize) -> Vec<String> {
    let mut args = vec![
        "--image".to_string(),
        path.display().to_string(),
        "--format".into(),
        match d.format {
            DriveFormat::Raw => "raw".into(),
            DriveFormat::Qcow2 => "qcow2".into(),
        },
        "--queues".into(),
        queues.to_string(),
        "--serial".into(),
        d.serial.clone().unwrap_or_else(|| d.drive_id.clone()),
    ];
    if d.is_read_only {
        args.push("--readonly".into());
    }
    if d.cache == DriveCache::Direct {
        args.push("--direct".into());
    }
    args
}

/// tern-net's arguments for NIC `n` on `tap`.
fn net_backend_args(n: &crate::config::NetConfig, tap: &str, pairs: usize) -> Vec<String> {
    let mut args = vec![
        "--tap".to_string(),
        tap.to_string(),
        "--mac".into(),
        crate::config::format_mac(&n.mac()),
        "--queues".into(),
        pairs.to_string(),
    ];
    if let Some(mtu) = n.mtu {
        args.push("--mtu".into());
        args.push(mtu.to_string());
    }
    args
}

/// Starts the managed tern-blk and tern-net backends of `config` without
/// waiting, so they come up while the VM is created; building the devices
/// then takes them (virtio-scsi's single backend is started as before).
pub(crate) fn prelaunch_backends(config: &VmConfig) {
    // A build begins: the spare threads stocked so far are what it gets.
    crate::spare_thread::stop_stocking();
    for d in config
        .drives
        .iter()
        .filter(|d| d.interface != crate::config::DriveInterface::VirtioScsi)
    {
        if let (None, Some(path)) = (&d.socket, &d.path_on_host) {
            let queues = blk_queues(d);
            BackendProcess::prelaunch(
                &backend_binary("tern-blk"),
                &d.drive_id,
                &blk_backend_args(d, path, queues),
            );
        }
    }
    for n in &config.network_interfaces {
        if let (None, Some(tap)) = (&n.socket, &n.host_dev_name) {
            let pairs = usize::from(n.num_queues.unwrap_or(1));
            BackendProcess::prelaunch(
                &backend_binary("tern-net"),
                &n.iface_id,
                &net_backend_args(n, tap, pairs),
            );
        }
    }
}

/// A drive's virtio-blk device: its managed backend started (or its
/// external one connected) and the vhost-user connection made.
pub(crate) fn blk_function(
    d: &DriveConfig,
    slot: u8,
    env: &PciEnv,
) -> Result<(VhostUserDevice, Option<u32>), VmmError> {
    let queues = blk_queues(d);
    let (socket, process) = match (&d.socket, &d.path_on_host) {
        (Some(s), _) => (s.clone(), None),
        (None, Some(path)) => {
            let args = blk_backend_args(d, path, queues);
            let p = BackendProcess::start(&backend_binary("tern-blk"), &d.drive_id, &args)
                .map_err(|err| VmmError::Backend {
                    drive: format!("drive {}", d.drive_id),
                    err,
                })?;
            (p.socket().to_owned(), Some(p))
        }
        (None, None) => {
            return Err(crate::config::ConfigError::Invalid(format!(
                "drive {} has no backend",
                d.drive_id
            ))
            .into())
        }
    };
    let backend_pid = process.as_ref().map(BackendProcess::pid);
    let blk = VhostUserDevice::blk(&socket, queues, &env.mem, process).map_err(|err| {
        VmmError::VhostUser {
            drive: format!("drive {}", d.drive_id),
            err,
        }
    })?;
    log::info!(
        "drive {}: {} sectors at 00:{slot:02x}.0 via {}",
        d.drive_id,
        blk.capacity(),
        socket.display()
    );
    Ok((blk, backend_pid))
}

/// A NIC's virtio-net device, as [`blk_function`] for drives.
pub(crate) fn net_function(
    n: &crate::config::NetConfig,
    slot: u8,
    env: &PciEnv,
) -> Result<(VhostUserDevice, Option<u32>), VmmError> {
    let pairs = usize::from(n.num_queues.unwrap_or(1));
    let (socket, process) = match (&n.socket, &n.host_dev_name) {
        (Some(s), _) => (s.clone(), None),
        (None, Some(tap)) => {
            let args = net_backend_args(n, tap, pairs);
            let p = BackendProcess::start(&backend_binary("tern-net"), &n.iface_id, &args)
                .map_err(|err| VmmError::Backend {
                    drive: format!("network interface {}", n.iface_id),
                    err,
                })?;
            (p.socket().to_owned(), Some(p))
        }
        (None, None) => {
            return Err(crate::config::ConfigError::Invalid(format!(
                "network interface {} has no backend",
                n.iface_id
            ))
            .into())
        }
    };
    let backend_pid = process.as_ref().map(BackendProcess::pid);
    // rx and tx per pair, and the control queue.
    let max_queues =
        2 * usize::from(n.num_queues.unwrap_or(crate::config::MAX_NET_QUEUE_PAIRS)) + 1;
    let net = VhostUserDevice::net(&socket, max_queues, &env.mem, process).map_err(|err| {
        VmmError::VhostUser {
            drive: format!("network interface {}", n.iface_id),
            err,
        }
    })?;
    log::info!(
        "network interface {}: mac {} at 00:{slot:02x}.0 via {}",
        n.iface_id,
        net.mac()
            .map(|m| crate::config::format_mac(&m))
            .unwrap_or_default(),
        socket.display()
    );
    Ok((net, backend_pid))
}

/// Writes the slot each device got into its configuration, so snapshots
/// and migrations (which rebuild the VM from it) put it back there. A
/// virtio-scsi controller's slot goes on its first LUN's drive.
pub(crate) fn record_slots(config: &mut VmConfig, virtio: &[VirtioEntry]) {
    for v in virtio {
        if !v.luns.is_empty() {
            // The controller's slot goes on its first LUN in configuration
            // order (the one a rebuild takes it from), and each drive
            // keeps its LUN number.
            let mut first = true;
            for d in config.drives.iter_mut() {
                let Some(l) = v.luns.iter().find(|l| l.id == d.drive_id) else {
                    continue;
                };
                d.lun = Some(l.lun);
                if first {
                    d.pci_slot = Some(v.slot);
                    first = false;
                }
            }
            continue;
        }
        if let Some(d) = config.drives.iter_mut().find(|d| d.drive_id == v.id) {
            d.pci_slot = Some(v.slot);
        } else if let Some(n) = config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == v.id)
        {
            n.pci_slot = Some(v.slot);
        }
    }
}

/// Hands out PCI slots on bus 0: a device's pinned slot, or the lowest
/// one nobody pinned or took.
pub(crate) struct SlotPicker {
    taken: u32,
}

impl SlotPicker {
    /// Slots pinned in `config` are reserved for their devices.
    pub(crate) fn new(config: &VmConfig) -> Self {
        let mut taken = 0u32;
        let pins = config
            .drives
            .iter()
            .map(|d| d.pci_slot)
            .chain(config.network_interfaces.iter().map(|n| n.pci_slot));
        for slot in pins.flatten() {
            taken |= 1 << slot;
        }
        Self { taken }
    }

    /// Slots already used by `entries` are taken.
    pub(crate) fn in_use(entries: &[VirtioEntry]) -> Self {
        Self {
            taken: entries.iter().fold(0, |t, e| t | 1 << e.slot),
        }
    }

    /// `pinned` (already reserved), or the lowest free slot.
    pub(crate) fn pick(&mut self, pinned: Option<u8>) -> Result<u8, VmmError> {
        if let Some(slot) = pinned {
            return Ok(slot);
        }
        let slot = (PCI_FIRST_DEVICE_SLOT..=PCI_LAST_DEVICE_SLOT)
            .find(|s| self.taken & (1 << s) == 0)
            .ok_or(VmmError::NoFreeSlot)?;
        self.taken |= 1 << slot;
        Ok(slot)
    }
}

/// Starts (or connects to) each drive's and NIC's backend and puts a
/// virtio-blk or virtio-net function for it on the PCI bus: virtio-blk
/// drives first (a root drive in slot 1), then the virtio-scsi controller
/// with every virtio-scsi drive as a LUN, then NICs.
fn build_drives(
    config: &VmConfig,
    env: &PciEnv,
    machine: &machine::Machine,
) -> Result<Vec<VirtioEntry>, VmmError> {
    let mut bars =
        AddressAllocator::new(MMIO32_START, MMIO32_END - MMIO32_START).map_err(VmmError::Bar)?;
    let mut entries = Vec::new();
    let mut slots = SlotPicker::new(config);
    for d in ordered_drives(config) {
        let slot = slots.pick(d.pci_slot)?;
        let (blk, backend_pid) = blk_function(d, slot, env)?;
        let label = format!("drive {}", d.drive_id);
        entries.push(attach(
            &mut bars,
            slot,
            &label,
            &d.drive_id,
            blk,
            backend_pid,
            env,
            machine,
        )?);
    }
    let scsi = config.scsi_drives();
    if !scsi.is_empty() {
        let slot = slots.pick(scsi.first().and_then(|d| d.pci_slot))?;
        entries.push(build_scsi(config, &scsi, slot, &mut bars, env, machine)?);
    }
    for n in &config.network_interfaces {
        let slot = slots.pick(n.pci_slot)?;
        let (net, backend_pid) = net_function(n, slot, env)?;
        let label = format!("network interface {}", n.iface_id);
        entries.push(attach(
            &mut bars,
            slot,
            &label,
            &n.iface_id,
            net,
            backend_pid,
            env,
            machine,
        )?);
    }
    Ok(entries)
}

/// Everything but the memory slots: devices, ACPI, kernel, vCPUs.
fn build_rest(
    kvm: &kvm_ioctls::Kvm,
    vm_fd: &Arc<kvm_ioctls::VmFd>,
    config: &VmConfig,
    ram: &memory::GuestRam,
    template: CpuTemplate,
    exit: &ExitSender,
) -> Result<Built, VmmError> {
    let mc = &config.machine_config;
    let Some(boot_source) = config.boot_source.as_ref() else {
        return Err(crate::config::ConfigError::Invalid("no kernel given".into()).into());
    };
    let built = build_platform(kvm, vm_fd, config, ram, template, exit)?;
    let rsdp = acpi::create_acpi_tables(
        &ram.memory,
        &AcpiConfig {
            num_cpus: mc.vcpu_count,
            mmio64: mmio64_window(ram.size),
        },
    )?;
    let cmdline = effective_cmdline(config);
    let spec = BootSpec {
        kernel: &boot_source.kernel_image_path,
        initrd: boot_source.initrd_path.as_deref(),
        cmdline: &cmdline,
        ram_size: ram.size,
        rsdp,
    };
    let entry = boot::prepare(&ram.memory, &spec)?;
    if let Some(bsp) = built.2.first() {
        regs::setup_boot_vcpu(&crate::kvm::vcpu::lock_fd(bsp.fd()), &ram.memory, entry)?;
    }
    Ok(built)
}

/// The machine, its devices (backends started or connected) and the
/// vCPUs (CPUID, MSRs, LAPIC): what a boot and a restore both need.
pub(crate) fn build_platform(
    kvm: &kvm_ioctls::Kvm,
    vm_fd: &Arc<kvm_ioctls::VmFd>,
    config: &VmConfig,
    ram: &memory::GuestRam,
    template: CpuTemplate,
    exit: &ExitSender,
) -> Result<Built, VmmError> {
    let mc = &config.machine_config;
    let serial_out = serial_out(&config.serial)?;
    let machine = machine::build(vm_fd, exit, serial_out)?;
    let env = PciEnv {
        vm: vm_fd.clone(),
        mmio: machine.mmio.clone(),
        router: Arc::new(GsiRouter::new(vm_fd.clone())),
        mem: ram.memory.clone(),
    };
    // The vCPUs first: a restore's backends are still starting up, and
    // device building waits for their sockets.
    let base_cpuid = crate::kvm::warm::supported_cpuid(kvm)?;
    let control = Arc::new(VcpuControl::default());
    let counters = Arc::new(ExitCounters::default());
    let shared = VcpuShared {
        pio: machine.pio.clone(),
        mmio: machine.mmio.clone(),
        exit: exit.clone(),
        counters: counters.clone(),
        control: control.clone(),
    };
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for i in 0..mc.vcpu_count {
        vcpus.push(Vcpu::new(
            vm_fd,
            i,
            mc.vcpu_count,
            &base_cpuid,
            template,
            shared.clone(),
        )?);
    }
    let virtio = build_drives(config, &env, &machine)?;
    // The backends log what they write for diff snapshots and migration.
    let dirty_log = if mc.track_dirty_pages && !virtio.is_empty() {
        let log = Arc::new(DirtyLog::new(&ram.memory).map_err(VmmError::DirtyLog)?);
        for v in &virtio {
            lock(&v.device)
                .set_dirty_log(Some(log.clone()))
                .map_err(|e| VmmError::VirtioPci {
                    drive: v.id.clone(),
                    err: crate::devices::virtio::pci::VirtioPciError::Log(e.to_string()),
                })?;
        }
        Some(log)
    } else {
        None
    };

    Ok((machine, virtio, vcpus, control, counters, dirty_log, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio64_follows_ram() {
        assert_eq!(mmio64_window(256 << 20).0, 1 << 32);
        assert_eq!(mmio64_window(6 << 30).0, 8 << 30);
    }
}
