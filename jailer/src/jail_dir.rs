//! The jail's directory, `<base>/<exec name>/<id>/root`: made fresh, with
//! the executables copied in and only the device nodes tern needs. Removed
//! again if the jailer fails before the exec.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The device nodes made in the jail: path, major, minor. /dev/null is
/// there because tern starts its managed backends with stdin on it.
pub const DEVICES: &[(&str, u32, u32)] = &[
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
    ("dev/null", 1, 3),
];

/// Why the jail directory could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailDirError {
    /// The id's directory exists already (another jail, or a stale one).
    #[error("jail directory {0} already exists")]
    Exists(PathBuf),
    /// A directory cannot be made.
    #[error("cannot create {path}: {err}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// A file cannot be copied in.
    #[error("cannot copy {src} into the jail: {err}")]
    Copy {
        /// The file.
        src: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// A device node cannot be made or given to the uid.
    #[error("cannot create device node {path}: {err}")]
    Device {
        /// The node.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// A path cannot be given to the jail's uid/gid.
    #[error("cannot chown {path}: {err}")]
    Chown {
        /// The path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
}

/// The jail's directory; removed on drop unless [`JailDir::keep`] was called.
#[derive(Debug)]
pub struct JailDir {
    root: PathBuf,
    /// The outermost directory this run created (removed on failure).
    created: Option<PathBuf>,
}

fn cstr(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// chown(2) on `path`.
pub fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl JailDir {
    /// Makes `<base>/<exec_name>/<id>/root`; the `<id>` directory must not
    /// exist yet.
    pub fn create(base: &Path, exec_name: &str, id: &str) -> Result<Self, JailDirError> {
        let exec_dir = base.join(exec_name);
        let mut created = None;
        // The missing parents, outermost first.
        let missing: Vec<&Path> = exec_dir.ancestors().take_while(|p| !p.exists()).collect();
        for dir in missing.into_iter().rev() {
            std::fs::create_dir(dir).map_err(|err| JailDirError::Create {
                path: dir.to_path_buf(),
                err,
            })?;
            created.get_or_insert_with(|| dir.to_path_buf());
        }
        let mut this = JailDir {
            root: exec_dir.join(id).join("root"),
            created,
        };
        let id_dir = exec_dir.join(id);
        match std::fs::create_dir(&id_dir) {
            Ok(()) => {
                this.created.get_or_insert(id_dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(JailDirError::Exists(id_dir));
            }
            Err(err) => return Err(JailDirError::Create { path: id_dir, err }),
        }
        this.mkdir("")?;
        Ok(this)
    }

    /// The jail's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes `rel` (relative to the root), mode 0755, owned by root.
    fn mkdir(&self, rel: &str) -> Result<PathBuf, JailDirError> {
        let path = self.root.join(rel);
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
            Err(err) => Err(JailDirError::Create { path, err }),
        }
    }

    /// Puts the executable `src` in the root as `/<file name>`: a hard link
    /// when it is on the same file system and anyone may read and run it
    /// (no copy to make: the jail cannot write it), else a copy, mode 0755.
    pub fn copy_in(&self, src: &Path) -> Result<PathBuf, JailDirError> {
        let err = |err| JailDirError::Copy {
            src: src.to_path_buf(),
            err,
        };
        let name = src
            .file_name()
            .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let dst = self.root.join(name);
        let world_rx = std::fs::metadata(src)
            .map(|m| m.permissions().mode() & 0o005 == 0o005)
            .unwrap_or(false);
        if world_rx && std::fs::hard_link(src, &dst).is_ok() {
            return Ok(dst);
        }
        std::fs::copy(src, &dst).map_err(err)?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        Ok(dst)
    }

    /// Makes the [`DEVICES`], owned by `uid`/`gid`,
    /// mode 0600, and a private /tmp owned by them; the root itself is
    /// theirs too (for the API socket).
    pub fn populate(&self, uid: u32, gid: u32) -> Result<(), JailDirError> {
        self.mkdir("dev")?;
        self.mkdir("dev/net")?;
        for &(rel, major, minor) in DEVICES {
            let path = self.root.join(rel);
            let c = cstr(&path).map_err(|err| JailDirError::Device {
                path: path.clone(),
                err,
            })?;
            // SAFETY: `c` is a valid path; mknod makes a character device.
            let rc = unsafe {
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o600,
                    libc::makedev(major, minor),
                )
            };
            if rc != 0 {
                return Err(JailDirError::Device {
                    path,
                    err: std::io::Error::last_os_error(),
                });
            }
            chown(&path, uid, gid).map_err(|err| JailDirError::Device { path, err })?;
        }
        let tmp = self.mkdir("tmp")?;
        for path in [tmp, self.root.clone()] {
            chown(&path, uid, gid).map_err(|err| JailDirError::Chown { path, err })?;
        }
        Ok(())
    }

    /// Makes the mount point for a bind of `src` at `dst` (absolute inside
    /// the jail): an empty file or directory like `src`, with its parents.
    pub fn mount_point(&self, src: &Path, dst: &Path) -> Result<PathBuf, JailDirError> {
        let target = self.root.join(dst.strip_prefix("/").unwrap_or(dst));
        let err = |path: &Path, err| JailDirError::Create {
            path: path.to_path_buf(),
            err,
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(parent, e))?;
        }
        if src.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| err(&target, e))?;
        } else {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map_err(|e| err(&target, e))?;
        }
        Ok(target)
    }

    /// The jail is in use: never remove it.
    pub fn keep(mut self) {
        self.created = None;
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        // Bind mounts are undone before this runs (see mount_ns), so this
        // never reaches into a host directory.
        if let Some(dir) = self.created.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
