//! `tern-bench migrate`: live migration of the test unikernel with all of
//! its RAM holding data, idle or dirtying memory at a set rate, over a Unix
//! socket, TCP on loopback and `local: true` (memfd passing): total time,
//! downtime (tern's `downtime_ms` and the gap in the guest's 1 ms
//! heartbeat), rounds, bytes sent, throughput. The VM moves from tern to
//! tern in a chain (each destination is the next source), so its RAM is
//! filled once per guest size and load. See tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::flags::{number, Flags};
use crate::http::{Conn, Request};
use crate::{report, Stats};

pub const USAGE: &str = "\
usage: tern-bench migrate [--runs N] [--big-runs N] [--sizes MIB,...]
                          [--transports unix,tcp,local] [--loads idle,dirty]
                          [--dirty-pages N] [--downtime-limit MS]
                          [--tern PATH] [--unikernel PATH] [--json PATH]
                          [--baseline-only] [--huge] [--prealloc]
                          [--guest-args STR]

For each guest size and load, a unikernel VM (1 vCPU, heartbeat every
1 ms, halting in between as an idle OS does: idle=hlt) fills all of its
RAM with a pattern (mempattern=all), then migrates
N times over each transport from one fresh tern to the next
(keep_source, so the source's GET /migration can be read at the end).
`dirty` adds memdirty=N new pages per beat (memdirtyspan: a window that
moves through 128-256 MiB), about 100 MB/s at the guest's beat rate.

  --runs N             migrations per size, load and transport (default 3)
  --big-runs N         the same for guests of 4 GiB and more (default 1)
  --sizes LIST         guest sizes in MiB (default 512,1024,4096)
  --transports LIST    unix, tcp (127.0.0.1), local (default all three)
  --loads LIST         idle, dirty (default both)
  --dirty-pages N      pages per beat for `dirty` (default 50)
  --downtime-limit MS  downtime_limit_ms of each migration (default 10)
  --tern PATH          tern to measure (default: `tern` next to this program)
  --unikernel PATH     test unikernel ELF (default: built with make)
  --json PATH          also write every sample as JSON
  --baseline-only      only the raw baseline (see below)
  --huge               guest RAM of 2 MiB huge pages (machine-config
                       huge_pages 2M): the host must have reserved
                       twice the largest size (vm.nr_hugepages). Every
                       free huge page is touched once before measuring:
                       on a host that is itself a VM the first touch of a
                       page can cost the outer host a fault, which would
                       slow whichever run came first
  --prealloc           destinations allocate their memory before the
                       source connects (machine-config, then
                       migration/receive with prealloc): the migration no
                       longer pays for the host allocating each page
  --guest-args STR     appended to the guest's command line (later keys
                       win: `idle=poll` busy-waits on the PIT between
                       beats, which keeps the vCPU's core busy)

Before each guest size, raw baselines move the same number of bytes over
each of the unix and tcp transports with a plain sender and receiver in
this process (4 MiB writes from a filled buffer, 4 MiB reads; no framing
or checksum), N times each: `raw wire` drops what it reads, `raw memfd`
pwrites it into a fresh memfd as a destination must. The table gives
their median GB/s and tern's GB/s (bytes over total time) as a share.

With TERN_BENCH_SHOW=1 each tern's log (but API lines) is printed when it
ends; add TERN_LOG=debug for the rounds and where the pause went.
";

pub struct Options {
    runs: usize,
    big_runs: usize,
    sizes: Vec<u64>,
    transports: Vec<String>,
    loads: Vec<String>,
    dirty_pages: u64,
    downtime_limit: u64,
    tern: PathBuf,
    unikernel: Option<PathBuf>,
    json: Option<PathBuf>,
    baseline_only: bool,
    huge: bool,
    prealloc: bool,
    guest_args: String,
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).collect()
}

fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        runs: 3,
        big_runs: 1,
        sizes: vec![512, 1024, 4096],
        transports: list("unix,tcp,local"),
        loads: list("idle,dirty"),
        dirty_pages: 50,
        downtime_limit: 10,
        tern: crate::exe_dir()?.join("tern"),
        unikernel: None,
        json: None,
        baseline_only: false,
        huge: false,
        prealloc: false,
        guest_args: String::new(),
    };
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--huge" => o.huge = true,
            "--prealloc" => o.prealloc = true,
            "--guest-args" => o.guest_args = value()?,
            "--runs" => o.runs = number(&flag, value()?, 0)?.max(1) as usize,
            "--big-runs" => o.big_runs = number(&flag, value()?, 0)?.max(1) as usize,
            "--dirty-pages" => o.dirty_pages = number(&flag, value()?, 0)?.clamp(1, 65536),
            "--downtime-limit" => o.downtime_limit = number(&flag, value()?, 0)?,
            "--sizes" => {
                let v = value()?;
                o.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--sizes: '{v}' is not a list of MiB"))?;
            }
            "--transports" => {
                o.transports = list(&value()?);
                if let Some(t) = o
                    .transports
                    .iter()
                    .find(|t| !["unix", "tcp", "local"].contains(&t.as_str()))
                {
                    return Err(format!("--transports: unknown '{t}' (unix, tcp, local)"));
                }
            }
            "--loads" => {
                o.loads = list(&value()?);
                if let Some(l) = o
                    .loads
                    .iter()
                    .find(|l| !["idle", "dirty"].contains(&l.as_str()))
                {
                    return Err(format!("--loads: unknown '{l}' (idle, dirty)"));
                }
            }
            "--tern" => o.tern = PathBuf::from(value()?),
            "--unikernel" => o.unikernel = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--baseline-only" => o.baseline_only = true,
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench migrate --help)"
                ))
            }
        }
    }
    Ok(Some(o))
}

pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    match parse(it)? {
        Some(o) => run(&o),
        None => {
            print!("{USAGE}");
            Ok(())
        }
    }
}

/// A tern whose console lines arrive, timestamped, on a channel.
struct Proc {
    child: Child,
    lines: Receiver<(String, Instant)>,
    stderr: PathBuf,
    sock: PathBuf,
    conn: Conn,
}

