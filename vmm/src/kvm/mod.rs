//! KVM: the VM, its vCPUs, and the CPU state they start with.

pub mod cpuid;
pub mod irq;
pub mod msrs;
pub mod pause;
pub mod regs;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod warm;
