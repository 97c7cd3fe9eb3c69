//! Guest RAM at an address chosen before the RAM exists.
//!
//! A KVM memory slot only records a host address range, so a slot can be
//! registered ahead (`kvm/warm.rs`) for a [`FreeRange`] and the RAM
//! mapped there later, once its file is known. Registering is the slow
//! part of a large slot on a shadow-paging KVM (its reverse maps: 0.3-0.4
//! ms per GiB measured on kvm_pvm), and this takes it out of a restore's
//! critical path.
//!
//! The range is left unmapped until then, not reserved with a PROT_NONE
//! mapping: replacing a mapping under a registered slot makes KVM walk
//! the slot's reverse maps (0.4 ms for 2.75 GiB), while mapping into a
//! free range costs nothing. It is picked far below where the kernel
//! places mappings by itself (top-down from below the stack) and mapped
//! with MAP_FIXED_NOREPLACE, so should anything have landed there, the
//! mapping fails instead of replacing it, and the caller maps elsewhere.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Where ranges are sought: 16 TiB, far from the binary (PIE, near 85
/// TiB) and from the kernel's own choices (near 128 TiB, downwards).
const FIRST_TRY: usize = 16 << 40;
/// How far apart the places tried are, and how many.
const STRIDE: usize = 1 << 40;
const TRIES: usize = 8;

/// Errors mapping RAM into a range.
#[derive(Debug, thiserror::Error)]
pub enum FixedError {
    /// mmap failed (EEXIST: something else is mapped there now).
    #[error("cannot map {len} bytes of guest memory at {addr:#x}: {err}")]
    Map {
        /// Where.
        addr: usize,
        /// How much.
        len: usize,
        /// The OS error.
        err: std::io::Error,
    },
}

/// An address range that was free when picked; nothing is mapped in it.
#[derive(Debug)]
pub struct FreeRange {
    addr: usize,
    len: usize,
}

/// Maps `len` bytes at exactly `addr`, failing if anything is there.
fn map_at(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: u64,
) -> Result<(), FixedError> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the
    // kernel fails with EEXIST instead.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED_NOREPLACE,
            fd,
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(FixedError::Map {
            addr,
            len,
            err: std::io::Error::last_os_error(),
        });
    }
    if p as usize != addr {
        // A kernel older than 4.17 treats the flag as a hint.
        // SAFETY: `p` is the mapping just made, used by nothing.
        unsafe { libc::munmap(p, len) };
        return Err(FixedError::Map {
            addr,
            len,
            err: std::io::Error::from_raw_os_error(libc::EEXIST),
        });
    }
    Ok(())
}

impl FreeRange {
    /// Picks a free range of `len` bytes (a multiple of 2 MiB, so that
    /// huge-page RAM fits) on a 2 MiB boundary.
    pub fn pick(len: usize) -> Option<Self> {
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        (0..TRIES).map(|i| FIRST_TRY + i * STRIDE).find_map(|addr| {
            // Probe by mapping it, then give it back.
            map_at(addr, len, libc::PROT_NONE, anon, -1, 0).ok()?;
            // SAFETY: the probe mapping just made, used by nothing.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            Some(Self { addr, len })
        })
    }

    /// The first address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Maps `file` from `offset` over the whole range, read-write, with
    /// mmap `flags` (MAP_SHARED or MAP_PRIVATE, MAP_NORESERVE...). Fails
    /// if something else has been mapped into the range meanwhile.
    pub fn map_file(
        self,
        file: &File,
        offset: u64,
        flags: i32,
    ) -> Result<FixedMapping, FixedError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        map_at(self.addr, self.len, prot, flags, file.as_raw_fd(), offset)?;
        Ok(FixedMapping {
            addr: self.addr,
            len: self.len,
        })
    }
}

/// Guest RAM mapped into a [`FreeRange`]; unmapped when dropped.
#[derive(Debug)]
pub struct FixedMapping {
    addr: usize,
    len: usize,
}

impl FixedMapping {
    /// The first address.
    pub fn addr(&self) -> usize {
        self.addr
    }
}

impl Drop for FixedMapping {
    fn drop(&mut self) {
        // SAFETY: the range is this mapping's own.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn memfd(len: u64) -> File {
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nothing else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn maps_a_file_where_the_range_was_picked() {
        let range = FreeRange::pick(8 << 20).unwrap();
        let addr = range.addr();
        assert_eq!(addr % (2 << 20), 0);
        let file = memfd(8 << 20);
        file.write_all_at(b"tern", 0).unwrap();
        let m = range.map_file(&file, 0, libc::MAP_SHARED).unwrap();
        assert_eq!(m.addr(), addr);
        // SAFETY: the mapping is 8 MiB, readable and writable.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, 8 << 20) };
        assert_eq!(&bytes[..4], b"tern");
        bytes[4096] = 7;
        let mut b = [0u8];
        file.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b[0], 7);
    }

    #[test]
    fn a_range_taken_meanwhile_is_refused_not_replaced() {
        let range = FreeRange::pick(4 << 20).unwrap();
        let file = memfd(4 << 20);
        // Something else lands in the range first.
        let other = FreeRange {
            addr: range.addr(),
            len: 4 << 20,
        }
        .map_file(&file, 0, libc::MAP_SHARED)
        .unwrap();
        assert!(matches!(
            range.map_file(&file, 0, libc::MAP_SHARED),
            Err(FixedError::Map { .. })
        ));
        drop(other);
    }
}
