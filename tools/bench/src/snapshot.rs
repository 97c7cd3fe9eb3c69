//! `tern-bench snapshot`: snapshot create time and size, and restore to
//! running, with the test unikernel holding a pattern in all of its RAM;
//! with and without a vhost-user disk, memory files on disk and on tmpfs;
//! against a plain sequential write of 1 GiB to the same place. See
//! tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::flags::{number, Flags};
use crate::http::{Conn, Request};
use crate::{report, Stats};

pub const USAGE: &str = "\
usage: tern-bench snapshot [--runs N] [--sizes MIB,...] [--dirs DIR,...]
                           [--no-disk] [--tern PATH] [--unikernel PATH] [--json PATH]

For each guest size, a unikernel VM fills all its RAM with a pattern
(mempattern=all), then: N full snapshots of the paused VM into each DIR
(create time, memory file size), and N restores from each DIR: into a
pre-started tern (spawned, its API socket connected, then 50 ms idle, as
a serverless platform keeps them: PUT /snapshot/load resume_vm -> the next
HEARTBEAT line), and cold (spawn tern --restore -> HEARTBEAT). Between
runs the previous tern's teardown (its backend, its memory) is given time
to finish, so that it does not compete with the next. The same again with a
vhost-user disk (managed tern-blk) attached, set up by the guest and
holding its pattern (snapblk=2). Baseline: a sequential 1 GiB write +
fsync into each DIR.

  --runs N          runs per measurement (default 10)
  --sizes LIST      guest sizes in MiB (default 128,1024,4096)
  --dirs LIST       where the snapshot files go (default /var/tmp,/dev/shm)
  --no-disk         skip the runs with a vhost-user disk
  --disk-only       only the runs with a vhost-user disk
  --tern PATH       tern to measure (default: `tern` next to this program;
                    tern-blk must be next to it)
  --unikernel PATH  test unikernel ELF (default: built with make)
  --json PATH       also write every sample as JSON
";

pub struct Options {
    runs: usize,
    sizes: Vec<u64>,
    dirs: Vec<PathBuf>,
    disk: bool,
    disk_only: bool,
    tern: PathBuf,
    unikernel: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        runs: 10,
        sizes: vec![128, 1024, 4096],
        dirs: vec!["/var/tmp".into(), "/dev/shm".into()],
        disk: true,
        disk_only: false,
        tern: crate::exe_dir()?.join("tern"),
        unikernel: None,
        json: None,
    };
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--runs" => o.runs = number(&flag, value()?, 1)? as usize,
            "--sizes" => {
                let v = value()?;
                o.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse::<u64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--sizes: '{v}' is not a list of MiB"))?;
            }
            "--dirs" => o.dirs = value()?.split(',').map(PathBuf::from).collect(),
            "--no-disk" => o.disk = false,
            "--disk-only" => o.disk_only = true,
            "--tern" => o.tern = PathBuf::from(value()?),
            "--unikernel" => o.unikernel = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench snapshot --help)"
                ))
            }
        }
    }
    Ok(Some(o))
}

