//! qcow2 (v3, and v2) images: reading, allocating writes with consistent
//! refcounts, zero clusters, discard, and backing files.
//!
//! Metadata is written through (every L1/L2/refcount change goes to the file
//! as it is made), in an order that can at worst leak clusters: refcount
//! first, then data, then the L2 entry, then the L1 entry. `flush` is then a
//! plain fdatasync.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::file;
use crate::{DiskImage, Format, ImageError};

mod create;
mod header;
mod io;
mod refcount;
mod tables;
mod zero;

pub use create::create_qcow2;
pub use header::MAGIC;

/// How deep a chain of backing files may go.
const MAX_BACKING_DEPTH: u32 = 16;
/// Largest L1 table we accept (bytes), as qemu.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we accept (bytes).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Byte budget of each metadata cache (L2 tables, refcount blocks).
const CACHE_BYTES: usize = 32 << 20;

/// Sizes derived from cluster_bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// log2 of entries per L2 table.
    pub l2_bits: u32,
    /// log2 of bytes covered by one refcount block.
    pub rb_shift: u32,
    /// Entries (16-bit refcounts) per refcount block.
    pub rb_entries: usize,
}

impl Geometry {
    fn new(cluster_bits: u32) -> Self {
        let cluster_size = 1u64 << cluster_bits;
        let rb_entries = (cluster_size / 2) as usize;
        Geometry {
            cluster_bits,
            cluster_size,
            l2_bits: cluster_bits - 3,
            rb_shift: cluster_bits + (cluster_bits - 1),
            rb_entries,
        }
    }

    /// Is `off` a multiple of the cluster size?
    pub(crate) fn aligned(&self, off: u64) -> bool {
        off & (self.cluster_size - 1) == 0
    }

    /// Cache capacity in tables of one cluster.
    pub(crate) fn cache_tables(&self) -> usize {
        (CACHE_BYTES / self.cluster_size as usize).max(16)
    }
}

/// Mutable metadata, behind the image's mutex.
pub(crate) struct Meta {
    /// L1 table (in memory copy of the on-disk one).
    pub l1: Vec<u64>,
    /// L2 tables by file offset.
    pub l2_cache: HashMap<u64, Vec<u64>>,
    /// Refcount table.
    pub rt: Vec<u64>,
    /// Offset of the refcount table in the file.
    pub rt_offset: u64,
    /// Refcount blocks by file offset.
    pub rb_cache: HashMap<u64, Vec<u16>>,
    /// Where the next cluster is allocated (end of file, cluster aligned).
    pub next_free: u64,
}

/// An open qcow2 image.
pub struct Qcow2Image {
    path: PathBuf,
    /// Buffered descriptor: metadata and internally built cluster writes.
    meta_file: File,
    /// Descriptor for guest data in allocated clusters (O_DIRECT when asked).
    data_file: File,
    geo: Geometry,
    version: u32,
    size: u64,
    l1_offset: u64,
    backing: Option<Box<dyn DiskImage>>,
    read_only: bool,
    meta: Mutex<Meta>,
}

