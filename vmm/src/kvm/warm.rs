//! KVM work done ahead, while tern waits for its first VM's configuration
//! (an API socket awaiting `snapshot/load`, say): KVM_CREATE_VM and
//! KVM_GET_SUPPORTED_CPUID each took 0.4-0.5 ms of a restore on kvm_pvm,
//! and neither depends on the VM that will be built.
//!
//! [`prepare`] starts a short-lived thread that makes one empty VM and
//! reads the supported CPUID. The first VM built takes that VM; later ones
//! (or one built before the thread is done with it, which then waits)
//! make their own. The CPUID is read once per process: it depends only on
//! the host's KVM.
//!
//! When idle, the thread also makes a second VM whose first memory slot,
//! all of low RAM (0 to the PCI hole, 2.75 GiB), is registered for an
//! address range kept free for it (`memory/fixed.rs`). On kvm_pvm registering
//! that slot costs 0.6-1.2 ms (KVM's shadow MMU allocates its reverse
//! maps), 2-4 ms while a restore's other threads compete for the CPUs. A
//! guest of 2.75 GiB or more maps its low RAM in that range and takes
//! this VM; a smaller one takes the plain VM. Whichever is left is
//! dropped once the VM runs ([`release_unused`]): the slot holds about
//! 6 MiB of kernel memory while it waits.
//!
//! Then it starts a tern-blk and a tern-net that wait for their arguments
//! (`backend_process.rs`), and stocks confined threads
//! (`spare_thread.rs`), until a build begins.

use std::sync::{Mutex, OnceLock};

use kvm_bindings::{kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::cpuid::{self, CpuidError};
use crate::machine::layout::{LOW_RAM_END, RAM_START};
use crate::memory::fixed::FreeRange;

/// The VM made ahead; the lock is held while it is being made.
static SPARE_VM: Mutex<Option<VmFd>> = Mutex::new(None);
/// The VM made ahead with low RAM's slot registered; the lock is held
/// while it is being made.
static LOW_RAM_VM: Mutex<Option<LowRamVm>> = Mutex::new(None);
static SUPPORTED_CPUID: OnceLock<CpuId> = OnceLock::new();

/// Bytes of low RAM: the slot registered ahead covers exactly this.
const LOW_RAM_LEN: u64 = LOW_RAM_END - RAM_START;

/// A VM whose slot 0 is registered for an address range kept for low RAM.
struct LowRamVm {
    vm: VmFd,
    /// The range; None once taken for guest RAM to be mapped in.
    range: Option<FreeRange>,
    /// Where the range starts.
    addr: usize,
}

/// Makes a VM with slot 0 for a free range of low RAM's size.
fn make_low_ram_vm(kvm: &Kvm) -> Option<LowRamVm> {
    let vm = kvm.create_vm().ok()?;
    let range = FreeRange::pick(LOW_RAM_LEN as usize)?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: RAM_START,
        memory_size: LOW_RAM_LEN,
        userspace_addr: range.addr() as u64,
    };
    // SAFETY: KVM reaches the range only from a vCPU, and this VM gets
    // vCPUs only once guest RAM is mapped there (`take_vm` checks). Until
    // then the slot points at unmapped addresses, which KVM accepts.
    unsafe { vm.set_user_memory_region(slot) }.ok()?;
    let addr = range.addr();
    Some(LowRamVm {
        vm,
        range: Some(range),
        addr,
    })
}

/// Threads stocked for a VM's build (see `spare_thread.rs`): enough for
/// the memory fill, a disk's and a NIC's backends, their interrupt
/// relays, stdin, the console writer, the reconnector and dropping the VM
/// made ahead that went unused; and for two vCPUs.
const STOCK_VMM_THREADS: usize = 10;
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
            let mut low = LOW_RAM_VM.lock().unwrap_or_else(|e| e.into_inner());
            let _ = started_tx.send(());
            // Not confined, like the thread that builds VMs before the
            // first one runs: it reads no input and ends in milliseconds.
            *spare = kvm.create_vm().ok();
            drop(spare);
            let _ = supported_cpuid(&kvm);
            if idle && !crate::spare_thread::stocking_stopped() {
                *low = make_low_ram_vm(&kvm);
            }
            drop(low);
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

/// The range kept for low RAM, for guest RAM of at least low RAM's size
/// to be mapped in; the VM with its slot is then [`take_vm`]'s.
pub fn take_low_ram_range() -> Option<FreeRange> {
    LOW_RAM_VM
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .and_then(|l| l.range.take())
}

/// A VM made ahead for guest memory `mem`, if one is left, with how many
/// of its memory slots (from 0) already hold `mem`'s regions.
pub fn take_vm(mem: &GuestMemoryMmap) -> Option<(VmFd, usize)> {
    let first = mem.iter().next().and_then(|r| {
        let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
        Some((r.start_addr().0, r.len(), host as usize))
    });
    {
        let mut low = LOW_RAM_VM.lock().unwrap_or_else(|e| e.into_inner());
        let ours = low
            .as_ref()
            .is_some_and(|l| l.range.is_none() && first == Some((RAM_START, LOW_RAM_LEN, l.addr)));
        if ours {
            log::debug!("low RAM's memory slot was registered ahead");
            return low.take().map(|l| (l.vm, 1));
        }
    }
    SPARE_VM
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(|vm| (vm, 0))
}

/// Whether `m` holds something, or is being filled.
fn holds<T>(m: &Mutex<Option<T>>) -> bool {
    m.try_lock().map_or(true, |g| g.is_some())
}

/// How long after the VM starts the unused VMs are dropped.
const RELEASE_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Drops the VMs made ahead that the build did not take, on a spare
/// thread and after [`RELEASE_DELAY`]: closing a VM with a large slot
/// is 0.3-0.5 ms in the host kernel, which should not compete with the
/// new VM's first run for the CPUs.
pub fn release_unused() {
    if !holds(&SPARE_VM) && !holds(&LOW_RAM_VM) {
        return;
    }
    let _ = crate::spare_thread::spawn("kvm-release", "vmm", || {
        std::thread::sleep(RELEASE_DELAY);
        drop(SPARE_VM.lock().unwrap_or_else(|e| e.into_inner()).take());
        drop(LOW_RAM_VM.lock().unwrap_or_else(|e| e.into_inner()).take());
    });
}

/// KVM's supported CPUID, read from `kvm` the first time.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    if let Some(c) = SUPPORTED_CPUID.get() {
        return Ok(c.clone());
    }
    let c = cpuid::supported(kvm)?;
    Ok(SUPPORTED_CPUID.get_or_init(|| c).clone())
}
