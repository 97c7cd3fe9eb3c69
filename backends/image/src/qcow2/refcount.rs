//! Refcount table and blocks (16-bit refcounts), and cluster allocation.
//!
//! Clusters are always allocated at the end of the file; freed clusters get
//! refcount 0 and a punched hole, and are not reused.

use std::collections::BTreeMap;

use super::header::{self, be16};
use super::{Meta, Qcow2Image};
use crate::{file, ImageError};

impl Qcow2Image {
    /// Index in the refcount table, and entry in the block, of host offset `host`.
    fn rc_pos(&self, host: u64) -> (usize, usize) {
        let idx = (host >> self.geo.rb_shift) as usize;
        let entry = ((host >> self.geo.cluster_bits) as usize) & (self.geo.rb_entries - 1);
        (idx, entry)
    }

    /// Offset of the refcount block for refcount-table index `idx` (0 if none).
    fn rb_offset(&self, m: &Meta, idx: usize) -> Result<u64, ImageError> {
        let off = m.rt.get(idx).copied().unwrap_or(0) & super::tables::OFFSET_MASK;
        if off != 0 && !self.geo.aligned(off) {
            return Err(ImageError::Corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(off)
    }

    /// Returns the refcount block at `rb_off`, reading it into the cache if needed.
    fn load_rb<'m>(&self, m: &'m mut Meta, rb_off: u64) -> Result<&'m mut Vec<u16>, ImageError> {
        if !m.rb_cache.contains_key(&rb_off) {
            let mut raw = vec![0u8; self.geo.cluster_size as usize];
            self.read_meta(&mut raw, rb_off, "refcount block")?;
            let block = raw.chunks_exact(2).map(|c| be16(c, 0)).collect();
            if m.rb_cache.len() >= self.geo.cache_tables() {
                if let Some(k) = m.rb_cache.keys().next().copied() {
                    m.rb_cache.remove(&k);
                }
            }
            m.rb_cache.insert(rb_off, block);
        }
        m.rb_cache
            .get_mut(&rb_off)
            .ok_or_else(|| ImageError::Corrupt("refcount cache lost a block".into()))
    }

    /// Refcount of the cluster at `host` (0 where no refcount block exists).
    pub(crate) fn refcount(&self, m: &mut Meta, host: u64) -> Result<u16, ImageError> {
        let (idx, entry) = self.rc_pos(host);
        let rb = self.rb_offset(m, idx)?;
        if rb == 0 {
            return Ok(0);
        }
        Ok(self.load_rb(m, rb)?[entry])
    }

    /// Sets the refcount of the cluster at `host`; its refcount block must exist.
    pub(crate) fn set_refcount(
        &self,
        m: &mut Meta,
        host: u64,
        value: u16,
    ) -> Result<(), ImageError> {
        let (idx, entry) = self.rc_pos(host);
        let rb = self.rb_offset(m, idx)?;
        if rb == 0 {
            return Err(ImageError::Corrupt(format!(
                "no refcount block covers cluster {host:#x}"
            )));
        }
        self.load_rb(m, rb)?;
        file::write_all(&self.meta_file, &value.to_be_bytes(), rb + entry as u64 * 2)?;
        self.load_rb(m, rb)?[entry] = value;
        Ok(())
    }

    /// Drops one reference to the cluster at `host`; when unused, punches it out.
    pub(crate) fn free_cluster(&self, m: &mut Meta, host: u64) -> Result<(), ImageError> {
        let rc = self.refcount(m, host)?;
        if rc == 0 {
            return Err(ImageError::Corrupt(format!(
                "freeing cluster {host:#x} whose refcount is 0"
            )));
        }
        self.set_refcount(m, host, rc - 1)?;
        if rc == 1 {
            // Best effort: the cluster is already free in the metadata.
            let _ = file::fallocate(
                &self.meta_file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                host,
                self.geo.cluster_size,
            );
        }
        Ok(())
    }

