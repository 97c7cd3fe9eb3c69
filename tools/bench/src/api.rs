//! `tern-bench api`: request latency and throughput of tern's HTTP API on
//! its Unix socket (one keep-alive connection, then several concurrent
//! ones), and InstanceStart -> first console line. See tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::flags::Flags;
use crate::http::{Conn, Request};
use crate::run::Vm;
use crate::{report, Stats};

pub const USAGE: &str = "\
usage: tern-bench api [--requests N] [--clients N] [--tern PATH] [--unikernel PATH]
                      [--json PATH] [--baseline-tern PATH]
                      [--seccomp-level N] [--jailer]

Times tern's HTTP API on its Unix socket (tern --api-sock, no VM booted):
N requests of GET / and N of PUT /machine-config over one keep-alive
connection, then the same spread over --clients concurrent connections; then
10 runs of configure + InstanceStart -> first console line and -> exit.

  --requests N           requests of each kind per phase (default 10000)
  --clients N            concurrent connections in phase 2 (default 8)
  --tern PATH            tern to measure (default: `tern` next to this program)
  --unikernel PATH       test unikernel ELF (default: build it with make into
                         target/guests)
  --json PATH            also write the results as JSON
  --baseline-tern PATH   measure another tern too (interleaved) and print
                         ours / baseline per metric
  --seccomp-level N      run the measured tern at this seccomp level
  --jailer               run the measured tern under tern-jailer (next to it);
                         with either option and no --baseline-tern, the
                         baseline is the same tern at level 0, unjailed
";

/// The request phases are cut into this many rounds; with a baseline, each
/// round runs on both binaries back to back (alternating who goes first).
const ROUNDS: usize = 10;
/// InstanceStart runs per binary.
const START_RUNS: usize = 10;
/// Untimed requests of each kind on every connection before timing.
const WARMUP: usize = 200;
const MACHINE_CONFIG: &str = r#"{"vcpu_count":1,"mem_size_mib":64}"#;
const BOOT_ARGS: &str = "action=i8042";

pub struct Options {
    tern: PathBuf,
    requests: usize,
    clients: usize,
    unikernel: Option<PathBuf>,
    json: Option<PathBuf>,
    baseline: Option<PathBuf>,
    confinement: Option<crate::confine::Confinement>,
}

/// Reads `tern-bench api`'s options; `None` for `--help`.
pub fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut requests = 10_000usize;
    let mut clients = 8usize;
    let mut tern = None;
    let mut unikernel = None;
    let mut json = None;
    let mut baseline = None;
    let mut confinement: Option<crate::confine::Confinement> = None;
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value_os(&flag, &inline);
        let number = |v: OsString, min: usize, max: usize| -> Result<usize, String> {
            let s = v.to_string_lossy();
            let n: usize = s
                .parse()
                .map_err(|_| format!("{flag}: '{s}' is not a number"))?;
            if n < min || n > max {
                return Err(format!("{flag} must be between {min} and {max} (got {n})"));
            }
            Ok(n)
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--requests" => requests = number(value()?, 100, 100_000_000)?,
            "--clients" => clients = number(value()?, 1, 256)?,
            "--tern" => tern = Some(PathBuf::from(value()?)),
            "--unikernel" => unikernel = Some(PathBuf::from(value()?)),
            "--json" => json = Some(PathBuf::from(value()?)),
            "--baseline-tern" => baseline = Some(PathBuf::from(value()?)),
            "--seccomp-level" => {
                let level = crate::confine::parse_level(&value()?.to_string_lossy())?;
                confinement
                    .get_or_insert_with(Default::default)
                    .seccomp_level = Some(level);
            }
            "--jailer" => {
                confinement.get_or_insert_with(Default::default).jailer = Some(PathBuf::new())
            }
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench api --help)"
                ))
            }
        }
    }
    if requests < clients * ROUNDS {
        return Err(format!(
            "--requests ({requests}) must be at least --clients x {ROUNDS} ({})",
            clients * ROUNDS
        ));
    }
    let tern = match tern {
        Some(t) => t,
        None => crate::exe_dir()?.join("tern"),
    };
    Ok(Some(Options {
        tern,
        requests,
        clients,
        unikernel,
        json,
        baseline,
        confinement,
    }))
}