impl Qcow2Image {
    /// Opens a qcow2 image and, recursively and read-only, its backing files.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, ImageError> {
        Self::open_depth(path, read_only, direct, 0)
    }

    fn open_depth(
        path: &Path,
        read_only: bool,
        direct: bool,
        depth: u32,
    ) -> Result<Self, ImageError> {
        let meta_file = file::open_file(path, read_only, false)?;
        let data_file = if direct {
            file::open_file(path, read_only, true)?
        } else {
            meta_file.try_clone().map_err(|err| ImageError::Open {
                path: path.to_path_buf(),
                err,
            })?
        };
        let file_len = file::file_len(&meta_file)?;
        let mut head = vec![0u8; file_len.min(1 << header::MAX_CLUSTER_BITS) as usize];
        file::read_exact(&meta_file, &mut head, 0)?;
        let h = header::parse(&head)?;
        let geo = Geometry::new(h.cluster_bits);
        let cs = geo.cluster_size;

        if h.nb_snapshots != 0 && !read_only {
            return Err(ImageError::Unsupported(format!(
                "image has {} internal snapshots; it can only be opened read-only",
                h.nb_snapshots
            )));
        }
        // L1 table: big enough for the virtual size, inside the file.
        let per_l2 = cs << geo.l2_bits;
        let needed_l1 = h.size.div_ceil(per_l2);
        if (h.l1_size as u64) < needed_l1 {
            return Err(ImageError::Corrupt(format!(
                "L1 table has {} entries, {} needed for a virtual size of {} bytes",
                h.l1_size, needed_l1, h.size
            )));
        }
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(ImageError::Unsupported(format!(
                "L1 table of {l1_bytes} bytes is too large"
            )));
        }
        check_table(&geo, "L1 table", h.l1_table_offset, l1_bytes, file_len)?;
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(ImageError::Corrupt(format!(
                "refcount table of {} clusters",
                h.refcount_table_clusters
            )));
        }
        check_table(
            &geo,
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            file_len,
        )?;
        let l1 = read_table(&meta_file, h.l1_table_offset, l1_bytes)?;
        let rt = read_table(&meta_file, h.refcount_table_offset, rt_bytes)?;

        let backing = match &h.backing_file {
            None => None,
            Some(name) => Some(open_backing(
                path,
                name,
                h.backing_format.as_deref(),
                direct,
                depth,
            )?),
        };

        if h.version == 3 && h.autoclear != 0 && !read_only {
            // We do not maintain what the autoclear bits describe (bitmaps...): clear them.
            file::write_all(&meta_file, &0u64.to_be_bytes(), header::OFF_AUTOCLEAR)?;
        }

        let meta = Meta {
            l1,
            l2_cache: HashMap::new(),
            rt,
            rt_offset: h.refcount_table_offset,
            rb_cache: HashMap::new(),
            next_free: file_len.next_multiple_of(cs),
        };
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            meta_file,
            data_file,
            geo,
            version: h.version,
            size: h.size,
            l1_offset: h.l1_table_offset,
            backing,
            read_only,
            meta: Mutex::new(meta),
        })
    }

    /// The file this image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }

    /// Whether the image has a backing file.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some()
    }

    /// Locks the metadata; a panic elsewhere does not make it unusable,
    /// since every change is written through as it is made.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a metadata structure; a short file means corruption.
    pub(crate) fn read_meta(&self, buf: &mut [u8], off: u64, what: &str) -> Result<(), ImageError> {
        read_meta_from(&self.meta_file, buf, off, what)
    }
}

fn read_meta_from(f: &File, buf: &mut [u8], off: u64, what: &str) -> Result<(), ImageError> {
    match file::read_exact(f, buf, off) {
        Err(ImageError::Io { err, .. }) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(ImageError::Corrupt(format!(
                "{what} at offset {off:#x} extends past the end of the file"
            )))
        }
        other => other,
    }
}

fn check_table(
    geo: &Geometry,
    what: &str,
    off: u64,
    bytes: u64,
    file_len: u64,
) -> Result<(), ImageError> {
    if bytes == 0 {
        return Ok(());
    }
    if off == 0 || !geo.aligned(off) {
        return Err(ImageError::Corrupt(format!(
            "{what} offset {off:#x} is not cluster aligned"
        )));
    }
    match off.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(ImageError::Corrupt(format!(
            "{what} at offset {off:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"
        ))),
    }
}

fn read_table(f: &File, off: u64, bytes: u64) -> Result<Vec<u64>, ImageError> {
    let mut raw = vec![0u8; bytes as usize];
    read_meta_from(f, &mut raw, off, "table")?;
    Ok(raw.chunks_exact(8).map(|c| header::be64(c, 0)).collect())
}

fn open_backing(
    overlay: &Path,
    name: &str,
    format: Option<&str>,
    direct: bool,
    depth: u32,
) -> Result<Box<dyn DiskImage>, ImageError> {
    if depth + 1 >= MAX_BACKING_DEPTH {
        return Err(ImageError::Unsupported(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} images"
        )));
    }
    let p = Path::new(name);
    let path = if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new(".")).join(p)
    };
    let format = match format {
        Some(f) => f.parse::<Format>().map_err(|_| {
            ImageError::Unsupported(format!("backing file {} has format {f:?}", path.display()))
        })?,
        None => crate::detect(&path)?,
    };
    // The backing chain is never written; data is read through the page cache.
    let _ = direct;
    match format {
        Format::Raw => Ok(Box::new(crate::RawImage::open(&path, true, false)?)),
        Format::Qcow2 => Ok(Box::new(Qcow2Image::open_depth(
            &path,
            true,
            false,
            depth + 1,
        )?)),
    }
}
