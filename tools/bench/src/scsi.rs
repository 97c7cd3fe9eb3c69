//! `tern-bench scsi`: the data path of `tern-scsi` (READ(16) CDBs) against
//! `tern-blk` on the same raw file, both driven directly over vhost-user
//! (no guest), with host fio as the baseline in the same run.
//! See tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_vhost_driver::scsi::{cmd_req, lun_field, rw16, REQUEST_QUEUE, REQ_SIZE, RESP_SIZE};
use tern_vhost_driver::{rd, scratch_dir_in, wr, Backend, BlkFrontend, Desc, QueueDriver};

use crate::blk::{self, BenchFile, Case, DirGuard, Res, Rng, Worker};
use crate::flags::{number, Flags};
use crate::report::Machine;

pub const USAGE: &str = "\
usage: tern-bench scsi [--seconds N] [--runs N] [--tern-scsi PATH] [--tern-blk PATH]
                       [--file PATH] [--size-mib N] [--json PATH] [--no-event-idx]

Drives tern-scsi (READ(16) CDBs on LUN 0) and tern-blk (VIRTIO_BLK_T_IN) as
a vhost-user frontend on the same raw file (memfd guest memory, QD requests
in flight on one request queue), and host fio on that file:

  4 KiB random read  QD32, 1 queue
  1 MiB sequential read QD8, 1 queue

Both backends and fio use O_DIRECT (tern-blk --direct, tern-scsi
--lun FILE,direct=on, fio --direct=1), so all three see the same disk and
no page cache. Each run measures
tern-blk, tern-scsi and fio back to back; the table gives medians over the
runs and tern-scsi / tern-blk (target: at least 85%).

  --seconds N        seconds per measurement (default 5)
  --runs N           interleaved runs per case (default 3)
  --tern-scsi PATH   default: tern-scsi next to this program
  --tern-blk PATH    default: tern-blk next to this program
  --file PATH        raw file to read (default: a 1 GiB file of random data
                     in $TMPDIR, removed after); never written
  --size-mib N       size of the created file (default 1024)
  --json PATH        also write every sample and the medians as JSON
  --no-event-idx     do not negotiate VIRTIO_RING_F_EVENT_IDX
";

/// The target: tern-scsi IOPS / MB/s at least this fraction of tern-blk's.
const TARGET_VS_BLK: f64 = 0.85;
/// Entries per virtqueue (both backends' maximum).
const QUEUE_SIZE: u16 = 256;
/// Descriptors per request: request header, response, data.
const DESCS: u16 = 3;
/// Bytes per slot for the request header (at 0) and the response (at 64).
const SLOT_STRIDE: u64 = 256;
const RESP_AT: u64 = 64;

const CASES: [Case; 2] = [
    Case {
        key: "randread_4k_qd32_1q",
        name: "4k randread QD32 1q",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Case {
        key: "seqread_1m_qd8_1q",
        name: "1M seqread QD8 1q",
        write: false,
        random: false,
        bs: 1 << 20,
        qd: 8,
        queues: 1,
    },
];

pub struct Options {
    tern_scsi: PathBuf,
    tern_blk: PathBuf,
    file: Option<PathBuf>,
    size_mib: u64,
    seconds: u64,
    runs: usize,
    json: Option<PathBuf>,
    event_idx: bool,
}

/// `tern-bench scsi ARGS...`.
pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    match parse(it)? {
        Some(o) => run(&o),
        None => {
            print!("{USAGE}");
            Ok(())
        }
    }
}

fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        tern_scsi: PathBuf::new(),
        tern_blk: PathBuf::new(),
        file: None,
        size_mib: 1024,
        seconds: 5,
        runs: 3,
        json: None,
        event_idx: true,
    };
    let (mut scsi, mut blk) = (None, None);
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value_os(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => o.seconds = number(&flag, value()?, 1)?,
            "--runs" => o.runs = number(&flag, value()?, 1)? as usize,
            "--size-mib" => o.size_mib = number(&flag, value()?, 16)?,
            "--tern-scsi" => scsi = Some(PathBuf::from(value()?)),
            "--tern-blk" => blk = Some(PathBuf::from(value()?)),
            "--file" => o.file = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--no-event-idx" => o.event_idx = false,
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench scsi --help)"
                ))
            }
        }
    }
    o.tern_scsi = match scsi {
        Some(p) => p,
        None => crate::exe_dir()?.join("tern-scsi"),
    };
    o.tern_blk = match blk {
        Some(p) => p,
        None => crate::exe_dir()?.join("tern-blk"),
    };
    Ok(Some(o))
}

