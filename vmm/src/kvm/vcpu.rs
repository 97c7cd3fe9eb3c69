//! vCPUs: per-vCPU setup (CPUID, MSRs, FPU, LAPIC) and the KVM_RUN loop
//! that sends port and MMIO exits to the device buses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_lapic_state, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::cpuid::{self, CpuTemplate};
use super::msrs;
use super::pause::VcpuControl;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSender};
use crate::spare_thread::SpareThread;

/// Errors creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: {what} failed: {err}")]
    Kvm {
        /// vCPU index.
        index: u32,
        /// Operation.
        what: &'static str,
        /// KVM error.
        err: kvm_ioctls::Error,
    },
    /// MSR setup failed.
    #[error("vCPU {0}: {1}")]
    Msr(u32, msrs::MsrError),
    /// The vCPU thread could not be started.
    #[error("cannot start vCPU thread {0}: {1}")]
    Thread(u32, std::io::Error),
}

/// Counters of vCPU exits by kind, shared by all vCPUs (read by metrics).
#[derive(Default, Debug)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Port accesses nothing claimed.
    pub unhandled_io: AtomicU64,
    /// MMIO accesses nothing claimed.
    pub unhandled_mmio: AtomicU64,
    /// Other exits (HLT, IRQ window, interrupted runs).
    pub other: AtomicU64,
}

/// What a vCPU thread needs to run.
pub struct Vcpu {
    fd: SharedVcpuFd,
    index: u32,
    shared: VcpuShared,
    /// Its thread, started with the vCPU and waiting for [`Vcpu::start`].
    thread: Option<SpareThread>,
}

/// A vCPU's KVM handle, shared between its thread (which holds the lock only
/// around each KVM_RUN and exit) and the VMM thread, which saves and
/// restores its state while the vCPU is paused.
pub type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

/// Locks a vCPU handle; a poisoned lock (a vCPU thread that panicked) still
/// gives the handle, whose state KVM keeps consistent.
pub fn lock_fd(fd: &SharedVcpuFd) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every vCPU of a VM shares: the buses, the exit channel, the exit
/// counters and the pause control.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the VM's end is reported.
    pub exit: ExitSender,
    /// Exit counters.
    pub counters: Arc<ExitCounters>,
    /// Pause and resume.
    pub control: Arc<VcpuControl>,
}

