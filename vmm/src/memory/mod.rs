//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO hole.
//!
//! A memfd (rather than anonymous memory) lets vhost-user backends map the
//! same pages, and lets snapshots write memory out by file offset.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::machine::layout::{HIGH_RAM_START, LOW_RAM_END, RAM_START};

pub mod fixed;

/// Smallest guest accepted: room for the boot structures, ACPI tables, a
/// kernel and its stack.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest accepted (the address space tern lays out and tests).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size outside the supported range.
    #[error("memory size {0} MiB is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB} MiB)")]
    BadSize(u64),
    /// memfd_create failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(std::io::Error),
    /// ftruncate failed.
    #[error("cannot size the guest memory file to {size} bytes: {err}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The OS error.
        err: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(vm_memory::mmap::MmapRegionError),
    /// Not enough free huge pages on the host.
    #[error("huge_pages 2M needs {needed} free 2 MiB huge pages but the host has {free} (see /proc/sys/vm/nr_hugepages)")]
    HugePages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// The regions did not form a valid guest memory.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    /// More memory asked for ahead than the host has available.
    #[error("allocating {needed} MiB ahead needs that much available memory, the host has {available} MiB (MemAvailable)")]
    NotAvailable {
        /// MiB asked for.
        needed: u64,
        /// MiB available.
        available: u64,
    },
    /// Populating the memory failed (not enough memory or huge pages).
    #[error("cannot allocate all {size} bytes of guest memory ahead: {err}")]
    Prealloc {
        /// RAM size.
        size: u64,
        /// The OS error.
        err: std::io::Error,
    },
}

/// What guest RAM is mapped from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A memfd mapped shared: vhost-user backends can map it too.
    Memfd,
    /// A snapshot's memory file mapped private (copy-on-write): pages are
    /// read from the file only when touched, and writes stay in this
    /// process. Not shareable with backends.
    PrivateFile,
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    /// Threads still bringing a snapshot's pages in (a lazy restore).
    /// Declared first so they stop before the memory is unmapped.
    pub filler: Option<crate::snapshot::lazy::LazyFill>,
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// Regions mapped at an address picked ahead (low RAM whose KVM slot
    /// was registered early, `kvm/warm.rs`): `memory` does not own these
    /// mappings, so they are released here, after it.
    pub fixed: Vec<fixed::FixedMapping>,
    /// The file holding every page, in guest-physical order (low RAM first,
    /// then high RAM).
    pub file: File,
    /// Total RAM size in bytes.
    pub size: u64,
    /// What the mapping is.
    pub backing: Backing,
}

impl GuestRam {
    /// Allocates and clears every page now, as if written
    /// (MADV_POPULATE_WRITE on each region), so that later writes find
    /// the page there: no allocation, no fault, and on a host that is
    /// itself a VM no first touch of fresh memory either.
    pub fn preallocate(&self) -> Result<(), MemoryError> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        for r in self.memory.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Layout(e.to_string()))?;
            // SAFETY: the region's whole mapping, which `self` owns;
            // populating changes no byte that is already there.
            let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(MemoryError::Prealloc {
                    size: self.size,
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Waits until a lazy restore has brought every page of its snapshot
    /// in (at once when there is none): a snapshot or migration must not
    /// read memory the fill has not reached, which would look like holes.
    /// False if the fill failed.
    pub fn wait_filled(&self) -> bool {
        self.filler.as_ref().is_none_or(|f| f.gate().wait())
    }
}

/// The guest-physical RAM ranges for `size` bytes: below the MMIO hole
/// first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(LOW_RAM_END - RAM_START);
    let mut ranges = vec![(GuestAddress(RAM_START), low)];
    if size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), size - low));
    }
    ranges
}

/// Creates `mib` MiB of guest RAM backed by a fresh memfd, of 2 MiB huge
/// pages when `huge` is set.
pub fn create_guest_ram(mib: u64, huge: bool) -> Result<GuestRam, MemoryError> {
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    let size = mib << 20;
    if huge {
        check_free_huge_pages(mib / 2)?;
    }
    let file = new_memfd(size, huge)?;
    map_ram(file, size, huge, Backing::Memfd)
}

