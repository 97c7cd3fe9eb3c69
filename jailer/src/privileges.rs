//! The last steps before the exec: inherited descriptors closed, uid and
//! gid dropped, every capability (effective, permitted, inheritable,
//! ambient and the bounding set) cleared, no_new_privs set.

/// A step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {err}")]
pub struct PrivilegeError {
    what: &'static str,
    err: std::io::Error,
}

fn check(rc: libc::c_long, what: &'static str) -> Result<(), PrivilegeError> {
    if rc < 0 {
        Err(PrivilegeError {
            what,
            err: std::io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Closes every descriptor but 0, 1 and 2.
pub fn close_inherited_fds() -> Result<(), PrivilegeError> {
    // SAFETY: close_range only closes descriptors; nothing in this process
    // holds one above 2 that it uses after this point.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    check(rc, "cannot close inherited file descriptors")
}

/// Points 0, 1 and 2 at `null` (an open /dev/null).
pub fn redirect_stdio(null: libc::c_int) -> Result<(), PrivilegeError> {
    for fd in 0..3 {
        // SAFETY: dup2 between two descriptors this process owns.
        check(
            unsafe { libc::dup2(null, fd) }.into(),
            "cannot redirect stdio to /dev/null",
        )?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
const LAST_CAP: libc::c_ulong = 63;

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    // SAFETY: each call takes plain integers (or a null list for setgroups).
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()).into(),
            "cannot clear supplementary groups",
        )?;
        check(libc::setresgid(gid, gid, gid).into(), "cannot set the gid")?;
        for cap in 0..=LAST_CAP {
            // EINVAL past the kernel's last capability: stop there.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(PrivilegeError {
                    what: "cannot drop a capability from the bounding set",
                    err,
                });
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
            "cannot clear the ambient capabilities",
        )?;
        check(libc::setresuid(uid, uid, uid).into(), "cannot set the uid")?;
    }
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a valid v3 header and two data structures.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(rc, "cannot clear the capabilities")?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc.into(), "cannot set no_new_privs")
}
