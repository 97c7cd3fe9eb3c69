//! The jail's mount namespace: a private copy of the host's mounts, the
//! requested bind mounts, then pivot_root into the jail so that the host's
//! file system is no longer reachable.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A mount step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {err}")]
pub struct MountError {
    what: String,
    err: std::io::Error,
}

fn cstr(path: &Path) -> CString {
    // Paths from the command line and the jail layout hold no NUL byte
    // (the kernel would not accept them as arguments either).
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<(), MountError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(MountError {
            what: what(),
            err: std::io::Error::last_os_error(),
        })
    }
}

fn bind(src: &Path, target: &Path) -> Result<(), MountError> {
    let (s, t) = (cstr(src), cstr(target));
    // SAFETY: valid NUL-terminated paths; a bind mount takes no data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    check(rc, || {
        format!(
            "cannot bind-mount {} at {}",
            src.display(),
            target.display()
        )
    })
}

/// Detaches the mounts at `targets` (to undo binds before a failure).
pub fn detach(targets: &[PathBuf]) {
    for t in targets.iter().rev() {
        let c = cstr(t);
        // SAFETY: a valid path; MNT_DETACH only unmounts.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Enters a new mount namespace whose mounts no longer propagate to the
/// host's.
pub fn unshare() -> Result<(), MountError> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, || {
        "cannot create a mount namespace".into()
    })?;
    let root = cstr(Path::new("/"));
    // SAFETY: a valid path; changing propagation takes no source or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    check(rc, || "cannot make / a slave mount".into())
}

/// Bind-mounts each `(src, target)`; on failure the ones made are undone.
pub fn bind_all(binds: &[(PathBuf, PathBuf)]) -> Result<Vec<PathBuf>, MountError> {
    let mut done = Vec::new();
    for (src, target) in binds {
        if let Err(e) = bind(src, target) {
            detach(&done);
            return Err(e);
        }
        done.push(target.clone());
    }
    Ok(done)
}

/// Makes `root` the process's `/`: bind it onto itself, pivot_root, and
/// detach the old root.
pub fn pivot(root: &Path) -> Result<(), MountError> {
    bind(root, root)?;
    let r = cstr(root);
    // SAFETY: a valid path.
    check(unsafe { libc::chdir(r.as_ptr()) }, || {
        format!("cannot chdir to {}", root.display())
    })?;
    let old = cstr(Path::new("old_root"));
    let dot = cstr(Path::new("."));
    // SAFETY: valid paths relative to the jail root.
    check(unsafe { libc::mkdir(old.as_ptr(), 0o700) }, || {
        "cannot create old_root".into()
    })?;
    // SAFETY: pivot_root takes two valid paths; the new root is a mount
    // point (the bind above) and old_root is below it.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) } as libc::c_int;
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // SAFETY: a valid path.
        unsafe { libc::rmdir(old.as_ptr()) };
        return Err(MountError {
            what: format!("cannot pivot_root into {}", root.display()),
            err,
        });
    }
    let slash = cstr(Path::new("/"));
    let old_abs = cstr(Path::new("/old_root"));
    // SAFETY: valid paths; the old root is detached lazily, then its
    // (now empty) mount point removed.
    unsafe {
        check(libc::chdir(slash.as_ptr()), || {
            "cannot chdir to the new /".into()
        })?;
        check(libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH), || {
            "cannot detach the old root".into()
        })?;
        check(libc::rmdir(old_abs.as_ptr()), || {
            "cannot remove /old_root".into()
        })?;
    }
    Ok(())
}