impl Proc {
    fn spawn(tern: &Path, sock: &Path) -> Result<Proc, String> {
        let stderr = sock.with_extension("stderr");
        let err = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new(tern)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", tern.display()))?;
        let out = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let at = Instant::now();
                        let l = String::from_utf8_lossy(&buf).trim_end().to_string();
                        let _ = tx.send((l, at));
                    }
                }
            }
        });
        let start = Instant::now();
        let conn = loop {
            match Conn::connect(sock) {
                Ok(c) => break c,
                Err(e) if start.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("{}: cannot connect: {e}", sock.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        };
        conn.set_timeout(Duration::from_secs(120))
            .map_err(|e| e.to_string())?;
        Ok(Proc {
            child,
            lines: rx,
            stderr,
            sock: sock.to_path_buf(),
            conn,
        })
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(3).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    fn put(&mut self, path: &str, body: &Value) -> Result<(), String> {
        self.conn
            .call(&Request::new("PUT", path, Some(&body.to_string()), 204))
            .map(|_| ())
            .map_err(|e| format!("{e} (tern: {})", self.stderr_tail()))
    }

    fn get(&mut self, path: &str) -> Result<Value, String> {
        let r = self.conn.call(&Request::new("GET", path, None, 200))?;
        serde_json::from_slice(&r.body).map_err(|e| format!("GET {path}: {e}"))
    }

    /// The first line starting with `prefix` within `limit`.
    fn wait_line(&self, prefix: &str, limit: Duration) -> Result<(String, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((l, at)) if l.starts_with(prefix) => return Ok((l, at)),
                Ok((l, _)) if l.starts_with("CHECK FAIL") || l.ends_with(" BAD") => {
                    return Err(format!("guest: {l}"))
                }
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "no `{prefix}` line within {limit:?} (tern: {})",
                        self.stderr_tail()
                    ))
                }
            }
        }
    }

    /// The last heartbeat among the lines so far: (n, when it arrived).
    fn last_beat(&self) -> Result<Option<(u64, Instant)>, String> {
        let mut last = None;
        while let Ok((l, at)) = self.lines.try_recv() {
            if l.ends_with(" BAD") || l.starts_with("CHECK FAIL") {
                return Err(format!("guest: {l}"));
            }
            if let Some(n) = beat_number(&l) {
                last = Some((n, at));
            }
        }
        Ok(last)
    }

    fn kill(&mut self) {
        if std::env::var_os("TERN_BENCH_SHOW").is_some() {
            let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            for l in s.lines().filter(|l| !l.contains("API GET")) {
                eprintln!("      | {l}");
            }
        }
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("tern-{pid}")));
        let _ = std::fs::remove_file(&self.stderr);
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn beat_number(l: &str) -> Option<u64> {
    l.strip_prefix("HEARTBEAT ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cmdline(size: u64, load: &str, pages: u64, extra: &str) -> String {
    let mut s = "action=heartbeat period=1 idle=hlt mempattern=all memcheck=0".to_string();
    if load == "dirty" {
        // A window moving through a quarter of RAM, at most 256 MiB.
        let span = (size / 4).min(256) * 256;
        write!(s, " memdirty={pages} memdirtyspan={span}").unwrap();
    }
    if !extra.is_empty() {
        write!(s, " {extra}").unwrap();
    }
    s
}

/// The guests' machine-config.
fn machine_config(o: &Options, size: u64) -> serde_json::Value {
    json!({"vcpu_count": 1, "mem_size_mib": size,
           "huge_pages": if o.huge { "2M" } else { "None" }})
}

/// Boots the first source and waits for its pattern; returns it and the
/// guest's beat interval (ms, median of 50).
fn boot(o: &Options, uk: &Path, work: &Path, size: u64, load: &str) -> Result<(Proc, f64), String> {
    let mut p = Proc::spawn(&o.tern, &work.join("vm-0.sock"))?;
    p.put("/machine-config", &machine_config(o, size))?;
    p.put(
        "/boot-source",
        &json!({"kernel_image_path": uk, "boot_args": cmdline(size, load, o.dirty_pages, &o.guest_args)}),
    )?;
    let t0 = Instant::now();
    p.put("/actions", &json!({"action_type": "InstanceStart"}))?;
    // About 10 s per GiB on a software KVM.
    let limit = Duration::from_secs(120 + size / 1024 * 60);
    let (l, _) = p.wait_line("MEMPATTERN ", limit)?;
    eprintln!(
        "  {size} MiB {load}: filled in {:.1} s: {l}",
        t0.elapsed().as_secs_f64()
    );
    let (_, mut last) = p.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
    let mut gaps = Vec::new();
    for _ in 0..50 {
        let (_, b) = p.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
        gaps.push((b - last).as_secs_f64() * 1e3);
        last = b;
    }
    Ok((p, Stats::new(gaps).median()))
}

/// One migration's numbers.
#[derive(Clone)]
struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    /// From the source's last heartbeat line to the destination's first.
    beat_gap_ms: f64,
    rounds: u64,
    bytes: u64,
    /// bytes / total time, GB/s.
    gbps: f64,
    max_throttle: u64,
    /// How long the destination's PUT /migration/receive took (with
    /// --prealloc: allocating its memory), ms.
    setup_ms: f64,
}