/// A memfd of `size` bytes (of 2 MiB huge pages when `huge`).
fn new_memfd(size: u64, huge: bool) -> Result<File, MemoryError> {
    let flags = if huge {
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: the name is a valid NUL-terminated string and the flags are
    // valid; the returned descriptor is checked before use.
    let fd = unsafe { libc::memfd_create(c"tern-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own and nothing else refers to it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|err| MemoryError::Truncate { size, err })?;
    Ok(file)
}

/// Creates guest RAM of `size` bytes backed by a fresh memfd filled from
/// `src` (a snapshot's memory file, possibly sparse: only its data extents
/// are copied, holes stay unallocated).
pub fn ram_from_file_copy(src: &File, size: u64) -> Result<GuestRam, MemoryError> {
    let file = new_memfd(size, false)?;
    copy_data_extents(src, &file, size).map_err(MemoryError::Memfd)?;
    map_ram(file, size, false, Backing::Memfd)
}

/// Creates guest RAM of `size` bytes backed by a fresh, empty memfd, for
/// a lazy restore to fill.
pub fn ram_empty(size: u64) -> Result<GuestRam, MemoryError> {
    let file = new_memfd(size, false)?;
    map_ram(file, size, false, Backing::Memfd)
}

/// Maps another tern's guest memfd (same-host migration) as guest RAM.
pub fn ram_from_memfd(file: File, size: u64) -> Result<GuestRam, MemoryError> {
    let actual = file.metadata().map_err(MemoryError::Memfd)?.len();
    if actual != size {
        return Err(MemoryError::Layout(format!(
            "the memory fd holds {actual} bytes, the VM needs {size}"
        )));
    }
    map_ram(file, size, false, Backing::Memfd)
}

/// Maps a snapshot's memory file private as guest RAM: nothing is read
/// until the guest touches it.
pub fn ram_from_file_private(file: File, size: u64) -> Result<GuestRam, MemoryError> {
    map_ram(file, size, false, Backing::PrivateFile)
}

/// The data extents of `f` within `[start, end)`, as (offset, length),
/// found with SEEK_DATA/SEEK_HOLE (a file system without them reports the
/// whole range as data).
pub fn data_extents(f: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a valid descriptor with a valid whence.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos. Anything else: assume all data.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((pos, end - pos));
            }
            break;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole - data));
        pos = hole;
    }
    out
}

/// Copies the data extents of `src` (up to `size`) into `dst` at the same
/// offsets.
fn copy_data_extents(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4 << 20];
    for (off, len) in data_extents(src, 0, size) {
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(buf.len());
            let at = off + done;
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Maps `file` (already `size` bytes) as guest RAM.
fn map_ram(file: File, size: u64, huge: bool, backing: Backing) -> Result<GuestRam, MemoryError> {
    let share = match backing {
        Backing::Memfd => libc::MAP_SHARED,
        Backing::PrivateFile => libc::MAP_PRIVATE,
    };
    // Huge pages are reserved at mmap time, so a shortage is an error now
    // rather than a SIGBUS when the guest touches memory.
    let flags = if huge {
        share
    } else {
        share | libc::MAP_NORESERVE
    };
    let mut regions = Vec::new();
    let mut fixed = Vec::new();
    let mut file_offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, file_offset);
        let builder = MmapRegionBuilder::new(len as usize)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags);
        let whole_low = addr.0 == RAM_START && len == LOW_RAM_END - RAM_START;
        let range = whole_low
            .then(crate::kvm::warm::take_low_ram_range)
            .flatten();
        let at = range.and_then(|r| match r.map_file(&file, file_offset, flags) {
            Ok(m) => Some(m),
            Err(e) => {
                log::debug!("{e}: mapping low RAM elsewhere");
                None
            }
        });
        let mmap = match at {
            Some(m) => {
                let ptr = m.addr() as *mut u8;
                fixed.push(m);
                // SAFETY: `ptr` starts a mapping of exactly `len` bytes,
                // kept until `fixed` (held by the GuestRam) is dropped.
                unsafe { builder.with_raw_mmap_pointer(ptr) }.build()
            }
            None => builder.build(),
        }
        .map_err(MemoryError::Mmap)?;
        let region = GuestRegionMmap::new(mmap, addr)
            .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
        file_offset += len;
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))?;
    Ok(GuestRam {
        filler: None,
        memory,
        fixed,
        file,
        size,
        backing,
    })
}

/// Refuses to allocate `mib` MiB ahead when the host's MemAvailable is
/// less: populating more than that would wake the OOM killer rather than
/// fail. Huge pages are reserved apart and checked when created.
pub fn check_available(mib: u64) -> Result<(), MemoryError> {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kib| kib >> 10);
    match available {
        Some(available) if available < mib => Err(MemoryError::NotAvailable {
            needed: mib,
            available,
        }),
        _ => Ok(()),
    }
}

/// Fails unless the host has `needed` free 2 MiB huge pages.
fn check_free_huge_pages(needed: u64) -> Result<(), MemoryError> {
    let free = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if free < needed {
        return Err(MemoryError::HugePages { needed, free });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn splits_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(6 << 30);
        assert_eq!(r[0], (GuestAddress(0), LOW_RAM_END));
        assert_eq!(
            r[1],
            (GuestAddress(HIGH_RAM_START), (6 << 30) - LOW_RAM_END)
        );
    }

    #[test]
    fn creates_shared_memory_of_large_size() {
        let ram = create_guest_ram(64 << 10, false).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        assert_eq!(ram.file.metadata().unwrap().len(), 64 << 30);
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(HIGH_RAM_START))
            .unwrap();
        assert!(create_guest_ram(1, false).is_err());
    }
}
