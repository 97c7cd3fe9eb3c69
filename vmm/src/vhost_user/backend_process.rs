//! Managed backends: tern starts the backend process itself (tern-blk for
//! a disk given by path), with its socket in a private runtime directory,
//! logs what it prints, waits for its socket, and stops it with the VM.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a backend may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The runtime directory cannot be made.
    #[error("cannot create runtime directory {path}: {err}")]
    RuntimeDir {
        /// The directory.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The binary cannot be started.
    #[error("cannot start {bin}: {err}")]
    Spawn {
        /// The binary.
        bin: String,
        /// OS error.
        err: std::io::Error,
    },
    /// It exited before opening its socket.
    #[error("{bin} exited with {status} before opening its socket")]
    Exited {
        /// The binary.
        bin: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// It did not open its socket in time.
    #[error("{bin} did not open {socket} within {timeout:?}")]
    Timeout {
        /// The binary.
        bin: String,
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}

/// This tern's private directory for backend sockets.
pub fn runtime_dir() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("tern-{}", std::process::id()))
}

/// Removes the runtime directory (at exit).
pub fn cleanup_runtime_dir() {
    let _ = std::fs::remove_dir_all(runtime_dir());
}

/// The backend binary `name`: `$TERN_<NAME>_BIN`, else next to tern's own
/// executable, else found on PATH.
pub fn backend_binary(name: &str) -> PathBuf {
    let var = format!(
        "TERN_{}_BIN",
        name.trim_start_matches("tern-").to_ascii_uppercase()
    );
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name(name);
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from(name)
}

/// The argument with which a backend waits for its real ones on stdin
/// (`tern_backend_common::command_line`).
const ARGS_ON_STDIN: &str = "--args-on-stdin";

/// A backend process, started with its arguments or waiting for them.
struct Waiting {
    bin: PathBuf,
    child: Child,
    /// Where the arguments go; None once given.
    args_in: Option<std::process::ChildStdin>,
    /// Its stdout and stderr, on one pipe.
    output: std::io::PipeReader,
}

impl Waiting {
    /// Starts `bin` with `args`, or with [`ARGS_ON_STDIN`] when None.
    fn spawn(bin: &Path, args: Option<&[String]>) -> std::io::Result<Self> {
        // One pipe takes both its stdout and stderr: one thread to read it.
        let (output, out_w) = std::io::pipe()?;
        let err_w = out_w.try_clone()?;
        let mut command = Command::new(bin);
        match args {
            Some(a) => command.args(a).stdin(Stdio::null()),
            None => command.arg(ARGS_ON_STDIN).stdin(Stdio::piped()),
        };
        command.stdout(out_w).stderr(err_w);
        let mut child = command.spawn()?;
        // Our copies of the pipe's write ends go with `command`, so that
        // the reader sees the end when the backend exits.
        drop(command);
        let args_in = child.stdin.take();
        Ok(Self {
            bin: bin.to_owned(),
            child,
            args_in,
            output,
        })
    }
}

/// Backends started while tern was idle, waiting for their arguments.
static WAITING: Mutex<Vec<Waiting>> = Mutex::new(Vec::new());

/// Starts `bin` waiting for its arguments, for the next backend of that
/// binary to take (see `kvm/warm.rs`); nothing if it cannot be started.
pub fn stock_waiting(bin: &Path) {
    match Waiting::spawn(bin, None) {
        Ok(w) => WAITING.lock().unwrap_or_else(|e| e.into_inner()).push(w),
        Err(e) => log::debug!("cannot start {} ahead: {e}", bin.display()),
    }
}

/// A waiting `bin`, given `args`; None if there is none (or it died).
fn take_waiting(bin: &Path, args: &[String]) -> Option<Waiting> {
    use std::io::Write;
    let mut w = {
        let mut waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
        let i = waiting.iter().position(|w| w.bin == bin)?;
        waiting.swap_remove(i)
    };
    let mut given = Vec::new();
    for a in args {
        given.extend_from_slice(a.as_bytes());
        given.push(0);
    }
    let mut args_in = w.args_in.take()?;
    if args_in.write_all(&given).is_err() {
        let _ = w.child.kill();
        let _ = w.child.wait();
        return None;
    }
    // Closing the pipe tells it the arguments are complete.
    drop(args_in);
    log::debug!(
        "{}: the process started ahead takes its arguments",
        bin.display()
    );
    Some(w)
}

