//! `tern-bench blk`: the data path of `tern-blk`, driven directly over
//! vhost-user (no guest: on a software-KVM host in-guest I/O would measure
//! the instruction emulator), against host `fio` on the same file.
//! See tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_vhost_driver::{blk, rd, scratch_dir_in, wr, Backend, BlkFrontend, Desc, QueueDriver};

use crate::flags::{number, Flags};
use crate::report::Machine;

pub const USAGE: &str = "\
usage: tern-bench blk [--seconds N] [--tern-blk PATH] [--file PATH] [--json PATH]
                      [--baseline-tern-blk PATH] [--no-buffered] [--no-event-idx]
                      [--size-mib N] [--runs N] [--case KEY]...

Drives tern-blk's data path directly as a vhost-user frontend (memfd guest
memory, split virtqueues, QD requests in flight per queue, one driver thread
per queue) and runs host fio (O_DIRECT, io_uring or libaio) on the same file
with the same block sizes, depths and job counts:

  4 KiB random read  QD32, 1 queue and 4 queues (fio: numjobs 1 / 4)
  4 KiB random write QD32, 1 queue and 4 queues
  1 MiB sequential read and write, QD8, 1 queue

Each measurement uses a fresh `tern-blk --direct`; with buffered runs on
(the default) each is repeated without --direct (page cache, no fio peer).

  --seconds N                 seconds per measurement (default 10)
  --tern-blk PATH             backend to measure (default: tern-blk next to
                              this program, i.e. target/release/tern-blk)
  --file PATH                 raw file to use; ITS CONTENT IS OVERWRITTEN by
                              the write tests (default: a preallocated 1 GiB
                              file of random data in $TMPDIR, removed after)
  --size-mib N                size of the created file (default 1024)
  --json PATH                 also write the results as JSON
  --baseline-tern-blk PATH    measure another tern-blk too (same cases,
                              interleaved) and print ours / baseline
  --no-buffered               skip the runs without --direct
  --no-event-idx              do not negotiate VIRTIO_RING_F_EVENT_IDX
  --runs N                    interleaved runs of every case (default 1); the
                              table gives per-metric medians, and the per-run
                              tern-blk / fio ratios follow it
  --case KEY                  only this case (repeatable): randread_4k_qd32_1q,
                              randread_4k_qd32_4q, randwrite_4k_qd32_1q,
                              randwrite_4k_qd32_4q, seqread_1m_qd8_1q,
                              seqwrite_1m_qd8_1q
";

/// Targets from the issue, as fractions of host fio.
const TARGET_RANDREAD_IOPS: f64 = 0.85;
const TARGET_SEQ_MBPS: f64 = 0.95;
/// Entries per virtqueue (tern-blk's maximum).
const QUEUE_SIZE: u16 = 256;
/// Descriptors per request: header, data, status.
const DESCS: u16 = 3;
/// Bytes of header + status per request slot.
const HDR_STRIDE: u64 = 64;

pub struct Options {
    tern_blk: PathBuf,
    file: Option<PathBuf>,
    size_mib: u64,
    seconds: u64,
    json: Option<PathBuf>,
    baseline: Option<PathBuf>,
    buffered: bool,
    event_idx: bool,
    runs: usize,
    cases: Vec<String>,
}

/// `tern-bench blk ARGS...`.
pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    match parse(it)? {
        Some(o) => run(&o),
        None => {
            print!("{USAGE}");
            Ok(())
        }
    }
}