/// One client thread's latencies (us), first request start and last answer.
type ClientRun = (Vec<f64>, Instant, Instant);

/// Latencies of one kind of request in one phase, and the time it took.
pub struct Series {
    /// Per-request latency, microseconds.
    pub lat_us: Stats,
    /// Wall time of the phase (sum over rounds), seconds.
    pub wall_s: f64,
}

impl Series {
    fn new() -> Series {
        Series {
            lat_us: Stats::new(Vec::new()),
            wall_s: 0.0,
        }
    }
    pub fn rps(&self) -> f64 {
        self.lat_us.samples.len() as f64 / self.wall_s
    }
}

/// Everything measured for one tern binary.
pub struct Measured {
    pub tern: PathBuf,
    pub single_get: Series,
    pub single_put: Series,
    pub multi_get: Series,
    pub multi_put: Series,
    pub sent_to_204_ms: Stats,
    pub answered_to_line_ms: Stats,
    pub sent_to_line_ms: Stats,
    pub sent_to_exit_ms: Stats,
}

impl Measured {
    fn new(tern: PathBuf) -> Measured {
        let e = || Stats::new(Vec::new());
        Measured {
            tern,
            single_get: Series::new(),
            single_put: Series::new(),
            multi_get: Series::new(),
            multi_put: Series::new(),
            sent_to_204_ms: e(),
            answered_to_line_ms: e(),
            sent_to_line_ms: e(),
            sent_to_exit_ms: e(),
        }
    }
}

/// A temp directory for the sockets, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("tern-bench-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The 1-minute load average (the host is shared: a busy one explains noise).
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `n` split into `parts` near-equal parts.
fn split(n: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `b - a` in ms, negative if `b` is earlier.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if b >= a {
        b.duration_since(a).as_secs_f64() * 1e3
    } else {
        -(a.duration_since(b).as_secs_f64() * 1e3)
    }
}

