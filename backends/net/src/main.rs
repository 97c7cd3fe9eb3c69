//! `tern-net`: a vhost-user virtio-net backend connecting one frontend (the
//! tern VMM) to a Linux tap device over a Unix socket.
//!
//! Exit status: 0 after the frontend disconnected (or SIGINT/SIGTERM), 1 on
//! a runtime failure, 2 on a usage or startup error (one line on stderr).

mod backend;
mod chain;
mod config;
mod metrics;
mod tap;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{debug, info, warn, LevelFilter};
use tern_backend_common::{init_logger, listen, ListenError, Signals};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::NetBackend;
use crate::config::{NetConfig, MAX_QUEUE_PAIRS};
use crate::metrics::Metrics;
use crate::tap::{Tap, TapError};

/// vhost-user virtio-net backend for tern.
#[derive(Debug, Parser)]
#[command(name = "tern-net", version, about)]
struct Args {
    /// Path of the vhost-user Unix socket to listen on (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Tap device to attach to (created and brought up if it does not exist).
    #[arg(long, value_name = "NAME")]
    tap: String,
    /// Guest MAC address (default: a random locally administered one).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// Number of queue pairs, each served by its own thread and tap queue.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_QUEUE_PAIRS as i64))]
    queues: u16,
    /// MTU advertised to the guest (VIRTIO_NET_F_MTU) and set on the tap.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(68..))]
    mtu: Option<u16>,
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

/// Parse `aa:bb:cc:dd:ee:ff` (unicast only).
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("invalid MAC address {s:?} (expected aa:bb:cc:dd:ee:ff)");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address {s} is a multicast address"));
    }
    Ok(mac)
}

fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        b = t.to_le_bytes();
    }
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Errors that stop `tern-net` before it serves anything (exit status 2).
#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("{0}")]
    Tap(#[from] TapError),
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
    #[error("cannot watch tap queue {0}: {1}")]
    WatchTap(usize, io::Error),
}

fn main() -> ExitCode {
    // Started ahead by a tern that never needed it: nothing to do.
    let Some(command_line) = tern_backend_common::command_line() else {
        return ExitCode::SUCCESS;
    };
    let args = Args::parse_from(command_line);
    init_logger("tern-net", args.log_level);
    tern_backend_common::serve_main(
        "tern-net",
        args.seccomp_level,
        || Setup::new(&args),
        |s| s.metrics.clone(),
        Setup::serve,
    )
}

/// Everything opened and checked before serving.
struct Setup {
    tap: Arc<Tap>,
    config: NetConfig,
    listener: Listener,
    keep_listening: bool,
    metrics: Arc<Metrics>,
}

impl Setup {
    fn new(args: &Args) -> Result<Self, StartupError> {
        let tap = Tap::open(&args.tap, args.queues)?;
        if let Some(mtu) = args.mtu {
            if let Err(e) = tap.set_mtu(mtu) {
                warn!("tap {}: cannot set MTU {mtu}: {e}", tap.name);
            }
        }
        let mac = args.mac.unwrap_or_else(random_mac);
        let config = NetConfig {
            mac,
            queue_pairs: args.queues,
            mtu: args.mtu,
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
            "serving tap {}{} (mac {}, {} queue pair(s), offloads: tso={} ufo={}) on {}",
            tap.name,
            if tap.created { " (created)" } else { "" },
            format_mac(&mac),
            args.queues,
            tap.offloads.tso,
            tap.offloads.ufo,
            args.socket.display()
        );
        Ok(Setup {
            tap: Arc::new(tap),
            config,
            listener,
            keep_listening: args.keep_listening,
            metrics,
        })
    }

    /// Serve frontend connections: one, or one after another with `--keep-listening`.
    fn serve(mut self) -> Result<(), RunError> {
        loop {
            // A fresh device per connection: no vring state leaks into the next frontend.
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = Arc::new(NetBackend::new(
                self.config,
                self.tap.clone(),
                mem.clone(),
                self.metrics.clone(),
            ));
            let mut daemon = VhostUserDaemon::new("tern-net".to_string(), backend.clone(), mem)
                .map_err(RunError::Daemon)?;
            // Tap readiness wakes the worker of its queue pair (edge-triggered:
            // the rx path reads until EAGAIN or until the guest runs out of buffers).
            for (thread, handler) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Some(fd) = backend.tap_fd(thread) {
                    handler
                        .register_listener(
                            fd.as_raw_fd(),
                            EventSet::IN | EventSet::EDGE_TRIGGERED,
                            u64::from(backend.tap_event()),
                        )
                        .map_err(|e| RunError::WatchTap(thread, e))?;
                }
            }
            daemon.start(&mut self.listener).map_err(RunError::Daemon)?;
            debug!("connection accepted");
            let result = daemon.wait();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:0g").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        let m = random_mac();
        assert_eq!(m[0] & 1, 0);
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 1, 2, 0xff]),
            "52:54:00:01:02:ff"
        );
    }
}
