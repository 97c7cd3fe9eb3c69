//! The SIGSYS handler: a filter violation is reported on stderr, naming the
//! binary, the thread kind and the syscall, and ends the process.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::OnceLock;

use crate::filters::syscall_name;

/// The exit status after a violation: 128 + SIGSYS, as a shell reports a
/// process killed by SIGSYS.
pub const VIOLATION_STATUS: i32 = 128 + libc::SIGSYS;

static BINARY: OnceLock<&'static str> = OnceLock::new();

thread_local! {
    /// The calling thread's kind, for the report.
    static THREAD: Cell<&'static str> = const { Cell::new("?") };
}

pub(crate) fn set_binary(binary: &'static str) {
    let _ = BINARY.set(binary);
}

pub(crate) fn set_thread(thread: &'static str) {
    THREAD.with(|t| t.set(thread));
}

/// A fixed buffer to format into without allocating (in a signal handler).
struct StackBuf {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Byte offset of `si_syscall` in the SIGSYS `siginfo_t` on x86_64: after
/// si_signo, si_errno, si_code, padding, and `_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO);
    // for SECCOMP_RET_TRAP its `_sigsys` member holds the syscall number at
    // this offset, within the 128-byte structure.
    let nr = unsafe {
        (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // context, a valid ucontext_t; its registers hold the syscall's
    // arguments (rdi, rsi, rdx), shown to help extend a filter.
    let args = unsafe {
        let g = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        [
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
        ]
    };
    let thread = THREAD.with(|t| t.get());
    let binary = BINARY.get().copied().unwrap_or("tern");
    let mut out = StackBuf {
        buf: [0; 256],
        len: 0,
    };
    let _ = writeln!(
        out,
        "{binary}: seccomp violation in thread {thread}: syscall {nr} ({}) args {:#x} {:#x} {:#x}",
        syscall_name(i64::from(nr)),
        args[0],
        args[1],
        args[2]
    );
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid
    // for `len` bytes. Both syscalls are in every filter.
    unsafe {
        libc::write(2, out.buf.as_ptr().cast(), out.len);
        libc::_exit(VIOLATION_STATUS);
    }
}

/// Installs the SIGSYS handler for the whole process.
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill in the handler and flags
    // and pass valid pointers to sigaction.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