/// Moves the VM from `src` to a fresh tern; returns that tern.
fn migrate(
    o: &Options,
    src: &mut Proc,
    work: &Path,
    seq: usize,
    transport: &str,
    size: u64,
) -> Result<(Proc, Sample), String> {
    let mut dst = Proc::spawn(&o.tern, &work.join(format!("vm-{seq}.sock")))?;
    let url = match transport {
        "tcp" => format!("tcp:127.0.0.1:{}", 17000 + seq % 1000),
        _ => format!("unix:{}", work.join(format!("mig-{seq}.sock")).display()),
    };
    // With --prealloc the destination allocates its memory before it
    // answers, as one prepared ahead would have (not with `local`, which
    // takes the source's memory).
    let prealloc = o.prealloc && transport != "local";
    if prealloc {
        dst.put("/machine-config", &machine_config(o, size))?;
    }
    let setup = Instant::now();
    dst.put(
        "/migration/receive",
        &json!({ "url": url, "prealloc": prealloc }),
    )?;
    let setup_ms = setup.elapsed().as_secs_f64() * 1e3;
    // The source's last beat so far: still its last if the migration is
    // over before it prints another (a local one takes 2-3 ms).
    let before = src.last_beat()?;
    src.put(
        "/migration/send",
        &json!({
            "url": url,
            "downtime_limit_ms": o.downtime_limit,
            "keep_source": true,
            "local": transport == "local",
        }),
    )?;
    let mut max_throttle = 0;
    let start = Instant::now();
    let m = loop {
        let m = src.get("/migration")?;
        max_throttle = max_throttle.max(m["throttle_percent"].as_u64().unwrap_or(0));
        match m["status"].as_str() {
            Some("completed") => break m,
            Some("failed" | "cancelled") => {
                return Err(format!(
                    "migration {}: {} (destination: {})",
                    m["status"],
                    m["error"],
                    dst.stderr_tail()
                ))
            }
            _ => {}
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(format!("migration did not finish in 600 s: {m}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (first, t_dst) = dst.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(20));
    let (n_src, t_src) = src
        .last_beat()?
        .or(before)
        .ok_or("no heartbeat from the source before or during the migration")?;
    let n_dst = beat_number(&first).unwrap_or(0);
    if n_dst <= n_src || n_dst > n_src + 2 {
        return Err(format!(
            "the counter did not continue: source's last beat {n_src}, destination's first {n_dst}"
        ));
    }
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    let total_ms = f("total_time_ms");
    let bytes = m["bytes_sent"].as_u64().unwrap_or(0);
    let s = Sample {
        total_ms,
        downtime_ms: f("downtime_ms"),
        beat_gap_ms: t_dst.saturating_duration_since(t_src).as_secs_f64() * 1e3,
        rounds: m["round"].as_u64().unwrap_or(0) + 1,
        bytes,
        gbps: bytes as f64 / (total_ms / 1e3) / 1e9,
        max_throttle,
        setup_ms,
    };
    src.kill();
    Ok((dst, s))
}

struct Row {
    size: u64,
    /// Median GB/s of the raw baselines (wire, into a memfd) on this
    /// transport and size.
    baseline_gbps: Option<[f64; 2]>,
    load: String,
    dirty_mbps: f64,
    transport: String,
    samples: Vec<Sample>,
}

fn stat(r: &Row, f: impl Fn(&Sample) -> f64) -> Stats {
    Stats::new(r.samples.iter().map(f).collect())
}

fn run(o: &Options) -> Result<(), String> {
    let tern = crate::check_binary("tern", &o.tern)?;
    let o = Options {
        tern,
        transports: o.transports.clone(),
        loads: o.loads.clone(),
        sizes: o.sizes.clone(),
        unikernel: o.unikernel.clone(),
        json: o.json.clone(),
        guest_args: o.guest_args.clone(),
        ..*o
    };
    let uk = match &o.unikernel {
        Some(p) => p.clone(),
        None => crate::build_unikernel()?,
    };
    let machine = report::Machine::probe();
    let work = std::env::temp_dir().join(format!("tern-bench-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    if o.huge {
        warm_huge_pages()?;
    }
    let mut rows = Vec::new();
    let mut seq = 1;
    let result = (|| -> Result<(), String> {
        for &size in &o.sizes {
            let mut baselines = Vec::new();
            for t in o.transports.iter().filter(|t| *t != "local") {
                let runs = if size >= 4096 { o.big_runs } else { o.runs };
                let mut medians = [0.0; 2];
                for (i, into_memory) in [false, true].into_iter().enumerate() {
                    let mut v = Vec::new();
                    for _ in 0..runs {
                        v.push(baseline(t, size << 20, into_memory, &work, seq)?);
                        seq += 1;
                    }
                    let st = Stats::new(v);
                    eprintln!(
                        "  {size} MiB raw baseline {t} {}: {:.2} GB/s ({:.2}-{:.2})",
                        if into_memory { "into a memfd" } else { "wire" },
                        st.median(),
                        st.min(),
                        st.max()
                    );
                    medians[i] = st.median();
                }
                baselines.push((t.clone(), medians));
            }
            if o.baseline_only {
                continue;
            }
            for load in &o.loads {
                let (mut cur, beat_ms) = boot(&o, &uk, &work, size, load)?;
                let dirty_mbps = if load == "dirty" {
                    (o.dirty_pages * 4096) as f64 / beat_ms / 1e3
                } else {
                    0.0
                };
                eprintln!(
                    "  beat every {beat_ms:.2} ms{}",
                    if load == "dirty" {
                        format!(": dirtying {dirty_mbps:.0} MB/s")
                    } else {
                        String::new()
                    }
                );
                let runs = if size >= 4096 { o.big_runs } else { o.runs };
                for t in &o.transports {
                    let mut samples = Vec::new();
                    for _ in 0..runs {
                        let (next, s) = migrate(&o, &mut cur, &work, seq, t, size)?;
                        seq += 1;
                        eprintln!(
                            "    {t}: total {:.1} ms, downtime {:.2} ms, beat gap {:.2} ms, {} rounds, {} MiB, {:.2} GB/s, receive set up in {:.1} ms{}",
                            s.total_ms,
                            s.downtime_ms,
                            s.beat_gap_ms,
                            s.rounds,
                            s.bytes >> 20,
                            s.gbps,
                            s.setup_ms,
                            if s.max_throttle > 0 {
                                format!(", throttle {}%", s.max_throttle)
                            } else {
                                String::new()
                            }
                        );
                        samples.push(s);
                        cur = next;
                    }
                    rows.push(Row {
                        size,
                        baseline_gbps: baselines.iter().find(|(b, _)| b == t).map(|b| b.1),
                        load: load.clone(),
                        dirty_mbps,
                        transport: t.clone(),
                        samples,
                    });
                }
                drop(cur);
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    print!("{}", table(&machine, &rows, &o));
    if let Some(path) = &o.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&to_json(&machine, &rows)).unwrap(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn table(machine: &report::Machine, rows: &[Row], o: &Options) -> String {
    let mut s = String::new();
    writeln!(s, "tern-bench migrate — {}", machine.summary()).unwrap();
    writeln!(
        s,
        "medians (min-max); RAM all data (mempattern=all); 1 ms heartbeat; keep_source; \
         {} pages{}{}",
        if o.huge { "2 MiB" } else { "4 KiB" },
        if o.prealloc {
            "; destination memory allocated ahead"
        } else {
            ""
        },
        if o.guest_args.is_empty() {
            String::new()
        } else {
            format!("; guest args '{}'", o.guest_args)
        },
    )
    .unwrap();
    writeln!(
        s,
        "{:>6} {:>12} {:>6} {:>4} {:>22} {:>20} {:>20} {:>6} {:>9} {:>5} {:>11} {:>11}",
        "MiB",
        "load",
        "via",
        "runs",
        "total ms",
        "downtime ms",
        "beat gap ms",
        "rounds",
        "MiB sent",
        "GB/s",
        "raw wire",
        "raw memfd"
    )
    .unwrap();
    for r in rows {
        let cell = |st: Stats, prec: usize| {
            format!(
                "{:.p$} ({:.p$}-{:.p$})",
                st.median(),
                st.min(),
                st.max(),
                p = prec
            )
        };
        // A baseline's GB/s and tern's as a share of it.
        let raw = |i: usize| {
            r.baseline_gbps.map_or("-".into(), |b| {
                format!(
                    "{:.2} ({:.0}%)",
                    b[i],
                    100.0 * stat(r, |x| x.gbps).median() / b[i]
                )
            })
        };
        let load = if r.load == "dirty" {
            format!("dirty {:.0}MB/s", r.dirty_mbps)
        } else {
            "idle".into()
        };
        writeln!(
            s,
            "{:>6} {:>12} {:>6} {:>4} {:>22} {:>20} {:>20} {:>6} {:>9} {:>5.2} {:>11} {:>11}",
            r.size,
            load,
            r.transport,
            r.samples.len(),
            cell(stat(r, |x| x.total_ms), 1),
            cell(stat(r, |x| x.downtime_ms), 2),
            cell(stat(r, |x| x.beat_gap_ms), 2),
            stat(r, |x| x.rounds as f64).median(),
            stat(r, |x| (x.bytes >> 20) as f64).median(),
            stat(r, |x| x.gbps).median(),
            raw(0),
            raw(1),
        )
        .unwrap();
    }
    writeln!(s, "targets: 512 MiB copied in < 700 ms with < 15 ms downtime; local < 3 ms downtime; >= 2 GB/s of pages on loopback").unwrap();
    for r in rows.iter().filter(|r| r.size == 512) {
        let total = stat(r, |x| x.total_ms).median();
        let down = stat(r, |x| x.downtime_ms).median();
        let gbps = stat(r, |x| x.gbps).median();
        let verdict = |ok: bool| if ok { "ok" } else { "MISS" };
        let line = match r.transport.as_str() {
            "local" => format!("downtime {down:.2} ms < 3: {}", verdict(down < 3.0)),
            t => format!(
                "total {total:.0} ms < 700: {}, downtime {down:.2} ms < 15: {}{}",
                verdict(total < 700.0),
                verdict(down < 15.0),
                if t == "tcp" {
                    format!(", {gbps:.2} GB/s >= 2: {}", verdict(gbps >= 2.0))
                } else {
                    String::new()
                }
            ),
        };
        writeln!(s, "  512 MiB {} {}: {line}", r.load, r.transport).unwrap();
    }
    s
}

fn to_json(machine: &report::Machine, rows: &[Row]) -> Value {
    json!({
        "machine": machine.json(),
        "rows": rows.iter().map(|r| json!({
            "size_mib": r.size,
            "load": r.load,
            "dirty_mbps": r.dirty_mbps,
            "transport": r.transport,
            "baseline_wire_gb_per_s": r.baseline_gbps.map(|b| b[0]),
            "baseline_memfd_gb_per_s": r.baseline_gbps.map(|b| b[1]),
            "samples": r.samples.iter().map(|s| json!({
                "total_ms": s.total_ms,
                "downtime_ms": s.downtime_ms,
                "beat_gap_ms": s.beat_gap_ms,
                "rounds": s.rounds,
                "bytes_sent": s.bytes,
                "gb_per_s": s.gbps,
                "max_throttle_percent": s.max_throttle,
                "receive_setup_ms": s.setup_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Anonymous memory for the raw baseline, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// `len` bytes of anonymous memory (the baseline's source).
    fn new(len: usize) -> Result<Mapping, String> {
        // SAFETY: a fresh mapping of `len` bytes that overlaps nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and
        // only this value refers to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain memory owned by the value.
unsafe impl Send for Mapping {}

/// Touches every free 2 MiB huge page once (a byte each: the kernel clears
/// the whole page) and reports how fast that went. Pages the kernel has
/// just reserved may never have been touched; where this host is a VM
/// whose memory the outer host hands out on first touch (seen here: 0.4
/// GB/s first, 8 GB/s after), the first migration would pay for it.
fn warm_huge_pages() -> Result<(), String> {
    const HUGE: usize = 2 << 20;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    let free = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if free == 0 {
        return Err("--huge: no free huge pages (raise vm.nr_hugepages)".into());
    }
    let len = free * HUGE;
    // SAFETY: a fresh mapping of `len` bytes that overlaps nothing.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!(
            "--huge: mapping {free} huge pages: {}",
            std::io::Error::last_os_error()
        ));
    }
    let map = Mapping {
        ptr: ptr.cast(),
        len,
    };
    let t = Instant::now();
    for at in (0..len).step_by(HUGE) {
        // SAFETY: inside the mapping; a volatile write so it happens.
        unsafe { map.ptr.add(at).write_volatile(1) };
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  huge pages: touched the {free} free ones first ({:.2} s, {:.2} GB/s)",
        secs,
        len as f64 / secs / 1e9
    );
    Ok(())
}

/// Chunk of the baseline's reads and writes: tern's migration moves pages
/// in batches of 4 MiB.
const BASELINE_CHUNK: usize = 4 << 20;

/// The raw baselines: `bytes` of data (not zero) from one buffer over the
/// same transport, by a plain sender and receiver in this process (4 MiB
/// writes and reads, no framing, no checksum). The receiver either drops
/// what it reads (the wire: what the transport carries) or writes it into
/// a fresh memfd (`into_memory`: what a destination must do at the least,
/// the fastest way measured — pwrite from the read buffer; reading
/// straight into a fresh memfd mapping was about half as fast here).
/// Returns GB/s.
fn baseline(
    transport: &str,
    bytes: u64,
    into_memory: bool,
    work: &Path,
    seq: usize,
) -> Result<f64, String> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    let len = bytes as usize;
    let mut src = Mapping::new(len)?;
    for (i, w) in src.bytes().chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 | 1 << 63).to_le_bytes());
    }
    let receive = move |mut r: Box<dyn Read + Send>| -> Result<(), String> {
        let file = if into_memory {
            // SAFETY: a valid NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"bench-baseline".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let f = unsafe { std::fs::File::from_raw_fd(fd) };
            f.set_len(bytes).map_err(|e| e.to_string())?;
            Some(f)
        } else {
            None
        };
        let mut buf = vec![0u8; BASELINE_CHUNK];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(buf.len());
            r.read_exact(&mut buf[..n])
                .map_err(|e| format!("baseline receive: {e}"))?;
            if let Some(f) = &file {
                f.write_all_at(&buf[..n], off as u64)
                    .map_err(|e| format!("baseline pwrite: {e}"))?;
            }
            off += n;
        }
        Ok(())
    };
    let start;
    let got = match transport {
        "tcp" => {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            let rx = std::thread::spawn(move || {
                let (s, _) = l.accept().map_err(|e| e.to_string())?;
                receive(Box::new(s))
            });
            start = Instant::now();
            let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
            for c in src.bytes().chunks(BASELINE_CHUNK) {
                s.write_all(c).map_err(|e| format!("baseline send: {e}"))?;
            }
            rx.join()
        }
        _ => {
            let path = work.join(format!("baseline-{seq}.sock"));
            let l = std::os::unix::net::UnixListener::bind(&path).map_err(|e| e.to_string())?;
            let rx = std::thread::spawn(move || {
                let (s, _) = l.accept().map_err(|e| e.to_string())?;
                receive(Box::new(s))
            });
            start = Instant::now();
            let mut s =
                std::os::unix::net::UnixStream::connect(&path).map_err(|e| e.to_string())?;
            for c in src.bytes().chunks(BASELINE_CHUNK) {
                s.write_all(c).map_err(|e| format!("baseline send: {e}"))?;
            }
            let r = rx.join();
            let _ = std::fs::remove_file(&path);
            r
        }
    };
    got.map_err(|_| "baseline receiver panicked".to_string())??;
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}
