//! Positional file I/O helpers mapping OS errors to [`ImageError`].

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::ImageError;

/// Opens an image file; with `direct`, O_DIRECT (refusal reported as Unsupported).
pub(crate) fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File, ImageError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(!read_only);
    if direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path).map_err(|err| {
        if direct && err.raw_os_error() == Some(libc::EINVAL) {
            ImageError::Unsupported(format!(
                "{}: the filesystem refuses O_DIRECT; open the image without direct I/O",
                path.display()
            ))
        } else {
            ImageError::Open {
                path: path.to_path_buf(),
                err,
            }
        }
    })
}

/// Length of a file or block device.
pub(crate) fn file_len(f: &File) -> Result<u64, ImageError> {
    let mut f = f;
    f.seek(SeekFrom::End(0)).map_err(|err| ImageError::Io {
        op: "seek to end",
        offset: 0,
        err,
    })
}

/// Reads exactly `buf.len()` bytes; a short file is an `UnexpectedEof` Io error.
pub(crate) fn read_exact(f: &File, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
    f.read_exact_at(buf, offset).map_err(|err| ImageError::Io {
        op: "read",
        offset,
        err,
    })
}

/// Reads as much as the file has (up to `buf.len()`); returns the count read.
pub(crate) fn read_up_to(f: &File, buf: &mut [u8], offset: u64) -> Result<usize, ImageError> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                return Err(ImageError::Io {
                    op: "read",
                    offset: offset + done as u64,
                    err,
                })
            }
        }
    }
    Ok(done)
}

/// Reads `buf.len()` bytes, treating bytes past the end of the file as zeros.
pub(crate) fn read_or_zero(f: &File, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
    let n = read_up_to(f, buf, offset)?;
    buf[n..].fill(0);
    Ok(())
}

/// Writes all of `buf` at `offset`.
pub(crate) fn write_all(f: &File, buf: &[u8], offset: u64) -> Result<(), ImageError> {
    f.write_all_at(buf, offset).map_err(|err| ImageError::Io {
        op: "write",
        offset,
        err,
    })
}

/// fdatasync.
pub(crate) fn sync_data(f: &File) -> Result<(), ImageError> {
    f.sync_data().map_err(|err| ImageError::Io {
        op: "fdatasync",
        offset: 0,
        err,
    })
}

/// fallocate(2) with `mode`; returns the raw io::Error so callers can fall back.
pub(crate) fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only takes an fd we own (kept open by `f`) and plain integers;
        // it touches no memory of ours.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// True when an fallocate error means "not supported here" (so write zeros instead).
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

/// Writes zeros over `[offset, offset + len)` through `f` (a buffered descriptor).
pub(crate) fn write_zeros(f: &File, offset: u64, len: u64) -> Result<(), ImageError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        write_all(f, &zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
