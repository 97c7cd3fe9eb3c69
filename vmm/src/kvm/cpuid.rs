//! The CPUID a vCPU sees: KVM's supported set, normalised to the VM's
//! topology, then narrowed by a CPU template.

use std::path::Path;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Where the kvm_pvm module announces itself.
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// A CPU template: which CPUID features the guest is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// KVM's supported CPUID, normalised. The default on hardware KVM.
    Host,
    /// Host minus the features that differ most between x86 hosts (AVX-512,
    /// TSX, PKU, arch-capabilities), so a VM can move between them.
    Baseline,
    /// For software KVM (kvm_pvm) hosts: also hides every feature whose
    /// instructions KVM's instruction emulator cannot run. The default there.
    Pvm,
}

impl FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "baseline" => Ok(CpuTemplate::Baseline),
            "pvm" => Ok(CpuTemplate::Pvm),
            other => Err(format!(
                "unknown CPU template '{other}' (host, baseline, pvm)"
            )),
        }
    }
}

impl CpuTemplate {
    /// The template used when the user names none.
    pub fn default_for_host() -> Self {
        if is_pvm_host() {
            CpuTemplate::Pvm
        } else {
            CpuTemplate::Host
        }
    }

    /// The name used on the command line and in configs.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
            CpuTemplate::Pvm => "pvm",
        }
    }
}

/// Whether /dev/kvm is the kvm_pvm software hypervisor.
pub fn is_pvm_host() -> bool {
    Path::new(PVM_MODULE).exists()
}

/// Linux `clearcpuid=` names matching what the pvm template hides. On PVM
/// the guest's `cpuid` mostly runs natively and sees the host's bits, so
/// the kernel must be told as well (see docs/pvm.md).
pub const PVM_GUEST_CMDLINE: &str = "noxsave tsc=reliable no_timer_check \
clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid";

/// One feature bit: leaf, subleaf (None: every subleaf), register, bit.
#[derive(Clone, Copy)]
struct Bit(u32, Option<u32>, Reg, u8);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const HYPERVISOR: Bit = Bit(1, None, Reg::Ecx, 31);

/// Features the baseline template hides.
const BASELINE_HIDDEN: &[Bit] = &[
    Bit(7, Some(0), Reg::Ebx, 4),  // HLE
    Bit(7, Some(0), Reg::Ebx, 11), // RTM
    Bit(7, Some(0), Reg::Ebx, 16), // AVX512F
    Bit(7, Some(0), Reg::Ebx, 17), // AVX512DQ
    Bit(7, Some(0), Reg::Ebx, 21), // AVX512IFMA
    Bit(7, Some(0), Reg::Ebx, 26), // AVX512PF
    Bit(7, Some(0), Reg::Ebx, 27), // AVX512ER
    Bit(7, Some(0), Reg::Ebx, 28), // AVX512CD
    Bit(7, Some(0), Reg::Ebx, 30), // AVX512BW
    Bit(7, Some(0), Reg::Ebx, 31), // AVX512VL
    Bit(7, Some(0), Reg::Ecx, 1),  // AVX512VBMI
    Bit(7, Some(0), Reg::Ecx, 3),  // PKU
    Bit(7, Some(0), Reg::Ecx, 4),  // OSPKE
    Bit(7, Some(0), Reg::Ecx, 5),  // WAITPKG
    Bit(7, Some(0), Reg::Ecx, 6),  // AVX512VBMI2
    Bit(7, Some(0), Reg::Ecx, 11), // AVX512VNNI
    Bit(7, Some(0), Reg::Ecx, 12), // AVX512BITALG
    Bit(7, Some(0), Reg::Ecx, 14), // AVX512VPOPCNTDQ
    Bit(7, Some(0), Reg::Edx, 2),  // AVX512_4VNNIW
    Bit(7, Some(0), Reg::Edx, 3),  // AVX512_4FMAPS
    Bit(7, Some(0), Reg::Edx, 8),  // AVX512_VP2INTERSECT
    Bit(7, Some(0), Reg::Edx, 23), // AVX512_FP16
    Bit(7, Some(0), Reg::Edx, 29), // ARCH_CAPABILITIES
    Bit(7, Some(1), Reg::Eax, 5),  // AVX512_BF16
];

