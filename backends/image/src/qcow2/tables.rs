//! L1/L2 tables: guest cluster -> host cluster mapping.

use super::header::be64;
use super::{Meta, Qcow2Image};
use crate::{file, ImageError};

/// Host offset bits of L1 and L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// L2: the cluster is compressed.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 (v3): the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;

/// What a guest cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (0 if none).
    Zero { host: u64, copied: bool },
    /// Data at `host`.
    Data { host: u64, copied: bool },
    /// Compressed data (unsupported).
    Compressed,
}

impl Qcow2Image {
    /// Looks up guest cluster `vcl`.
    pub(crate) fn lookup(&self, m: &mut Meta, vcl: u64) -> Result<Mapping, ImageError> {
        let l1_idx = (vcl >> self.geo.l2_bits) as usize;
        let Some(&l1e) = m.l1.get(l1_idx) else {
            return Ok(Mapping::Unallocated);
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let l2_idx = (vcl & ((1 << self.geo.l2_bits) - 1)) as usize;
        let e = self.load_l2(m, l2_off)?[l2_idx];
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed);
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if host != 0 && !self.geo.aligned(host) {
            return Err(ImageError::Corrupt(format!(
                "L2 entry {e:#x} for guest cluster {vcl} is not cluster aligned"
            )));
        }
        if host >= m.next_free {
            return Err(ImageError::Corrupt(format!(
                "guest cluster {vcl} maps to host offset {host:#x}, past the end of the file"
            )));
        }
        if self.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied })
    }

    /// Returns the L2 table at `l2_off`, reading it into the cache if needed.
    fn load_l2<'m>(&self, m: &'m mut Meta, l2_off: u64) -> Result<&'m mut Vec<u64>, ImageError> {
        if !m.l2_cache.contains_key(&l2_off) {
            if !self.geo.aligned(l2_off) {
                return Err(ImageError::Corrupt(format!(
                    "L2 table offset {l2_off:#x} is not cluster aligned"
                )));
            }
            let mut raw = vec![0u8; self.geo.cluster_size as usize];
            self.read_meta(&mut raw, l2_off, "L2 table")?;
            let table = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
            if m.l2_cache.len() >= self.geo.cache_tables() {
                if let Some(k) = m.l2_cache.keys().next().copied() {
                    m.l2_cache.remove(&k);
                }
            }
            m.l2_cache.insert(l2_off, table);
        }
        m.l2_cache
            .get_mut(&l2_off)
            .ok_or_else(|| ImageError::Corrupt("L2 cache lost a table".into()))
    }

    /// Sets the L2 entry of guest cluster `vcl`, allocating the L2 table if
    /// needed (table written before the L1 entry that points at it).
    pub(crate) fn set_l2_entry(
        &self,
        m: &mut Meta,
        vcl: u64,
        entry: u64,
    ) -> Result<(), ImageError> {
        let l1_idx = (vcl >> self.geo.l2_bits) as usize;
        let l2_idx = (vcl & ((1 << self.geo.l2_bits) - 1)) as usize;
        let Some(&l1e) = m.l1.get(l1_idx) else {
            return Err(ImageError::Corrupt(format!(
                "guest cluster {vcl} is beyond the L1 table"
            )));
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            let new = self.alloc_cluster(m)?;
            let mut table = vec![0u64; 1 << self.geo.l2_bits];
            table[l2_idx] = entry;
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            file::write_all(&self.meta_file, &raw, new)?;
            let l1e = new | COPIED;
            file::write_all(
                &self.meta_file,
                &l1e.to_be_bytes(),
                self.l1_offset + l1_idx as u64 * 8,
            )?;
            m.l1[l1_idx] = l1e;
            if m.l2_cache.len() >= self.geo.cache_tables() {
                if let Some(k) = m.l2_cache.keys().next().copied() {
                    m.l2_cache.remove(&k);
                }
            }
            m.l2_cache.insert(new, table);
            return Ok(());
        }
        if l1e & COPIED == 0 {
            return Err(ImageError::Unsupported(
                "writing to an L2 table shared with a snapshot (refcount > 1)".into(),
            ));
        }
        self.load_l2(m, l2_off)?;
        file::write_all(
            &self.meta_file,
            &entry.to_be_bytes(),
            l2_off + l2_idx as u64 * 8,
        )?;
        self.load_l2(m, l2_off)?[l2_idx] = entry;
        Ok(())
    }
}
