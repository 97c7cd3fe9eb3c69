//! Writing guest memory to a snapshot's memory file: the whole of RAM in
//! file order (low RAM, then high RAM) for a full snapshot, or only the
//! pages dirtied since the last snapshot for a diff. Pages that are all
//! zeros, and pages the memfd never allocated, are left as holes, so the
//! file is sparse and a diff file holds only what changed.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::{data_extents, Backing, GuestRam};

/// Guest page size for dirty tracking.
pub const PAGE: u64 = 4096;

/// Errors writing memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Writing the file failed (a full disk, say).
    #[error("writing guest memory: {0}")]
    Io(#[from] std::io::Error),
    /// A region has no host mapping.
    #[error("guest memory region at {0:#x} is not mapped")]
    Unmapped(u64),
}

/// A region of RAM as the snapshot sees it.
pub(crate) struct Region<'a> {
    /// The mapped bytes.
    pub(crate) bytes: &'a [u8],
    /// Where the region starts in the memory file.
    pub(crate) file_offset: u64,
}

pub(crate) fn regions(ram: &GuestRam) -> Result<Vec<Region<'_>>, MemoryFileError> {
    let mut out = Vec::new();
    let mut file_offset = 0u64;
    for r in ram.memory.iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryFileError::Unmapped(r.start_addr().0))?;
        // SAFETY: the region is mapped for its whole length for as long as
        // `ram` lives; the vCPUs are paused and the backends' rings stopped
        // while a snapshot is written, so nothing changes the bytes.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, r.len() as usize) };
        out.push(Region { bytes, file_offset });
        file_offset += r.len();
    }
    Ok(out)
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this.
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// Writes pages `[first, end)` of `region` (page indices), skipping zero
/// pages unless `keep_zero`, in runs as long as possible.
fn write_pages(
    out: &File,
    region: &Region,
    first: u64,
    end: u64,
    keep_zero: bool,
) -> Result<u64, MemoryFileError> {
    let mut written = 0;
    let mut run_start: Option<u64> = None;
    let flush = |from: u64, to: u64| -> std::io::Result<u64> {
        let bytes = &region.bytes[(from * PAGE) as usize..(to * PAGE) as usize];
        out.write_all_at(bytes, region.file_offset + from * PAGE)?;
        Ok(bytes.len() as u64)
    };
    // Runs are cut at 8 MiB so one write never holds too much.
    const MAX_RUN: u64 = (8 << 20) / PAGE;
    for p in first..end {
        let page = &region.bytes[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
        let keep = keep_zero || !is_zero(page);
        match (keep, run_start) {
            (true, None) => run_start = Some(p),
            (true, Some(s)) if p - s >= MAX_RUN => {
                written += flush(s, p)?;
                run_start = Some(p);
            }
            (false, Some(s)) => {
                written += flush(s, p)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        written += flush(s, end)?;
    }
    Ok(written)
}

/// The page ranges `[first, end)` of each region that may hold data:
/// pages a memfd never allocated are zero and are skipped without touching
/// them (reading would allocate them); a private file mapping may hold
/// data anywhere.
pub(crate) fn data_pages(ram: &GuestRam, region: &Region) -> Vec<(u64, u64)> {
    // Pages a lazy restore has not brought in yet look like holes.
    ram.wait_filled();
    let len = region.bytes.len() as u64;
    let extents = match ram.backing {
        Backing::Memfd => data_extents(&ram.file, region.file_offset, region.file_offset + len)
            .into_iter()
            .map(|(o, l)| (o - region.file_offset, l))
            .collect(),
        Backing::PrivateFile => vec![(0, len)],
    };
    extents
        .into_iter()
        .map(|(off, l)| (off / PAGE, (off + l).div_ceil(PAGE).min(len / PAGE)))
        .collect()
}

/// Writes all of RAM to `out` (sized to RAM, sparse). Returns the bytes
/// written.
pub fn write_full(ram: &GuestRam, out: &File) -> Result<u64, MemoryFileError> {
    out.set_len(0)?;
    out.set_len(ram.size)?;
    let mut written = 0;
    for region in regions(ram)? {
        for (first, end) in data_pages(ram, &region) {
            written += write_pages(out, &region, first, end, false)?;
        }
    }
    Ok(written)
}

/// Writes the pages marked in `dirty` (one bitmap per region, a bit per
/// 4 KiB page, as KVM_GET_DIRTY_LOG gives) to `out`, sized to RAM and
/// otherwise a hole. Dirty zero pages are written too: over a base they
/// must read as zeros. Returns the bytes written.
pub fn write_diff(ram: &GuestRam, out: &File, dirty: &[Vec<u64>]) -> Result<u64, MemoryFileError> {
    out.set_len(0)?;
    out.set_len(ram.size)?;
    let mut written = 0;
    for (region, bitmap) in regions(ram)?.iter().zip(dirty) {
        let bit = |p: u64| {
            bitmap
                .get((p / 64) as usize)
                .is_some_and(|w| w >> (p % 64) & 1 == 1)
        };
        for (first, end) in data_pages(ram, region) {
            let mut p = first;
            while p < end {
                if !bit(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < end && bit(p) {
                    p += 1;
                }
                written += write_pages(out, region, start, p, true)?;
            }
        }
    }
    Ok(written)
}

/// Lays the data extents of each diff file in `diffs` (oldest first) over
/// `base`, in place: the result is the full memory of the newest diff.
pub fn merge(base: &File, diffs: &[File]) -> std::io::Result<u64> {
    let size = base.metadata()?.len();
    let mut buf = vec![0u8; 4 << 20];
    let mut copied = 0;
    for d in diffs {
        let dsize = d.metadata()?.len();
        if dsize != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("diff is {dsize} bytes but the base is {size}"),
            ));
        }
        for (off, len) in data_extents(d, 0, size) {
            let mut done = 0;
            while done < len {
                let n = ((len - done) as usize).min(buf.len());
                d.read_exact_at(&mut buf[..n], off + done)?;
                base.write_all_at(&buf[..n], off + done)?;
                done += n as u64;
                copied += n as u64;
            }
        }
    }
    base.sync_all()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn tmp(name: &str) -> File {
        let p = std::env::temp_dir().join(format!("tern-mem-{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn full_then_diff_merge_to_the_latest_memory() {
        let ram = crate::memory::create_guest_ram(32, false).unwrap();
        ram.memory
            .write_obj(0x1111u64, GuestAddress(0x5000))
            .unwrap();
        ram.memory
            .write_obj(0x2222u64, GuestAddress(0x80_0000))
            .unwrap();
        let base = tmp("base");
        let n = write_full(&ram, &base).unwrap();
        assert_eq!(n, 2 * PAGE, "only the two touched pages are written");
        assert_eq!(base.metadata().unwrap().len(), 32 << 20);

        // Change one page, zero another: the diff carries both.
        ram.memory
            .write_obj(0x3333u64, GuestAddress(0x5000))
            .unwrap();
        ram.memory.write_obj(0u64, GuestAddress(0x80_0000)).unwrap();
        let pages = (32 << 20) / PAGE;
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        for page in [0x5000 / PAGE, 0x80_0000 / PAGE] {
            bitmap[(page / 64) as usize] |= 1 << (page % 64);
        }
        let diff = tmp("diff");
        assert_eq!(write_diff(&ram, &diff, &[bitmap]).unwrap(), 2 * PAGE);
        merge(&base, &[diff]).unwrap();
        let mut b = [0u8; 8];
        base.read_exact_at(&mut b, 0x5000).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 0x3333);
        base.read_exact_at(&mut b, 0x80_0000).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 0);
    }
}