/// Ends the waiting backends nobody took: their stdin closes with nothing
/// on it, and they exit. They are reaped on the launcher thread.
fn discard_waiting() {
    let left = std::mem::take(&mut *WAITING.lock().unwrap_or_else(|e| e.into_inner()));
    if left.is_empty() {
        return;
    }
    let reap = move || {
        for mut w in left {
            drop(w.args_in.take());
            let _ = w.child.wait();
        }
    };
    match LAUNCHER.get() {
        Some(l) => {
            let _ = l
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Box::new(reap));
        }
        None => reap(),
    }
}

/// A running backend; killed when dropped.
pub struct BackendProcess {
    child: Child,
    socket: PathBuf,
    /// What it was started with, to start it again if it dies.
    bin: PathBuf,
    id: String,
    /// Shared with whoever changes what the backend serves at run time (a
    /// hot added LUN), so that a restart serves the same.
    args: Arc<Mutex<Vec<String>>>,
    last_start: Instant,
}

/// A dead managed backend is started again at most this often.
const RESTART_INTERVAL: Duration = Duration::from_secs(1);

/// A request to the launcher thread: start a backend, answer on `reply`.
type LaunchJob = Box<dyn FnOnce() + Send>;

/// The launcher thread's queue, once started.
static LAUNCHER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<LaunchJob>>> =
    std::sync::OnceLock::new();

/// Starts the thread that starts backends. Call it before any thread of
/// tern enters its seccomp filter: a child process inherits the filter of
/// the thread that forks it, and a backend started after boot (hot plug, a
/// restart) must run under its own filter only. The launcher does nothing
/// but fork and exec the backend binaries tern chose.
pub fn start_launcher() {
    let (tx, rx) = std::sync::mpsc::channel::<LaunchJob>();
    if LAUNCHER.set(std::sync::Mutex::new(tx)).is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("backend-launcher".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        });
}

/// A start under way on the launcher thread.
type Launching = std::sync::mpsc::Receiver<Result<BackendProcess, BackendError>>;

/// What a backend is started with: binary, id, arguments.
type LaunchKey = (PathBuf, String, Vec<String>);

/// A backend started ahead of need ([`BackendProcess::prelaunch`]).
enum Prelaunched {
    /// Being started on the launcher thread.
    Launching(Launching),
    /// A waiting process, given its arguments on the prelaunching thread.
    Begun(Starting),
}

impl Prelaunched {
    /// The started backend; None if the launcher thread went away.
    fn take(self) -> Option<Result<BackendProcess, BackendError>> {
        match self {
            Self::Begun(s) => Some(s.wait()),
            Self::Launching(rx) => rx.recv().ok(),
        }
    }
}

static PRELAUNCHED: std::sync::Mutex<Vec<(LaunchKey, Prelaunched)>> =
    std::sync::Mutex::new(Vec::new());

/// A backend process started (or a waiting one given its arguments),
/// whose socket may not be there yet.
struct Starting {
    child: Child,
    socket: PathBuf,
    bin: PathBuf,
    id: String,
    args: Vec<String>,
}

