//! The guest pages a restored vCPU needs first, found from its saved
//! registers: the code at RIP (and the 1 MiB around it: a kernel's code
//! and data lie close together), the stack at RSP, the descriptor tables,
//! the TSS, the FS/GS bases (per-CPU data in Linux), and the page-table
//! pages that map them. A lazy restore copies these in before the vCPUs
//! run, so their first instructions do not each wait for a page fault to
//! be served (on kvm_pvm 0.1-0.5 ms apiece: a round trip through the
//! userfaultfd thread while the host is busy bringing up the VM).
//!
//! This is only a hint: an address that does not translate, or one that
//! is wrong, costs a needless copy and nothing else.

use crate::kvm::state::VcpuState;

/// MSR holding the GS base swapped in by SWAPGS (the kernel's per-CPU base
/// while a 64-bit guest is in user mode).
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
/// Bits 12-51 of a page-table entry: the next table or the page.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Bytes brought in around each address found.
const AROUND: u64 = 64 << 10;
/// ... and around the code at RIP.
const AROUND_CODE: u64 = 1 << 20;

/// Guest-physical ranges (start, length; aligned to their length) worth
/// having before `vcpus` run. `read` gives the 8 bytes of guest memory at
/// a guest-physical address (None outside RAM), as the snapshot saved
/// them.
pub fn of_vcpus(vcpus: &[VcpuState], read: impl Fn(u64) -> Option<u64>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for v in vcpus {
        let s = &v.sregs;
        let mut code = Vec::new();
        translate(s.cr0, s.cr3, s.cr4, s.efer, v.regs.rip, &read, &mut code);
        // The last address is the code's; those before it, page tables.
        if let Some(rip) = code.pop() {
            ranges.push((rip & !(AROUND_CODE - 1), AROUND_CODE));
        }
        ranges.extend(code.into_iter().map(|a| (a & !(AROUND - 1), AROUND)));
    }
    ranges.extend(
        addresses(vcpus, &read)
            .into_iter()
            .map(|a| (a & !(AROUND - 1), AROUND)),
    );
    // By start, the longest first, so that a range inside another comes
    // after it and is dropped.
    ranges.sort_unstable_by_key(|&(start, len)| (start, std::cmp::Reverse(len)));
    let mut kept: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        if !kept.iter().any(|k| k.0 <= r.0 && r.0 + r.1 <= k.0 + k.1) {
            kept.push(r);
        }
    }
    kept
}

/// The guest-physical addresses the registers of `vcpus` point at, and
/// the page tables on the way.
fn addresses(vcpus: &[VcpuState], read: &impl Fn(u64) -> Option<u64>) -> Vec<u64> {
    let mut hot = Vec::new();
    for v in vcpus {
        let s = &v.sregs;
        let kernel_gs = v
            .msrs
            .iter()
            .find(|(i, _)| *i == MSR_KERNEL_GS_BASE)
            .map(|(_, b)| *b);
        let virt = [
            Some(v.regs.rip),
            Some(v.regs.rsp),
            Some(s.gdt.base),
            Some(s.idt.base),
            Some(s.tr.base),
            Some(s.fs.base),
            Some(s.gs.base),
            kernel_gs,
        ];
        for va in virt.into_iter().flatten().filter(|&va| va != 0) {
            translate(s.cr0, s.cr3, s.cr4, s.efer, va, read, &mut hot);
        }
    }
    hot.sort_unstable();
    hot.dedup();
    hot
}

/// Adds the guest-physical address of `va`, and of the page tables
/// walked on the way, to `out`. Without paging addresses are physical;
/// 32-bit paging is not walked (only the top table is added).
fn translate(
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    va: u64,
    read: &impl Fn(u64) -> Option<u64>,
    out: &mut Vec<u64>,
) {
    if cr0 & CR0_PG == 0 {
        out.push(va);
        return;
    }
    let mut table = cr3 & ADDR_MASK;
    out.push(table);
    if efer & EFER_LMA == 0 {
        return;
    }
    let levels: u32 = if cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (va >> shift) & 0x1ff;
        let Some(entry) = read(table + index * 8) else {
            return;
        };
        if entry & PRESENT == 0 {
            return;
        }
        let next = entry & ADDR_MASK;
        // A 1 GiB (level 3) or 2 MiB (level 2) page ends the walk.
        if level == 1 || (entry & HUGE != 0 && level <= 3) {
            let offset_mask = (1u64 << shift) - 1;
            out.push((next & !offset_mask) | (va & offset_mask));
            return;
        }
        table = next;
        out.push(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vcpu(rip: u64, rsp: u64, cr3: u64, paging: bool) -> VcpuState {
        let mut v = VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: None,
            fpu: None,
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
            mp_state: Default::default(),
            tsc_khz: None,
        };
        v.regs.rip = rip;
        v.regs.rsp = rsp;
        if paging {
            v.sregs.cr0 = CR0_PG | 1;
            v.sregs.cr3 = cr3;
            v.sregs.efer = EFER_LMA | (1 << 8);
        }
        v
    }

    #[test]
    fn without_paging_addresses_are_physical() {
        let v = [vcpu(0x10_1c71, 0x1a_9f30, 0, false)];
        assert_eq!(addresses(&v, &|_| None), vec![0x10_1c71, 0x1a_9f30]);
        // The MiB around the code holds the stack's 64 KiB too.
        assert_eq!(of_vcpus(&v, |_| None), vec![(0x10_0000, 1 << 20)]);
    }

    #[test]
    fn ranges_are_aligned_and_the_code_gets_a_mib() {
        let v = [vcpu(0x30_1c71, 0x1a_9f30, 0, false)];
        assert_eq!(
            of_vcpus(&v, |_| None),
            vec![(0x1a_0000, 64 << 10), (0x30_0000, 1 << 20)]
        );
    }

    #[test]
    fn walks_four_levels_to_4k_and_2m_pages() {
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; the PD maps the
        // 2 MiB page at virtual 0xffff_8000_0020_0000 to 0x4000_0000 and
        // points its next entry at a page table at 0x5000 whose entry 3
        // maps 4 KiB to 0x7000.
        let va_huge: u64 = 0xffff_8000_0020_1234;
        let va_small: u64 = 0xffff_8000_0040_3abc;
        let mut mem = HashMap::new();
        let pml4i = (va_huge >> 39) & 0x1ff;
        let pdpti = (va_huge >> 30) & 0x1ff;
        mem.insert(0x1000 + pml4i * 8, 0x2000 | PRESENT);
        mem.insert(0x2000 + pdpti * 8, 0x3000 | PRESENT);
        mem.insert(0x3000 + 8, 0x4000_0000 | PRESENT | HUGE);
        mem.insert(0x3000 + 2 * 8, 0x5000 | PRESENT);
        mem.insert(0x5000 + 3 * 8, 0x7000 | PRESENT);
        let v = [vcpu(va_huge, va_small, 0x1000, true)];
        let hot = addresses(&v, &|a| mem.get(&a).copied());
        assert_eq!(
            hot,
            vec![0x1000, 0x2000, 0x3000, 0x5000, 0x7abc, 0x4000_1234]
        );
    }

    #[test]
    fn stops_at_a_missing_entry() {
        let v = [vcpu(0xffff_8000_0000_0000, 0, 0x9000, true)];
        assert_eq!(addresses(&v, &|_| Some(0)), vec![0x9000]);
    }
}