/// Drive `tern-scsi` on `file` for `seconds` with `case` (reads only).
fn drive_scsi(
    binary: &Path,
    file: &BenchFile,
    case: &Case,
    seconds: u64,
    event_idx: bool,
) -> Result<Res, String> {
    let dir = scratch_dir_in(&std::env::temp_dir(), "bench-scsi");
    let _cleanup = DirGuard(dir.clone());
    let socket = dir.join("scsi.sock");
    let lun = format!(
        "{},format=raw,ro=on,direct=on",
        file.path.to_str().ok_or("file path is not UTF-8")?
    );
    let queues = case.queues.to_string();
    let args = ["--lun", &lun, "--queues", &queues, "--log-level", "warn"];
    let mut backend = Backend::try_spawn(binary, &socket, &args)?;
    let slots = case.queues * case.qd;
    let hdr_bytes = (slots as u64 * SLOT_STRIDE).div_ceil(4096) * 4096;
    let data_size = (hdr_bytes + slots as u64 * u64::from(case.bs)).div_ceil(2 << 20) * (2 << 20);
    let mut fe = BlkFrontend::connect_with(
        &socket,
        &tern_vhost_driver::Options {
            queues: REQUEST_QUEUE + case.queues,
            event_idx,
            dirty_log: false,
            queue_size: QUEUE_SIZE,
            data_size,
        },
    )?;
    // Per queue: (slot gpa, slot host address, buffer gpa).
    let hdr_base = fe.alloc(hdr_bytes, 4096, 0);
    let mut layout = Vec::new();
    for q in 0..case.queues {
        let mut v = Vec::new();
        for s in 0..case.qd {
            let h = hdr_base + (q * case.qd + s) as u64 * SLOT_STRIDE;
            v.push((h, fe.host_ptr(h, SLOT_STRIDE as usize) as usize, 0u64));
        }
        layout.push(v);
    }
    for v in layout.iter_mut() {
        for slot in v.iter_mut() {
            slot.2 = fe.alloc(u64::from(case.bs), 4096, 0);
        }
    }
    let mut vqs = std::mem::take(&mut fe.queues);
    let barrier = Barrier::new(case.queues);
    let dur = Duration::from_secs(seconds);
    let disk = file.size;
    let pid = backend.child.id();
    let cpu0 = blk::process_cpu_us(pid);
    let mem = &fe.mem;
    let outs: Vec<Result<Worker, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = vqs[REQUEST_QUEUE..]
            .iter_mut()
            .zip(layout.iter())
            .enumerate()
            .map(|(qi, (vq, slots))| {
                let barrier = &barrier;
                sc.spawn(move || {
                    let qd = QueueDriver::new(mem, vq);
                    run_queue(qd, slots, case, disk, qi, dur, barrier)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("driver thread panicked".into()))
            })
            .collect()
    });
    let cpu1 = blk::process_cpu_us(pid);
    drop(fe);
    let status = backend.try_wait_for(Duration::from_secs(5));
    let mut res = blk::summarize(outs, dur)?;
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        res.backend_cpu_us = (b - a) / res.ios.max(1) as f64;
    }
    match status {
        Some(st) if st.success() => {}
        Some(st) => return Err(format!("{} exited with {st}", binary.display())),
        None => {
            return Err(format!(
                "{} did not exit after disconnect",
                binary.display()
            ))
        }
    }
    res.mbps = res.iops * f64::from(case.bs) / 1e6;
    Ok(res)
}

