//! The KVM VM: creation, guest memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where KVM puts the three-page TSS it needs for real-mode emulation on
/// Intel; just below the BIOS area at the top of 4 GiB, outside RAM.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors creating or setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("/dev/kvm does not exist: tern needs KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm,
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is this user in the kvm group?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// More vCPUs than KVM allows.
    #[error("{asked} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// Opens /dev/kvm with an error that says what is wrong.
pub fn open_kvm() -> Result<Kvm, VmError> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err(VmError::NoKvm);
    }
    Kvm::new().map_err(VmError::OpenKvm)
}

/// Creates a VM for `vcpus` vCPUs with `mem` registered as its memory
/// slots (dirty-logged when `log_dirty`), then its in-kernel irqchip and
/// PIT.
///
/// The order matters for start-up time: every change to a VM's memory
/// slots or I/O buses waits for an SRCU grace period in the host kernel,
/// and once the irqchip exists that wait is milliseconds (measured on
/// kvm_pvm: 2-11 ms for the first slot after KVM_CREATE_IRQCHIP, 0.09 ms
/// before it). Registering memory first keeps VM creation under half a
/// millisecond, less than running it on a helper thread did.
pub fn create_vm(
    kvm: &Kvm,
    vcpus: u32,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<VmFd, VmError> {
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(VmError::TooManyVcpus { asked: vcpus, max });
    }
    let (vm, registered) = match super::warm::take_vm(mem) {
        Some(made) => made,
        None => (kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?, 0),
    };
    register_slots(&vm, mem, log_dirty, registered)?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The PC speaker port (0x61) is answered in-kernel with a dummy.
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Registers every guest memory region as a KVM memory slot (slot i is
/// region i), with dirty-page logging when `log_dirty`.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
    register_slots(vm, mem, log_dirty, 0)
}

/// [`register_memory`] for a VM whose first `registered` slots already
/// hold their regions without dirty logging (made ahead, `warm.rs`):
/// those are only changed to log when `log_dirty`.
fn register_slots(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
    registered: usize,
) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        if slot < registered && !log_dirty {
            continue;
        }
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm {
                what: "guest memory host address",
                err: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region stays mapped for as long as the VM exists (the
        // guest memory is owned by the VMM and outlives every vCPU), and the
        // slots do not overlap because the regions do not.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Reads and clears the dirty bitmap of every memory slot (one `u64` per
/// 64 pages, slot i = region i).
pub fn dirty_bitmaps(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
    mem.iter()
        .enumerate()
        .map(|(slot, r)| {
            vm.get_dirty_log(slot as u32, r.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
        })
        .collect()
}
