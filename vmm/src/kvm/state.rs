//! KVM state for snapshots and migration: each vCPU's architectural state
//! and the VM-wide interrupt controllers, PIT and clock. Saved while the
//! vCPUs are paused; restored into a fresh VM before its vCPUs first run.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// The MSR list could not be built.
    #[error("cannot build an MSR list of {0} entries")]
    MsrList(usize),
    /// The saved floating-point state has the wrong size.
    #[error("saved FPU state is {0} bytes, expected {1}")]
    FpuSize(usize, usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |err| StateError::Kvm { what, err }
}

/// MSRs KVM would let a guest change but that tern does not carry across a
/// snapshot: IA32_ARCH_CAPABILITIES (0x10a) is refused on some hosts
/// (kvm_pvm) and KVM derives it from the host anyway.
const MSRS_NOT_SAVED: &[u32] = &[0x10a];
/// MSR_IA32_TSC_DEADLINE: it must follow the LAPIC (set after it).
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Extended state, when KVM_GET_XSAVE works.
    pub xsave: Option<kvm_xsave>,
    /// Legacy FPU/SSE state (raw `kvm_fpu`), when XSAVE does not.
    pub fpu: Option<Vec<u8>>,
    /// XCR0, when the host has XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM reports and could read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted or waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// The guest TSC frequency.
    pub tsc_khz: Option<u32>,
}

/// VM-wide interrupt controllers, PIT and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

/// The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST),
/// without those tern leaves alone.
pub fn msr_index_list(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| !MSRS_NOT_SAVED.contains(i))
        .collect())
}

fn msrs_of(entries: &[(u32, u64)]) -> Result<Msrs, StateError> {
    let v: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&v).map_err(|_| StateError::MsrList(v.len()))
}

/// Reads the MSRs in `indices`, skipping any KVM refuses (KVM_GET_MSRS
/// stops at the first MSR it cannot read and says how many it did).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<(u32, u64)> = rest.iter().take(255).map(|&i| (i, 0)).collect();
        let mut msrs = msrs_of(&chunk)?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Skip the one that failed, if any.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Writes MSRs, skipping (and logging) any KVM refuses.
fn write_msrs(fd: &VcpuFd, entries: &[(u32, u64)]) -> Result<(), StateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk: Vec<(u32, u64)> = rest.iter().take(255).copied().collect();
        let n = fd
            .set_msrs(&msrs_of(&chunk)?)
            .map_err(kvm("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            log::debug!("KVM refused MSR {:#x} on restore; skipped", chunk[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(())
}

fn fpu_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: kvm_fpu is a plain C struct of integers and byte arrays with
    // no padding that matters; viewing it as bytes reads initialised memory
    // of exactly its size.
    unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    }
    .to_vec()
}

fn fpu_from_bytes(b: &[u8]) -> Result<kvm_fpu, StateError> {
    let size = std::mem::size_of::<kvm_fpu>();
    if b.len() != size {
        return Err(StateError::FpuSize(b.len(), size));
    }
    let mut fpu = kvm_fpu::default();
    // SAFETY: `b` has exactly size_of::<kvm_fpu>() bytes and every bit
    // pattern is a valid kvm_fpu (integers and byte arrays only).
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut fpu as *mut kvm_fpu).cast::<u8>(), size)
    };
    Ok(fpu)
}

