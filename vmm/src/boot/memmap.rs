//! The guest's physical memory map, as reported to it by E820 (Linux boot
//! protocol) or the PVH memory map table.

use crate::machine::layout::{
    ECAM_SIZE, ECAM_START, HIMEM_START, LEGACY_HOLE_END, LEGACY_HOLE_START, RAM_START,
};
use crate::memory::ram_ranges;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// One range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRange {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type.
    pub kind: u32,
}

/// The memory map for `ram_size` bytes of RAM: RAM below the legacy hole,
/// the hole (BIOS area with the ACPI tables) reserved, RAM from 1 MiB to the
/// MMIO hole, the ECAM window reserved (so Linux trusts MCFG), RAM above
/// 4 GiB.
pub fn memory_map(ram_size: u64) -> Vec<MemRange> {
    let mut map = Vec::new();
    for (start, len) in ram_ranges(ram_size) {
        let (start, end) = (start.0, start.0 + len);
        if start == RAM_START {
            map.push(MemRange {
                addr: RAM_START,
                size: LEGACY_HOLE_START,
                kind: E820_RAM,
            });
            map.push(MemRange {
                addr: LEGACY_HOLE_START,
                size: LEGACY_HOLE_END - LEGACY_HOLE_START,
                kind: E820_RESERVED,
            });
            if end > HIMEM_START {
                map.push(MemRange {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(MemRange {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map.push(MemRange {
        addr: ECAM_START,
        size: ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|r| r.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_gib_map() {
        let m = memory_map(6 << 30);
        let ram: u64 = m
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| r.size)
            .sum();
        // Everything but the legacy hole is RAM.
        assert_eq!(ram, (6 << 30) - (LEGACY_HOLE_END - LEGACY_HOLE_START));
        assert!(m
            .iter()
            .any(|r| r.addr == ECAM_START && r.kind == E820_RESERVED));
        assert!(m.iter().any(|r| r.addr == 1 << 32 && r.kind == E820_RAM));
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
