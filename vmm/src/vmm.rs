//! Putting a VM together and running it to its end.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use crate::boot::{self, BootSpec};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::bus::lock;
use crate::devices::serial::{forward_stdin, SerialOut};
use crate::exit::{exit_channel, ExitReason};
use crate::kvm::cpuid::{self, CpuTemplate};
use crate::kvm::regs;
use crate::kvm::vcpu::{ExitCounters, Vcpu};
use crate::kvm::vm;
use crate::machine::layout::MMIO64_SIZE;
use crate::machine::q35::acpi::{self, AcpiConfig};
use crate::machine::{self, layout::HIGH_RAM_START};
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

/// The end of the 64-bit PCI window: after RAM, aligned to 1 GiB.
fn mmio64_window(ram_size: u64) -> (u64, u64) {
    let ram_end = memory::ram_ranges(ram_size)
        .last()
        .map(|(a, l)| a.0 + l)
        .unwrap_or(0)
        .max(HIGH_RAM_START);
    let start = (ram_end + (1 << 30) - 1) & !((1 << 30) - 1);
    (start, start + MMIO64_SIZE)
}

/// Builds the VM described by `config`, runs it until it ends, and returns
/// why it ended.
pub fn run(config: &VmConfig) -> Result<ExitReason, VmmError> {
    let started = Instant::now();
    config.validate()?;
    let mc = &config.machine_config;
    let template = mc
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

    let kvm = vm::open_kvm()?;
    let vm_fd = vm::create_vm(&kvm, mc.vcpu_count)?;
    let ram = memory::create_guest_ram(mc.mem_size_mib)?;
    // Registering a memory slot waits for an SRCU grace period in the host
    // kernel (milliseconds, whatever the size); nothing else needs the slot
    // until the vCPUs run, so the rest of the set-up overlaps it.
    let (memory_registered, built) = std::thread::scope(|scope| {
        let registering = scope.spawn(|| vm::register_memory(&vm_fd, &ram.memory));
        let built = build_rest(&kvm, &vm_fd, config, &ram, template);
        let registered = registering.join().unwrap_or_else(|_| {
            Err(vm::VmError::Kvm {
                what: "KVM_SET_USER_MEMORY_REGION thread",
                err: kvm_ioctls::Error::new(libc::EIO),
            })
        });
        (registered, built)
    });
    memory_registered?;
    let Built {
        machine,
        vcpus,
        exit_rx,
    } = built?;
    log::debug!("VM built in {:?}", started.elapsed());

    let _raw_terminal = match config.serial {
        SerialOutput::Stdout => RawTerminal::enter(),
        _ => None,
    };
    let serial = machine.serial.clone();
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || forward_stdin(serial));
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(v.start()?);
    }
    // The first reason wins; the sender side stops every vCPU.
    let reason = exit_rx.recv().unwrap_or(ExitReason::VcpuError {
        vcpu: 0,
        message: "every vCPU thread ended without a reason".into(),
    });
    lock(&machine.serial).flush();
    // Keep the VM's memory and file descriptors alive until here: vCPU
    // threads may still be inside KVM_RUN and are ended with the process.
    std::mem::forget(handles);
    std::mem::forget(vm_fd);
    std::mem::forget(ram);
    Ok(reason)
}

/// A VM ready to run, but for its memory slots.
struct Built {
    machine: machine::Machine,
    vcpus: Vec<Vcpu>,
    exit_rx: std::sync::mpsc::Receiver<ExitReason>,
}

/// Everything but the memory slots: devices, ACPI, kernel, vCPUs.
fn build_rest(
    kvm: &kvm_ioctls::Kvm,
    vm_fd: &kvm_ioctls::VmFd,
    config: &VmConfig,
    ram: &memory::GuestRam,
    template: CpuTemplate,
) -> Result<Built, VmmError> {
    let mc = &config.machine_config;
    let Some(boot_source) = config.boot_source.as_ref() else {
        return Err(crate::config::ConfigError::Invalid("no kernel given".into()).into());
    };

    let (exit_tx, exit_rx) = exit_channel();
    let serial_out = SerialOut::new(serial_sink(&config.serial)?);
    let machine = machine::build(vm_fd, &exit_tx, serial_out)?;

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
    let counters = Arc::new(ExitCounters::default());
    let mut vcpus = Vec::with_capacity(mc.vcpu_count as usize);
    for i in 0..mc.vcpu_count {
        vcpus.push(Vcpu::new(
            vm_fd,
            i,
            mc.vcpu_count,
            &base_cpuid,
            template,
            machine.pio.clone(),
            machine.mmio.clone(),
            exit_tx.clone(),
            counters.clone(),
        )?);
    }
    if let Some(bsp) = vcpus.first() {
        regs::setup_boot_vcpu(bsp.fd(), &ram.memory, entry)?;
    }
    Ok(Built {
        machine,
        vcpus,
        exit_rx,
    })
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