/// Features the pvm template hides on top of the baseline: the guest kit's
/// list (instructions KVM's emulator lacks, or that stopped a boot) plus
/// what depends on them, and the KVM PV features that use hypercalls, which
/// spin on kvm_pvm.
const PVM_HIDDEN: &[Bit] = &[
    Bit(1, None, Reg::Ecx, 12),           // FMA (needs XSAVE/AVX state)
    Bit(1, None, Reg::Ecx, 13),           // CX16: lock cmpxchg16b
    Bit(1, None, Reg::Ecx, 17),           // PCID
    Bit(1, None, Reg::Ecx, 23),           // POPCNT
    Bit(1, None, Reg::Ecx, 26),           // XSAVE: xrstor in FPU init
    Bit(1, None, Reg::Ecx, 27),           // OSXSAVE
    Bit(1, None, Reg::Ecx, 28),           // AVX
    Bit(1, None, Reg::Ecx, 29),           // F16C
    Bit(1, None, Reg::Ecx, 30),           // RDRAND
    Bit(7, Some(0), Reg::Ebx, 0),         // FSGSBASE
    Bit(7, Some(0), Reg::Ebx, 3),         // BMI1
    Bit(7, Some(0), Reg::Ebx, 5),         // AVX2
    Bit(7, Some(0), Reg::Ebx, 7),         // SMEP
    Bit(7, Some(0), Reg::Ebx, 8),         // BMI2
    Bit(7, Some(0), Reg::Ebx, 10),        // INVPCID
    Bit(7, Some(0), Reg::Ebx, 18),        // RDSEED
    Bit(7, Some(0), Reg::Ebx, 20),        // SMAP: clac/stac
    Bit(7, Some(0), Reg::Ecx, 9),         // VAES
    Bit(7, Some(0), Reg::Ecx, 10),        // VPCLMULQDQ
    Bit(7, Some(0), Reg::Ecx, 22),        // RDPID
    Bit(0x8000_0001, None, Reg::Ecx, 5),  // ABM/LZCNT
    Bit(0x8000_0001, None, Reg::Edx, 27), // RDTSCP
    Bit(0x4000_0001, None, Reg::Eax, 7),  // KVM_FEATURE_PV_UNHALT (kick hypercall)
    Bit(0x4000_0001, None, Reg::Eax, 11), // KVM_FEATURE_PV_SEND_IPI
    Bit(0x4000_0001, None, Reg::Eax, 13), // KVM_FEATURE_PV_SCHED_YIELD
];

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn apply(entries: &mut [kvm_cpuid_entry2], bits: &[Bit], set: bool) {
    for &Bit(leaf, sub, reg, bit) in bits {
        for e in entries.iter_mut() {
            if e.function == leaf && sub.is_none_or(|s| e.index == s) {
                let r = reg_mut(e, reg);
                if set {
                    *r |= 1 << bit;
                } else {
                    *r &= !(1 << bit);
                }
            }
        }
    }
}

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
}

/// KVM's supported CPUID, read once per VM and specialised per vCPU.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// Bits needed to number `n` things.
fn width(n: u32) -> u32 {
    u32::BITS - n.saturating_sub(1).leading_zeros()
}

/// The CPUID for vCPU `index` of `count`: one socket, one thread per core,
/// `count` cores, APIC ID = index.
pub fn for_vcpu(base: &CpuId, template: CpuTemplate, index: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    let entries = cpuid.as_mut_slice();
    let amd = is_amd(entries);
    let core_bits = width(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // APIC ID, logical processor count, CLFLUSH size (8 x 8 bytes).
                e.ebx = (index << 24) | (count.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            // Deterministic cache parameters: cores sharing the package.
            4 if !amd => {
                e.eax = (e.eax & 0x03ff_ffff) | ((count.min(64) - 1) << 26);
                // Caches shared by all cores (L3) say so; private ones stay
                // per core (threads sharing = 1).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing.min(0xfff)) << 14);
            }
            // Extended topology: SMT level then core level.
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
                e.edx = index;
            }
            // CmpLegacy: HTT means cores, not threads.
            0x8000_0001 if amd && count > 1 => e.ecx |= 1 << 1,
            0x8000_0008 if amd => {
                e.ecx = (core_bits << 12) | (count - 1);
            }
            0x8000_001e if amd => {
                e.eax = index;
                e.ebx = index & 0xff; // core id, one thread per core
                e.ecx = 0; // node 0
            }
            _ => {}
        }
    }
    apply(entries, &[HYPERVISOR], true);
    match template {
        CpuTemplate::Host => {}
        CpuTemplate::Baseline => apply(entries, BASELINE_HIDDEN, false),
        CpuTemplate::Pvm => {
            apply(entries, BASELINE_HIDDEN, false);
            apply(entries, PVM_HIDDEN, false);
            // No XSAVE: the XSAVE leaf describes nothing.
            for e in entries.iter_mut().filter(|e| e.function == 0xd) {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx: u32::MAX,
            ebx: u32::MAX,
            eax: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_and_templates() {
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xd, 0),
        ])
        .unwrap();
        let c = for_vcpu(&base, CpuTemplate::Host, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).eax, 2);
        assert_eq!(find(&c, 0xb, 0).edx, 3);
        assert_ne!(l1.ecx & (1 << 13), 0);
        let p = for_vcpu(&base, CpuTemplate::Pvm, 0, 1);
        let l1 = find(&p, 1, 0);
        assert_eq!(l1.ecx & ((1 << 13) | (1 << 23) | (1 << 26)), 0);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_eq!(find(&p, 7, 0).ebx & (1 << 20), 0);
        assert_eq!(find(&p, 0xd, 0).eax, 0);
        let b = for_vcpu(&base, CpuTemplate::Baseline, 0, 1);
        assert_eq!(find(&b, 7, 0).edx & (1 << 29), 0);
        assert_ne!(find(&b, 1, 0).ecx & (1 << 26), 0);
    }

    #[test]
    fn parses_names() {
        assert_eq!("pvm".parse::<CpuTemplate>().unwrap(), CpuTemplate::Pvm);
        assert!("fast".parse::<CpuTemplate>().is_err());
    }
}