    /// Allocates one cluster (refcount 1) at the end of the file.
    pub(crate) fn alloc_cluster(&self, m: &mut Meta) -> Result<u64, ImageError> {
        let cs = self.geo.cluster_size;
        loop {
            let off = m.next_free;
            if off > super::tables::OFFSET_MASK {
                return Err(ImageError::Unsupported(
                    "image file would exceed 2^56 bytes".into(),
                ));
            }
            let (idx, entry) = self.rc_pos(off);
            if idx >= m.rt.len() {
                self.grow_reftable(m, idx)?;
                continue;
            }
            if self.rb_offset(m, idx)? == 0 {
                // A new refcount block at `off` covers itself.
                let mut block = vec![0u16; self.geo.rb_entries];
                block[entry] = 1;
                file::write_all(&self.meta_file, &rb_bytes(&block), off)?;
                file::write_all(
                    &self.meta_file,
                    &off.to_be_bytes(),
                    m.rt_offset + idx as u64 * 8,
                )?;
                m.rt[idx] = off;
                m.rb_cache.insert(off, block);
                m.next_free += cs;
                continue;
            }
            m.next_free += cs;
            if self.refcount(m, off)? != 0 {
                continue; // in use beyond the end of the file: skip it
            }
            self.set_refcount(m, off, 1)?;
            return Ok(off);
        }
    }

    /// Replaces the refcount table with a larger one covering index `need`.
    /// The new table and any refcount blocks it needs are placed at the end of
    /// the file; the header switches to it after they are durable.
    fn grow_reftable(&self, m: &mut Meta, need: usize) -> Result<(), ImageError> {
        let cs = self.geo.cluster_size;
        let per_cluster = (cs / 8) as usize;
        let start = m.next_free;
        let mut table_clusters = (need + 1).max(m.rt.len() * 2).div_ceil(per_cluster);
        // New refcount blocks needed to cover [start, end), keyed by table index.
        let mut new_blocks: BTreeMap<usize, u64>;
        loop {
            let mut extra = 0usize;
            loop {
                let end = start + (table_clusters + extra) as u64 * cs;
                let first = (start >> self.geo.rb_shift) as usize;
                let last = ((end - 1) >> self.geo.rb_shift) as usize;
                let missing = (first..=last)
                    .filter(|&i| m.rt.get(i).copied().unwrap_or(0) == 0)
                    .count();
                if missing <= extra {
                    break;
                }
                extra = missing;
            }
            let end = start + (table_clusters + extra) as u64 * cs;
            let last = ((end - 1) >> self.geo.rb_shift) as usize;
            if last < table_clusters * per_cluster && need < table_clusters * per_cluster {
                let first = (start >> self.geo.rb_shift) as usize;
                new_blocks = BTreeMap::new();
                let mut at = start + table_clusters as u64 * cs;
                for i in first..=last {
                    if m.rt.get(i).copied().unwrap_or(0) == 0 {
                        new_blocks.insert(i, at);
                        at += cs;
                    }
                }
                break;
            }
            table_clusters += 1;
        }
        let end = start + (table_clusters as u64 + new_blocks.len() as u64) * cs;
        if table_clusters as u64 * cs > super::MAX_REFTABLE_BYTES {
            return Err(ImageError::Unsupported(
                "refcount table would exceed 8 MiB".into(),
            ));
        }

        // Refcounts of the new clusters: in new blocks (memory) or existing ones (disk).
        let mut blocks: BTreeMap<usize, Vec<u16>> = new_blocks
            .keys()
            .map(|&i| (i, vec![0u16; self.geo.rb_entries]))
            .collect();
        let mut c = start;
        while c < end {
            let (idx, entry) = self.rc_pos(c);
            match blocks.get_mut(&idx) {
                Some(b) => b[entry] = 1,
                None => self.set_refcount(m, c, 1)?,
            }
            c += cs;
        }
        for (i, b) in &blocks {
            file::write_all(&self.meta_file, &rb_bytes(b), new_blocks[i])?;
        }
        let mut rt = m.rt.clone();
        rt.resize(table_clusters * per_cluster, 0);
        for (&i, &off) in &new_blocks {
            rt[i] = off;
        }
        let raw: Vec<u8> = rt.iter().flat_map(|e| e.to_be_bytes()).collect();
        file::write_all(&self.meta_file, &raw, start)?;
        file::sync_data(&self.meta_file)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&start.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file::write_all(&self.meta_file, &hdr, header::OFF_REFCOUNT_TABLE)?;
        file::sync_data(&self.meta_file)?;

        let old_off = m.rt_offset;
        let old_clusters = (m.rt.len() / per_cluster) as u64;
        m.rt = rt;
        m.rt_offset = start;
        for (i, b) in blocks {
            m.rb_cache.insert(new_blocks[&i], b);
        }
        m.next_free = end;
        for k in 0..old_clusters {
            self.free_cluster(m, old_off + k * cs)?;
        }
        Ok(())
    }
}

fn rb_bytes(block: &[u16]) -> Vec<u8> {
    block.iter().flat_map(|v| v.to_be_bytes()).collect()
}
