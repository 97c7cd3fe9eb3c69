//! The destination side: check what comes, build the same VM (backends
//! started or connected) around fresh memory — or the source's own memfd
//! on the same host — take the pages and the state, and resume.

use std::io::BufReader;
use std::time::Instant;

use super::pages::{check_runs, start_receiver, PageReceiver};
use super::protocol::{self, Frame, PROTOCOL_VERSION};
use super::send::guest_cpu_features;
use super::stream::{ListenSocket, MigrationUrl, Stream};
use super::{MigrationError, SharedMigration};
use crate::config::{SerialOutput, VmConfig};
use crate::exit::ExitSender;
use crate::kvm::vm;
use crate::memory;
use crate::snapshot::{Platform, SnapshotState};
use crate::vmm::Vmm;

/// A bound destination socket waiting for its source.
pub struct Listener {
    socket: ListenSocket,
}

impl Listener {
    /// Binds `url` (`unix:PATH` or `tcp:HOST:PORT`).
    pub fn bind(url: &str) -> Result<Self, MigrationError> {
        let url: MigrationUrl = url.parse()?;
        Ok(Self {
            socket: ListenSocket::bind(&url)?,
        })
    }

    /// Wakes a blocked accept (a cancel before the source came).
    pub fn interrupt(&self) {
        // SAFETY: shutdown on a listening socket we own; it only makes a
        // blocked accept return.
        unsafe { libc::shutdown(self.socket.raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Guest memory allocated before the source came (`prealloc`), used if
/// the incoming VM has that much memory of that page size.
pub struct PreparedRam {
    ram: memory::GuestRam,
    huge: bool,
}

impl PreparedRam {
    /// Creates `mib` MiB of guest memory (of 2 MiB pages when `huge`) and
    /// allocates every page of it.
    pub fn allocate(mib: u64, huge: bool) -> Result<Self, memory::MemoryError> {
        let t = Instant::now();
        if !huge {
            memory::check_available(mib)?;
        }
        let ram = memory::create_guest_ram(mib, huge)?;
        ram.preallocate()?;
        log::info!(
            "incoming migration: {mib} MiB allocated ahead in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(Self { ram, huge })
    }
}

fn refuse(stream: &mut Stream, reason: String) -> MigrationError {
    let _ = protocol::send(
        stream,
        &Frame::Refused {
            reason: reason.clone(),
        },
    );
    MigrationError::Incompatible(reason)
}

/// Checks the source's VM against this host: vCPUs KVM allows, and every
/// CPU feature the guest sees.
fn check_host(config: &VmConfig, features: &[u32]) -> Result<(), String> {
    let kvm = vm::open_kvm().map_err(|e| e.to_string())?;
    let vcpus = config.machine_config.vcpu_count;
    if vcpus as usize > kvm.get_max_vcpus() {
        return Err(format!(
            "{vcpus} vCPUs but this host allows {}",
            kvm.get_max_vcpus()
        ));
    }
    let here = guest_cpu_features(config)?;
    let names = ["1.ECX", "1.EDX", "7.EBX", "7.ECX", "7.EDX"];
    for ((name, src), dst) in names.iter().zip(features).zip(&here) {
        let missing = src & !dst;
        if missing != 0 {
            return Err(format!(
                "the guest uses CPUID {name} bits {missing:#x} that this host does not offer"
            ));
        }
    }
    Ok(())
}

/// Takes one incoming migration on `listener` and returns the VM, running.
/// On any error nothing is left behind (backends stopped, memory freed).
pub fn receive(
    listener: &Listener,
    prepared: Option<PreparedRam>,
    serial: SerialOutput,
    exit: &ExitSender,
    shared: &SharedMigration,
) -> Result<Vmm, MigrationError> {
    shared.update(|s| {
        s.role = "destination";
        s.status = "setup";
    });
    let result = run(listener, prepared, serial, exit, shared);
    shared.set_stream(None);
    match &result {
        Ok(_) => shared.update(|s| s.status = "completed"),
        Err(e) => {
            // A cancel breaks the connection: say so, not the I/O error.
            let msg = if shared.cancelled() {
                MigrationError::Cancelled.to_string()
            } else {
                e.to_string()
            };
            let cancelled = shared.cancelled();
            shared.update(|s| {
                s.status = if cancelled { "cancelled" } else { "failed" };
                s.error = Some(msg);
            });
            log::warn!("incoming migration failed: {e}");
        }
    }
    result
}

fn run(
    listener: &Listener,
    prepared: Option<PreparedRam>,
    serial: SerialOutput,
    exit: &ExitSender,
    shared: &SharedMigration,
) -> Result<Vmm, MigrationError> {
    let mut stream = listener.socket.accept()?;
    if shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    shared.set_stream(Some(stream.try_clone()?));
    let started = Instant::now();
    let (mut config, mem_size, features, local) = match protocol::recv(&mut stream)? {
        Frame::Hello {
            version,
            config,
            mem_size,
            cpu_features,
            local,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(refuse(
                    &mut stream,
                    format!("stream version {version}, this tern speaks {PROTOCOL_VERSION}"),
                ));
            }
            let config: VmConfig = match serde_json::from_slice(&config) {
                Ok(c) => c,
                Err(e) => {
                    return Err(refuse(
                        &mut stream,
                        format!("the source's configuration does not parse: {e}"),
                    ))
                }
            };
            (config, mem_size, cpu_features, local)
        }
        other => {
            return Err(protocol::ProtocolError::Unexpected {
                expected: "Hello",
                got: protocol::name(&other),
            }
            .into())
        }
    };
    if mem_size != config.machine_config.mem_size_mib << 20 {
        return Err(refuse(
            &mut stream,
            format!(
                "memory size {mem_size} does not match the configuration's {} MiB",
                config.machine_config.mem_size_mib
            ),
        ));
    }
    if let Err(why) = config.validate().map_err(|e| e.to_string()) {
        return Err(refuse(&mut stream, why));
    }
    if let Err(why) = check_host(&config, &features) {
        return Err(refuse(&mut stream, why));
    }
    config.serial = serial;
    // Dirty tracking is the source's business; the destination starts
    // without it (a later snapshot or migration turns it on).
    config.machine_config.track_dirty_pages = false;

    let huge = config.machine_config.huge_pages == crate::config::HugePages::Huge2M;
    let ram = match prepared {
        _ if local => {
            protocol::send(&mut stream, &Frame::Ready)?;
            let file = stream.recv_fd()?;
            memory::ram_from_memfd(file, mem_size)
        }
        Some(p) if p.ram.size == mem_size && p.huge == huge => {
            log::info!("incoming migration: into the memory allocated ahead");
            Ok(p.ram)
        }
        other => {
            if let Some(p) = other {
                log::info!(
                    "incoming migration: the memory allocated ahead ({} MiB{}) does not fit \
                     the VM ({} MiB{}): allocating anew",
                    p.ram.size >> 20,
                    if p.huge { " of huge pages" } else { "" },
                    mem_size >> 20,
                    if huge { " of huge pages" } else { "" },
                );
            }
            memory::create_guest_ram(config.machine_config.mem_size_mib, huge)
        }
    };
    let ram = match ram {
        Ok(r) => r,
        Err(e) => return Err(refuse(&mut stream, e.to_string())),
    };
    crate::spare_thread::stop_stocking();
    let platform = Platform::build(config, ram, exit);
    // Backends started ahead that the VM did not take end now.
    crate::vhost_user::backend_process::BackendProcess::discard_prelaunched();
    let platform = match platform {
        Ok(p) => p,
        Err(e) => return Err(refuse(&mut stream, e.to_string())),
    };
    protocol::send(&mut stream, &Frame::Ready)?;
    log::debug!(
        "incoming migration: VM built, Ready {:.1} ms after Hello",
        started.elapsed().as_secs_f64() * 1e3
    );
    shared.update(|s| s.status = "active");

    // Frame headers are small reads: buffer them (page data bypasses the
    // buffer, being read in pieces larger than it).
    let mut rx = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    let ram = platform.ram();
    let state = if local {
        // The memory came as the source's own memfd: no pages, no writer.
        take_stream(&mut rx, &mut stream, None, shared, mem_size)?
    } else {
        std::thread::scope(|scope| {
            let (mut sink, writer) = start_receiver(scope, ram, huge)?;
            let read = take_stream(&mut rx, &mut stream, Some(&mut sink), shared, mem_size);
            // Every page is in memory once the writer is done.
            sink.close();
            let written = writer.map_or(Ok(()), |w| {
                w.join().unwrap_or_else(|_| {
                    Err(MigrationError::Os {
                        what: "writing guest memory",
                        err: std::io::Error::other("the page writer thread panicked"),
                    })
                })
            });
            // The writer's failure is what stopped the reader, if both failed.
            written.and(read)
        })?
    };
    let Some(state) = state else {
        return Err(protocol::ProtocolError::Unexpected {
            expected: "State before Complete",
            got: "Complete".into(),
        }
        .into());
    };
    let finishing = Instant::now();
    log::debug!(
        "incoming migration: {} KiB of pages, stream done {:.1} ms after Hello, thread CPU {:.0} ms",
        shared.status().bytes_sent >> 10,
        started.elapsed().as_secs_f64() * 1e3,
        super::thread_cpu().as_secs_f64() * 1e3
    );
    shared.update(|s| s.status = "completing");
    let mut vmm = match platform.finish(&state, true, started) {
        Ok(v) => v,
        Err(e) => {
            let _ = protocol::send(
                &mut stream,
                &Frame::Failed {
                    reason: e.to_string(),
                },
            );
            return Err(e.into());
        }
    };
    vmm.resume();
    protocol::send(&mut stream, &Frame::Resumed)?;
    log::debug!(
        "incoming migration: state restored and resumed in {:.2} ms",
        finishing.elapsed().as_secs_f64() * 1e3
    );
    log::info!(
        "incoming migration done in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(vmm)
}

/// Reads frames up to `Complete`: pages go to `sink` (none for a local
/// migration, which takes no pages), each `RoundEnd` is answered on
/// `stream`. Returns the state that came.
fn take_stream(
    rx: &mut impl std::io::Read,
    stream: &mut Stream,
    mut sink: Option<&mut PageReceiver>,
    shared: &SharedMigration,
    mem_size: u64,
) -> Result<Option<SnapshotState>, MigrationError> {
    let mut state = None;
    loop {
        if shared.cancelled() {
            return Err(MigrationError::Cancelled);
        }
        match protocol::recv_head(rx)? {
            Frame::Pages { runs, .. } => {
                let Some(sink) = sink.as_deref_mut() else {
                    return Err(protocol::ProtocolError::Unexpected {
                        expected: "no pages (local migration)",
                        got: "Pages".into(),
                    }
                    .into());
                };
                check_runs(&runs, mem_size)?;
                let n = sink.batch(rx, &runs)?;
                shared.update(|s| s.bytes_sent += n);
            }
            Frame::RoundEnd { round } => {
                shared.update(|s| s.round = round);
                protocol::send(stream, &Frame::Received { round })?;
            }
            Frame::State { body, .. } => {
                let s: SnapshotState = serde_json::from_slice(&body).map_err(|e| {
                    MigrationError::Incompatible(format!("the source's state does not parse: {e}"))
                })?;
                state = Some(s);
            }
            Frame::Complete => return Ok(state),
            Frame::Failed { reason } => return Err(MigrationError::Refused(reason)),
            other => {
                return Err(protocol::ProtocolError::Unexpected {
                    expected: "Pages, State or Complete",
                    got: protocol::name(&other),
                }
                .into())
            }
        }
    }
}
