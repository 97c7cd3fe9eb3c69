//! Booting a guest: kernel, initrd and command line into memory, then the
//! boot protocol's parameter block (PVH start info or Linux boot_params).

pub mod kernel;
pub mod memmap;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::kvm::regs::EntryMode;
use crate::machine::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, LOW_RAM_END, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use memmap::memory_map;

/// Magic value of `hvm_start_info`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Where the PVH module list goes: right after the largest memory map.
const PVH_MODLIST_START: u64 = PVH_MEMMAP_START + (PVH_MEMMAP_MAX_ENTRIES * 24) as u64;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// loadflags: the setup heap is usable.
const CAN_USE_HEAP: u8 = 0x80;

/// Errors preparing the boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Loading the kernel failed.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {err}")]
    Initrd {
        /// The path given.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooBig {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long or contains a NUL.
    #[error("kernel command line is too long ({len} bytes, at most {max}) or contains a NUL byte")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing boot structures failed.
    #[error("cannot write boot parameters to guest memory: {0}")]
    Memory(String),
}

/// What to boot.
pub struct BootSpec<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initrd path.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// Where the ACPI RSDP is.
    pub rsdp: GuestAddress,
}

/// Loads everything and writes the boot protocol's parameters; returns how
/// the boot vCPU must enter the kernel.
pub fn prepare(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<EntryMode, BootError> {
    if spec.cmdline.len() >= CMDLINE_MAX_SIZE || spec.cmdline.contains('\0') {
        return Err(BootError::Cmdline {
            len: spec.cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    let kernel = kernel::load_kernel(mem, spec.kernel)?;
    let mem_err = |e: vm_memory::GuestMemoryError| BootError::Memory(e.to_string());
    mem.write_slice(spec.cmdline.as_bytes(), GuestAddress(CMDLINE_START))
        .map_err(mem_err)?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_START + spec.cmdline.len() as u64))
        .map_err(mem_err)?;

    // The initrd goes as high as the boot protocol allows, below the MMIO
    // hole, so the kernel's own early allocations stay clear of it.
    let mut limit = spec.ram_size.min(LOW_RAM_END);
    if let Some(hdr) = &kernel.setup_header {
        if hdr.initrd_addr_max != 0 {
            limit = limit.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let initrd = match spec.initrd {
        Some(path) => Some(load_initrd(mem, path, kernel.end, limit)?),
        None => None,
    };

    match kernel.entry {
        EntryMode::Pvh { .. } => write_pvh(mem, spec, initrd)?,
        EntryMode::Linux64 { .. } => write_boot_params(mem, spec, &kernel, initrd)?,
    }
    Ok(kernel.entry)
}

/// Loads the initrd page-aligned just below `limit`; returns (addr, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let io_err = |err| BootError::Initrd {
        path: path.to_owned(),
        err,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let too_big = || BootError::InitrdTooBig {
        path: path.to_owned(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::Initrd {
            path: path.to_owned(),
            err: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(spec.ram_size)
        .iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.addr,
            size: r.size,
            type_: r.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: spec.rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Memory(e.to_string()))
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    kernel: &kernel::LoadedKernel,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut bp = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        bp.hdr = hdr;
    } else {
        bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        bp.hdr.header = KERNEL_HDR_MAGIC;
        bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.loadflags |= CAN_USE_HEAP;
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
    bp.hdr.cmdline_size = spec.cmdline.len() as u32 + 1;
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = spec.rsdp.0;
    let map = memory_map(spec.ram_size);
    for (slot, r) in bp.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: r.addr,
            size: r.size,
            r#type: r.kind,
        };
    }
    bp.e820_entries = map.len().min(bp.e820_table.len()) as u8;
    let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::Memory(e.to_string()))
}
