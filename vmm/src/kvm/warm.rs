//! KVM work done ahead, while tern waits for its first VM's configuration
//! (an API socket awaiting `snapshot/load`, say): KVM_CREATE_VM and
//! KVM_GET_SUPPORTED_CPUID each took 0.4-0.5 ms of a restore on kvm_pvm,
//! and neither depends on the VM that will be built.
//!
//! [`prepare`] starts a short-lived thread that makes one empty VM and
//! reads the supported CPUID. The first VM built takes that VM; later ones
//! (or one built before the thread is done with it, which then waits)
//! make their own. The CPUID is read once per process: it depends only on
//! the host's KVM. When idle, the thread then starts a tern-blk and a
//! tern-net that wait for their arguments (`backend_process.rs`), and
//! stocks confined threads (`spare_thread.rs`), until a build begins.

use std::sync::{Mutex, OnceLock};

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use super::cpuid::{self, CpuidError};

/// The VM made ahead; the lock is held while it is being made.
static SPARE_VM: Mutex<Option<VmFd>> = Mutex::new(None);
static SUPPORTED_CPUID: OnceLock<CpuId> = OnceLock::new();

/// Threads stocked for a VM's build (see `spare_thread.rs`): enough for
/// the memory fill, a disk's and a NIC's backends, their interrupt
/// relays, stdin and the reconnector; and for two vCPUs.
const STOCK_VMM_THREADS: usize = 8;
const STOCK_VCPU_THREADS: usize = 2;

/// Starts making a VM and reading the supported CPUID in the background,
/// then, when `idle` (tern waits for its VM's configuration), stocks
/// confined threads for it. Does nothing without /dev/kvm (the VM's build
/// then reports that).
pub fn prepare(idle: bool) {
    let Ok(kvm) = super::vm::open_kvm() else {
        return;
    };
    // Taken before the thread runs, so a build that starts at once waits
    // for this VM instead of making a second.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-warm".into())
        .spawn(move || {
            let mut spare = SPARE_VM.lock().unwrap_or_else(|e| e.into_inner());
            let _ = started_tx.send(());
            // Not confined, like the thread that builds VMs before the
            // first one runs: it reads no input and ends in a millisecond.
            *spare = kvm.create_vm().ok();
            drop(spare);
            let _ = supported_cpuid(&kvm);
            if idle {
                use crate::vhost_user::backend_process::{backend_binary, stock_waiting};
                for name in ["tern-blk", "tern-net"] {
                    if !crate::spare_thread::stocking_stopped() {
                        stock_waiting(&backend_binary(name));
                    }
                }
                crate::spare_thread::stock("vcpu", STOCK_VCPU_THREADS);
                crate::spare_thread::stock("vmm", STOCK_VMM_THREADS);
            }
        });
    if spawned.is_ok() {
        let _ = started_rx.recv();
    }
}

/// The VM made ahead, if there is one left.
pub fn take_vm() -> Option<VmFd> {
    SPARE_VM.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// KVM's supported CPUID, read from `kvm` the first time.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    if let Some(c) = SUPPORTED_CPUID.get() {
        return Ok(c.clone());
    }
    let c = cpuid::supported(kvm)?;
    Ok(SUPPORTED_CPUID.get_or_init(|| c).clone())
}
