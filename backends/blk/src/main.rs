//! `tern-blk`: a vhost-user virtio-blk backend serving one disk image (raw or
//! qcow2) to one frontend (the tern VMM) over a Unix socket.
//!
//! Exit status: 0 after the frontend disconnected (or SIGINT/SIGTERM), 1 on
//! a runtime failure, 2 on a usage or startup error (one line on stderr).

mod aio;
mod backend;
mod config;
mod executor;
mod metrics;
mod request;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use log::{debug, info, warn, LevelFilter};
use tern_backend_common::{init_logger, listen, ListenError, Signals};
use tern_image::{DiskImage, Format};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{BlkBackend, MAX_QUEUES};
use crate::config::{BlkConfig, SECTOR_SIZE};
use crate::executor::Executor;
use crate::metrics::Metrics;
use crate::request::ID_BYTES;

/// Image format names accepted by `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// A plain disk image.
    Raw,
    /// A QEMU copy-on-write v2/v3 image.
    Qcow2,
}

impl FormatArg {
    fn to_format(self) -> Format {
        match self {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// I/O engines accepted by `--aio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AioArg {
    /// Linux io_uring: many requests per queue in flight (raw images).
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    /// One blocking pread/pwrite at a time per queue.
    Sync,
}

/// vhost-user virtio-blk backend for tern.
#[derive(Debug, Parser)]
#[command(name = "tern-blk", version, about)]
struct Args {
    /// Path of the vhost-user Unix socket to listen on (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Disk image file (or block device).
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Image format; probed from the file when omitted.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO); writes complete with IOERR.
    #[arg(long)]
    readonly: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUES as i64))]
    queues: u16,
    /// Device serial returned by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "", value_name = "ID")]
    serial: String,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// I/O engine for raw images (qcow2 is always synchronous); io_uring falls
    /// back to sync when the kernel refuses it.
    #[arg(long, value_enum, default_value = "io_uring", value_name = "ENGINE")]
    aio: AioArg,
    /// After the frontend disconnects, wait for the next one instead of exiting.
    #[arg(long)]
    keep_listening: bool,
    /// Log level: off, error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_name = "LEVEL", value_parser = parse_level)]
    log_level: LevelFilter,
    /// seccomp filters: 0 off, 1 syscalls only, 2 syscalls and arguments.
    #[arg(long, default_value = "2", value_name = "0|1|2")]
    seccomp_level: tern_seccomp::Level,
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?} (off, error, warn, info, debug, trace)"))
}

/// Errors that stop `tern-blk` before it serves anything (exit status 2).
#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("--serial is {0} bytes, at most 20 allowed")]
    SerialTooLong(usize),
    #[error("image {path}: {source}")]
    ImageMissing { path: PathBuf, source: io::Error },
    #[error("image {0}: not a regular file or block device")]
    ImageNotAFile(PathBuf),
    #[error("image {0}: the filesystem does not support O_DIRECT (drop --direct)")]
    DirectUnsupported(PathBuf),
    #[error("image {path}: cannot probe the format: {source}")]
    Detect {
        path: PathBuf,
        source: tern_image::ImageError,
    },
    #[error("image {path}: cannot open as {format:?}: {source}")]
    Open {
        path: PathBuf,
        format: FormatArg,
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
    // Started ahead by a tern that never needed it: nothing to do.
    let Some(command_line) = tern_backend_common::command_line() else {
        return ExitCode::SUCCESS;
    };
    let args = Args::parse_from(command_line);
    init_logger("tern-blk", args.log_level);
    tern_backend_common::serve_main(
        "tern-blk",
        args.seccomp_level,
        || Setup::new(&args),
        |s| s.metrics.clone(),
        Setup::serve,
    )
}

/// Everything opened and checked before serving.
struct Setup {
    image: Arc<dyn DiskImage>,
    config: BlkConfig,
    listener: Listener,
    args_serial: String,
    read_only: bool,
    direct: bool,
    keep_listening: bool,
    metrics: Arc<Metrics>,
    /// The raw image opened for io_uring (None: synchronous I/O).
    aio_file: Option<Arc<File>>,
}

