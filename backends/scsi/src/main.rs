//! `tern-scsi`: a vhost-user virtio-scsi backend serving one controller
//! with one LUN per `--lun` image to one frontend (the tern VMM).
//!
//! Exit status: 0 after the frontend disconnected (or SIGINT/SIGTERM), 1 on
//! a runtime failure, 2 on a usage or startup error (one line on stderr).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{debug, info, warn};
use tern_backend_common::{init_logger, listen, ListenError, Signals};
use tern_image::Format;
use tern_scsi::backend::ScsiBackend;
use tern_scsi::cdb::BLOCK_SIZE;
use tern_scsi::config::{AioArg, Args, LunSpec, ScsiConfig};
use tern_scsi::hotplug::{Control, Frontend, Opener};
use tern_scsi::lun::{Lun, Target, MAX_LUNS};
use tern_scsi::metrics::{self, Metrics};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Errors that stop `tern-scsi` before it serves anything (exit status 2).
#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("{0} LUNs given, at most {MAX_LUNS} supported")]
    TooManyLuns(usize),
    #[error("two --lun options ask for LUN {0}")]
    LunTwice(u16),
    #[error("control socket {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
    #[error("LUN {lun} ({path}): {source}")]
    ImageMissing {
        lun: usize,
        path: PathBuf,
        source: io::Error,
    },
    #[error("LUN {lun} ({path}): not a regular file or block device")]
    ImageNotAFile { lun: usize, path: PathBuf },
    #[error("LUN {lun} ({path}): cannot probe the format: {source}")]
    Detect {
        lun: usize,
        path: PathBuf,
        source: tern_image::ImageError,
    },
    #[error("LUN {lun} ({path}): cannot open as {format}: {source}")]
    Open {
        lun: usize,
        path: PathBuf,
        format: Format,
        source: tern_image::ImageError,
    },
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
}

/// Errors while serving (exit status 1).
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logger("tern-scsi", args.log_level);
    let code = tern_backend_common::serve_main(
        "tern-scsi",
        args.seccomp_level,
        || Setup::new(&args),
        |s| s.metrics.clone(),
        Setup::serve,
    );
    if let Some(c) = &args.control {
        let _ = std::fs::remove_file(c);
    }
    code
}

/// Everything opened and checked before serving.
struct Setup {
    target: Arc<Target>,
    config: ScsiConfig,
    listener: Listener,
    keep_listening: bool,
    metrics: Arc<Metrics>,
    /// The connected frontend's device, for the control socket's events.
    frontend: Arc<Frontend>,
}

