//! Installing a thread's filter.

use std::sync::OnceLock;

use crate::filters;
use crate::level::Level;
use crate::sigsys;

/// The environment variable of the test hook: `<binary>:<thread>` makes
/// that thread call a forbidden syscall right after entering its filter.
pub const TRIGGER_ENV: &str = "TERN_SECCOMP_TEST_TRIGGER";

/// The process's binary name and level, set once by [`init`].
static PROCESS: OnceLock<(&'static str, Level, Option<String>)> = OnceLock::new();

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// [`init`] was called twice.
    #[error("seccomp is already initialised")]
    AlreadyInitialised,
    /// No filter for this binary and thread kind in resources/seccomp.
    #[error("no seccomp filter for thread '{thread}' of {binary}")]
    NoFilter {
        /// The binary.
        binary: &'static str,
        /// The thread kind.
        thread: &'static str,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for thread '{thread}': {err}")]
    Apply {
        /// The thread kind.
        thread: &'static str,
        /// What seccompiler reported.
        err: seccompiler::Error,
    },
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Signal(std::io::Error),
}

/// Sets this process's binary name (which filter file applies) and level,
/// and installs the SIGSYS handler that reports violations. Call it once,
/// before any thread calls [`enter`]. Without it, [`enter`] installs
/// nothing (a library used in unit tests is not confined).
pub fn init(binary: &'static str, level: Level) -> Result<(), SeccompError> {
    let trigger = std::env::var(TRIGGER_ENV).ok();
    PROCESS
        .set((binary, level, trigger))
        .map_err(|_| SeccompError::AlreadyInitialised)?;
    sigsys::set_binary(binary);
    if level != Level::Off {
        sigsys::install_handler().map_err(SeccompError::Signal)?;
    }
    Ok(())
}

fn program(
    thread: &'static str,
) -> Result<Option<&'static [seccompiler::sock_filter]>, SeccompError> {
    let Some((binary, level, _)) = PROCESS.get() else {
        return Ok(None);
    };
    if *level == Level::Off {
        return Ok(None);
    }
    filters::find(binary, thread, level.number())
        .map(Some)
        .ok_or(SeccompError::NoFilter { binary, thread })
}

/// Installs the filter for `thread` (a kind in this binary's filter file)
/// on the calling thread; threads it starts later inherit it.
pub fn enter(thread: &'static str) -> Result<(), SeccompError> {
    sigsys::set_thread(thread);
    match program(thread)? {
        Some(p) => {
            seccompiler::apply_filter(p).map_err(|err| SeccompError::Apply { thread, err })?
        }
        None => mark(),
    }
    trigger(thread);
    Ok(())
}

/// Installs the filter for `thread` on every thread of the process
/// (SECCOMP_FILTER_FLAG_TSYNC): for threads a library starts before the
/// process can filter them, such as a backend's signal thread.
pub fn enter_all_threads(thread: &'static str) -> Result<(), SeccompError> {
    sigsys::set_thread(thread);
    match program(thread)? {
        Some(p) => seccompiler::apply_filter_all_threads(p)
            .map_err(|err| SeccompError::Apply { thread, err })?,
        None => mark(),
    }
    trigger(thread);
    Ok(())
}

/// The level [`init`] set, if it was called.
pub fn level() -> Option<Level> {
    PROCESS.get().map(|p| p.1)
}

thread_local! {
    /// Whether this thread has entered its filter through [`enter_once`].
    static ENTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`enter_or_exit`] the first time a thread calls it, nothing after: for
/// threads a library creates, filtered at the start of the first callback
/// they make into our code (before it reads any input).
pub fn enter_once(thread: &'static str) {
    if !ENTERED.with(|e| e.replace(true)) {
        enter_or_exit(thread);
    }
}

/// [`enter`], or end the process with status 1 and a one-line error: a
/// thread must never run unfiltered when its filter was asked for.
pub fn enter_or_exit(thread: &'static str) {
    if let Err(e) = enter(thread) {
        let binary = PROCESS.get().map(|p| p.0).unwrap_or("tern");
        eprintln!("{binary}: error: {e}");
        std::process::exit(1);
    }
}

/// At level 0, a `prctl(PR_GET_SECCOMP)` marks where the filter would have
/// been installed, so that `tools/seccomp-trace.sh` can tell a thread's
/// set-up syscalls from those its filter must allow.
fn mark() {
    // SAFETY: PR_GET_SECCOMP only reads this thread's seccomp mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
}

/// The test hook: a forbidden syscall from the named thread kind.
fn trigger(thread: &'static str) {
    let Some((binary, _, Some(wanted))) = PROCESS.get() else {
        return;
    };
    if wanted.split_once(':') == Some((binary, thread)) {
        // SAFETY: personality(0xffffffff) only queries the execution
        // domain; no filter allows it, so under a filter it raises SIGSYS.
        let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        eprintln!("{binary}: seccomp test trigger in thread {thread}: personality() returned {r}");
    }
}