/// Reads `tern-bench blk`'s options; `None` for `--help`.
pub fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        tern_blk: PathBuf::new(),
        file: None,
        size_mib: 1024,
        seconds: 10,
        json: None,
        baseline: None,
        buffered: true,
        event_idx: true,
        runs: 1,
        cases: Vec::new(),
    };
    let mut tern_blk = None;
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value_os(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => o.seconds = number(&flag, value()?, 1)?,
            "--size-mib" => o.size_mib = number(&flag, value()?, 16)?,
            "--tern-blk" => tern_blk = Some(PathBuf::from(value()?)),
            "--file" => o.file = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--baseline-tern-blk" => o.baseline = Some(PathBuf::from(value()?)),
            "--no-buffered" => o.buffered = false,
            "--no-event-idx" => o.event_idx = false,
            "--runs" => o.runs = number(&flag, value()?, 1)? as usize,
            "--case" => {
                let k = value()?.to_string_lossy().into_owned();
                if !CASES.iter().any(|c| c.key == k) {
                    return Err(format!("--case: unknown case '{k}' (see --help)"));
                }
                o.cases.push(k);
            }
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench blk --help)"
                ))
            }
        }
    }
    o.tern_blk = match tern_blk {
        Some(p) => p,
        None => crate::exe_dir()?.join("tern-blk"),
    };
    Ok(Some(o))
}

/// One measurement.
#[derive(Clone, Copy)]
pub(crate) struct Case {
    pub(crate) key: &'static str,
    pub(crate) name: &'static str,
    pub(crate) write: bool,
    pub(crate) random: bool,
    pub(crate) bs: u32,
    pub(crate) qd: usize,
    pub(crate) queues: usize,
}

const CASES: [Case; 6] = [
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
        key: "randread_4k_qd32_4q",
        name: "4k randread QD32 4q",
        write: false,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 4,
    },
    Case {
        key: "randwrite_4k_qd32_1q",
        name: "4k randwrite QD32 1q",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Case {
        key: "randwrite_4k_qd32_4q",
        name: "4k randwrite QD32 4q",
        write: true,
        random: true,
        bs: 4096,
        qd: 32,
        queues: 4,
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
    Case {
        key: "seqwrite_1m_qd8_1q",
        name: "1M seqwrite QD8 1q",
        write: true,
        random: false,
        bs: 1 << 20,
        qd: 8,
        queues: 1,
    },
];

impl Case {
    /// The target for this case: (which metric, fraction of fio).
    fn target(&self) -> Option<(&'static str, f64)> {
        match (self.random, self.write) {
            (true, false) => Some(("iops", TARGET_RANDREAD_IOPS)),
            (false, _) => Some(("mbps", TARGET_SEQ_MBPS)),
            _ => None,
        }
    }
}

/// The outcome of one measurement.
#[derive(Clone, Debug, Default)]
pub(crate) struct Res {
    pub(crate) iops: f64,
    pub(crate) mbps: f64,
    pub(crate) lat_p50_us: f64,
    pub(crate) lat_p99_us: f64,
    pub(crate) ios: u64,
    pub(crate) seconds: f64,
    /// Driver-side counters (tern-blk runs only).
    pub(crate) kicks: u64,
    pub(crate) calls: u64,
    /// CPU time (user + system) per I/O: the backend process, and the
    /// driver threads (for fio: the fio job, and 0).
    pub(crate) backend_cpu_us: f64,
    pub(crate) driver_cpu_us: f64,
}

/// CPU time (user + system) of process `pid` so far, in microseconds.
pub(crate) fn process_cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1e6 / hz)
}

/// CPU time (user + system) of the calling thread so far, in microseconds.
pub(crate) fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

impl Res {
    pub(crate) fn json(&self) -> Value {
        json!({
            "iops": self.iops,
            "mb_per_s": self.mbps,
            "lat_p50_us": self.lat_p50_us,
            "lat_p99_us": self.lat_p99_us,
            "ios": self.ios,
            "seconds": self.seconds,
            "kicks": self.kicks,
            "calls": self.calls,
            "backend_cpu_us_per_io": self.backend_cpu_us,
            "driver_cpu_us_per_io": self.driver_cpu_us,
        })
    }
}

