//! Raw images: guest offset == file offset. Opened with O_DIRECT, buffers
//! that are not 4 KiB aligned in address and length go through an aligned
//! bounce buffer (file offsets and lengths must still be multiples of the
//! device's logical block size, as every caller's 512-byte sectors are).

use std::fs::File;
use std::path::Path;

use crate::file::{self, fallocate, is_unsupported};
use crate::{check_range, DiskImage, ImageError};

/// A raw image file or block device.
pub struct RawImage {
    /// Descriptor for guest data (O_DIRECT when asked).
    file: File,
    /// Buffered descriptor for internally generated writes (zero fill), whose
    /// buffers are not aligned for O_DIRECT.
    aux: File,
    size: u64,
    read_only: bool,
    /// `file` is O_DIRECT: buffers that are not [`DIRECT_ALIGN`]-aligned
    /// (address and length) go through an aligned bounce buffer.
    direct: bool,
}

/// Buffer alignment (address and length) assumed for O_DIRECT.
pub const DIRECT_ALIGN: usize = 4096;

/// Bytes per bounce-buffer round trip.
const BOUNCE_CHUNK: usize = 1 << 20;

fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) && buf.len().is_multiple_of(DIRECT_ALIGN)
}

/// A zeroed heap buffer of `len` bytes whose start is [`DIRECT_ALIGN`]-aligned.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn get(&mut self, n: usize) -> &mut [u8] {
        &mut self.storage[self.start..self.start + n.min(self.len)]
    }
}

impl RawImage {
    /// Opens a raw image.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, ImageError> {
        let file = file::open_file(path, read_only, direct)?;
        let aux = if direct {
            file::open_file(path, read_only, false)?
        } else {
            file.try_clone().map_err(|err| ImageError::Open {
                path: path.to_path_buf(),
                err,
            })?
        };
        let size = file::file_len(&file)?;
        Ok(RawImage {
            file,
            aux,
            size,
            read_only,
            direct,
        })
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// fallocate with `mode`, falling back to writing zeros where unsupported.
    fn zero_with(
        &self,
        mode: libc::c_int,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => file::write_zeros(&self.aux, offset, len),
            Err(err) => Err(ImageError::Io { op, offset, err }),
        }
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        // Inside the size, so a short read means the file shrank under us: zeros.
        if !self.direct || is_aligned(buf) {
            return file::read_or_zero(&self.file, buf, offset);
        }
        // O_DIRECT and an unaligned buffer: through an aligned one (same
        // file offsets, which callers keep at 512-byte multiples).
        let mut bounce =
            AlignedBuf::new(BOUNCE_CHUNK.min(buf.len()).next_multiple_of(DIRECT_ALIGN));
        for (i, chunk) in buf.chunks_mut(BOUNCE_CHUNK).enumerate() {
            let b = bounce.get(chunk.len());
            file::read_or_zero(&self.file, b, offset + (i * BOUNCE_CHUNK) as u64)?;
            chunk.copy_from_slice(b);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_write(offset, buf.len() as u64)?;
        if !self.direct || is_aligned(buf) {
            return file::write_all(&self.file, buf, offset);
        }
        let mut bounce =
            AlignedBuf::new(BOUNCE_CHUNK.min(buf.len()).next_multiple_of(DIRECT_ALIGN));
        for (i, chunk) in buf.chunks(BOUNCE_CHUNK).enumerate() {
            let b = bounce.get(chunk.len());
            b.copy_from_slice(chunk);
            file::write_all(&self.file, b, offset + (i * BOUNCE_CHUNK) as u64)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ImageError> {
        file::sync_data(&self.file)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.check_write(offset, len)?;
        self.zero_with(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            "punch hole",
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), ImageError> {
        if may_unmap {
            return self.discard(offset, len);
        }
        self.check_write(offset, len)?;
        self.zero_with(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            "zero range",
            offset,
            len,
        )
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
