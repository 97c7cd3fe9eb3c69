//! `--daemonize` and `--new-pid-ns`: the forks before the exec.

use std::io::Write;

/// A fork or namespace step that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {err}")]
pub struct ProcessError {
    what: &'static str,
    err: std::io::Error,
}

fn last(what: &'static str) -> ProcessError {
    ProcessError {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// Forks; the parent exits 0 at once and the child leads a new session.
pub fn daemonize() -> Result<(), ProcessError> {
    // SAFETY: the jailer is single-threaded, so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(last("cannot fork to daemonize")),
        // SAFETY: setsid takes no arguments; the child is no group leader.
        0 => match unsafe { libc::setsid() } {
            -1 => Err(last("cannot start a new session")),
            _ => Ok(()),
        },
        // SAFETY: _exit ends the parent without running any destructor
        // (the jail directory stays: it is the child's).
        _ => unsafe { libc::_exit(0) },
    }
}

/// Makes a new PID namespace and forks into it: the child goes on as its
/// pid 1; the parent writes the child's pid (as the host sees it) to
/// `pid_file` (a path inside the jail) and exits 0.
pub fn new_pid_namespace(pid_file: &str) -> Result<(), ProcessError> {
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(last("cannot create a PID namespace"));
    }
    // SAFETY: the jailer is single-threaded, so the child may run any code.
    match unsafe { libc::fork() } {
        -1 => Err(last("cannot fork into the PID namespace")),
        0 => Ok(()),
        child => {
            let written = std::fs::File::create(pid_file).and_then(|mut f| writeln!(f, "{child}"));
            if let Err(err) = &written {
                eprintln!("tern-jailer: error: cannot write {pid_file}: {err}");
            }
            // SAFETY: as in daemonize.
            unsafe { libc::_exit(if written.is_ok() { 0 } else { 1 }) }
        }
    }
}