/// Saves a paused vCPU's state.
pub fn save_vcpu(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let (xsave, fpu) = match fd.get_xsave() {
        Ok(x) => (Some(x), None),
        Err(_) => (
            None,
            Some(fpu_bytes(&fd.get_fpu().map_err(kvm("KVM_GET_FPU"))?)),
        ),
    };
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave,
        fpu,
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msr_indices)?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Restores a vCPU (whose CPUID is already set) to `state`. The order
/// matters: the LAPIC before the TSC deadline MSR, events and MP state last.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    if let Some(khz) = state.tsc_khz {
        // Hosts whose TSC runs at another rate scale the guest's, where
        // KVM can; otherwise the guest's clock source copes.
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!("cannot set the guest TSC to {khz} kHz: {e}");
            }
        }
    }
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    match (&state.xsave, &state.fpu) {
        // SAFETY: the buffer is a complete kvm_xsave that KVM_GET_XSAVE
        // filled (legacy 4 KiB layout, no extended FAM part).
        (Some(x), _) => unsafe { fd.set_xsave(x) }.map_err(kvm("KVM_SET_XSAVE"))?,
        (None, Some(b)) => fd
            .set_fpu(&fpu_from_bytes(b)?)
            .map_err(kvm("KVM_SET_FPU"))?,
        (None, None) => {}
    }
    if let Some(x) = &state.xcrs {
        fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let is_deadline = |e: &&(u32, u64)| e.0 == MSR_TSC_DEADLINE;
    let others: Vec<(u32, u64)> = state
        .msrs
        .iter()
        .filter(|e| !is_deadline(e))
        .copied()
        .collect();
    let deadline: Vec<(u32, u64)> = state.msrs.iter().filter(is_deadline).copied().collect();
    write_msrs(fd, &others)?;
    write_msrs(fd, &deadline)?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the VM-wide state (vCPUs paused).
pub fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: one_shots_keep_their_time(vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?, monotonic_ns()),
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// The PIT's input clock.
const PIT_HZ: u128 = 1_193_182;

/// The host's CLOCK_MONOTONIC in nanoseconds: the clock of KVM's
/// `count_load_time`.
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// KVM_SET_PIT2 loads every channel's count afresh, so a one-shot count
/// (modes 0 and 4, started by the guest's write) would start over on
/// restore: a guest in the middle of a 1 ms PIT delay waited up to 1 ms
/// more. Saving what is left of it instead (at least one tick: a count
/// already run out fires at once) makes the countdown carry on, as it does
/// across a pause in one process. Periodic modes keep their count, the
/// period.
fn one_shots_keep_their_time(mut pit: kvm_pit_state2, now_ns: i64) -> kvm_pit_state2 {
    for ch in pit.channels.iter_mut() {
        if ch.mode != 0 && ch.mode != 4 {
            continue;
        }
        let count = if ch.count == 0 { 0x1_0000 } else { ch.count };
        let elapsed_ns = now_ns.saturating_sub(ch.count_load_time).max(0) as u128;
        let elapsed = (elapsed_ns * PIT_HZ / 1_000_000_000).min(u128::from(count)) as u32;
        ch.count = (count - elapsed).max(1);
    }
    pit
}

/// Restores the VM-wide state into a fresh VM before its vCPUs run.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // Only the clock value: the flags KVM_GET_CLOCK reports (stable,
    // realtime) are not inputs KVM_SET_CLOCK takes from us here.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_one_shot_pit_count_keeps_what_is_left_of_it() {
        let mut pit = kvm_pit_state2::default();
        // Channel 2: a 1 ms one-shot (1193 ticks) loaded 0.5 ms ago.
        pit.channels[2].mode = 0;
        pit.channels[2].count = 1193;
        pit.channels[2].count_load_time = 1_000_000;
        // Channel 0: periodic, left alone.
        pit.channels[0].mode = 2;
        pit.channels[0].count = 11932;
        // Channel 1: a one-shot long run out.
        pit.channels[1].mode = 4;
        pit.channels[1].count = 100;
        let saved = one_shots_keep_their_time(pit, 1_500_000);
        assert_eq!(saved.channels[2].count, 1193 - 596);
        assert_eq!(saved.channels[0].count, 11932);
        assert_eq!(saved.channels[1].count, 1);
    }

    use super::*;

    #[test]
    fn fpu_round_trips_through_bytes() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][5] = 0xab;
        let b = fpu_bytes(&fpu);
        let back = fpu_from_bytes(&b).unwrap();
        assert_eq!(back.fcw, 0x37f);
        assert_eq!(back.mxcsr, 0x1f80);
        assert_eq!(back.xmm[3][5], 0xab);
        assert!(fpu_from_bytes(&b[1..]).is_err());
    }
}