/// One request queue's loop: keep `case.qd` READ(16)s in flight until the
/// deadline, then drain.
fn run_queue(
    mut qd: QueueDriver<'_>,
    slots: &[(u64, usize, u64)],
    case: &Case,
    disk: u64,
    qi: usize,
    dur: Duration,
    barrier: &Barrier,
) -> Result<Worker, String> {
    let n = slots.len();
    let blocks_per_io = case.bs / 512;
    for (s, &(hdr, hva, buf)) in slots.iter().enumerate() {
        let h = s as u16 * DESCS;
        qd.set_desc(h, rd(hdr, REQ_SIZE as u32), Some(h + 1));
        qd.set_desc(h + 1, wr(hdr + RESP_AT, RESP_SIZE as u32), Some(h + 2));
        let data = Desc {
            addr: buf,
            len: case.bs,
            write: true,
        };
        qd.set_desc(h + 2, data, None);
        let req = cmd_req(lun_field(0), s as u64, &rw16(false, 0, blocks_per_io));
        // SAFETY: `hva` maps SLOT_STRIDE bytes of the shared data region.
        unsafe { std::ptr::copy_nonoverlapping(req.as_ptr(), hva as *mut u8, REQ_SIZE) };
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((qi as u64 + 1) * 0x9e37_79b9_7f4a_7c15));
    let blocks = disk / u64::from(case.bs);
    let mut seq = (disk / case.queues as u64 / u64::from(case.bs)) * qi as u64;
    let mut next_lba = move || -> u64 {
        let b = if case.random {
            rng.next() % blocks
        } else {
            let b = seq;
            seq = (seq + 1) % blocks;
            b
        };
        b * u64::from(blocks_per_io)
    };
    let mut sent = vec![Instant::now(); n];
    // CDB at +19 of the request: READ(16) LBA in bytes 2..10.
    let submit = |qd: &mut QueueDriver<'_>, s: usize, lba: u64, sent: &mut [Instant]| {
        let hva = slots[s].1 as *mut u8;
        // SAFETY: the LBA field of this slot's CDB and its response byte,
        // inside the slot's SLOT_STRIDE bytes.
        unsafe {
            std::ptr::write_unaligned(hva.add(19 + 2) as *mut u64, lba.to_be());
            std::ptr::write_volatile(hva.add(RESP_AT as usize + 11), 0xffu8);
        }
        sent[s] = Instant::now();
        qd.push(s as u16 * DESCS);
    };
    let mut lat = Vec::with_capacity(1 << 20);
    let mut ios = 0u64;
    barrier.wait();
    let cpu0 = blk::thread_cpu_us();
    let start = Instant::now();
    let end = start + dur;
    for s in 0..n {
        submit(&mut qd, s, next_lba(), &mut sent);
    }
    qd.commit();
    let mut inflight = n;
    let mut idle_since = Instant::now();
    while inflight > 0 {
        let mut got = false;
        while let Some(u) = qd.pop_used() {
            got = true;
            let now = Instant::now();
            let s = usize::from(u.id / DESCS);
            if s >= n || u.id % DESCS != 0 {
                return Err(format!("queue {qi}: used id {} is no request head", u.id));
            }
            // SAFETY: status and response bytes of slot s.
            let (status, response) = unsafe {
                let r = (slots[s].1 as *const u8).add(RESP_AT as usize);
                (
                    std::ptr::read_volatile(r.add(10)),
                    std::ptr::read_volatile(r.add(11)),
                )
            };
            if (response, status) != (0, 0) {
                return Err(format!(
                    "queue {qi}: command failed: response {response} status {status}"
                ));
            }
            if now <= end {
                ios += 1;
                lat.push((now - sent[s]).as_nanos().min(u128::from(u32::MAX)) as u32);
                submit(&mut qd, s, next_lba(), &mut sent);
            } else {
                inflight -= 1;
            }
        }
        qd.commit();
        if got {
            idle_since = Instant::now();
        } else if !qd.arm_and_check() {
            qd.wait_call(100);
            if idle_since.elapsed() > Duration::from_secs(30) {
                return Err(format!("queue {qi}: no completion for 30 s"));
            }
        }
    }
    Ok(Worker {
        ios,
        lat_ns: lat,
        kicks: qd.kicks(),
        calls: qd.calls(),
        cpu_us: blk::thread_cpu_us() - cpu0,
    })
}

