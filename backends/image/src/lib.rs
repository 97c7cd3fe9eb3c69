//! Disk image access shared by tern's vhost-user disk backends (`tern-blk`,
//! `tern-scsi`): raw files (or block devices) and qcow2 images, with backing
//! files, behind one thread-safe [`DiskImage`] trait.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub mod aio;
mod error;
mod file;
pub mod qcow2;
mod raw;

pub use error::ImageError;
pub use qcow2::{create_qcow2, Qcow2Image};
pub use raw::{RawImage, DIRECT_ALIGN};

/// Image file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A flat file or block device: guest offset == file offset.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The format's name as used on command lines and in qcow2 headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(ImageError::UnknownFormat(other.to_string())),
        }
    }
}

/// A disk image: byte-addressed, thread-safe (queues on several threads use one image).
pub trait DiskImage: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly buf.len() bytes at offset (holes and unallocated clusters read as zeros; past the end is an error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    /// Writes all of buf at offset (allocating as needed). Error if read-only or past the end.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError>;
    /// Makes written data durable (fdatasync, and qcow2 metadata).
    fn flush(&self) -> Result<(), ImageError>;
    /// Discards a range: raw punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE) so the file's allocated size shrinks; qcow2 may deallocate whole clusters (and zero-flag partial ones) or just write zeros.
    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// Zeroes a range; with `may_unmap` it may deallocate (as discard) if reads still return zeros.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError>;
    /// Opened read-only.
    fn is_read_only(&self) -> bool;
}

/// Opens `path` as `format`; `direct` opens with O_DIRECT (callers pass aligned buffers; if the filesystem refuses O_DIRECT, return a clear error).
pub fn open(
    path: &Path,
    format: Format,
    read_only: bool,
    direct: bool,
) -> Result<Box<dyn DiskImage>, ImageError> {
    match format {
        Format::Raw => Ok(Box::new(RawImage::open(path, read_only, direct)?)),
        Format::Qcow2 => Ok(Box::new(Qcow2Image::open(path, read_only, direct)?)),
    }
}

/// Detects the format from the header (qcow2 magic "QFI\xfb").
pub fn detect(path: &Path) -> Result<Format, ImageError> {
    let f = file::open_file(path, true, false)?;
    let mut magic = [0u8; 4];
    let n = file::read_up_to(&f, &mut magic, 0)?;
    if n == magic.len() && magic == qcow2::MAGIC {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Checks that `[offset, offset + len)` lies inside an image of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}
