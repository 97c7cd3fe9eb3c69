//! The error type of every image operation.

use std::io;
use std::path::PathBuf;

/// What can go wrong opening, reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening (or creating) the file failed.
    #[error("cannot open {path}: {err}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        err: io::Error,
    },
    /// An I/O system call on the image file failed.
    #[error("{op} at offset {offset:#x} failed: {err}")]
    Io {
        /// What was being done ("read", "write", "fdatasync", "punch hole", ...).
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// The OS error.
        #[source]
        err: io::Error,
    },
    /// A write, discard or zeroing on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// The request does not fit inside the image.
    #[error(
        "request at offset {offset:#x} of {len} bytes is past the end of the image ({size} bytes)"
    )]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
    /// The image's metadata is inconsistent or points outside the file.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image uses a feature this implementation does not handle.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// A format name other than "raw" or "qcow2".
    #[error("unknown image format {0:?} (expected \"raw\" or \"qcow2\")")]
    UnknownFormat(String),
}
