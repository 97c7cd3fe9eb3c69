//! Startup code shared by the tern vhost-user backends (`tern-blk`,
//! `tern-net`, `tern-scsi`): the listening socket, signal handling, the
//! stderr logger and the shape of `main` around set-up and serving.

use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use log::{info, LevelFilter};
use vhost::vhost_user::Listener;

/// Why the vhost-user listening socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A live process accepts connections on the socket.
    #[error("socket {0}: in use by a running process")]
    SocketInUse(PathBuf),
    /// Something other than a socket exists at the path.
    #[error("socket {0}: exists and is not a socket")]
    SocketNotASocket(PathBuf),
    /// Inspecting, probing or removing the existing file failed.
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    /// Binding or listening on the socket failed.
    #[error("socket {path}: cannot listen: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
}

/// Create the listening socket, replacing a stale one but never a live one.
pub fn listen(path: &Path) -> Result<Listener, ListenError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::SocketInUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|source| ListenError::Socket {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(ListenError::Socket {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
        Ok(_) => return Err(ListenError::SocketNotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ListenError::Socket {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    Listener::new(path, false).map_err(|source| ListenError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// SIGINT/SIGTERM (exit, removing the socket) and SIGUSR1 (log metrics),
/// received synchronously by a dedicated thread.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Block SIGINT, SIGTERM and SIGUSR1 in the calling thread. Call it
    /// before any other thread exists, so every thread inherits the mask and
    /// only the signal thread receives them.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigemptyset/sigaddset only write the local set; pthread_sigmask
        // reads it and changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
                libc::sigaddset(&mut set, sig);
            }
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(Signals { set })
        }
    }

    /// Start the `signals` thread: SIGUSR1 logs `metrics()`; SIGINT/SIGTERM
    /// remove `socket`, log `metrics()` and exit with status 0.
    pub fn spawn_handler(self, socket: PathBuf, metrics: fn() -> Option<String>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `self.set` is an initialised signal set and `sig` a valid out pointer.
                let r = unsafe { libc::sigwait(&self.set, &mut sig) };
                if r != 0 {
                    continue;
                }
                if sig == libc::SIGUSR1 {
                    if let Some(m) = metrics() {
                        info!("{m}");
                    }
                    continue;
                }
                info!("signal {sig}: shutting down");
                let _ = std::fs::remove_file(&socket);
                if let Some(m) = metrics() {
                    info!("exiting; {m}");
                }
                std::process::exit(0);
            })
            .map(|_| ())
    }
}

/// Install a minimal stderr logger (`<name>: LEVEL: message`) at `level`.
/// Only the first call installs a logger; later calls do nothing.
pub fn init_logger(name: &'static str, level: LevelFilter) {
    static LOGGER: OnceLock<Logger> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| Logger { name });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// A minimal stderr logger (`<name>: LEVEL: message`).
struct Logger {
    name: &'static str,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                io::stderr().lock(),
                "{}: {}: {}",
                self.name,
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// The flag with which tern starts a backend ahead of need: the backend
/// then waits for its real arguments on stdin (see [`command_line`]).
pub const ARGS_ON_STDIN: &str = "--args-on-stdin";

/// The backend's command line: its own, or, when started with only
/// [`ARGS_ON_STDIN`], the arguments tern writes to its stdin later (each
/// ended by a NUL; tern then closes the pipe). A tern that expects to
/// build a VM starts its backends this way while it is idle, so that the
/// process start, the dynamic linking and the runtime set-up (1-2 ms on a
/// small host) are done before the VM's configuration is known. None when
/// stdin closes with nothing on it: the tern that started it went away
/// without needing it.
pub fn command_line() -> Option<Vec<std::ffi::OsString>> {
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() != 2 || args[1] != ARGS_ON_STDIN {
        return Some(args);
    }
    let mut given = Vec::new();
    if io::stdin().read_to_end(&mut given).is_err() || given.is_empty() {
        return None;
    }
    args.truncate(1);
    args.extend(
        given
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsString::from_vec(a.to_vec())),
    );
    Some(args)
}

/// The rest of a backend's `main` once its arguments are parsed and its
/// logger is set: the seccomp filters prepared, `setup` (exit status 2 if
/// either fails, said on stderr), every thread filtered, `serve` (exit
/// status 1 on error, logged), and the metrics logged on the way out.
pub fn serve_main<S, M, SE, RE>(
    name: &'static str,
    seccomp_level: tern_seccomp::Level,
    setup: impl FnOnce() -> Result<S, SE>,
    metrics: impl FnOnce(&S) -> M,
    serve: impl FnOnce(S) -> Result<(), RE>,
) -> std::process::ExitCode
where
    M: std::fmt::Display,
    SE: std::fmt::Display,
    RE: std::fmt::Display,
{
    use std::process::ExitCode;
    if let Err(e) = tern_seccomp::init(name, seccomp_level) {
        eprintln!("{name}: {e}");
        return ExitCode::from(2);
    }
    let setup = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    // Every thread so far (main, signals) and every thread started later
    // (the vhost-user request thread, the queue workers) is filtered.
    if let Err(e) = tern_seccomp::enter_all_threads("main") {
        eprintln!("{name}: {e}");
        return ExitCode::from(2);
    }
    let metrics = metrics(&setup);
    let code = match serve(setup) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    };
    log::info!("exiting; {metrics}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "tern-backend-common-{}-{tag}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn listen_replaces_stale_socket_and_refuses_live_one() {
        let path = temp_path("stale");
        let _ = std::fs::remove_file(&path);
        // A bound but closed socket leaves a stale file behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = listen(&path).unwrap();
        let Err(err) = listen(&path) else {
            panic!("listen succeeded")
        };
        assert!(matches!(err, ListenError::SocketInUse(_)));
        assert_eq!(
            err.to_string(),
            format!("socket {}: in use by a running process", path.display())
        );
        drop(live);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn listen_refuses_non_socket() {
        let path = temp_path("file");
        std::fs::write(&path, b"x").unwrap();
        let Err(err) = listen(&path) else {
            panic!("listen succeeded")
        };
        assert_eq!(
            err.to_string(),
            format!("socket {}: exists and is not a socket", path.display())
        );
        let _ = std::fs::remove_file(&path);
    }
}
