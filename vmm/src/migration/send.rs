//! The source side: pre-copy rounds while the guest runs, then pause,
//! the last dirty pages and the state, and the destination's word that
//! the VM runs there. Any failure leaves the VM running here as before.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::pages::{Kind, PageSender};
use super::protocol::{self, Frame};
use super::stream::{MigrationUrl, Stream};
use super::tracking::count;
use super::{MigrationError, SharedMigration};
use crate::snapshot::memory::{data_pages, is_zero, regions, PAGE};
use crate::snapshot::SnapshotKind;
use crate::vmm::Vmm;

/// What to do when `max_iterations` rounds did not converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum OnMaxIterations {
    /// Pause and copy what is left, however long it takes.
    #[default]
    StopAndCopy,
    /// Give up; the VM keeps running here.
    Fail,
}

/// `PUT /migration/send`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub url: String,
    /// The pause the guest may see, in ms.
    #[serde(default = "default_downtime")]
    pub downtime_limit_ms: u64,
    /// Cap on the transfer rate (0 or absent: none), in Mbit/s.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<u64>,
    /// Pre-copy rounds before giving up on convergence.
    #[serde(default = "default_iterations")]
    pub max_iterations: u32,
    /// Keep the source (paused) after success rather than exit.
    #[serde(default)]
    pub keep_source: bool,
    /// Same host over a Unix socket: pass the memory fd, copy no pages.
    #[serde(default)]
    pub local: bool,
    /// Slow the vCPUs down when the guest dirties faster than the link.
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// What to do past `max_iterations`.
    #[serde(default)]
    pub on_max_iterations: OnMaxIterations,
}

fn default_downtime() -> u64 {
    300
}
fn default_iterations() -> u32 {
    30
}
fn default_true() -> bool {
    true
}

/// How a successful migration ended for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs at the destination; this process should exit.
    Moved,
    /// The VM runs at the destination; the source stays paused.
    Kept,
}

/// The CPU feature words a guest sees (leaf 1 ECX, EDX; leaf 7.0 EBX,
/// ECX, EDX), from a vCPU's CPUID.
pub(crate) fn cpu_features(cpuid: &kvm_bindings::CpuId) -> Vec<u32> {
    let find = |f: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == f && e.index == 0)
            .copied()
            .unwrap_or_default()
    };
    let (l1, l7) = (find(1), find(7));
    vec![l1.ecx, l1.edx, l7.ebx, l7.ecx, l7.edx]
}

/// The CPU feature words the VM's guest sees on this host: its CPU
/// template applied to what KVM supports, as the vCPUs were set up (not read
/// from a vCPU, whose lock a running vCPU holds).
pub(crate) fn guest_cpu_features(config: &crate::config::VmConfig) -> Result<Vec<u32>, String> {
    let kvm = crate::kvm::vm::open_kvm().map_err(|e| e.to_string())?;
    let base = crate::kvm::warm::supported_cpuid(&kvm).map_err(|e| e.to_string())?;
    let template = crate::vmm::cpu_template(config);
    let n = config.machine_config.vcpu_count;
    Ok(cpu_features(&crate::kvm::cpuid::for_vcpu(
        &base, template, 0, n,
    )))
}