/// Connects to `sock` once it exists; `dead` says why to give up early.
fn wait_for_socket(sock: &Path, mut dead: impl FnMut() -> Option<String>) -> Result<Conn, String> {
    let start = Instant::now();
    loop {
        match Conn::connect(sock) {
            Ok(c) => return Ok(c),
            Err(e) => {
                if let Some(why) = dead() {
                    return Err(why);
                }
                if start.elapsed() > Duration::from_secs(5) {
                    return Err(format!(
                        "cannot connect to {} within 5 s: {e}",
                        sock.display()
                    ));
                }
                thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

/// The requests of the two request phases.
struct Reqs {
    get: Request,
    put: Request,
}

/// A long-running `tern --api-sock` with its connections.
struct Server {
    vm: Vm,
    tern: PathBuf,
    single: Conn,
    multi: Vec<Conn>,
}

impl Server {
    fn start(tern: &Path, sock: &Path, clients: usize, reqs: &Reqs) -> Result<Server, String> {
        let args: Vec<OsString> = vec!["--api-sock".into(), sock.into()];
        // The watchdog only guards against a hang; the phases check liveness.
        let mut vm = Vm::spawn(tern, &args, Duration::from_secs(6 * 3600))?;
        let single = wait_for_socket(sock, || match vm.child.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{}: tern --api-sock exited ({st}) before its socket appeared{}",
                tern.display(),
                vm.stderr_tail()
            )),
            _ => None,
        })?;
        let mut s = Server {
            vm,
            tern: tern.to_path_buf(),
            single,
            multi: Vec::new(),
        };
        // Check that no VM runs: only the API path is timed.
        let r = s.single.call(&reqs.get).map_err(|e| s.err(e))?;
        let state = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v.get("state").and_then(Value::as_str).map(String::from));
        if state.as_deref() != Some("Not started") {
            return Err(s.err(format!(
                "GET / answered {:?}, expected state \"Not started\"",
                String::from_utf8_lossy(&r.body)
            )));
        }
        // One connection at a time, each answered before the next connects:
        // tiny_http 0.12 (tern's HTTP server) can leave a keep-alive
        // connection unserved when several arrive at once (its task pool
        // counts idle workers that are already taken), see README.
        for _ in 0..clients {
            let mut c = Conn::connect(sock).map_err(|e| s.err(format!("connect: {e}")))?;
            c.call(&reqs.get)
                .map_err(|e| s.err(format!("new connection {}: {e}", s.multi.len() + 2)))?;
            s.multi.push(c);
        }
        // Warm-up.
        for _ in 0..WARMUP {
            s.single.call(&reqs.get).map_err(|e| s.err(e))?;
            s.single.call(&reqs.put).map_err(|e| s.err(e))?;
        }
        for i in 0..s.multi.len() {
            for _ in 0..WARMUP / 10 {
                let r = s.multi[i]
                    .call(&reqs.get)
                    .and_then(|_| s.multi[i].call(&reqs.put));
                r.map_err(|e| s.err(e))?;
            }
        }
        Ok(s)
    }

    /// An error message naming this tern, with its stderr tail (and whether
    /// it died).
    fn err(&mut self, msg: String) -> String {
        let died = match self.vm.child.try_wait() {
            Ok(Some(st)) => format!(" (tern exited: {st})"),
            _ => String::new(),
        };
        format!(
            "{}: {msg}{died}{}",
            self.tern.display(),
            self.vm.stderr_tail()
        )
    }

    /// `n` requests on the single connection.
    fn single_round(&mut self, req: &Request, n: usize, out: &mut Series) -> Result<(), String> {
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            if let Err(e) = self.single.call(req) {
                return Err(self.err(e));
            }
            out.lat_us.samples.push(us(t.elapsed()));
        }
        out.wall_s += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// `counts[c]` requests on connection c, all connections at once.
    fn multi_round(
        &mut self,
        req: &Request,
        counts: &[usize],
        out: &mut Series,
    ) -> Result<(), String> {
        let barrier = Barrier::new(self.multi.len());
        let results: Vec<Result<ClientRun, String>> = thread::scope(|s| {
            let handles: Vec<_> = self
                .multi
                .iter_mut()
                .zip(counts)
                .map(|(conn, &n)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let mut lat = Vec::with_capacity(n);
                        barrier.wait();
                        let start = Instant::now();
                        for _ in 0..n {
                            let t = Instant::now();
                            conn.call(req)?;
                            lat.push(us(t.elapsed()));
                        }
                        Ok((lat, start, Instant::now()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("a client thread panicked".into()))
                })
                .collect()
        });
        let mut first: Option<Instant> = None;
        let mut last: Option<Instant> = None;
        for r in results {
            let (lat, start, end) = r.map_err(|e| self.err(e))?;
            out.lat_us.samples.extend(lat);
            first = Some(first.map_or(start, |f| f.min(start)));
            last = Some(last.map_or(end, |l| l.max(end)));
        }
        if let (Some(f), Some(l)) = (first, last) {
            out.wall_s += l.duration_since(f).as_secs_f64();
        }
        Ok(())
    }

    /// Checks tern is still alive and idle, then stops it.
    fn finish(mut self, reqs: &Reqs) -> Result<(), String> {
        if let Err(e) = self.single.call(&reqs.get) {
            return Err(self.err(format!("after the request phases: {e}")));
        }
        self.vm.kill();
        Ok(())
    }
}