/// Offsets of the LAPIC's LVT LINT0/LINT1 registers and the delivery modes
/// the PC wiring expects: LINT0 is the 8259's ExtINT, LINT1 the NMI.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// For an emulation failure whose data carries the instruction (flag bit
/// 0 of the first word, then a size byte and up to 15 bytes, as KVM lays
/// out `emulation_failure`), the bytes as hex.
fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> Option<String> {
    const EMULATION_FAILURE: u32 = 1;
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    if suberror != EMULATION_FAILURE || data.len() < 2 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let size = usize::from(*raw.first()?).min(15).min(raw.len() - 1);
    Some(
        raw[1..=size]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The guest's instruction pointer, for error messages.
fn rip(fd: &VcpuFd) -> String {
    match fd.get_regs() {
        Ok(r) => format!("{:#x}", r.rip),
        Err(e) => format!("unknown ({e})"),
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `count` with its CPUID, MSRs, FPU and LAPIC.
    pub fn new(
        vm: &VmFd,
        index: u32,
        count: u32,
        base_cpuid: &CpuId,
        template: CpuTemplate,
        shared: VcpuShared,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| move |err| VcpuError::Kvm { index, what, err };
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(base_cpuid, template, index, count);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let refused = msrs::setup_msrs(&fd).map_err(|e| VcpuError::Msr(index, e))?;
        if !refused.is_empty() && index == 0 {
            log::warn!("this host's KVM refused boot MSRs {refused:#x?}; continuing without them");
        }
        super::regs::setup_fpu(&fd).map_err(|e| match e {
            super::regs::RegsError::Kvm { err, .. } => VcpuError::Kvm {
                index,
                what: "KVM_SET_FPU",
                err,
            },
            _ => VcpuError::Kvm {
                index,
                what: "KVM_SET_FPU",
                err: kvm_ioctls::Error::new(libc::EINVAL),
            },
        })?;
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
        );
        fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        let thread = SpareThread::get(format!("vcpu{index}"), "vcpu")
            .map_err(|e| VcpuError::Thread(index, e))?;
        Ok(Self {
            fd: Arc::new(Mutex::new(fd)),
            index,
            shared,
            thread: Some(thread),
        })
    }

    /// The KVM vCPU, for boot register setup and state save/restore.
    pub fn fd(&self) -> &SharedVcpuFd {
        &self.fd
    }

    /// Starts the vCPU's thread. It runs until the VM ends.
    pub fn start(mut self) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let thread = match self.thread.take() {
            Some(t) => t,
            None => SpareThread::get(format!("vcpu{}", self.index), "vcpu")
                .map_err(|e| VcpuError::Thread(self.index, e))?,
        };
        Ok(thread.run(move || self.run()))
    }

    fn fail(&self, message: String) {
        self.shared.exit.send(ExitReason::VcpuError {
            vcpu: self.index,
            message,
        });
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR from the kvm_run area.
    fn internal_error(fd: &mut VcpuFd) -> String {
        let rip = rip(fd);
        let run = fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the one KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "emulation failure: the host's KVM could not emulate a guest instruction",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            4 => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let detail = match emulation_failure_bytes(internal.suberror, &internal.data[..n]) {
            Some(bytes) => format!("instruction bytes [{bytes}]"),
            None => {
                let data: Vec<String> = internal.data[..n]
                    .iter()
                    .map(|d| format!("{d:#x}"))
                    .collect();
                format!("data [{}]", data.join(", "))
            }
        };
        let hint = if cpuid::is_pvm_host() {
            " (kvm_pvm host: use --cpu-template pvm and the kernel options in docs/pvm.md)"
        } else {
            ""
        };
        format!(
            "KVM_EXIT_INTERNAL_ERROR suberror {} ({what}) at guest RIP {rip}, {detail}{hint}",
            internal.suberror
        )
    }

    fn run(self) {
        loop {
            self.shared.control.park_if_paused();
            if self.shared.exit.is_stopping() {
                return;
            }
            let mut fd = lock_fd(&self.fd);
            let result = fd.run();
            match result {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.shared.counters.io.fetch_add(1, Ordering::Relaxed);
                    if !self.shared.pio.read(u64::from(port), data) {
                        self.shared
                            .counters
                            .unhandled_io
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.shared.counters.io.fetch_add(1, Ordering::Relaxed);
                    if !self.shared.pio.write(u64::from(port), data) {
                        self.shared
                            .counters
                            .unhandled_io
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !self.shared.mmio.read(addr, data) {
                        self.shared
                            .counters
                            .unhandled_mmio
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.shared.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    if !self.shared.mmio.write(addr, data) {
                        self.shared
                            .counters
                            .unhandled_mmio
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    self.shared.exit.send(ExitReason::TripleFault);
                    return;
                }
                Ok(VcpuExit::SystemEvent(kind, data)) => {
                    match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => self.shared.exit.send(ExitReason::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => {
                            self.shared.exit.send(ExitReason::Reset("KVM system event"))
                        }
                        KVM_SYSTEM_EVENT_CRASH => {
                            let msg = format!("guest crash event {data:x?}");
                            self.fail(msg)
                        }
                        other => {
                            let msg = format!("unknown KVM system event {other}");
                            self.fail(msg)
                        }
                    }
                    return;
                }
                Ok(VcpuExit::InternalError) => {
                    drop(result);
                    let msg = Self::internal_error(&mut fd);
                    self.fail(msg);
                    return;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let msg = format!(
                        "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu}) at guest RIP {}",
                        rip(&fd)
                    );
                    self.fail(msg);
                    return;
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {
                    self.shared.counters.other.fetch_add(1, Ordering::Relaxed);
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    let msg = format!("unexpected exit {what} at guest RIP {}", rip(&fd));
                    self.fail(msg);
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.shared.counters.other.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let msg = format!("KVM_RUN failed: {e} at guest RIP {}", rip(&fd));
                    self.fail(msg);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_emulation_failure_bytes() {
        let data = [0x1, 0x41c3_c0b8_0f48_f30f, 0x20bb_53fd_8948_5554];
        let bytes = emulation_failure_bytes(1, &data).unwrap();
        assert!(bytes.starts_with("f3 48 0f b8 c0"), "{bytes}");
        assert_eq!(bytes.split(' ').count(), 15);
        assert!(emulation_failure_bytes(2, &data).is_none());
        assert!(emulation_failure_bytes(1, &[0]).is_none());
    }
}
