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
use crate::config::{HugePages, SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::devices::serial::{forward_stdin, SerialOut};
use crate::exit::ExitSender;
use crate::kvm::cpuid::{self, CpuTemplate};
use crate::kvm::pause::{self, PauseError, VcpuControl};
use crate::kvm::regs;
use crate::kvm::vcpu::{ExitCounters, Vcpu, VcpuShared};
use crate::kvm::vm;
use crate::machine::layout::MMIO64_SIZE;
use crate::machine::q35::acpi::{self, AcpiConfig};
use crate::machine::{self, layout::HIGH_RAM_START, DeviceInfo};
use crate::memory;
use crate::terminal::RawTerminal;

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
}

fn serial_sink(out: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
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
    })
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
fn cpu_template(config: &VmConfig) -> CpuTemplate {
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

/// A VM whose vCPUs are running (or paused).
pub struct Vmm {
    config: VmConfig,
    machine: machine::Machine,
    vcpu_threads: Vec<JoinHandle<()>>,
    control: Arc<VcpuControl>,
    counters: Arc<ExitCounters>,
    paused: bool,
    boot_duration: Duration,
    // Dropped last: the vCPU threads and devices use the VM and its memory
    // until the process ends.
    _vm: kvm_ioctls::VmFd,
    _ram: memory::GuestRam,
    _raw_terminal: Option<RawTerminal>,
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
        let mc = &config.machine_config;

        let kvm = vm::open_kvm()?;
        let vm_fd = vm::create_vm(&kvm, mc.vcpu_count)?;
        let ram = memory::create_guest_ram(mc.mem_size_mib, mc.huge_pages == HugePages::Huge2M)?;
        // Registering a memory slot waits for an SRCU grace period in the
        // host kernel (milliseconds, whatever the size); nothing else needs
        // the slot until the vCPUs run, so the rest of the set-up overlaps it.
        let (registered, built) = std::thread::scope(|scope| {
            let registering = scope.spawn(|| vm::register_memory(&vm_fd, &ram.memory));
            let built = build_rest(&kvm, &vm_fd, &config, &ram, template, exit);
            let registered = registering.join().unwrap_or_else(|_| {
                Err(vm::VmError::Kvm {
                    what: "KVM_SET_USER_MEMORY_REGION thread",
                    err: kvm_ioctls::Error::new(libc::EIO),
                })
            });
            (registered, built)
        });
        registered?;
        let (machine, vcpus, control, counters) = built?;

        pause::install_kick_handler().map_err(VmmError::Signal)?;
        let raw_terminal = match config.serial {
            SerialOutput::Stdout => RawTerminal::enter(),
            _ => None,
        };
        let serial = machine.serial.clone();
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || forward_stdin(serial));
        let mut vcpu_threads = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            vcpu_threads.push(v.start()?);
        }
        let boot_duration = started.elapsed();
        log::debug!("VM built and started in {boot_duration:?}");
        Ok(Self {
            config,
            machine,
            vcpu_threads,
            control,
            counters,
            paused: false,
            boot_duration,
            _vm: vm_fd,
            _ram: ram,
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

    /// Every device of the machine.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.machine.devices
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

type Built = (
    machine::Machine,
    Vec<Vcpu>,
    Arc<VcpuControl>,
    Arc<ExitCounters>,
);

/// Everything but the memory slots: devices, ACPI, kernel, vCPUs.
fn build_rest(
    kvm: &kvm_ioctls::Kvm,
    vm_fd: &kvm_ioctls::VmFd,
    config: &VmConfig,
    ram: &memory::GuestRam,
    template: CpuTemplate,
    exit: &ExitSender,
) -> Result<Built, VmmError> {
    let mc = &config.machine_config;
    let Some(boot_source) = config.boot_source.as_ref() else {
        return Err(crate::config::ConfigError::Invalid("no kernel given".into()).into());
    };
    let serial_out = SerialOut::new(serial_sink(&config.serial)?);
    let machine = machine::build(vm_fd, exit, serial_out)?;

    let rsdp = acpi::create_acpi_tables(
        &ram.memory,
        &AcpiConfig {
            num_cpus: mc.vcpu_count,
            mmio64: mmio64_window(ram.size),
        },
    )?;
    let spec = BootSpec {
        kernel: &boot_source.kernel_image_path,
        initrd: boot_source.initrd_path.as_deref(),
        cmdline: boot_source.boot_args.as_deref().unwrap_or(""),
        ram_size: ram.size,
        rsdp,
    };
    let entry = boot::prepare(&ram.memory, &spec)?;

    let base_cpuid = cpuid::supported(kvm)?;
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
    if let Some(bsp) = vcpus.first() {
        regs::setup_boot_vcpu(bsp.fd(), &ram.memory, entry)?;
    }
    Ok((machine, vcpus, control, counters))
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
