//! Initial register state of the boot vCPU for the two entry protocols:
//! PVH (32-bit protected mode, paging off) and the Linux 64-bit entry
//! (long mode with identity page tables and `boot_params` in RSI).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode at `entry`, EBX = hvm_start_info.
    Pvh {
        /// 32-bit physical entry point.
        entry: u64,
    },
    /// Linux 64-bit boot protocol at `entry`, RSI = boot_params.
    Linux64 {
        /// 64-bit entry point (startup_64).
        entry: u64,
    },
}

/// Errors setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}: {err}")]
    Kvm {
        /// Which registers.
        what: &'static str,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// Writing the GDT or page tables to guest memory failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from access/flags bits, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM view of descriptor `entry` at GDT slot `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // KVM wants the limit in bytes.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |err| RegsError::Kvm { what, err }
}

/// Sets the FPU to its reset state (x87 control word 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU"))
}

/// Writes the boot GDT and IDT and returns (code, data, tss) segments.
fn write_gdt(
    mem: &GuestMemoryMmap,
    long_mode: bool,
) -> Result<(kvm_segment, kvm_segment, kvm_segment), RegsError> {
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code, present, execute/read, accessed
    } else {
        gdt_entry(0xc09b, 0, 0xfffff) // 32-bit code
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write, accessed
        gdt_entry(0x008b, 0, 0x67),    // busy 32-bit TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok((segment(gdt[1], 1), segment(gdt[2], 2), segment(gdt[3], 3)))
}

/// Identity-maps the low 4 GiB with 2 MiB pages (PML4 -> one PDPT -> four
/// page directories), enough for any kernel and initrd below the MMIO hole.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))?;
    for dir in 0..4u64 {
        let pd = PDE_START + dir * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPTE_START + dir * 8))?;
        for i in 0..512u64 {
            let addr = ((dir << 30) | (i << 21)) | PRESENT_RW | HUGE;
            mem.write_obj(addr, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel entry.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let long_mode = matches!(mode, EntryMode::Linux64 { .. });
    let (code, data, tss) = write_gdt(mem, long_mode)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("special registers"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh { entry } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        EntryMode::Linux64 { entry } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("special registers"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_back() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.s, tss.type_), (0x67, 0, 0, 0xb));
        let data32 = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data32.db, data32.s, data32.type_), (1, 1, 3));
    }
}
