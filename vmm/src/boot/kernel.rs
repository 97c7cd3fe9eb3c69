//! Loading the kernel image: ELF (with or without a PVH note) or bzImage,
//! with linux-loader.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::kvm::regs::EntryMode;
use crate::machine::layout::HIMEM_START;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file cannot be opened or read.
    #[error("cannot read kernel image {path}: {err}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel image {0} is neither an ELF file nor a bzImage")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected it.
    #[error("cannot load kernel image {path}: {err}")]
    Load {
        /// The path given.
        path: PathBuf,
        /// What linux-loader said.
        err: linux_loader::loader::Error,
    },
}

/// The kind of image, detected from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// An ELF executable (vmlinux or a unikernel).
    Elf,
    /// A Linux bzImage.
    BzImage,
}

/// A loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// How the boot vCPU enters it.
    pub entry: EntryMode,
    /// The bzImage setup header, to be copied into boot_params.
    pub setup_header: Option<setup_header>,
    /// First byte after the kernel image.
    pub end: u64,
}

/// Detects the image kind from its first bytes.
pub fn detect(file: &mut File, path: &Path) -> Result<ImageKind, KernelError> {
    let mut head = [0u8; 0x206];
    let open_err = |err| KernelError::Open {
        path: path.to_owned(),
        err,
    };
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    let n = read_up_to(file, &mut head).map_err(|err| KernelError::Open {
        path: path.to_owned(),
        err,
    })?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(ImageKind::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(ImageKind::BzImage);
    }
    Err(KernelError::UnknownFormat(path.to_owned()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, KernelError> {
    let mut file = File::open(path).map_err(|err| KernelError::Open {
        path: path.to_owned(),
        err,
    })?;
    let kind = detect(&mut file, path)?;
    let load_err = |err| KernelError::Load {
        path: path.to_owned(),
        err,
    };
    match kind {
        ImageKind::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh { entry: addr.0 },
                _ => EntryMode::Linux64 {
                    entry: r.kernel_load.0,
                },
            };
            Ok(LoadedKernel {
                entry,
                setup_header: None,
                end: r.kernel_end,
            })
        }
        ImageKind::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            // The 64-bit entry (startup_64) sits 0x200 bytes into the
            // protected-mode kernel.
            let entry = EntryMode::Linux64 {
                entry: r.kernel_load.0 + 0x200,
            };
            Ok(LoadedKernel {
                entry,
                setup_header: r.setup_header,
                end: r.kernel_end,
            })
        }
    }
}
