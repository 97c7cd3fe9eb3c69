//! The few userfaultfd operations a lazy restore needs (`lazy.rs`): open,
//! register a range for missing-page faults, read fault events, resolve
//! them by copying a page range in atomically, wake, unregister.
//!
//! Written against the kernel ABI (linux/userfaultfd.h) with vmm-sys-util's
//! ioctl helpers: the `userfaultfd` crate generates its bindings with
//! bindgen and libclang at build time, a heavy build for six ioctls.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

/// The userfaultfd API version (`UFFD_API`), also the ioctl type byte.
const UFFD_API: u64 = 0xAA;
/// Missing-page faults on shared memory (shmem, memfd) are reported.
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// Register for faults on pages not present in the backing file.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `uffd_msg.event` of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` as a page fault fills it (32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    _feat: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFD_API as u32, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFD_API as u32, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFD_API as u32, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFD_API as u32, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFD_API as u32, 0x03, UffdioCopy);

/// What a copy did.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// This many bytes from the start were copied in (all of them, or up to
    /// a page that was already there).
    Bytes(u64),
    /// The first page was already present: nothing copied.
    FirstPresent,
}

/// A userfaultfd, non-blocking and close-on-exec.
pub struct Uffd(File);

impl Uffd {
    /// Opens a userfaultfd that reports missing pages of shared memory.
    /// Fails where the kernel lacks it or forbids it to this process
    /// (`vm.unprivileged_userfaultfd` = 0 and no CAP_SYS_PTRACE).
    pub fn new() -> io::Result<Self> {
        // SAFETY: the syscall takes flags only and returns a new descriptor
        // or -1; no memory is passed.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let uffd = Uffd(unsafe { File::from_raw_fd(fd as i32) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_MISSING_SHMEM,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly a `UffdioApi`.
        let ret = unsafe { ioctl_with_mut_ref(&uffd.0, UFFDIO_API(), &mut api) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        if api.features & UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "userfaultfd lacks missing-page faults on shared memory",
            ));
        }
        Ok(uffd)
    }

    /// Reports missing-page faults in `[start, start + len)` (page aligned,
    /// one or more whole mappings of shared memory).
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a
        // `UffdioRegister`; the range only names memory, it is not accessed.
        let ret = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_REGISTER(), &mut reg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops reporting faults in the range; threads waiting on a fault
    /// there are woken and fault again without us.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a `UffdioRange`.
        let ret = unsafe { ioctl_with_ref(&self.0, UFFDIO_UNREGISTER(), &range) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wakes threads waiting on a fault in the range (a page another
    /// thread filled first).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads exactly a `UffdioRange`.
        let ret = unsafe { ioctl_with_ref(&self.0, UFFDIO_WAKE(), &range) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` into the registered range at `dst`,
    /// page by page, each page atomically put in place; stops at the
    /// first page already present. Waiters on the copied pages are woken.
    ///
    /// # Safety
    /// `src..src+len` must be readable memory of this process for the
    /// call's duration.
    pub unsafe fn copy(&self, dst: u64, src: u64, len: u64) -> io::Result<Copied> {
        let mut c = UffdioCopy {
            dst,
            src,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes exactly a `UffdioCopy`; the
        // caller vouches for the source, and the kernel checks the
        // destination is in a registered range.
        let ret = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_COPY(), &mut c) };
        if ret == 0 {
            return Ok(Copied::Bytes(len));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Part copied: `copy` says how much (a page further on was
            // present, or the copy was cut short).
            Some(libc::EAGAIN) if c.copy > 0 => Ok(Copied::Bytes(c.copy as u64)),
            Some(libc::EEXIST) => Ok(Copied::FirstPresent),
            _ => Err(err),
        }
    }

    /// The addresses of the page faults waiting now (none when nothing is
    /// pending). Other events are ignored: only missing faults are asked
    /// for.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> io::Result<()> {
        let mut msgs = [UffdMsg::default(); 16];
        let size = std::mem::size_of_val(&msgs);
        // SAFETY: reads at most `size` bytes into the array, which is that
        // large; uffd_msg is plain data.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                msgs.as_mut_ptr() as *mut libc::c_void,
                size,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(()),
                _ => Err(err),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(
            msgs[..count]
                .iter()
                .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
                .map(|m| m.address),
        );
        Ok(())
    }

    /// The descriptor, to poll on.
    pub fn as_raw_fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From linux/userfaultfd.h, as a C compiler computes them.
        assert_eq!(UFFDIO_API(), 3222841919);
        assert_eq!(UFFDIO_REGISTER(), 3223366144);
        assert_eq!(UFFDIO_UNREGISTER(), 2148575745);
        assert_eq!(UFFDIO_WAKE(), 2148575746);
        assert_eq!(UFFDIO_COPY(), 3223890435);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