/// Order of the binaries in iteration `i` (alternating who goes first).
fn order(i: usize, n: usize) -> Vec<usize> {
    if i.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// What the stdout reader of one InstanceStart run saw.
struct ReaderResult {
    first: Option<(String, Instant)>,
    rest: Vec<String>,
    wait: Result<(std::process::ExitStatus, Instant), String>,
    timed_out: bool,
    stderr_tail: String,
}

/// Times of one InstanceStart run, ms: sent -> 204 read, 204 read -> first
/// line, sent -> first line, sent -> exit.
fn start_once(tern: &Path, sock: &Path, uk: &Path) -> Result<[f64; 4], String> {
    let _ = std::fs::remove_file(sock);
    let args: Vec<OsString> = vec!["--api-sock".into(), sock.into()];
    let mut vm = Vm::spawn(tern, &args, Duration::from_secs(10))?;
    let pid = vm.pid();
    // tern's stdout is read on its own thread so a line is timestamped when
    // it arrives, even while this thread is still reading the 204.
    let reader = thread::spawn(move || {
        let first = vm.next_line();
        let rest = vm.drain();
        let wait = vm.wait();
        ReaderResult {
            first,
            rest,
            wait,
            timed_out: vm.timed_out(),
            stderr_tail: vm.stderr_tail(),
        }
    });
    let fail = |reader: thread::JoinHandle<ReaderResult>, msg: String| -> String {
        if !reader.is_finished() {
            // SAFETY: kill(2) on our own child, which the reader thread has
            // not reaped yet (it reaps only after tern's stdout closes).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        let tail = reader.join().map(|r| r.stderr_tail).unwrap_or_default();
        format!("{}: {msg}{tail}", tern.display())
    };
    let conn = wait_for_socket(sock, || {
        reader
            .is_finished()
            .then(|| "tern --api-sock exited before its socket appeared".to_string())
    });
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => return Err(fail(reader, e)),
    };
    let machine = Request::new("PUT", "/machine-config", Some(MACHINE_CONFIG), 204);
    let boot = Request::new(
        "PUT",
        "/boot-source",
        Some(&json!({"kernel_image_path": uk, "boot_args": BOOT_ARGS}).to_string()),
        204,
    );
    let start = Request::new(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        204,
    );
    if let Err(e) = conn.call(&machine).and_then(|_| conn.call(&boot)) {
        return Err(fail(reader, e));
    }
    let sent = Instant::now();
    if let Err(e) = conn.call(&start) {
        return Err(fail(reader, e));
    }
    let answered = Instant::now();
    let r = reader
        .join()
        .map_err(|_| format!("{}: the console reader thread panicked", tern.display()))?;
    let (status, exited) = r.wait?;
    if r.timed_out {
        return Err(format!(
            "{}: the VM did not end within 10 s{}",
            tern.display(),
            r.stderr_tail
        ));
    }
    let Some((line, at)) = r.first else {
        return Err(format!(
            "{}: no console output after InstanceStart, {status}{}",
            tern.display(),
            r.stderr_tail
        ));
    };
    if !line.starts_with("TERN-UNIKERNEL") {
        return Err(format!(
            "{}: first console line is \"{line}\", expected TERN-UNIKERNEL ...",
            tern.display()
        ));
    }
    if !status.success() {
        let last = r.rest.last().map(String::as_str).unwrap_or(&line);
        return Err(format!(
            "{}: tern {status} (last console line \"{last}\"){}",
            tern.display(),
            r.stderr_tail
        ));
    }
    Ok([
        signed_ms(sent, answered),
        signed_ms(answered, at),
        signed_ms(sent, at),
        signed_ms(sent, exited),
    ])
}

pub fn run(opts: &Options) -> Result<(), String> {
    let tern = crate::check_binary("tern", &opts.tern)?;
    let mut baseline = match &opts.baseline {
        Some(b) => Some(crate::check_binary("baseline tern", b)?),
        None => None,
    };
    let uk = match &opts.unikernel {
        Some(u) if !u.is_file() => return Err(format!("unikernel not found at {}", u.display())),
        Some(u) => std::fs::canonicalize(u).unwrap_or_else(|_| u.clone()),
        None => crate::build_unikernel()?,
    };
    let machine = report::Machine::probe();
    let load_before = loadavg();
    let dir = TempDir::new()?;
    if let Some(c) = &opts.confinement {
        crate::confine::apply(&tern, c, &mut baseline)?;
        crate::confine::bind(&tern, &uk);
        crate::confine::bind(&tern, &dir.0);
    }
    let reqs = Reqs {
        get: Request::new("GET", "/", None, 200),
        put: Request::new("PUT", "/machine-config", Some(MACHINE_CONFIG), 204),
    };

    let mut all: Vec<Measured> = vec![Measured::new(tern.clone())];
    if let Some(b) = &baseline {
        all.push(Measured::new(b.clone()));
    }
    let n = all.len();
    let each = if n > 1 { " each, interleaved," } else { "" };

    // Phases 1 and 2: one idle tern per binary, all alive together.
    let mut servers = Vec::new();
    for (i, m) in all.iter().enumerate() {
        let sock = dir.0.join(format!("api-{i}.sock"));
        servers.push(Server::start(&m.tern, &sock, opts.clients, &reqs)?);
    }
    eprintln!(
        "tern-bench: {} GET / + {} PUT /machine-config on 1 connection{each} ...",
        opts.requests, opts.requests
    );
    let chunks = split(opts.requests, ROUNDS);
    for (req, which) in [(&reqs.get, 0), (&reqs.put, 1)] {
        for (round, &c) in chunks.iter().enumerate() {
            for k in order(round, n) {
                let m = &mut all[k];
                let out = if which == 0 {
                    &mut m.single_get
                } else {
                    &mut m.single_put
                };
                servers[k].single_round(req, c, out)?;
            }
        }
    }
    eprintln!(
        "tern-bench: the same over {} concurrent connections{each} ...",
        opts.clients
    );
    let per_client: Vec<Vec<usize>> = split(opts.requests, opts.clients)
        .into_iter()
        .map(|c| split(c, ROUNDS))
        .collect();
    for (req, which) in [(&reqs.get, 0), (&reqs.put, 1)] {
        for round in 0..ROUNDS {
            let counts: Vec<usize> = per_client.iter().map(|c| c[round]).collect();
            for k in order(round, n) {
                let m = &mut all[k];
                let out = if which == 0 {
                    &mut m.multi_get
                } else {
                    &mut m.multi_put
                };
                servers[k].multi_round(req, &counts, out)?;
            }
        }
    }
    for s in servers {
        s.finish(&reqs)?;
    }

    // Phase 3: a fresh tern per run.
    eprintln!(
        "tern-bench: {START_RUNS} InstanceStart runs{each} of {} ...",
        uk.display()
    );
    for (i, m) in all.iter().enumerate() {
        start_once(&m.tern, &dir.0.join(format!("start-{i}.sock")), &uk)?;
    }
    for run in 0..START_RUNS {
        for k in order(run, n) {
            let m = &mut all[k];
            let sock = dir.0.join(format!("start-{k}.sock"));
            let [a, b, c, d] = start_once(&m.tern, &sock, &uk)?;
            m.sent_to_204_ms.samples.push(a);
            m.answered_to_line_ms.samples.push(b);
            m.sent_to_line_ms.samples.push(c);
            m.sent_to_exit_ms.samples.push(d);
        }
    }

    let base = if n > 1 { all.pop() } else { None };
    let ours = all.pop().expect("ours");
    let rep = Report {
        load: [load_before, loadavg()],
        requests: opts.requests,
        clients: opts.clients,
        unikernel: uk,
        machine,
        ours,
        baseline: base,
    };
    print!("{}", rep.table());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&rep.json()).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("tern-bench: wrote {}", path.display());
    }
    Ok(())
}

