//! Raw images: guest offset == file offset.

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
        file::read_or_zero(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_write(offset, buf.len() as u64)?;
        file::write_all(&self.file, buf, offset)
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