impl Starting {
    /// Starts `bin` (or gives a waiting one its arguments) and sends its
    /// output to tern's log; does not wait.
    fn begin(bin: &Path, id: &str, args: &[String]) -> Result<Self, BackendError> {
        let dir = runtime_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|err| BackendError::RuntimeDir {
                path: dir.clone(),
                err,
            })?;
        let socket = dir.join(format!("{id}.sock"));
        let _ = std::fs::remove_file(&socket);
        let name = bin.display().to_string();
        let mut full_args = vec!["--socket".to_string(), socket.display().to_string()];
        full_args.extend_from_slice(args);
        if let Some(l) = tern_seccomp::level() {
            full_args.extend(["--seccomp-level".to_string(), l.to_string()]);
        }
        let Waiting { child, output, .. } = match take_waiting(bin, &full_args) {
            Some(w) => w,
            None => Waiting::spawn(bin, Some(&full_args)).map_err(|err| BackendError::Spawn {
                bin: name.clone(),
                err,
            })?,
        };
        // Its output goes to tern's log, line by line, tagged with the drive.
        let tag = format!(
            "{}[{id}]",
            bin.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let _ = crate::spare_thread::spawn("backend-log", "vmm", move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                log::info!("{tag}: {line}");
            }
        });
        Ok(Self {
            child,
            socket,
            bin: bin.to_owned(),
            id: id.to_owned(),
            args: args.to_vec(),
        })
    }

    /// Waits until the socket is there.
    fn wait(self) -> Result<BackendProcess, BackendError> {
        let Self {
            mut child,
            socket,
            bin,
            id,
            args,
        } = self;
        let name = bin.display().to_string();
        let start = Instant::now();
        loop {
            // Wait for the socket file, not a connection: a backend serves
            // one frontend and a probe connection would be taken for it.
            if socket.exists() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::Exited { bin: name, status });
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BackendError::Timeout {
                    bin: name,
                    socket,
                    timeout: START_TIMEOUT,
                });
            }
            // Short: a restore waits on this before the guest can run.
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(BackendProcess {
            child,
            socket,
            bin,
            id,
            args: Arc::new(Mutex::new(args)),
            last_start: Instant::now(),
        })
    }

    /// Stops it (a prelaunched backend nobody took).
    fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl BackendProcess {
    /// Starts `bin` with `args` and `--socket <runtime dir>/<id>.sock`, and
    /// waits until the socket accepts connections (on the launcher thread
    /// when there is one). A backend prelaunched with the same arguments is
    /// taken instead of starting another.
    pub fn start(bin: &Path, id: &str, args: &[String]) -> Result<Self, BackendError> {
        let key = (bin.to_owned(), id.to_owned(), args.to_vec());
        let prelaunched = {
            let mut p = PRELAUNCHED.lock().unwrap_or_else(|e| e.into_inner());
            p.iter()
                .position(|(k, _)| *k == key)
                .map(|i| p.swap_remove(i).1)
        };
        if let Some(r) = prelaunched.and_then(Prelaunched::take) {
            return r;
        }
        match Self::launch(bin, id, args) {
            Some(rx) => rx
                .recv()
                .unwrap_or_else(|_| Self::start_here(bin, id, args)),
            None => Self::start_here(bin, id, args),
        }
    }

    /// Starts a backend without waiting for it, so that it comes up while
    /// tern does other work (a restore creates the VM meanwhile); the
    /// [`Self::start`] that needs it takes it. A process started ahead
    /// (`stock_waiting`) is given its arguments at once, here: only a new
    /// process needs the launcher thread, whose wake-up cost up to a
    /// millisecond on a busy host.
    pub fn prelaunch(bin: &Path, id: &str, args: &[String]) {
        let waiting = WAITING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|w| w.bin == bin);
        let started = match waiting {
            true => Starting::begin(bin, id, args).ok().map(Prelaunched::Begun),
            false => None,
        };
        let Some(p) = started.or_else(|| Self::launch(bin, id, args).map(Prelaunched::Launching))
        else {
            return;
        };
        PRELAUNCHED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(((bin.to_owned(), id.to_owned(), args.to_vec()), p));
    }

    /// Stops the prelaunched backends nobody took (a restore that failed),
    /// and those started while idle that the VM did not need.
    pub fn discard_prelaunched() {
        discard_waiting();
        let left = std::mem::take(&mut *PRELAUNCHED.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, p) in left {
            match p {
                Prelaunched::Begun(s) => s.abandon(),
                // Waiting drops each started process, which stops it.
                Prelaunched::Launching(rx) => {
                    let _ = rx.recv();
                }
            }
        }
    }

    /// Hands the start to the launcher thread; None without one.
    fn launch(bin: &Path, id: &str, args: &[String]) -> Option<Launching> {
        let launcher = LAUNCHER.get()?;
        let (reply_tx, reply_rx) = std::sync::mpsc::channel();
        let (bin_c, id_c, args_c) = (bin.to_owned(), id.to_owned(), args.to_vec());
        let job: LaunchJob = Box::new(move || {
            let _ = reply_tx.send(Self::start_here(&bin_c, &id_c, &args_c));
        });
        launcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .ok()?;
        Some(reply_rx)
    }

    fn start_here(bin: &Path, id: &str, args: &[String]) -> Result<Self, BackendError> {
        Starting::begin(bin, id, args)?.wait()
    }

    /// If the backend has died, starts it again with the same arguments
    /// (at most once a second). Returns whether it did.
    pub fn restart_if_exited(&mut self) -> Result<bool, BackendError> {
        let Ok(Some(status)) = self.child.try_wait() else {
            return Ok(false);
        };
        if self.last_start.elapsed() < RESTART_INTERVAL {
            return Ok(false);
        }
        log::warn!(
            "{}[{}] exited ({status}); starting it again",
            self.bin.display(),
            self.id
        );
        let args = self.args.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut fresh = Self::start(&self.bin, &self.id, &args)?;
        fresh.args = self.args.clone();
        // The old process is reaped (try_wait) and its socket path is now
        // the new one's: its Drop must not kill or unlink anything.
        std::mem::forget(std::mem::replace(self, fresh));
        Ok(true)
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The arguments a restart uses (after `--socket`), to be changed
    /// when what the backend serves changes.
    pub fn shared_args(&self) -> Arc<Mutex<Vec<String>>> {
        self.args.clone()
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