struct Report {
    /// 1-minute load average before and after the measurements.
    load: [Option<f64>; 2],
    requests: usize,
    clients: usize,
    unikernel: PathBuf,
    machine: report::Machine,
    ours: Measured,
    baseline: Option<Measured>,
}

/// Request rows: label, JSON key, series.
fn series_rows(m: &Measured, clients: usize) -> Vec<(String, &'static str, &Series)> {
    vec![
        (
            "1 connection: GET /".into(),
            "single_get_root",
            &m.single_get,
        ),
        (
            "1 connection: PUT /machine-config".into(),
            "single_put_machine_config",
            &m.single_put,
        ),
        (
            format!("{clients} connections: GET /"),
            "concurrent_get_root",
            &m.multi_get,
        ),
        (
            format!("{clients} connections: PUT /machine-config"),
            "concurrent_put_machine_config",
            &m.multi_put,
        ),
    ]
}

/// InstanceStart rows: label, JSON key, stats.
fn start_rows(m: &Measured) -> Vec<(&'static str, &'static str, &Stats)> {
    vec![
        (
            "InstanceStart sent -> 204 read",
            "sent_to_204_ms",
            &m.sent_to_204_ms,
        ),
        (
            "204 read -> first console line",
            "answered_to_first_line_ms",
            &m.answered_to_line_ms,
        ),
        (
            "InstanceStart sent -> first line",
            "sent_to_first_line_ms",
            &m.sent_to_line_ms,
        ),
        (
            "InstanceStart sent -> exit",
            "sent_to_exit_ms",
            &m.sent_to_exit_ms,
        ),
    ]
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

impl Report {
    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "tern-bench api");
        let _ = writeln!(s, "host: {}", self.machine.summary());
        let _ = writeln!(s, "tern: {}", self.ours.tern.display());
        let fmt = |l: Option<f64>| l.map_or("?".into(), |l| format!("{l:.2}"));
        let _ = writeln!(
            s,
            "load average (1 min): {} before, {} after",
            fmt(self.load[0]),
            fmt(self.load[1])
        );
        let _ = writeln!(
            s,
            "requests: {} GET / and {} PUT /machine-config on 1 keep-alive connection, the same over {} connections; no VM booted",
            self.requests, self.requests, self.clients
        );
        let _ = writeln!(
            s,
            "InstanceStart: {START_RUNS} runs, fresh tern each, {} ({BOOT_ARGS}, 64 MiB, 1 vCPU)",
            self.unikernel.display()
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<38} {:>9} {:>9} {:>9} {:>10}",
            "request latency (us)", "median", "p99", "max", "req/s"
        );
        for (label, _, se) in series_rows(&self.ours, self.clients) {
            let _ = writeln!(
                s,
                "{:<38} {:>9.1} {:>9.1} {:>9.1} {:>10.0}",
                label,
                se.lat_us.median(),
                se.lat_us.percentile(99.0),
                se.lat_us.max(),
                se.rps()
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<38} {:>9} {:>9} {:>9}",
            "InstanceStart (ms)", "median", "min", "max"
        );
        for (label, _, st) in start_rows(&self.ours) {
            let _ = writeln!(
                s,
                "{:<38} {:>9.2} {:>9.2} {:>9.2}",
                label,
                st.median(),
                st.min(),
                st.max()
            );
        }
        if let Some(b) = &self.baseline {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "baseline: {} (rounds and runs interleaved with ours)",
                b.tern.display()
            );
            let _ = writeln!(
                s,
                "{:<38} {:>9} {:>9} {:>10}  {:>13} {:>13}",
                "request latency (us)", "median", "p99", "req/s", "ours/base med", "ours/base r/s"
            );
            for ((label, _, o), (_, _, r)) in series_rows(&self.ours, self.clients)
                .into_iter()
                .zip(series_rows(b, self.clients))
            {
                let _ = writeln!(
                    s,
                    "{:<38} {:>9.1} {:>9.1} {:>10.0}  {:>12.3}x {:>12.3}x",
                    label,
                    r.lat_us.median(),
                    r.lat_us.percentile(99.0),
                    r.rps(),
                    o.lat_us.median() / r.lat_us.median(),
                    o.rps() / r.rps()
                );
            }
            let _ = writeln!(
                s,
                "{:<38} {:>9} {:>9} {:>9}  {:>13}",
                "InstanceStart (ms)", "median", "min", "max", "ours/baseline"
            );
            for ((label, _, o), (_, _, r)) in start_rows(&self.ours).into_iter().zip(start_rows(b))
            {
                let _ = writeln!(
                    s,
                    "{:<38} {:>9.2} {:>9.2} {:>9.2}  {:>12.3}x",
                    label,
                    r.median(),
                    r.min(),
                    r.max(),
                    o.median() / r.median()
                );
            }
        }
        s
    }

    fn json(&self) -> Value {
        let clients = self.clients;
        let metrics = |m: &Measured| {
            let mut req = serde_json::Map::new();
            for (_, key, se) in series_rows(m, clients) {
                let l = &se.lat_us;
                req.insert(
                    key.to_string(),
                    json!({
                        "unit": "us",
                        "requests": l.samples.len(),
                        "median": r3(l.median()),
                        "p90": r3(l.percentile(90.0)),
                        "p99": r3(l.percentile(99.0)),
                        "p99_9": r3(l.percentile(99.9)),
                        "min": r3(l.min()),
                        "max": r3(l.max()),
                        "mean": r3(l.samples.iter().sum::<f64>() / l.samples.len() as f64),
                        "wall_s": r3(se.wall_s),
                        "throughput_rps": se.rps().round(),
                    }),
                );
            }
            let mut start = serde_json::Map::new();
            for (_, key, st) in start_rows(m) {
                start.insert(
                    key.to_string(),
                    json!({
                        "unit": "ms",
                        "median": r3(st.median()),
                        "min": r3(st.min()),
                        "max": r3(st.max()),
                        "samples": st.samples.iter().map(|x| r3(*x)).collect::<Vec<_>>(),
                    }),
                );
            }
            json!({"requests": req, "instance_start": start})
        };
        let baseline = self.baseline.as_ref().map(|b| {
            let mut ratios = serde_json::Map::new();
            for ((_, key, o), (_, _, r)) in series_rows(&self.ours, clients)
                .into_iter()
                .zip(series_rows(b, clients))
            {
                ratios.insert(
                    key.to_string(),
                    json!({
                        "median": r3(o.lat_us.median() / r.lat_us.median()),
                        "throughput_rps": r3(o.rps() / r.rps()),
                    }),
                );
            }
            for ((_, key, o), (_, _, r)) in start_rows(&self.ours).into_iter().zip(start_rows(b)) {
                ratios.insert(key.to_string(), json!(r3(o.median() / r.median())));
            }
            json!({
                "tern": b.tern,
                "metrics": metrics(b),
                "ratio_ours_over_baseline": ratios,
            })
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "tool": "tern-bench api",
            "timestamp_unix": now,
            "machine": self.machine.json(),
            "loadavg_1min_before": self.load[0],
            "loadavg_1min_after": self.load[1],
            "tern": self.ours.tern,
            "requests_per_kind": self.requests,
            "clients": self.clients,
            "rounds": ROUNDS,
            "warmup_requests_per_kind": WARMUP,
            "machine_config_body": MACHINE_CONFIG,
            "instance_start_runs": START_RUNS,
            "unikernel": self.unikernel,
            "boot_args": BOOT_ARGS,
            "metrics": metrics(&self.ours),
            "baseline": baseline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(10_000, 8).iter().sum::<usize>(), 10_000);
        assert_eq!(order(1, 2), vec![1, 0]);
    }
}
