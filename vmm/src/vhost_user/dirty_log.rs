//! The dirty log shared with vhost-user backends (VHOST_USER_PROTOCOL_F_
//! LOG_SHMFD): a memfd holding one bit per 4 KiB guest page, indexed by
//! guest physical address, that each backend sets (atomically) for every
//! page it writes — the used rings and the buffers it fills. KVM's dirty
//! log cannot see those writes, so diff snapshots and migration read both.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Bytes per logged page.
const LOG_PAGE: u64 = 4096;

/// Errors creating the log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The memfd could not be created, sized or mapped.
    #[error("vhost-user dirty log: {0}")]
    Os(std::io::Error),
}

/// The shared log.
pub struct DirtyLog {
    file: File,
    ptr: *mut AtomicU8,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics, and it lives as
// long as the struct; the raw pointer is what makes the type !Send/!Sync
// by default.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: every access is an atomic byte operation.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// A log covering every page of `mem` (up to its highest address).
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, DirtyLogError> {
        let end = mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        let bytes = end.div_ceil(LOG_PAGE).div_ceil(8);
        let len = bytes.div_ceil(4096).max(1) * 4096;
        // SAFETY: a valid NUL-terminated name and flags; checked below.
        let fd = unsafe { libc::memfd_create(c"tern-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(DirtyLogError::Os(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).map_err(DirtyLogError::Os)?;
        // SAFETY: maps `len` bytes of a file of that size, shared; the
        // result is checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyLogError::Os(std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            ptr: ptr.cast(),
            len: len as usize,
        })
    }

    /// The memfd to send with SET_LOG_BASE.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The log's size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    fn byte(&self, i: usize) -> Option<&AtomicU8> {
        // SAFETY: `i` is checked against the mapping's length, which stays
        // mapped while `self` lives; AtomicU8 has the layout of u8.
        (i < self.len).then(|| unsafe { &*self.ptr.add(i) })
    }

    /// Reads and clears the log, as one bitmap per region of `mem` in
    /// KVM_GET_DIRTY_LOG's layout (bit n of the region's u64 array = the
    /// region's page n).
    pub fn take(&self, mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
        mem.iter()
            .map(|r| {
                let first = r.start_addr().0 / LOG_PAGE;
                let pages = r.len() / LOG_PAGE;
                let mut out = vec![0u64; pages.div_ceil(64) as usize];
                let mut p = 0;
                while p < pages {
                    let g = first + p;
                    // Whole log bytes at once where aligned.
                    if g.is_multiple_of(8) && p + 8 <= pages {
                        let v = self
                            .byte((g / 8) as usize)
                            .map(|b| b.swap(0, Ordering::AcqRel))
                            .unwrap_or(0);
                        for k in 0..8 {
                            if v >> k & 1 == 1 {
                                let q = p + k;
                                out[(q / 64) as usize] |= 1 << (q % 64);
                            }
                        }
                        p += 8;
                    } else {
                        let bit = 1u8 << (g % 8);
                        let was = self
                            .byte((g / 8) as usize)
                            .map(|b| b.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
                            .unwrap_or(false);
                        if was {
                            out[(p / 64) as usize] |= 1 << (p % 64);
                        }
                        p += 1;
                    }
                }
                out
            })
            .collect()
    }

    /// Marks a guest physical page dirty (what a backend does; for tests).
    pub fn mark(&self, gpa: u64) {
        let page = gpa / LOG_PAGE;
        if let Some(b) = self.byte((page / 8) as usize) {
            b.fetch_or(1 << (page % 8), Ordering::AcqRel);
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// ORs `b` into `a`, bitmap by bitmap.
pub fn merge_bitmaps(a: &mut [Vec<u64>], b: &[Vec<u64>]) {
    for (x, y) in a.iter_mut().zip(b) {
        for (u, v) in x.iter_mut().zip(y) {
            *u |= v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_read_back_per_region_and_clear() {
        let ram = crate::memory::create_guest_ram(4 << 10, false).unwrap();
        let log = DirtyLog::new(&ram.memory).unwrap();
        let high = crate::machine::layout::HIGH_RAM_START;
        log.mark(0x3000);
        log.mark(high + 9 * 4096);
        let b = log.take(&ram.memory);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0][0], 1 << 3);
        assert_eq!(b[1][0], 1 << 9);
        assert!(log.take(&ram.memory).iter().flatten().all(|w| *w == 0));
    }
}
