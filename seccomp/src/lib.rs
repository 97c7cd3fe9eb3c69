//! seccomp for tern and its backends.
//!
//! Each binary has one filter per thread kind, written as seccompiler JSON
//! in `resources/seccomp/<binary>.json` (one comment per syscall) and
//! compiled into BPF by this crate's build script, at level 2 (syscalls and
//! argument conditions) and level 1 (syscalls only). A process calls
//! [`init`] once with its binary name and [`Level`], then each thread calls
//! [`enter`] (or the process [`enter_all_threads`]) before it touches guest
//! or frontend input. A syscall outside the filter raises SIGSYS; the
//! handler prints `<binary>: seccomp violation in thread <kind>: syscall N
//! (name)` and exits with [`VIOLATION_STATUS`].
//!
//! Test hook: with `TERN_SECCOMP_TEST_TRIGGER=<binary>:<thread>` in the
//! environment, that thread makes a forbidden syscall (`personality`, a
//! harmless query when allowed) right after installing its filter, so a
//! test can check that the filter is in force.

mod filters;
mod install;
mod level;
mod sigsys;

pub use filters::thread_kinds;
pub use install::{
    enter, enter_all_threads, enter_once, enter_or_exit, init, level, SeccompError, TRIGGER_ENV,
};
pub use level::{Level, LevelError};
pub use sigsys::VIOLATION_STATUS;