impl Setup {
    fn new(args: &Args) -> Result<Self, StartupError> {
        if args.serial.len() > ID_BYTES as usize {
            return Err(StartupError::SerialTooLong(args.serial.len()));
        }
        let (image, format) = open_image(args)?;
        let size = image.size();
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                "image size {size} is not a multiple of 512; the last {} bytes are not visible",
                size % SECTOR_SIZE
            );
        }
        let config = BlkConfig::new(size, args.queues);
        let read_only = args.readonly || image.is_read_only();
        let aio_file = if format == FormatArg::Raw && args.aio == AioArg::IoUring {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if args.direct {
                o.custom_flags(libc::O_DIRECT);
            }
            match o.open(&args.image) {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    warn!("cannot open the image for io_uring ({e}); using synchronous I/O");
                    None
                }
            }
        } else {
            None
        };

        // Block the signals we handle before any thread exists, so every
        // thread inherits the mask and only the signal thread receives them.
        let signals = Signals::block().map_err(StartupError::Signals)?;
        let listener = listen(&args.socket)?;
        signals
            .spawn_handler(args.socket.clone(), || {
                metrics::global().map(|m| m.to_string())
            })
            .map_err(StartupError::Signals)?;
        let metrics = Arc::new(Metrics::new());
        metrics::set_global(metrics.clone());
        info!(
            "serving {} ({} sectors, {} queue(s){}) on {}",
            args.image.display(),
            config.capacity,
            args.queues,
            if read_only { ", read-only" } else { "" },
            args.socket.display()
        );
        Ok(Setup {
            image,
            config,
            listener,
            args_serial: args.serial.clone(),
            read_only,
            direct: args.direct,
            keep_listening: args.keep_listening,
            metrics,
            aio_file,
        })
    }

    /// Serve frontend connections: one, or one after another with `--keep-listening`.
    fn serve(mut self) -> Result<(), RunError> {
        loop {
            // A fresh device per connection: no vring state leaks into the next frontend.
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let executor = Executor::new(
                self.image.clone(),
                &self.args_serial,
                self.read_only,
                self.direct,
                self.metrics.clone(),
            );
            let mut backend =
                BlkBackend::new(self.config, executor, mem.clone(), self.metrics.clone());
            if let Some(file) = &self.aio_file {
                backend = backend.with_io_uring(file.clone(), self.direct);
            }
            let backend = Arc::new(backend);
            let mut daemon = VhostUserDaemon::new("tern-blk".to_string(), backend.clone(), mem)
                .map_err(RunError::Daemon)?;
            // io_uring completions wake the queue's own worker thread.
            for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some(fd) = backend.completion_fd(thread) {
                    let event = u64::from(backend.completion_event());
                    if let Err(e) = handler.register_listener(fd, EventSet::IN, event) {
                        warn!("cannot watch io_uring completions ({e}); queue {thread} uses synchronous I/O");
                        backend.disable_io_uring(thread);
                    }
                }
            }
            if backend.uses_io_uring(0) {
                debug!("using io_uring");
            }
            daemon.start(&mut self.listener).map_err(RunError::Daemon)?;
            debug!("connection accepted");
            let result = daemon.wait();
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

/// Check and open the image.
fn open_image(args: &Args) -> Result<(Arc<dyn DiskImage>, FormatArg), StartupError> {
    let path = &args.image;
    let meta = std::fs::metadata(path).map_err(|source| StartupError::ImageMissing {
        path: path.clone(),
        source,
    })?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(StartupError::ImageNotAFile(path.clone()));
    }
    if args.direct {
        // Probe O_DIRECT ourselves so its refusal gets a clear message.
        if let Err(e) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                StartupError::DirectUnsupported(path.clone())
            } else {
                StartupError::ImageMissing {
                    path: path.clone(),
                    source: e,
                }
            });
        }
    }
    let format = match args.format {
        Some(f) => f,
        None => {
            let f = tern_image::detect(path).map_err(|source| StartupError::Detect {
                path: path.clone(),
                source,
            })?;
            let f = match f {
                Format::Raw => FormatArg::Raw,
                Format::Qcow2 => FormatArg::Qcow2,
            };
            info!("probed image format: {f:?} (pass --format to skip probing)");
            f
        }
    };
    let image = tern_image::open(path, format.to_format(), args.readonly, args.direct).map_err(
        |source| StartupError::Open {
            path: path.clone(),
            format,
            source,
        },
    )?;
    Ok((Arc::from(image), format))
}
