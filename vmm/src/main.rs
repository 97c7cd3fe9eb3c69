//! The `tern` binary: parse the command line, start the API server if
//! asked, boot the VM if configured, then run the VMM thread's event loop
//! until the VM ends.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, SubscriberOps};
use tern::api::server::{self, ApiServer};
use tern::cli::{self, Command, RunOptions};
use tern::controller::Controller;
use tern::exit::ERROR_STATUS;

/// The API socket path, for the signal handler to remove.
static SOCKET_PATH: OnceLock<CString> = OnceLock::new();

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if let Some(path) = SOCKET_PATH.get() {
        // SAFETY: unlink is async-signal-safe and the path is a valid,
        // NUL-terminated string that lives for the whole process.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

fn fail(msg: impl std::fmt::Display, api: Option<&ApiServer>) -> ExitCode {
    if let Some(a) = api {
        a.remove_socket();
    }
    eprintln!("tern: error: {msg}");
    ExitCode::from(ERROR_STATUS as u8)
}

fn run(opts: RunOptions) -> ExitCode {
    // glibc's malloc sizes its arena limit from the CPU count the first
    // time a thread needs a new arena, by opening
    // /sys/devices/system/cpu/online; that can happen in a thread whose
    // seccomp filter has no openat (an INTx relay started from a vCPU).
    // Set the limit now so it never has to look.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes malloc's tuning; called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 8);
    }
    // Before any thread is confined (see start_launcher).
    tern::vhost_user::backend_process::start_launcher();
    if let Err(e) = tern_seccomp::init("tern", opts.seccomp_level) {
        return fail(e, None);
    }
    // Idle: the VM's configuration comes later, through the API or a
    // migration stream.
    tern::kvm::warm::prepare(!opts.boot_now && opts.restore.is_none());
    let api = match &opts.api_sock {
        Some(path) => match server::bind(path).and_then(|l| server::start(l, path)) {
            Ok((srv, inbox)) => {
                if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
                    let _ = SOCKET_PATH.set(c);
                }
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    let _ = vmm_sys_util::signal::register_signal_handler(sig, on_terminate);
                }
                Some((srv, inbox))
            }
            Err(e) => return fail(e, None),
        },
        None => None,
    };
    let (server, inbox) = match api {
        Some((s, i)) => (Some(s), Some(i)),
        None => (None, None),
    };
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("tern-{}", std::process::id()));
    let api_parts = match (inbox, &server) {
        (Some(i), Some(s)) => Some((i, s.counters.clone())),
        _ => None,
    };
    let mut controller = match Controller::new(id, opts.config, api_parts) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                format!("cannot set up the VMM thread: {e}"),
                server.as_ref(),
            )
        }
    };
    if opts.boot_now {
        if let Err(e) = controller.start() {
            return fail(e, server.as_ref());
        }
    }
    if let Some(url) = &opts.migrate_from {
        if let Err(e) = controller.start_receive(url, false) {
            return fail(e.message, server.as_ref());
        }
    }
    if let Some((state, mem)) = &opts.restore {
        if let Err(e) = controller.restore(state, mem) {
            return fail(e, server.as_ref());
        }
    }
    let controller = Arc::new(Mutex::new(controller));
    let mut events = match EventManager::<Arc<Mutex<Controller>>>::new() {
        Ok(em) => em,
        Err(e) => {
            return fail(
                format!("cannot create the event loop: {e:?}"),
                server.as_ref(),
            )
        }
    };
    events.add_subscriber(controller.clone());
    loop {
        if let Err(e) = events.run() {
            return fail(format!("event loop: {e:?}"), server.as_ref());
        }
        let finished = controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finished()
            .cloned();
        if let Some(reason) = finished {
            if let Some(s) = &server {
                s.remove_socket();
            }
            eprintln!("tern: {reason}");
            // Other threads may still be inside KVM_RUN; exit the process
            // directly rather than waiting for them.
            std::process::exit(reason.status());
        }
    }
}

fn main() -> ExitCode {
    tern::logger::init();
    match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("tern {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Run(opts)) => run(*opts),
        Ok(Command::MergeMemory { base, diffs }) => {
            match tern::snapshot::merge_memory_files(&base, &diffs) {
                Ok(bytes) => {
                    eprintln!(
                        "tern: merged {} diff(s) into {} ({} MiB of pages)",
                        diffs.len(),
                        base.display(),
                        bytes >> 20
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tern: error: merging into {}: {e}", base.display());
                    ExitCode::from(ERROR_STATUS as u8)
                }
            }
        }
        Err(e) => {
            eprintln!("tern: error: {e}");
            ExitCode::from(ERROR_STATUS as u8)
        }
    }
}