/// A tern whose console lines arrive, timestamped, on a channel.
struct Proc {
    child: Child,
    started: Instant,
    lines: Receiver<(String, Instant)>,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(tern: &Path, args: &[&str], tag: &str) -> Result<Proc, String> {
        let stderr = std::env::temp_dir().join(format!(
            "tern-bench-snap-{}-{tag}.stderr",
            std::process::id()
        ));
        let err = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut child = Command::new(tern)
            .args(args)
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
                        if tx.send((l, at)).is_err() {
                            // Nobody listens any more: keep draining.
                        }
                    }
                }
            }
        });
        Ok(Proc {
            child,
            started,
            lines: rx,
            stderr,
        })
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(3).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The first line starting with `prefix` within `limit`.
    fn wait_line(&self, prefix: &str, limit: Duration) -> Result<(String, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((l, at)) if l.starts_with(prefix) => return Ok((l, at)),
                Ok((l, _)) if l.starts_with("CHECK FAIL") || l.contains(" BAD") => {
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

    /// Drops the lines so far.
    fn skip_lines(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    fn kill(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("tern-{pid}")));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

fn connect(sock: &Path, limit: Duration) -> Result<Conn, String> {
    let start = Instant::now();
    loop {
        match Conn::connect(sock) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > limit => {
                return Err(format!("{}: cannot connect: {e}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

fn call(c: &mut Conn, method: &str, path: &str, body: &Value) -> Result<(), String> {
    c.call(&Request::new(method, path, Some(&body.to_string()), 204))
        .map(|_| ())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One configuration's results.
struct Case {
    size_mib: u64,
    disk: bool,
    dir: PathBuf,
    create_ms: Stats,
    mem_file_mib: f64,
    mem_alloc_mib: f64,
    /// spawn -> HEARTBEAT, PUT /snapshot/load -> HEARTBEAT, spawn -> HEARTBEAT (--restore)
    restore_put_ms: Stats,
    restore_cli_ms: Stats,
}

struct Source {
    proc: Proc,
    conn: Conn,
    beat_interval_ms: f64,
    fill_s: f64,
}

fn cmdline(disk: bool) -> String {
    let mut s = "action=heartbeat period=1 mempattern=all memcheck=0".to_string();
    if disk {
        // The device is set up and holds the pattern; no I/O at the beats,
        // so that the next beat after a restore is not delayed by the
        // guest's own (emulated, ~150 ms) disk requests.
        s.push_str(" snapblk=2");
    }
    s
}

/// Boots the source VM and waits for its pattern and a few beats.
fn boot_source(
    o: &Options,
    uk: &Path,
    work: &Path,
    size: u64,
    disk: Option<&Path>,
) -> Result<Source, String> {
    let sock = work.join("source.sock");
    let _ = std::fs::remove_file(&sock);
    let proc = Proc::spawn(&o.tern, &["--api-sock", sock.to_str().unwrap()], "source")?;
    let mut conn = connect(&sock, Duration::from_secs(10))?;
    conn.set_timeout(Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    call(
        &mut conn,
        "PUT",
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": size}),
    )?;
    call(
        &mut conn,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": uk, "boot_args": cmdline(disk.is_some())}),
    )?;
    if let Some(d) = disk {
        call(
            &mut conn,
            "PUT",
            "/drives/disk0",
            &json!({"drive_id": "disk0", "path_on_host": d, "is_root_device": false}),
        )?;
    }
    let t0 = Instant::now();
    call(
        &mut conn,
        "PUT",
        "/actions",
        &json!({"action_type": "InstanceStart"}),
    )?;
    // About 10 s per GiB on a software KVM.
    let limit = Duration::from_secs(120 + size / 1024 * 60);
    let (l, _) = proc.wait_line("MEMPATTERN ", limit)?;
    let fill_s = t0.elapsed().as_secs_f64();
    eprintln!("  {size} MiB guest filled in {fill_s:.1} s: {l}");
    proc.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
    let (_, a) = proc.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
    let mut last = a;
    let mut gaps = Vec::new();
    for _ in 0..20 {
        let (_, b) = proc.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
        gaps.push(ms(b - last));
        last = b;
    }
    Ok(Source {
        proc,
        conn,
        beat_interval_ms: Stats::new(gaps).median(),
        fill_s,
    })
}

fn remove(paths: &[&Path]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

fn file_sizes(p: &Path) -> (f64, f64) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => (
            m.len() as f64 / (1 << 20) as f64,
            (m.blocks() * 512) as f64 / (1 << 20) as f64,
        ),
        Err(_) => (f64::NAN, f64::NAN),
    }
}

/// N snapshots of the paused source into `dir`; keeps the last one.
fn creates(
    o: &Options,
    src: &mut Source,
    state: &Path,
    mem: &Path,
) -> Result<(Stats, f64, f64), String> {
    let mut samples = Vec::new();
    let body = json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem});
    for _ in 0..o.runs {
        remove(&[state, mem]);
        // Paused just after a beat line: every snapshot at the same point
        // of the guest's beat cycle, one whole interval of guest work
        // before its next beat (see PUT->running in the table).
        src.proc.skip_lines();
        src.proc.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
        call(&mut src.conn, "PATCH", "/vm", &json!({"state": "Paused"}))?;
        let t = Instant::now();
        call(&mut src.conn, "PUT", "/snapshot/create", &body)?;
        samples.push(ms(t.elapsed()));
        call(&mut src.conn, "PATCH", "/vm", &json!({"state": "Resumed"}))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whether the guest goes on after the snapshots (beats keep coming).
    src.proc.skip_lines();
    src.proc.wait_line("HEARTBEAT ", Duration::from_secs(30))?;
    let (size, alloc) = file_sizes(mem);
    Ok((Stats::new(samples), size, alloc))
}

/// How long a pre-started tern idles before the load: a platform keeps
/// such processes ready, and tern uses the wait to prepare (kvm/warm.rs).
const PRESTARTED_IDLE: Duration = Duration::from_millis(50);

/// Time for a killed tern's teardown (its backend exiting, its memory
/// freed: about 0.1 s per GiB here) before the next run starts.
fn teardown_time(size_mib: u64) -> Duration {
    Duration::from_millis(100 + size_mib * 100 / 1024)
}

/// Restores through the API (PUT -> beat) and through --restore (spawn ->
/// beat).
fn restores(
    o: &Options,
    work: &Path,
    (state, mem): (&Path, &Path),
    size_mib: u64,
    disk: Option<&Path>,
) -> Result<(Stats, Stats), String> {
    let (mut put_ms, mut cli_ms) = (Vec::new(), Vec::new());
    let mut body = json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    if let Some(d) = disk {
        // A copy of the disk: the source VM's backend keeps the original.
        body["drive_overrides"] = json!([{"drive_id": "disk0", "path_on_host": d}]);
    }
    let sock = work.join("restore.sock");
    for i in 0..o.runs {
        let _ = std::fs::remove_file(&sock);
        let mut p = Proc::spawn(&o.tern, &["--api-sock", sock.to_str().unwrap()], "r")?;
        let mut c = connect(&sock, Duration::from_secs(10))?;
        c.set_timeout(Duration::from_secs(120))
            .map_err(|e| e.to_string())?;
        std::thread::sleep(PRESTARTED_IDLE);
        let put = Instant::now();
        call(&mut c, "PUT", "/snapshot/load", &body)
            .map_err(|e| format!("restore {i}: {e} (tern: {})", p.stderr_tail()))?;
        let (_, at) = p.wait_line("HEARTBEAT ", Duration::from_secs(60))?;
        put_ms.push(ms(at - put));
        p.kill();
        std::thread::sleep(teardown_time(size_mib));

        // From the command line, with the snapshot's own disk path (the
        // source is gone; the guest does no I/O at its beats).
        let arg = format!("{},{}", state.display(), mem.display());
        let mut p = Proc::spawn(&o.tern, &["--restore", &arg], "c")?;
        let (_, at) = p.wait_line("HEARTBEAT ", Duration::from_secs(60))?;
        cli_ms.push(ms(at - p.started));
        p.kill();
        std::thread::sleep(teardown_time(size_mib));
    }
    Ok((Stats::new(put_ms), Stats::new(cli_ms)))
}

/// A sequential write of `mib` MiB (8 MiB writes of non-zero bytes) and
/// fsync, as `dd bs=8M conv=fsync`; milliseconds.
fn plain_write(dir: &Path, mib: usize) -> Result<f64, String> {
    let path = dir.join(format!("tern-bench-write-{}.bin", std::process::id()));
    let chunk: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8 | 1)
        .collect();
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    for _ in 0..mib / 8 {
        f.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    let took = ms(t.elapsed());
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    let Some(o) = parse(it)? else {
        print!("{USAGE}");
        return Ok(());
    };
    let tern = crate::check_binary("tern", &o.tern)?;
    let o = Options { tern, ..o };
    let uk = match &o.unikernel {
        Some(p) => p.clone(),
        None => crate::build_unikernel()?,
    };
    let machine = report::Machine::probe();
    eprintln!("{}", machine.summary());

    // The baseline first, while nothing else writes.
    let mut baseline = Vec::new();
    for dir in &o.dirs {
        let mut s = Vec::new();
        plain_write(dir, 1024)?; // warm-up
        for _ in 0..o.runs.min(5) {
            s.push(plain_write(dir, 1024)?);
        }
        let st = Stats::new(s);
        eprintln!(
            "baseline: 1 GiB sequential write + fsync into {}: {:.0} ms",
            dir.display(),
            st.median()
        );
        baseline.push((dir.clone(), st));
    }

    let mut cases = Vec::new();
    let mut sources = Vec::new();
    for &size in &o.sizes {
        for disk in [false, true] {
            if (disk && !o.disk) || (!disk && o.disk_only) {
                continue;
            }
            let work = std::env::temp_dir().join(format!("tern-bench-snap-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
            let disk_path = work.join("disk.raw");
            let clone_disk = work.join("clone.raw");
            if disk {
                let f = std::fs::File::create(&disk_path).map_err(|e| e.to_string())?;
                f.set_len(64 << 20).map_err(|e| e.to_string())?;
            }
            eprintln!(
                "{size} MiB guest{}:",
                if disk { " with a vhost-user disk" } else { "" }
            );
            let mut src = boot_source(&o, &uk, &work, size, disk.then_some(disk_path.as_path()))?;
            sources.push((size, disk, src.beat_interval_ms, src.fill_s));
            let mut per_dir = Vec::new();
            for dir in &o.dirs {
                let state = dir.join(format!("tern-bench-{size}.state"));
                let mem = dir.join(format!("tern-bench-{size}.mem"));
                let (create, fsize, alloc) = creates(&o, &mut src, &state, &mem)?;
                eprintln!(
                    "  create into {}: median {:.1} ms, memory file {fsize:.0} MiB ({alloc:.0} MiB allocated)",
                    dir.display(),
                    create.median()
                );
                per_dir.push((dir.clone(), state, mem, create, fsize, alloc));
            }
            // The restores run without the source (memory), each on a copy
            // of the disk as the source left it.
            src.proc.kill();
            if disk {
                std::fs::copy(&disk_path, &clone_disk).map_err(|e| e.to_string())?;
            }
            for (dir, state, mem, create, fsize, alloc) in per_dir {
                let (put, cli) = restores(
                    &o,
                    &work,
                    (&state, &mem),
                    size,
                    disk.then_some(clone_disk.as_path()),
                )?;
                eprintln!(
                    "  restore from {}: PUT->beat {:.2} ms, --restore spawn->beat {:.2} ms",
                    dir.display(),
                    put.median(),
                    cli.median(),
                );
                remove(&[&state, &mem]);
                cases.push(Case {
                    size_mib: size,
                    disk,
                    dir,
                    create_ms: create,
                    mem_file_mib: fsize,
                    mem_alloc_mib: alloc,
                    restore_put_ms: put,
                    restore_cli_ms: cli,
                });
            }
            let _ = std::fs::remove_dir_all(&work);
        }
    }

    print!("{}", table(&machine, &baseline, &cases, &sources, o.runs));
    if let Some(path) = &o.json {
        let v = to_json(&machine, &baseline, &cases, &sources);
        let text = serde_json::to_string_pretty(&v).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn cell(s: &Stats) -> String {
    if s.samples.is_empty() {
        return format!("{:>27}", "-");
    }
    format!("{:>9.2} {:>8.2} {:>8.2}", s.median(), s.min(), s.max())
}

fn table(
    machine: &report::Machine,
    baseline: &[(PathBuf, Stats)],
    cases: &[Case],
    sources: &[(u64, bool, f64, f64)],
    runs: usize,
) -> String {
    // The guest's steady beat interval for a case's source VM.
    let interval = |c: &Case| {
        sources
            .iter()
            .find(|(size, disk, _, _)| *size == c.size_mib && *disk == c.disk)
            .map_or(0.0, |s| s.2)
    };
    let mut t = String::new();
    let _ = writeln!(t, "{}", machine.summary());
    let _ = writeln!(
        t,
        "tern-bench snapshot: {runs} runs each; ms as median min max; unikernel with every RAM page written (mempattern=all), heartbeat period=1"
    );
    for (size, disk, gap, fill) in sources {
        let _ = writeln!(
            t,
            "  {size:>5} MiB{}: pattern fill {fill:.1} s; beat interval (guest, steady) {gap:.2} ms",
            if *disk { " +disk" } else { "      " }
        );
    }
    let _ = writeln!(
        t,
        "\nbaseline: sequential 1 GiB write + fsync (8 MiB writes)"
    );
    for (dir, s) in baseline {
        let _ = writeln!(t, "  {:<12} {}", dir.display(), cell(s));
    }
    let _ = writeln!(
        t,
        "\n{:>6} {:>5} {:<10} {:>27} {:>9} {:>9} {:>27} {:>12} {:>27}",
        "MiB",
        "disk",
        "dir",
        "create (paused, full)",
        "file MiB",
        "alloc",
        "load (pre-started): PUT->beat",
        "PUT->running",
        "--restore: spawn -> beat"
    );
    for c in cases {
        let _ = writeln!(
            t,
            "{:>6} {:>5} {:<10} {} {:>9.0} {:>9.0} {} {:>12.2} {}",
            c.size_mib,
            if c.disk { "vhost" } else { "-" },
            c.dir.display(),
            cell(&c.create_ms),
            c.mem_file_mib,
            c.mem_alloc_mib,
            cell(&c.restore_put_ms),
            c.restore_put_ms.median() - interval(c),
            cell(&c.restore_cli_ms),
        );
    }
    let _ = writeln!(
        t,
        "\nsnapshot create of 1 GiB / plain 1 GiB write (target <= 1.2):"
    );
    for (dir, b) in baseline {
        for c in cases.iter().filter(|c| c.size_mib == 1024 && &c.dir == dir) {
            let _ = writeln!(
                t,
                "  {:<10} {:<5} {:.2}",
                dir.display(),
                if c.disk { "disk" } else { "-" },
                c.create_ms.median() / b.median()
            );
        }
    }
    let _ = writeln!(
        t,
        "PUT->running: PUT->beat less one steady beat interval of the guest, which was paused just after a beat line and so has one whole interval (its 1 ms delay, then printing the line) of its own work to do before the next"
    );
    let _ = writeln!(
        t,
        "restore targets: < 5 ms to running for 128 MiB and 4 GiB, also with a vhost-user disk"
    );
    let _ = writeln!(
        t,
        "for comparison (issue 7, ~200-byte guest): Firecracker restores 128 MiB / 1 GiB in 14.9 / 16.2 ms, Cloud Hypervisor 11.9 / 16.3 ms; create 183 / 1186 ms and 31 / 749 ms"
    );
    t
}

fn stats_json(s: &Stats) -> Value {
    json!({
        "median": s.median(), "min": s.min(), "max": s.max(), "samples": s.samples,
    })
}

fn to_json(
    machine: &report::Machine,
    baseline: &[(PathBuf, Stats)],
    cases: &[Case],
    sources: &[(u64, bool, f64, f64)],
) -> Value {
    json!({
        "machine": machine.json(),
        "baseline_write_1gib_ms": baseline.iter().map(|(d, s)| json!({"dir": d, "ms": stats_json(s)})).collect::<Vec<_>>(),
        "sources": sources.iter().map(|(size, disk, gap, fill)| json!({"mem_mib": size, "disk": disk, "beat_interval_ms": gap, "fill_s": fill})).collect::<Vec<_>>(),
        "cases": cases.iter().map(|c| json!({
            "mem_mib": c.size_mib,
            "disk": c.disk,
            "dir": c.dir,
            "create_ms": stats_json(&c.create_ms),
            "mem_file_mib": c.mem_file_mib,
            "mem_alloc_mib": c.mem_alloc_mib,
            "restore_put_to_beat_ms": stats_json(&c.restore_put_ms),
            "restore_cli_spawn_to_beat_ms": stats_json(&c.restore_cli_ms),
        })).collect::<Vec<_>>(),
    })
}