/// xorshift64*: fast and good enough for offsets.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The benchmark file; removed on drop when we created it.
pub(crate) struct BenchFile {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) owned: bool,
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(crate) fn create_file(path: &Path, size: u64) -> Result<BenchFile, String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let bf = BenchFile {
        path: path.to_path_buf(),
        size,
        owned: true,
    };
    // SAFETY: fallocate on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r != 0 {
        return Err(format!(
            "fallocate {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut chunk = vec![0u8; 1 << 20];
    let mut w = &f;
    for _ in 0..size / chunk.len() as u64 {
        for c in chunk.chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        w.write_all(&chunk)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    Ok(bf)
}

/// Drive `binary` on `file` for `seconds` with `case`.
pub(crate) fn drive(
    binary: &Path,
    file: &BenchFile,
    direct: bool,
    case: &Case,
    seconds: u64,
    event_idx: bool,
) -> Result<Res, String> {
    let dir = scratch_dir_in(&std::env::temp_dir(), "bench");
    let _cleanup = DirGuard(dir.clone());
    let socket = dir.join("blk.sock");
    let queues = case.queues.to_string();
    let mut args = vec![
        "--image",
        file.path.to_str().ok_or("file path is not UTF-8")?,
        "--format",
        "raw",
        "--queues",
        &queues,
        "--log-level",
        "warn",
    ];
    if direct {
        args.push("--direct");
    }
    let mut backend = Backend::try_spawn(binary, &socket, &args)?;
    let slots = case.queues * case.qd;
    let hdr_bytes = (slots as u64 * HDR_STRIDE).div_ceil(4096) * 4096;
    let data_size = (hdr_bytes + slots as u64 * u64::from(case.bs)).div_ceil(2 << 20) * (2 << 20);
    let mut fe = BlkFrontend::connect_with(
        &socket,
        &tern_vhost_driver::Options {
            queues: case.queues,
            event_idx,
            dirty_log: false,
            queue_size: QUEUE_SIZE,
            data_size,
        },
    )?;
    let disk = fe.capacity() << blk::SECTOR_SHIFT;
    if disk < file.size {
        return Err(format!(
            "tern-blk reports {disk} bytes, file has {}",
            file.size
        ));
    }
    let disk = file.size;
    if case.qd * usize::from(DESCS) > usize::from(QUEUE_SIZE) {
        return Err(format!(
            "QD {} does not fit a {QUEUE_SIZE}-entry queue",
            case.qd
        ));
    }
    // Per queue: (header gpa, header host address, buffer gpa) per slot.
    let hdr_base = fe.alloc(hdr_bytes, 4096, 0);
    let mut layout = Vec::new();
    for q in 0..case.queues {
        let mut v = Vec::new();
        for s in 0..case.qd {
            let h = hdr_base + (q * case.qd + s) as u64 * HDR_STRIDE;
            v.push((h, fe.host_ptr(h, HDR_STRIDE as usize) as usize, 0u64));
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
    let kind = if case.write { blk::T_OUT } else { blk::T_IN };
    let pid = backend.child.id();
    let cpu0 = process_cpu_us(pid);
    let mem = &fe.mem;
    let outs: Vec<Result<Worker, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = vqs
            .iter_mut()
            .zip(layout.iter())
            .enumerate()
            .map(|(qi, (vq, slots))| {
                let barrier = &barrier;
                sc.spawn(move || {
                    let qd = QueueDriver::new(mem, vq);
                    run_queue(qd, slots, case, kind, disk, qi, dur, barrier)
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
    let cpu1 = process_cpu_us(pid);
    drop(fe);
    let status = backend.try_wait_for(Duration::from_secs(5));
    let mut res = summarize(outs, dur)?;
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

/// Sum the driver threads' results (IOPS, latency percentiles, driver CPU per I/O).
pub(crate) fn summarize(outs: Vec<Result<Worker, String>>, dur: Duration) -> Result<Res, String> {
    let mut lat = Vec::new();
    let mut res = Res {
        seconds: dur.as_secs_f64(),
        ..Res::default()
    };
    let mut cpu = 0.0;
    for o in outs {
        let w = o?;
        res.ios += w.ios;
        res.kicks += w.kicks;
        res.calls += w.calls;
        cpu += w.cpu_us;
        lat.extend_from_slice(&w.lat_ns);
    }
    if res.ios == 0 {
        return Err("no request completed".into());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    res.iops = res.ios as f64 / res.seconds;
    res.lat_p50_us = pct(0.50);
    res.lat_p99_us = pct(0.99);
    res.driver_cpu_us = cpu / res.ios as f64;
    Ok(res)
}

pub(crate) struct DirGuard(pub(crate) PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) struct Worker {
    pub(crate) ios: u64,
    pub(crate) lat_ns: Vec<u32>,
    pub(crate) kicks: u64,
    pub(crate) calls: u64,
    /// CPU time of the driver thread while measuring.
    pub(crate) cpu_us: f64,
}

/// One queue's loop: keep `case.qd` requests in flight until the deadline,
/// then drain.
#[allow(clippy::too_many_arguments)]
fn run_queue(
    mut qd: QueueDriver<'_>,
    slots: &[(u64, usize, u64)],
    case: &Case,
    kind: u32,
    disk: u64,
    qi: usize,
    dur: Duration,
    barrier: &Barrier,
) -> Result<Worker, String> {
    let n = slots.len();
    for (s, &(hdr, hva, buf)) in slots.iter().enumerate() {
        let h = s as u16 * DESCS;
        qd.set_desc(h, rd(hdr, 16), Some(h + 1));
        let data = Desc {
            addr: buf,
            len: case.bs,
            write: !case.write,
        };
        qd.set_desc(h + 1, data, Some(h + 2));
        qd.set_desc(h + 2, wr(hdr + 16, 1), None);
        let bytes = tern_vhost_driver::request_header(kind, 0);
        // SAFETY: `hva` maps HDR_STRIDE bytes of the shared data region.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), hva as *mut u8, 16) };
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((qi as u64 + 1) * 0x9e37_79b9_7f4a_7c15));
    let blocks = disk / u64::from(case.bs);
    let mut seq = (disk / case.queues as u64 / u64::from(case.bs)) * qi as u64;
    let mut next_offset = move || -> u64 {
        let b = if case.random {
            rng.next() % blocks
        } else {
            let b = seq;
            seq = (seq + 1) % blocks;
            b
        };
        b * u64::from(case.bs)
    };
    let mut sent = vec![Instant::now(); n];
    let submit = |qd: &mut QueueDriver<'_>, s: usize, off: u64, sent: &mut [Instant]| {
        let hva = slots[s].1 as *mut u8;
        // SAFETY: sector at +8 and status at +16 of this slot's header.
        unsafe {
            std::ptr::write_volatile(hva.add(8) as *mut u64, (off >> blk::SECTOR_SHIFT).to_le());
            std::ptr::write_volatile(hva.add(16), 0xffu8);
        }
        sent[s] = Instant::now();
        qd.push(s as u16 * DESCS);
    };
    let mut lat = Vec::with_capacity(1 << 20);
    let mut ios = 0u64;
    barrier.wait();
    let cpu0 = thread_cpu_us();
    let start = Instant::now();
    let end = start + dur;
    for s in 0..n {
        submit(&mut qd, s, next_offset(), &mut sent);
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
            // SAFETY: status byte of slot s.
            let st = unsafe { std::ptr::read_volatile((slots[s].1 as *const u8).add(16)) };
            if st != blk::S_OK {
                return Err(format!("queue {qi}: request failed with status {st}"));
            }
            if now <= end {
                ios += 1;
                lat.push((now - sent[s]).as_nanos().min(u128::from(u32::MAX)) as u32);
                submit(&mut qd, s, next_offset(), &mut sent);
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
        cpu_us: thread_cpu_us() - cpu0,
    })
}

/// fio availability: installs it with apt-get when missing.
pub(crate) fn ensure_fio() -> Result<String, String> {
    let version = || {
        Command::new("fio")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    eprintln!("tern-bench blk: fio not found, trying `apt-get install -y fio`");
    let st = Command::new("apt-get")
        .args(["install", "-y", "fio"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match (st, version()) {
        (_, Some(v)) => Ok(v),
        (Ok(st), None) => Err(format!("apt-get install -y fio failed ({st})")),
        (Err(e), None) => Err(format!("cannot run apt-get: {e}")),
    }
}

/// Run fio for `case` (O_DIRECT); Err with fio's complaint on failure.
fn fio(engine: &str, file: &BenchFile, case: &Case, seconds: u64) -> Result<Res, String> {
    fio_with(engine, file, case, seconds, true)
}

/// Run fio for `case`, with O_DIRECT or through the page cache.
pub(crate) fn fio_with(
    engine: &str,
    file: &BenchFile,
    case: &Case,
    seconds: u64,
    direct: bool,
) -> Result<Res, String> {
    let rw = match (case.random, case.write) {
        (true, false) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (false, true) => "write",
    };
    let out = Command::new("fio")
        .arg("--name=tern-bench")
        .arg(format!("--filename={}", file.path.display()))
        .arg(format!("--size={}", file.size))
        .arg(format!("--direct={}", u8::from(direct)))
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", case.bs))
        .arg(format!("--iodepth={}", case.qd))
        .arg(format!("--numjobs={}", case.queues))
        .arg("--group_reporting")
        .arg("--norandommap")
        .arg("--randrepeat=0")
        .arg("--lat_percentiles=1")
        .arg("--time_based")
        .arg(format!("--runtime={seconds}"))
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "fio ({engine}) failed: {}",
            err.lines().next().unwrap_or("").trim()
        ));
    }
    // fio may print notes before the JSON object.
    let js = stdout.find('{').map(|i| &stdout[i..]).unwrap_or("");
    let v: Value = serde_json::from_str(js).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio ({engine}) job error {}", job["error"]));
    }
    let d = &job[if case.write { "write" } else { "read" }];
    let pct = |p: &str| {
        d["lat_ns"]["percentile"][p]
            .as_f64()
            .or_else(|| d["clat_ns"]["percentile"][p].as_f64())
            .unwrap_or(f64::NAN)
            / 1000.0
    };
    let iops = d["iops"].as_f64().ok_or("fio JSON: no iops")?;
    let cpu_pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let runtime_s = job["job_runtime"]
        .as_f64()
        .unwrap_or(seconds as f64 * 1000.0)
        / 1000.0;
    let total = d["total_ios"].as_u64().unwrap_or(0).max(1) as f64;
    let bw = d["bw_bytes"].as_f64().ok_or("fio JSON: no bw_bytes")?;
    Ok(Res {
        iops,
        mbps: bw / 1e6,
        lat_p50_us: pct("50.000000"),
        lat_p99_us: pct("99.000000"),
        ios: d["total_ios"].as_u64().unwrap_or(0),
        seconds: seconds as f64,
        backend_cpu_us: cpu_pct / 100.0 * runtime_s * 1e6 / total,
        ..Res::default()
    })
}

/// Every run's results of one case.
#[derive(Default)]
struct Samples {
    tern: Vec<Res>,
    fio: Vec<Res>,
    buffered: Vec<Res>,
    baseline: Vec<Res>,
}

/// Per-field medians of `v` (None if empty).
fn median_res(v: &[Res]) -> Option<Res> {
    if v.is_empty() {
        return None;
    }
    let med = |f: fn(&Res) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    Some(Res {
        iops: med(|r| r.iops),
        mbps: med(|r| r.mbps),
        lat_p50_us: med(|r| r.lat_p50_us),
        lat_p99_us: med(|r| r.lat_p99_us),
        ios: med(|r| r.ios as f64) as u64,
        seconds: med(|r| r.seconds),
        kicks: med(|r| r.kicks as f64) as u64,
        calls: med(|r| r.calls as f64) as u64,
        backend_cpu_us: med(|r| r.backend_cpu_us),
        driver_cpu_us: med(|r| r.driver_cpu_us),
    })
}

/// The tern-blk / fio ratio of each run, per case (IOPS for random cases, MB/s otherwise).
fn per_run(cases: &[&Case], samples: &[Samples]) -> String {
    let mut s = String::from("per-run tern-blk / fio:\n");
    for (case, smp) in cases.iter().zip(samples) {
        let m = if case.random { "iops" } else { "mbps" };
        let ratios: Vec<String> = smp
            .tern
            .iter()
            .zip(&smp.fio)
            .map(|(t, f)| format!("{:.2}", metric(t, m) / metric(f, m)))
            .collect();
        let mut v: Vec<f64> = smp
            .tern
            .iter()
            .zip(&smp.fio)
            .map(|(t, f)| metric(t, m) / metric(f, m))
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let med = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "  {:<24} {m:<5} {}   median {med:.2}",
            case.name,
            ratios.join(" ")
        );
    }
    s
}

struct Row {
    case: Case,
    tern: Res,
    fio: Option<Res>,
    buffered: Option<Res>,
    baseline: Option<Res>,
}

fn check_binary(what: &str, p: &Path) -> Result<PathBuf, String> {
    if !p.is_file() {
        return Err(format!(
            "{what} {} not found (build it: cargo build --release -p tern-blk)",
            p.display()
        ));
    }
    Ok(p.to_path_buf())
}

pub fn run(o: &Options) -> Result<(), String> {
    let tern_blk = check_binary("tern-blk", &o.tern_blk)?;
    let baseline = match &o.baseline {
        Some(b) => Some(check_binary("baseline tern-blk", b)?),
        None => None,
    };
    let fio_version = match ensure_fio() {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!(
                "tern-bench blk: WARNING: fio is not available ({e}); \
                 no host baseline, ratios and targets are not evaluated"
            );
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
            let p = std::env::temp_dir().join(format!("tern-bench-blk-{}.raw", std::process::id()));
            eprintln!(
                "tern-bench blk: creating {} ({} MiB, fallocate + random data)",
                p.display(),
                o.size_mib
            );
            create_file(&p, o.size_mib << 20)?
        }
    };
    let machine = Machine::probe();
    eprintln!("tern-bench blk: {}", machine.summary());
    let mut engine = "io_uring".to_string();
    let mut engine_note = None;
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| o.cases.is_empty() || o.cases.iter().any(|k| k == c.key))
        .collect();
    let mut samples: Vec<Samples> = cases.iter().map(|_| Samples::default()).collect();
    for run in 0..o.runs {
        for (i, (case, smp)) in cases.iter().zip(samples.iter_mut()).enumerate() {
            eprintln!(
                "tern-bench blk: run {}/{} [{}/{}] {} ({} s each)",
                run + 1,
                o.runs,
                i + 1,
                cases.len(),
                case.name,
                o.seconds
            );
            let tern = drive(&tern_blk, &file, true, case, o.seconds, o.event_idx)
                .map_err(|e| format!("{}: tern-blk --direct: {e}", case.name))?;
            eprintln!("  tern-blk --direct  {}", brief(&tern));
            smp.tern.push(tern);
            if let Some(b) = &baseline {
                let r = drive(b, &file, true, case, o.seconds, o.event_idx)
                    .map_err(|e| format!("{}: baseline tern-blk: {e}", case.name))?;
                eprintln!("  baseline --direct  {}", brief(&r));
                smp.baseline.push(r);
            }
            if fio_version.is_some() {
                let mut r = fio(&engine, &file, case, o.seconds);
                if r.is_err() && engine == "io_uring" {
                    let why = r.as_ref().err().cloned().unwrap_or_default();
                    eprintln!("  {why}; retrying with libaio");
                    engine = "libaio".into();
                    engine_note = Some(why);
                    r = fio(&engine, &file, case, o.seconds);
                }
                let r = r.map_err(|e| format!("{}: {e}", case.name))?;
                eprintln!("  fio ({engine:8})    {}", brief(&r));
                smp.fio.push(r);
            }
            if o.buffered {
                let r = drive(&tern_blk, &file, false, case, o.seconds, o.event_idx)
                    .map_err(|e| format!("{}: tern-blk (buffered): {e}", case.name))?;
                eprintln!("  tern-blk buffered  {}", brief(&r));
                smp.buffered.push(r);
            }
        }
    }
    let rows: Vec<Row> = cases
        .iter()
        .zip(samples.iter())
        .map(|(case, smp)| Row {
            case: **case,
            tern: median_res(&smp.tern).unwrap_or_default(),
            fio: median_res(&smp.fio),
            buffered: median_res(&smp.buffered),
            baseline: median_res(&smp.baseline),
        })
        .collect();
    println!(
        "tern-blk data path vs host fio ({} s per measurement, file {} MiB at {}, EVENT_IDX {}, fio {} engine {})",
        o.seconds,
        file.size >> 20,
        file.path.display(),
        if o.event_idx { "on" } else { "off" },
        fio_version.as_deref().unwrap_or("unavailable"),
        engine
    );
    print!("{}", table(&rows));
    if o.runs > 1 {
        print!("{}", per_run(&cases, &samples));
    }
    if let Some(path) = &o.json {
        let v = json!({
            "benchmark": "tern-bench blk",
            "seconds": o.seconds,
            "file": file.path.display().to_string(),
            "file_bytes": file.size,
            "file_created": file.owned,
            "event_idx": o.event_idx,
            "queue_size": QUEUE_SIZE,
            "tern_blk": tern_blk.display().to_string(),
            "baseline_tern_blk": baseline.as_ref().map(|b| b.display().to_string()),
            "fio_version": fio_version,
            "fio_engine": engine,
            "fio_engine_fallback_reason": engine_note,
            "targets": {"randread_iops_vs_fio": TARGET_RANDREAD_IOPS, "seq_mbps_vs_fio": TARGET_SEQ_MBPS},
            "runs": o.runs,
            "machine": machine.json(),
            "cases": rows.iter().zip(samples.iter()).map(|(r, smp)| {
                let mut v = row_json(r);
                let all = |v: &[Res]| v.iter().map(Res::json).collect::<Vec<Value>>();
                v["samples"] = json!({
                    "tern_blk_direct": all(&smp.tern), "fio": all(&smp.fio),
                    "tern_blk_buffered": all(&smp.buffered), "baseline_direct": all(&smp.baseline),
                });
                v
            }).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&v).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("tern-bench blk: wrote {}", path.display());
    }
    Ok(())
}

pub(crate) fn brief(r: &Res) -> String {
    format!(
        "{:>9.0} IOPS {:>8.1} MB/s  p50 {:>8.1} us  p99 {:>8.1} us  cpu/io {:>4.1}+{:<4.1} us  io/kick {:>5.1} io/call {:>5.1}",
        r.iops,
        r.mbps,
        r.lat_p50_us,
        r.lat_p99_us,
        r.backend_cpu_us,
        r.driver_cpu_us,
        r.ios as f64 / r.kicks.max(1) as f64,
        r.ios as f64 / r.calls.max(1) as f64,
    )
}

fn metric(r: &Res, m: &str) -> f64 {
    match m {
        "iops" => r.iops,
        "mbps" => r.mbps,
        "p50" => r.lat_p50_us,
        _ => r.lat_p99_us,
    }
}

fn verdict(row: &Row) -> Option<(&'static str, f64, f64, bool)> {
    let (m, frac) = row.case.target()?;
    let fio = row.fio.as_ref()?;
    let ratio = metric(&row.tern, m) / metric(fio, m);
    Some((m, frac, ratio, ratio >= frac))
}

fn row_json(row: &Row) -> Value {
    let c = &row.case;
    let ratio = |m: &str| {
        row.fio
            .as_ref()
            .map(|f| metric(&row.tern, m) / metric(f, m))
    };
    json!({
        "key": c.key,
        "name": c.name,
        "rw": if c.write { "write" } else { "read" },
        "pattern": if c.random { "random" } else { "sequential" },
        "block_size": c.bs,
        "queue_depth": c.qd,
        "queues": c.queues,
        "tern_blk_direct": row.tern.json(),
        "fio": row.fio.as_ref().map(Res::json),
        "tern_blk_buffered": row.buffered.as_ref().map(Res::json),
        "baseline_direct": row.baseline.as_ref().map(Res::json),
        "ratio_vs_fio": {"iops": ratio("iops"), "mb_per_s": ratio("mbps"),
                          "lat_p50": ratio("p50"), "lat_p99": ratio("p99")},
        "ratio_vs_baseline": row.baseline.as_ref().map(|b| json!({
            "iops": row.tern.iops / b.iops, "mb_per_s": row.tern.mbps / b.mbps,
            "lat_p50": row.tern.lat_p50_us / b.lat_p50_us,
            "lat_p99": row.tern.lat_p99_us / b.lat_p99_us})),
        "target": verdict(row).map(|(m, frac, r, ok)| json!({
            "metric": m, "min_ratio": frac, "ratio": r, "ok": ok})),
    })
}

fn table(rows: &[Row]) -> String {
    let base = rows.iter().any(|r| r.baseline.is_some());
    let buffered = rows.iter().any(|r| r.buffered.is_some());
    let mut s = String::new();
    let _ = write!(
        s,
        "{:<34} {:>11} {:>11} {:>7}  {:<13}",
        "metric", "tern-blk", "host fio", "ratio", "target"
    );
    if buffered {
        let _ = write!(s, " {:>13}", "tern buffered");
    }
    if base {
        let _ = write!(s, " {:>11} {:>9}", "baseline", "ours/base");
    }
    s.push('\n');
    for row in rows {
        for (m, label, prec) in [
            ("iops", "IOPS", 0usize),
            ("mbps", "MB/s", 1),
            ("p50", "lat p50 us", 1),
            ("p99", "lat p99 us", 1),
        ] {
            let t = metric(&row.tern, m);
            let name = format!("{} {}", row.case.name, label);
            let (fio, ratio) = match &row.fio {
                Some(f) => {
                    let fv = metric(f, m);
                    (format!("{fv:.prec$}"), format!("{:.2}x", t / fv))
                }
                None => ("-".into(), "-".into()),
            };
            let target = match verdict(row) {
                Some((tm, frac, _, ok)) if tm == m => {
                    format!(">={:.0}% {}", frac * 100.0, if ok { "ok" } else { "MISS" })
                }
                _ => String::new(),
            };
            let _ = write!(
                s,
                "{name:<34} {t:>11.prec$} {fio:>11} {ratio:>7}  {target:<13}"
            );
            if buffered {
                match &row.buffered {
                    Some(b) => {
                        let _ = write!(s, " {:>13.prec$}", metric(b, m));
                    }
                    None => {
                        let _ = write!(s, " {:>13}", "-");
                    }
                }
            }
            if let Some(b) = &row.baseline {
                let bv = metric(b, m);
                let _ = write!(s, " {bv:>11.prec$} {:>8.2}x", t / bv);
            }
            s.push('\n');
        }
    }
    s.push_str(
        "ratio = tern-blk / host fio (latency: above 1.00x is slower); \
         targets from the issue: 4 KiB random read IOPS >= 85% of fio, sequential MB/s >= 95%.\n",
    );
    s
}
