//! The MSI-X table and pending-bit array of a virtio-pci function.

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: masked.
const MASKED: u32 = 1;

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & MASKED != 0
    }
}

/// The table (saved whole in snapshots).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
}

impl MsixTable {
    /// `n` vectors, all masked (their reset state).
    pub fn new(n: u16) -> Self {
        Self {
            entries: vec![
                MsixEntry {
                    address: 0,
                    data: 0,
                    control: MASKED
                };
                usize::from(n)
            ],
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `v`.
    pub fn entry(&self, v: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(v)).copied()
    }

    fn dword(&self, index: usize, word: u64) -> u32 {
        let e = &self.entries[index];
        match word {
            0 => e.address as u32,
            1 => (e.address >> 32) as u32,
            2 => e.data,
            _ => e.control,
        }
    }

    /// Reads the table at `offset` (dword or qword accesses, as the spec
    /// allows; anything else reads 0).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let index = (offset / ENTRY_SIZE) as usize;
        if index >= self.entries.len()
            || !(data.len() == 4 || data.len() == 8)
            || !offset.is_multiple_of(4)
        {
            return;
        }
        let word = (offset % ENTRY_SIZE) / 4;
        let lo = self.dword(index, word);
        data[..4].copy_from_slice(&lo.to_le_bytes());
        if data.len() == 8 && word.is_multiple_of(2) {
            data[4..].copy_from_slice(&self.dword(index, word + 1).to_le_bytes());
        }
    }

    /// Writes the table; returns the vector whose entry changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<u16> {
        let index = (offset / ENTRY_SIZE) as usize;
        if index >= self.entries.len()
            || !(data.len() == 4 || data.len() == 8)
            || !offset.is_multiple_of(4)
        {
            return None;
        }
        let word = (offset % ENTRY_SIZE) / 4;
        let mut apply = |w: u64, v: u32| {
            let e = &mut self.entries[index];
            match w {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                1 => e.address = (e.address & 0xffff_ffff) | (u64::from(v) << 32),
                2 => e.data = v,
                _ => e.control = v & MASKED,
            }
        };
        apply(
            word,
            u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        );
        if data.len() == 8 && word.is_multiple_of(2) {
            apply(
                word + 1,
                u32::from_le_bytes([data[4], data[5], data[6], data[7]]),
            );
        }
        Some(index as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_and_report_changes() {
        let mut t = MsixTable::new(2);
        assert!(t.entry(1).unwrap().masked());
        assert_eq!(t.write(16, &0xfee0_0000u32.to_le_bytes()), Some(1));
        t.write(24, &0x4041u64.to_le_bytes()); // data + control (unmask)
        let e = t.entry(1).unwrap();
        assert_eq!(
            (e.address, e.data, e.masked()),
            (0xfee0_0000, 0x4041, false)
        );
        let mut b = [0u8; 8];
        t.read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_0000);
        assert_eq!(t.write(64, &[0; 4]), None);
        assert_eq!(t.write(17, &[0; 4]), None);
    }
}