/// Sends a round: every data page (round 0, zero pages skipped since the
/// destination's memory starts zeroed), or the pages set in `dirty` (zero
/// ones as zero runs, without their bytes). Returns data bytes sent.
fn send_round<W: Write>(
    vmm: &Vmm,
    tx: &mut PageSender<W>,
    dirty: Option<&[Vec<u64>]>,
) -> Result<u64, MigrationError> {
    let before = tx.sent;
    let regions = regions(&vmm.ram).map_err(|e| MigrationError::Os {
        what: "guest memory",
        err: std::io::Error::other(e.to_string()),
    })?;
    for (ri, region) in regions.iter().enumerate() {
        let pages = region.bytes.len() as u64 / PAGE;
        let mut one = |p: u64| -> Result<(), MigrationError> {
            // The guest may be writing this page right now: a torn copy is
            // fine, the page is dirty again and goes in a later round.
            let page = &region.bytes[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
            let kind = if is_zero(page) {
                if dirty.is_none() {
                    return Ok(());
                }
                Kind::Zero
            } else {
                Kind::Data
            };
            // SAFETY: the page is guest RAM, mapped while the VM lives.
            unsafe {
                tx.add(
                    region.file_offset + p * PAGE,
                    page.as_ptr(),
                    PAGE as usize,
                    kind,
                )
            }
        };
        match dirty {
            None => {
                for (first, end) in data_pages(&vmm.ram, region) {
                    for p in first..end {
                        one(p)?;
                    }
                }
            }
            Some(bitmaps) => {
                let Some(bitmap) = bitmaps.get(ri) else {
                    continue;
                };
                // Word by word: most words of a large guest are clear.
                for (wi, &word) in bitmap.iter().enumerate() {
                    let mut w = word;
                    while w != 0 {
                        let p = wi as u64 * 64 + u64::from(w.trailing_zeros());
                        w &= w - 1;
                        if p < pages {
                            one(p)?;
                        }
                    }
                }
            }
        }
    }
    tx.flush()?;
    Ok(tx.sent - before)
}

/// Holds the vCPUs back for `percent` of every 10 ms while asked to.
fn throttle_loop(vmm: &Vmm, percent: &AtomicU8, done: &AtomicBool) {
    const PERIOD: Duration = Duration::from_millis(10);
    while !done.load(Ordering::SeqCst) {
        let p = u32::from(percent.load(Ordering::SeqCst));
        if p == 0 {
            std::thread::sleep(PERIOD);
            continue;
        }
        if vmm.control.pause(&vmm.vcpu_threads).is_ok() {
            std::thread::sleep(PERIOD * p / 100);
            vmm.control.resume();
        }
        std::thread::sleep(PERIOD * (100 - p) / 100);
    }
}

/// Expects `Ready` (or a refusal) from the destination.
fn expect_ready(stream: &mut Stream) -> Result<(), MigrationError> {
    match protocol::recv(stream)? {
        Frame::Ready => Ok(()),
        Frame::Refused { reason } | Frame::Failed { reason } => {
            Err(MigrationError::Refused(reason))
        }
        other => Err(protocol::ProtocolError::Unexpected {
            expected: "Ready",
            got: protocol::name(&other),
        }
        .into()),
    }
}

/// Waits for the destination's `Received { round }` (earlier rounds'
/// answers may come first).
fn wait_received(stream: &mut Stream, round: u32) -> Result<(), MigrationError> {
    loop {
        match protocol::recv(stream)? {
            Frame::Received { round: r } if r == round => return Ok(()),
            Frame::Received { round: r } if r < round => {}
            Frame::Refused { reason } | Frame::Failed { reason } => {
                return Err(MigrationError::Refused(reason))
            }
            other => {
                return Err(protocol::ProtocolError::Unexpected {
                    expected: "Received",
                    got: protocol::name(&other),
                }
                .into())
            }
        }
    }
}

/// Migrates `vmm` as `params` say, and hands it back: on failure running
/// (or paused, if it was paused before) as it was.
pub fn send(
    mut vmm: Vmm,
    params: &SendParams,
    shared: &SharedMigration,
) -> (Vmm, Result<Outcome, MigrationError>) {
    let started = Instant::now();
    let was_paused = vmm.paused;
    shared.update(|s| {
        s.role = "source";
        s.status = "setup";
    });
    let result = run(&mut vmm, params, shared, started);
    shared.set_stream(None);
    match result {
        Ok(downtime) => {
            shared.update(|s| {
                s.status = "completed";
                s.total_time_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                s.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
            });
            log::info!(
                "migration to {} completed in {:.1} ms, downtime {:.2} ms",
                params.url,
                started.elapsed().as_secs_f64() * 1e3,
                downtime.as_secs_f64() * 1e3
            );
            if params.keep_source {
                (vmm, Ok(Outcome::Kept))
            } else {
                (vmm, Ok(Outcome::Moved))
            }
        }
        Err(e) => {
            vmm.stop_tracking();
            if !was_paused && vmm.paused {
                vmm.resume();
            }
            let status = if shared.cancelled() {
                "cancelled"
            } else {
                "failed"
            };
            // A cancel breaks the connection: say so, not the I/O error.
            let msg = if shared.cancelled() {
                MigrationError::Cancelled.to_string()
            } else {
                e.to_string()
            };
            shared.update(|s| {
                s.status = status;
                s.error = Some(msg);
                s.total_time_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                s.throttle_percent = 0;
            });
            log::warn!(
                "migration to {} {status}: {e}; the VM runs on here",
                params.url
            );
            (vmm, Err(e))
        }
    }
}

/// The migration proper; returns the downtime.
fn run(
    vmm: &mut Vmm,
    params: &SendParams,
    shared: &SharedMigration,
    started: Instant,
) -> Result<Duration, MigrationError> {
    let url: MigrationUrl = params.url.parse()?;
    if params.local && !matches!(url, MigrationUrl::Unix(_)) {
        return Err(MigrationError::Incompatible(
            "local: true needs a unix: URL".into(),
        ));
    }
    // A lazily restored VM's memory is whole only once its fill is done:
    // pages not yet filled would be sent as holes, or missing in the memfd
    // a local destination maps.
    if !vmm.ram.wait_filled() {
        return Err(MigrationError::Incompatible(
            "the VM's memory could not be restored from its snapshot".into(),
        ));
    }
    let mut stream = Stream::connect(&url)?;
    shared.set_stream(Some(stream.try_clone()?));
    if shared.cancelled() {
        return Err(MigrationError::Cancelled);
    }
    let cpu = guest_cpu_features(&vmm.config).map_err(MigrationError::Incompatible)?;
    protocol::send(
        &mut stream,
        &Frame::Hello {
            version: protocol::PROTOCOL_VERSION,
            config: serde_json::to_vec(&vmm.config)
                .map_err(|e| MigrationError::Os {
                    what: "encoding the configuration",
                    err: std::io::Error::other(e),
                })?
                .into(),
            mem_size: vmm.ram.size,
            cpu_features: cpu,
            local: params.local,
        },
    )?;
    let hello_sent = started.elapsed();
    if !params.local {
        // Switching the memory slots to dirty logging waits for the host
        // kernel (milliseconds per slot): do it while the destination
        // builds its VM.
        vmm.start_tracking()?;
    }
    let tracking = started.elapsed();
    expect_ready(&mut stream)?;
    log::debug!(
        "migration setup: Hello sent at {:.1} ms, dirty logging on at {:.1} ms, Ready at {:.1} ms",
        hello_sent.as_secs_f64() * 1e3,
        tracking.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );

    if params.local {
        // Same host: the destination maps this very memory; nothing to copy.
        if vmm.ram.backing != crate::memory::Backing::Memfd {
            return Err(MigrationError::Incompatible(
                "local migration needs memfd-backed RAM (this VM was restored from a private file mapping)".into(),
            ));
        }
        use std::os::fd::AsRawFd;
        stream.send_fd(vmm.ram.file.as_raw_fd())?;
        expect_ready(&mut stream)?;
    } else {
        precopy(vmm, params, shared, &mut stream)?;
    }
    finish(vmm, shared, &mut stream, params, started)
}

/// Pre-copy rounds (dirty logging already on) until what is dirty fits the
/// downtime limit.
fn precopy(
    vmm: &mut Vmm,
    params: &SendParams,
    shared: &SharedMigration,
    stream: &mut Stream,
) -> Result<(), MigrationError> {
    shared.update(|s| s.status = "active");
    let rate = params
        .max_bandwidth_mbps
        .filter(|&m| m > 0)
        .map(|m| m as f64 * 1e6 / 8.0);
    let limit = Duration::from_millis(params.downtime_limit_ms);
    let throttle = AtomicU8::new(0);
    let done = AtomicBool::new(false);
    let vmm_ref: &Vmm = vmm;
    std::thread::scope(|scope| {
        if params.auto_converge && !vmm_ref.paused {
            scope.spawn(|| throttle_loop(vmm_ref, &throttle, &done));
        }
        let result = (|| {
            let mut pacer = PageSender::new(stream, shared, rate);
            let mut round = 0u32;
            let mut dirty: Option<Vec<Vec<u64>>> = None;
            let mut last_dirty_bytes = u64::MAX;
            loop {
                let t = Instant::now();
                let sent = send_round(vmm_ref, &mut pacer, dirty.as_deref())?;
                pacer.frame(&Frame::RoundEnd { round })?;
                wait_received(pacer.out(), round)?;
                let took = t.elapsed().as_secs_f64().max(1e-6);
                let bandwidth = (sent as f64 / took).max(1e6);
                let next = vmm_ref.take_dirty()?;
                let dirty_bytes = count(&next) * PAGE;
                let dirty_rate = dirty_bytes as f64 / took;
                let expected = Duration::from_secs_f64(dirty_bytes as f64 / rate.unwrap_or(bandwidth).min(bandwidth));
                shared.update(|s| {
                    s.round = round;
                    s.bytes_remaining = dirty_bytes;
                    s.dirty_rate_mbps = dirty_rate / 1e6;
                    s.bandwidth_mbps = bandwidth / 1e6;
                    s.throttle_percent = throttle.load(Ordering::SeqCst);
                });
                log::debug!(
                    "migration round {round}: sent {} KiB in {:.1} ms ({:.2} GB/s), dirty log read in {:.1} ms, {} KiB dirty, expected downtime {:?}, thread CPU {:.0} ms",
                    sent >> 10,
                    took * 1e3,
                    sent as f64 / took / 1e9,
                    (t.elapsed().as_secs_f64() - took) * 1e3,
                    dirty_bytes >> 10,
                    expected,
                    super::thread_cpu().as_secs_f64() * 1e3
                );
                dirty = Some(next);
                round += 1;
                if expected <= limit {
                    return Ok(dirty);
                }
                if round > params.max_iterations {
                    return match params.on_max_iterations {
                        OnMaxIterations::StopAndCopy => Ok(dirty),
                        OnMaxIterations::Fail => Err(MigrationError::NoConvergence(round)),
                    };
                }
                // Not shrinking: hold the vCPUs back harder.
                if params.auto_converge && dirty_bytes * 2 > last_dirty_bytes.min(sent.max(1)) {
                    let t = throttle.load(Ordering::SeqCst);
                    throttle.store(if t == 0 { 20 } else { (t + 10).min(99) }, Ordering::SeqCst);
                }
                last_dirty_bytes = dirty_bytes;
            }
        })();
        done.store(true, Ordering::SeqCst);
        result
    })
    .map(|dirty| {
        // The last dirty set goes with the final copy: fold it back in.
        vmm.pending_dirty = dirty;
    })
}

/// Pause, the last pages, the state, and the handshake.
fn finish(
    vmm: &mut Vmm,
    shared: &SharedMigration,
    stream: &mut Stream,
    params: &SendParams,
    started: Instant,
) -> Result<Duration, MigrationError> {
    shared.update(|s| {
        s.status = "completing";
        s.throttle_percent = 0;
    });
    vmm.pause()?;
    let paused_at = Instant::now();
    let virtio = vmm.stop_devices()?;
    // Where the pause goes, for the debug log.
    let mut marks: Vec<(&str, Instant)> = vec![("devices stopped", Instant::now())];
    let result = (|| {
        if !params.local {
            let mut dirty = vmm.take_dirty()?;
            if let Some(earlier) = vmm.pending_dirty.take() {
                crate::vhost_user::dirty_log::merge_bitmaps(&mut dirty, &earlier);
            }
            marks.push(("dirty log read", Instant::now()));
            let mut pacer = PageSender::new(&mut *stream, shared, None);
            let sent = send_round(vmm, &mut pacer, Some(&dirty))?;
            log::debug!("migration: {} KiB in the final copy", sent >> 10);
            marks.push(("last pages sent", Instant::now()));
        }
        let state = vmm.capture_state(SnapshotKind::Full, &virtio)?;
        let body = serde_json::to_vec(&state).map_err(|e| MigrationError::Os {
            what: "encoding the state",
            err: std::io::Error::other(e),
        })?;
        marks.push(("state captured", Instant::now()));
        protocol::send(
            stream,
            &Frame::State {
                crc: crc32fast::hash(&body),
                body: body.into(),
            },
        )?;
        protocol::send(stream, &Frame::Complete)?;
        stream.flush().map_err(protocol::ProtocolError::Io)?;
        marks.push(("state sent", Instant::now()));
        match protocol::recv(stream)? {
            Frame::Resumed => {
                marks.push(("resumed there", Instant::now()));
                let mut at = paused_at;
                let steps: Vec<String> = marks
                    .iter()
                    .map(|(what, t)| {
                        let d = t.duration_since(at);
                        at = *t;
                        format!("{what} +{:.2} ms", d.as_secs_f64() * 1e3)
                    })
                    .collect();
                log::debug!("migration downtime: paused, {}", steps.join(", "));
                Ok(paused_at.elapsed())
            }
            Frame::Failed { reason } | Frame::Refused { reason } => {
                Err(MigrationError::Refused(reason))
            }
            other => Err(protocol::ProtocolError::Unexpected {
                expected: "Resumed",
                got: protocol::name(&other),
            }
            .into()),
        }
    })();
    // The guest runs elsewhere now, or goes on here: either way the rings
    // restart (a kept source stays paused, so they stay idle).
    vmm.restart_devices(&virtio);
    let _ = started;
    result
}
