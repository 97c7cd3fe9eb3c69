//! Model-specific registers each vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Fast-string operations enabled, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Errors setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// KVM_SET_MSRS failed outright.
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(kvm_ioctls::Error),
    /// The list could not be built.
    #[error("cannot build the MSR list")]
    List,
}

/// The boot MSR values, as firmware would leave them. MSR 0x10a
/// (IA32_ARCH_CAPABILITIES) is deliberately not set: some hosts (kvm_pvm)
/// refuse it, and KVM already gives the guest its own value.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs. Returns the indices KVM did not accept: a host that
/// refuses one of these firmware defaults still runs guests, so the caller
/// logs them instead of failing.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<Vec<u32>, MsrError> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::List)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    // KVM stops at the first MSR it refuses; set the rest one by one so a
    // single refusal does not leave the others unset.
    let mut refused = Vec::new();
    for e in entries.iter().skip(set) {
        let one = Msrs::from_entries(&[*e]).map_err(|_| MsrError::List)?;
        if vcpu.set_msrs(&one).map_err(MsrError::Set)? != 1 {
            refused.push(e.index);
        }
    }
    Ok(refused)
}
