//! The jailer's steps, in order: everything that can fail because of the
//! command line is checked before anything is made, and whatever was made
//! is removed again if a later step fails before the jail is entered.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::args::JailerArgs;
use crate::cgroup::{CgroupError, Cgroups};
use crate::jail_dir::{JailDir, JailDirError};
use crate::mount_ns::{self, MountError};
use crate::privileges::{self, PrivilegeError};
use crate::process::{self, ProcessError};
use crate::rlimit::{self, RlimitError};

/// The environment variables passed on to the executable (besides
/// `PATH=/`, where it and the copied executables are).
const KEPT_ENV_PREFIXES: &[&str] = &["TERN_", "RUST_"];

/// Why the jailer stopped.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The executable (or a `--copy` file) is missing or not a file.
    #[error("exec file {path}: {why}")]
    ExecFile {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A `--bind` source is missing.
    #[error("bind source {path}: {err}")]
    BindSource {
        /// The path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The network namespace cannot be opened or joined.
    #[error("network namespace {path}: {err}")]
    Netns {
        /// The path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// /dev/null cannot be opened (for --daemonize).
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
    /// The jail directory.
    #[error(transparent)]
    Dir(#[from] JailDirError),
    /// The cgroups.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The rlimits.
    #[error(transparent)]
    Rlimit(#[from] RlimitError),
    /// The mount namespace.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The forks.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The privilege drop.
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    /// execve failed.
    #[error("cannot exec {path}: {err}")]
    Exec {
        /// The path inside the jail.
        path: String,
        /// OS error.
        err: std::io::Error,
    },
}

fn regular_file(path: &Path) -> Result<String, JailError> {
    let err = |why: String| JailError::ExecFile {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| err("has no file name".into()))
}

fn cstring(s: &[u8]) -> CString {
    // Arguments and environment strings come from C strings already.
    CString::new(s).unwrap_or_default()
}

/// Confines the process as `args` say and execs the executable; returns
/// only on error.
pub fn run(args: &JailerArgs) -> Result<Infallible, JailError> {
    // 1. Checks that need nothing made.
    let exec_name = regular_file(&args.exec_file)?;
    for c in &args.copies {
        regular_file(c)?;
    }
    for (src, _) in &args.binds {
        std::fs::metadata(src).map_err(|err| JailError::BindSource {
            path: src.clone(),
            err,
        })?;
    }
    let netns = match &args.netns {
        Some(p) => Some(File::open(p).map_err(|err| JailError::Netns {
            path: p.clone(),
            err,
        })?),
        None => None,
    };
    let null = if args.daemonize {
        Some(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(JailError::DevNull)?,
        )
    } else {
        None
    };

    // 2. The jail directory: removed on drop unless kept.
    let dir = JailDir::create(&args.chroot_base, &exec_name, &args.id)?;
    dir.copy_in(&args.exec_file)?;
    for c in &args.copies {
        dir.copy_in(c)?;
    }
    dir.populate(args.uid, args.gid)?;
    let mut targets = Vec::new();
    for (src, dst) in &args.binds {
        targets.push((src.clone(), dir.mount_point(src, dst)?));
    }

    // 3. Cgroups (removed by `setup` itself on error) and rlimits.
    let mut cgroups = Cgroups::setup(args.cgroup_version, &args.cgroups, &exec_name, &args.id)?;
    let entered = enter(args, &dir, &mut cgroups, netns.as_ref(), &targets);
    if let Err(e) = entered {
        cgroups.remove();
        return Err(e);
    }
    dir.keep();

    // 4. Inside the jail: forks, stdio, descriptors, privileges, exec.
    if args.daemonize {
        process::daemonize()?;
    }
    if args.new_pid_ns {
        process::new_pid_namespace(&format!("/{exec_name}.pid"))?;
    }
    if let Some(null) = &null {
        privileges::redirect_stdio(null.as_raw_fd())?;
    }
    privileges::close_inherited_fds()?;
    privileges::drop_to(args.uid, args.gid)?;
    exec(&format!("/{exec_name}"), &args.exec_args)
}

/// The steps after which the jail directory cannot be removed from here
/// any more (the host's tree is gone after pivot_root).
fn enter(
    args: &JailerArgs,
    dir: &JailDir,
    cgroups: &mut Cgroups,
    netns: Option<&File>,
    targets: &[(PathBuf, PathBuf)],
) -> Result<(), JailError> {
    rlimit::apply(&args.rlimits)?;
    cgroups.join()?;
    if let (Some(ns), Some(path)) = (netns, &args.netns) {
        // SAFETY: setns on a namespace descriptor this process opened.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(JailError::Netns {
                path: path.clone(),
                err: std::io::Error::last_os_error(),
            });
        }
    }
    mount_ns::unshare()?;
    let mounted = mount_ns::bind_all(targets)?;
    if let Err(e) = mount_ns::pivot(dir.root()) {
        mount_ns::detach(&mounted);
        mount_ns::detach(&[dir.root().to_path_buf()]);
        return Err(e.into());
    }
    Ok(())
}

fn exec(path: &str, args: &[String]) -> Result<Infallible, JailError> {
    let prog = cstring(path.as_bytes());
    let argv: Vec<CString> = std::iter::once(prog.clone())
        .chain(args.iter().map(|a| cstring(a.as_bytes())))
        .collect();
    let mut envp: Vec<CString> = vec![cstring(b"PATH=/")];
    for (k, v) in std::env::vars_os() {
        let key = k.as_bytes();
        if KEPT_ENV_PREFIXES
            .iter()
            .any(|p| key.starts_with(p.as_bytes()))
        {
            let mut kv = key.to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstring(&kv));
        }
    }
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    // SAFETY: NUL-terminated argument and environment arrays of valid C
    // strings, alive across the call.
    unsafe { libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    Err(JailError::Exec {
        path: path.to_string(),
        err: std::io::Error::last_os_error(),
    })
}