/// A table row: JSON key, label, the value, whether higher is better.
type MetricRow = (&'static str, &'static str, fn(&Res) -> f64, bool);

/// Every sample of one case.
#[derive(Default)]
struct Samples {
    scsi: Vec<Res>,
    blk: Vec<Res>,
    fio: Vec<Res>,
}

fn median(v: &[Res], f: impl Fn(&Res) -> f64) -> Option<f64> {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    if x.is_empty() {
        return None;
    }
    x.sort_by(|a, b| a.total_cmp(b));
    Some(x[x.len() / 2])
}

fn check_binary(what: &str, p: &Path) -> Result<(), String> {
    if p.is_file() {
        Ok(())
    } else {
        Err(format!(
            "{what} {} not found (build it: cargo build --release -p tern-blk -p tern-scsi)",
            p.display()
        ))
    }
}

pub fn run(o: &Options) -> Result<(), String> {
    check_binary("tern-scsi", &o.tern_scsi)?;
    check_binary("tern-blk", &o.tern_blk)?;
    let fio_version = match blk::ensure_fio() {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("tern-bench scsi: WARNING: fio is not available ({e}); no host baseline");
            None
        }
    };
    let file = match &o.file {
        Some(p) => {
            let size = std::fs::metadata(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .len()
                / (1 << 20)
                * (1 << 20);
            if size < 16 << 20 {
                return Err(format!("{}: smaller than 16 MiB", p.display()));
            }
            BenchFile {
                path: p.clone(),
                size,
                owned: false,
            }
        }
        None => {
            let p =
                std::env::temp_dir().join(format!("tern-bench-scsi-{}.raw", std::process::id()));
            eprintln!(
                "tern-bench scsi: creating {} ({} MiB of random data)",
                p.display(),
                o.size_mib
            );
            blk::create_file(&p, o.size_mib << 20)?
        }
    };
    let machine = Machine::probe();
    eprintln!("tern-bench scsi: {}", machine.summary());
    let mut engine = "io_uring".to_string();
    let mut samples: Vec<Samples> = CASES.iter().map(|_| Samples::default()).collect();
    for run in 0..o.runs {
        for (case, s) in CASES.iter().zip(samples.iter_mut()) {
            eprintln!(
                "tern-bench scsi: run {}/{} {} ({} s each)",
                run + 1,
                o.runs,
                case.name,
                o.seconds
            );
            let b = blk::drive(&o.tern_blk, &file, true, case, o.seconds, o.event_idx)
                .map_err(|e| format!("{}: tern-blk: {e}", case.name))?;
            eprintln!("  tern-blk   {}", blk::brief(&b));
            s.blk.push(b);
            let r = drive_scsi(&o.tern_scsi, &file, case, o.seconds, o.event_idx)
                .map_err(|e| format!("{}: tern-scsi: {e}", case.name))?;
            eprintln!("  tern-scsi  {}", blk::brief(&r));
            s.scsi.push(r);
            if fio_version.is_some() {
                let mut r = blk::fio_with(&engine, &file, case, o.seconds, true);
                if r.is_err() && engine == "io_uring" {
                    engine = "libaio".into();
                    r = blk::fio_with(&engine, &file, case, o.seconds, true);
                }
                let r = r.map_err(|e| format!("{}: {e}", case.name))?;
                eprintln!("  fio        {}", blk::brief(&r));
                s.fio.push(r);
            }
        }
    }
    println!(
        "tern-scsi vs tern-blk, same raw file ({} MiB, O_DIRECT), medians of {} runs x {} s, EVENT_IDX {}, fio {} ({})",
        file.size >> 20,
        o.runs,
        o.seconds,
        if o.event_idx { "on" } else { "off" },
        fio_version.as_deref().unwrap_or("unavailable"),
        engine
    );
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<30} {:>11} {:>11} {:>9} {:<11} {:>11} {:>9} {:>9}",
        "metric", "tern-scsi", "tern-blk", "scsi/blk", "target", "host fio", "scsi/fio", "blk/fio"
    );
    let mut cases_json = Vec::new();
    for (case, s) in CASES.iter().zip(samples.iter()) {
        let metrics: [MetricRow; 4] = [
            ("iops", "IOPS", |r| r.iops, true),
            ("mbps", "MB/s", |r| r.mbps, true),
            ("p50", "lat p50 us", |r| r.lat_p50_us, false),
            ("p99", "lat p99 us", |r| r.lat_p99_us, false),
        ];
        let mut case_json = serde_json::Map::new();
        for (key, label, f, higher_better) in metrics {
            let sc = median(&s.scsi, f).unwrap_or(f64::NAN);
            let bl = median(&s.blk, f).unwrap_or(f64::NAN);
            let fi = median(&s.fio, f);
            let ratio = sc / bl;
            let target = if higher_better && (case.random == (key == "iops")) {
                format!(
                    ">=85% {}",
                    if ratio >= TARGET_VS_BLK { "ok" } else { "MISS" }
                )
            } else {
                String::new()
            };
            let prec = if key == "iops" { 0 } else { 1 };
            let (fs, r1, r2) = match fi {
                Some(fv) => (
                    format!("{fv:.prec$}"),
                    format!("{:.2}x", sc / fv),
                    format!("{:.2}x", bl / fv),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                t,
                "{:<30} {sc:>11.prec$} {bl:>11.prec$} {:>8.2}x {target:<11} {fs:>11} {r1:>9} {r2:>9}",
                format!("{} {label}", case.name),
                ratio
            );
            case_json.insert(
                key.to_string(),
                json!({"tern_scsi": sc, "tern_blk": bl, "fio": fi, "scsi_vs_blk": ratio}),
            );
        }
        let all = |v: &[Res]| v.iter().map(Res::json).collect::<Vec<Value>>();
        cases_json.push(json!({
            "key": case.key, "name": case.name, "block_size": case.bs, "queue_depth": case.qd,
            "medians": Value::Object(case_json),
            "samples": {"tern_scsi": all(&s.scsi), "tern_blk": all(&s.blk), "fio": all(&s.fio)},
        }));
    }
    t.push_str(
        "scsi/blk = tern-scsi / tern-blk (latency: above 1.00x is slower); target from the issue: \
         tern-scsi >= 85% of tern-blk (4 KiB random read IOPS, 1 MiB sequential MB/s).\n",
    );
    t.push_str("per-run tern-scsi / tern-blk (and tern-blk / fio):\n");
    for (case, smp) in CASES.iter().zip(samples.iter()) {
        let f = |r: &Res| if case.random { r.iops } else { r.mbps };
        let sb: Vec<String> = smp
            .scsi
            .iter()
            .zip(&smp.blk)
            .map(|(a, b)| format!("{:.2}", f(a) / f(b)))
            .collect();
        let bf: Vec<String> = smp
            .blk
            .iter()
            .zip(&smp.fio)
            .map(|(a, b)| format!("{:.2}", f(a) / f(b)))
            .collect();
        let med = |a: &[Res], b: &[Res]| {
            let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
            v.sort_by(|x, y| x.total_cmp(y));
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let _ = writeln!(
            t,
            "  {:<22} scsi/blk {} (median {:.2})   blk/fio {} (median {:.2})",
            case.name,
            sb.join(" "),
            med(&smp.scsi, &smp.blk),
            bf.join(" "),
            med(&smp.blk, &smp.fio)
        );
    }
    print!("{t}");
    if let Some(path) = &o.json {
        let v = json!({
            "benchmark": "tern-bench scsi",
            "seconds": o.seconds,
            "runs": o.runs,
            "file_bytes": file.size,
            "page_cache": false,
            "o_direct": true,
            "event_idx": o.event_idx,
            "fio_version": fio_version,
            "fio_engine": engine,
            "target_scsi_vs_blk": TARGET_VS_BLK,
            "machine": machine.json(),
            "cases": cases_json,
        });
        let text = serde_json::to_string_pretty(&v).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("tern-bench scsi: wrote {}", path.display());
    }
    Ok(())
}