impl Setup {
    fn new(args: &Args) -> Result<Self, StartupError> {
        if args.luns.len() > MAX_LUNS {
            return Err(StartupError::TooManyLuns(args.luns.len()));
        }
        let metrics = Arc::new(Metrics::new());
        // LUNs with a number first; the others take the lowest free ones
        // in the order given.
        let mut given = std::collections::BTreeSet::new();
        for n in args.luns.iter().filter_map(|l| l.number) {
            if !given.insert(n) {
                return Err(StartupError::LunTwice(n));
            }
        }
        let mut luns: Vec<Option<Arc<Lun>>> = Vec::with_capacity(args.luns.len());
        let mut next = 0u16;
        for spec in &args.luns {
            let n = match spec.number {
                Some(n) => n,
                None => {
                    while given.contains(&next) {
                        next += 1;
                    }
                    given.insert(next);
                    next
                }
            };
            let i = usize::from(n);
            if luns.len() <= i {
                luns.resize(i + 1, None);
            }
            luns[i] = Some(Arc::new(open_lun(i, spec, args.aio, metrics.clone())?));
        }
        let count = args.luns.len();
        let config = ScsiConfig::new(args.queues);

        let target = Arc::new(Target::sparse(luns));
        let frontend = Arc::<Frontend>::default();

        // Block the signals we handle before any thread exists, so every
        // thread inherits the mask and only the signal thread receives them.
        let signals = Signals::block().map_err(StartupError::Signals)?;
        // The control socket exists before the vhost-user one: tern waits
        // for the latter and then may use the former at once.
        if let Some(path) = &args.control {
            let control_err = |source| StartupError::Control {
                path: path.clone(),
                source,
            };
            let _ = std::fs::remove_file(path);
            let listener = std::os::unix::net::UnixListener::bind(path).map_err(control_err)?;
            let (aio, m) = (args.aio, metrics.clone());
            let open: Box<Opener> = Box::new(move |n, spec| {
                open_lun(usize::from(n), spec, aio, m.clone()).map_err(|e| e.to_string())
            });
            let control = Control::new(target.clone(), frontend.clone(), open);
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control.serve(listener))
                .map_err(control_err)?;
        }
        let listener = listen(&args.socket)?;
        signals
            .spawn_handler(args.socket.clone(), || {
                metrics::global().map(|m| m.to_string())
            })
            .map_err(StartupError::Signals)?;
        metrics::set_global(metrics.clone());
        info!(
            "serving {} LUN(s) on {} request queue(s) on {}",
            count,
            args.queues,
            args.socket.display()
        );
        Ok(Setup {
            target,
            config,
            listener,
            keep_listening: args.keep_listening,
            metrics,
            frontend,
        })
    }

    /// Serve frontend connections: one, or one after another with `--keep-listening`.
    fn serve(mut self) -> Result<(), RunError> {
        loop {
            // A fresh device per connection: no vring state leaks into the next frontend.
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = Arc::new(
                ScsiBackend::new(
                    self.config,
                    self.target.clone(),
                    mem.clone(),
                    self.metrics.clone(),
                )
                .with_io_uring(),
            );
            let mut daemon = VhostUserDaemon::new("tern-scsi".to_string(), backend.clone(), mem)
                .map_err(RunError::Daemon)?;
            // io_uring completions wake the request queue's own worker thread.
            for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some(fd) = backend.completion_fd(thread) {
                    let event = u64::from(backend.completion_event());
                    if let Err(e) = handler.register_listener(fd, EventSet::IN, event) {
                        warn!("cannot watch io_uring completions ({e}); worker {thread} uses synchronous I/O");
                        backend.disable_io_uring(thread);
                    }
                }
            }
            daemon.start(&mut self.listener).map_err(RunError::Daemon)?;
            debug!("connection accepted");
            self.frontend.set(Some(backend.clone()));
            let result = daemon.wait();
            self.frontend.set(None);
            // Dropping the daemon stops and joins the queue workers.
            drop(daemon);
            if !backend.was_contacted() {
                debug!("connection closed before negotiating: a probe, still listening");
                continue;
            }
            match result {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => info!("frontend disconnected"),
                Err(e) => warn!("connection ended: {e}"),
            }
            if !self.keep_listening {
                return Ok(());
            }
            info!("waiting for the next frontend; {}", self.metrics);
        }
    }
}

/// Check and open one LUN's image.
fn open_lun(
    lun: usize,
    spec: &LunSpec,
    aio: AioArg,
    metrics: Arc<Metrics>,
) -> Result<Lun, StartupError> {
    let path = &spec.path;
    let meta = std::fs::metadata(path).map_err(|source| StartupError::ImageMissing {
        lun,
        path: path.clone(),
        source,
    })?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(StartupError::ImageNotAFile {
            lun,
            path: path.clone(),
        });
    }
    let format = match spec.format {
        Some(f) => f,
        None => tern_image::detect(path).map_err(|source| StartupError::Detect {
            lun,
            path: path.clone(),
            source,
        })?,
    };
    let image = tern_image::open(path, format, spec.read_only, spec.direct).map_err(|source| {
        StartupError::Open {
            lun,
            path: path.clone(),
            format,
            source,
        }
    })?;
    let size = image.size();
    if !size.is_multiple_of(u64::from(BLOCK_SIZE)) {
        warn!(
            "LUN {lun}: image size {size} is not a multiple of 512; the last {} bytes are not visible",
            size % u64::from(BLOCK_SIZE)
        );
    }
    // `lun < MAX_LUNS`, checked by the caller.
    let number = u16::try_from(lun).unwrap_or(u16::MAX);
    let serial = spec
        .serial
        .clone()
        .unwrap_or_else(|| format!("tern-lun{lun}"));
    info!(
        "LUN {lun}: {} ({format}, {} blocks{}{})",
        path.display(),
        size / u64::from(BLOCK_SIZE),
        if spec.read_only { ", read-only" } else { "" },
        if spec.direct { ", O_DIRECT" } else { "" }
    );
    let read_only = spec.read_only || image.is_read_only();
    let unit = Lun::new(number, Arc::from(image), spec.read_only, serial, metrics);
    if format != Format::Raw || aio != AioArg::IoUring {
        return Ok(unit);
    }
    // READ/WRITE through io_uring on a descriptor of its own.
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only);
    if spec.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    match o.open(path) {
        Ok(f) => Ok(unit.with_aio_file(Arc::new(f), spec.direct)),
        Err(e) => {
            warn!("LUN {lun}: cannot open the image for io_uring ({e}); using synchronous I/O");
            Ok(unit)
        }
    }
}
