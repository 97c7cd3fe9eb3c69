//! `tern-bench`: measures how fast tern starts a guest and how much memory it
//! uses outside guest RAM. See tools/bench/README.md.

mod api;
mod blk;
mod confine;
mod flags;
mod hotplug;
mod http;
mod migrate;
mod net;
mod report;
mod run;
mod scsi;
mod snapshot;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use flags::Flags;
use run::{read_rss, Rss, Vm};

const USAGE: &str = "\
usage: tern-bench boot|api|blk|net|scsi|snapshot|migrate|hotplug [options]   (tern-bench CMD --help for its options)

       tern-bench boot [--runs N] [--tern PATH] [--unikernel PATH] [--json PATH]
                       [--linux] [--baseline-tern PATH]
                       [--seccomp-level N] [--jailer]

Times tern booting the test unikernel (start -> first console line, start ->
exit) and measures tern's resident memory outside guest RAM.

  --runs N               timed boots per tern binary (default 20, at least 10)
  --tern PATH            tern to measure (default: `tern` next to this program)
  --unikernel PATH       test unikernel ELF (default: build it with make into
                         target/guests)
  --json PATH            also write the results as JSON
  --linux                also boot the Linux guest kit in $TERN_GUEST_DIR
  --baseline-tern PATH   measure another tern too (runs interleaved) and print
                         ours / baseline per metric
  --seccomp-level N      run the measured tern at this seccomp level
  --jailer               run the measured tern under tern-jailer (next to it);
                         with either option and no --baseline-tern, the
                         baseline is the same tern at level 0, unjailed
";

/// Runs of the RSS measurement per binary.
const RSS_RUNS: usize = 10;
/// Kernel command line of the Linux kit on a kvm_pvm host.
const PVM_LINUX_CMDLINE: &str = "console=ttyS0 panic=-1 noxsave tsc=reliable no_timer_check \
clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid";
/// Kernel command line of the Linux kit on hardware KVM.
const HW_LINUX_CMDLINE: &str = "console=ttyS0 panic=-1 quiet run=true";
const PVM_MARKER: &str = "Run /init as init process";
const HW_MARKER: &str = "GUEST-READY";

struct Options {
    runs: usize,
    tern: PathBuf,
    unikernel: Option<PathBuf>,
    json: Option<PathBuf>,
    linux: bool,
    baseline: Option<PathBuf>,
    confinement: Option<confine::Confinement>,
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match real_main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Vec<OsString>) -> Result<(), String> {
    let mut it = args.into_iter();
    match it.next().as_ref().and_then(|a| a.to_str()) {
        Some("boot") => {}
        Some("api") => {
            return match api::parse(it)? {
                Some(o) => api::run(&o),
                None => {
                    print!("{}", api::USAGE);
                    Ok(())
                }
            };
        }
        Some("blk") => return blk::main(it),
        Some("net") => return net::main(it),
        Some("snapshot") => return snapshot::main(it),
        Some("migrate") => return migrate::main(it),
        Some("scsi") => return scsi::main(it),
        Some("hotplug") => return hotplug::main(it),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return Ok(());
        }
        Some(other) => {
            return Err(format!(
                "unknown command '{other}' (try: tern-bench boot, tern-bench api)"
            ))
        }
        None => {
            return Err("missing command (try: tern-bench boot or api; --help for usage)".into())
        }
    }
    let opts = match parse_boot(it)? {
        Some(o) => o,
        None => {
            print!("{USAGE}");
            return Ok(());
        }
    };
    boot(&opts)
}

fn parse_boot(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut runs = 20usize;
    let mut tern = None;
    let mut unikernel = None;
    let mut json = None;
    let mut linux = false;
    let mut baseline = None;
    let mut confinement: Option<confine::Confinement> = None;
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value_os(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--runs" => {
                let v = value()?;
                let s = v.to_string_lossy();
                runs = s
                    .parse()
                    .map_err(|_| format!("--runs: '{s}' is not a number"))?;
                if runs < 10 {
                    return Err(format!("--runs must be at least 10 (got {runs})"));
                }
            }
            "--tern" => tern = Some(PathBuf::from(value()?)),
            "--unikernel" => unikernel = Some(PathBuf::from(value()?)),
            "--json" => json = Some(PathBuf::from(value()?)),
            "--baseline-tern" => baseline = Some(PathBuf::from(value()?)),
            "--linux" => linux = true,
            "--seccomp-level" => {
                let v = value()?;
                let level = confine::parse_level(&v.to_string_lossy())?;
                confinement
                    .get_or_insert_with(Default::default)
                    .seccomp_level = Some(level);
            }
            "--jailer" => {
                confinement.get_or_insert_with(Default::default).jailer = Some(PathBuf::new())
            }
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench boot --help)"
                ))
            }
        }
    }
    let tern = match tern {
        Some(t) => t,
        None => exe_dir()?.join("tern"),
    };
    Ok(Some(Options {
        runs,
        tern,
        unikernel,
        json,
        linux,
        baseline,
        confinement,
    }))
}

fn exe_dir() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "cannot find this program's directory".into())
}

/// The workspace root this tool was built from.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check_binary(what: &str, p: &Path) -> Result<PathBuf, String> {
    if !p.is_file() {
        return Err(format!(
            "{what} not found at {} (build it with `cargo build --release -p tern` or pass {})",
            p.display(),
            if what == "tern" {
                "--tern PATH"
            } else {
                "another path"
            }
        ));
    }
    Ok(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
}

/// Builds the unikernel with make into target/guests (next to the target
/// directory holding this program, else the repository's).
fn build_unikernel() -> Result<PathBuf, String> {
    let src = repo_root().join("tests/guests/unikernel");
    if !src.join("Makefile").is_file() {
        return Err(format!(
            "no unikernel sources at {} (pass --unikernel PATH)",
            src.display()
        ));
    }
    // target/release/tern-bench -> target/guests
    let out = exe_dir()?
        .parent()
        .filter(|t| t.file_name().is_some_and(|n| n == "target"))
        .map(|t| t.join("guests"))
        .unwrap_or_else(|| repo_root().join("target/guests"));
    let out = std::fs::canonicalize(out.parent().unwrap_or(&out))
        .map(|p| p.join("guests"))
        .unwrap_or(out);
    let res = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", out.display()))
        .output()
        .map_err(|e| {
            format!("cannot run make to build the unikernel: {e} (pass --unikernel PATH)")
        })?;
    if !res.status.success() {
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "building the unikernel failed ({}): {last} (pass --unikernel PATH)",
            res.status
        ));
    }
    let elf = out.join("unikernel.elf");
    if !elf.is_file() {
        return Err(format!("make did not produce {}", elf.display()));
    }
    Ok(elf)
}

/// Samples of one metric with median, min and max.
#[derive(Clone, Debug)]
pub struct Stats {
    pub samples: Vec<f64>,
}

impl Stats {
    fn new(samples: Vec<f64>) -> Stats {
        Stats { samples }
    }
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }
    pub fn median(&self) -> f64 {
        let s = self.sorted();
        let n = s.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
    /// The `p`th percentile, nearest-rank: the smallest sample with at
    /// least p% of the samples at or below it.
    pub fn percentile(&self, p: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }
}

/// Everything measured for one tern binary.
pub struct Measured {
    pub tern: PathBuf,
    pub first_output_ms: Stats,
    pub exit_ms: Stats,
    pub rss_outside_mib: Stats,
    pub guest_rss_mib: Stats,
    pub vmrss_mib: Stats,
}

impl Measured {
    fn new(tern: PathBuf) -> Measured {
        let e = || Stats::new(Vec::new());
        Measured {
            tern,
            first_output_ms: e(),
            exit_ms: e(),
            rss_outside_mib: e(),
            guest_rss_mib: e(),
            vmrss_mib: e(),
        }
    }
}

/// The Linux kit measurement.
pub struct LinuxResult {
    pub pvm: bool,
    pub marker: &'static str,
    pub cmdline: String,
    pub first_output_ms: Stats,
    pub marker_ms: Stats,
    /// Start -> exit, when the VM ended by itself (status 0).
    pub exit_ms: Stats,
    pub notes: Vec<String>,
}

fn ms(since: Instant, at: Instant) -> f64 {
    at.duration_since(since).as_secs_f64() * 1e3
}

fn boot_args(uk: &Path, memory: u32, cmdline: &str) -> Vec<OsString> {
    vec![
        "--kernel".into(),
        uk.into(),
        "--memory".into(),
        memory.to_string().into(),
        "--cmdline".into(),
        cmdline.into(),
        "--serial".into(),
        "stdout".into(),
    ]
}

/// One timed boot: start -> first line, start -> exit (ms).
fn boot_once(tern: &Path, uk: &Path) -> Result<(f64, f64), String> {
    let args = boot_args(uk, 64, "action=i8042");
    let mut vm = Vm::spawn(tern, &args, Duration::from_secs(10))?;
    let first = vm.next_line();
    let rest = vm.drain();
    let (status, exited) = vm.wait()?;
    if vm.timed_out() {
        return Err(format!(
            "{}: the VM did not end within 10 s{}",
            tern.display(),
            vm.stderr_tail()
        ));
    }
    let Some((line, at)) = first else {
        return Err(format!(
            "{}: no console output, {status}{}",
            tern.display(),
            vm.stderr_tail()
        ));
    };
    if !line.starts_with("TERN-UNIKERNEL") {
        return Err(format!(
            "{}: first console line is \"{line}\", expected TERN-UNIKERNEL ...",
            tern.display()
        ));
    }
    if !status.success() {
        let last = rest.last().map(String::as_str).unwrap_or(&line);
        return Err(format!(
            "{}: tern {status} (last console line \"{last}\"){}",
            tern.display(),
            vm.stderr_tail()
        ));
    }
    Ok((ms(vm.started, at), ms(vm.started, exited)))
}

/// One RSS measurement of a halted guest.
fn rss_once(tern: &Path, uk: &Path) -> Result<Rss, String> {
    let args = boot_args(uk, 128, "action=halt");
    let mut vm = Vm::spawn(tern, &args, Duration::from_secs(10))?;
    loop {
        match vm.next_line() {
            Some((l, _)) if l.trim() == "HALT" => break,
            Some(_) => {}
            None => {
                let (status, _) = vm.wait()?;
                return Err(format!(
                    "{}: the guest ended before printing HALT ({status}){}",
                    tern.display(),
                    vm.stderr_tail()
                ));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss = read_rss(vm.pid());
    vm.kill();
    rss.map_err(|e| format!("{}: {e}", tern.display()))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn boot(opts: &Options) -> Result<(), String> {
    let tern = check_binary("tern", &opts.tern)?;
    let mut baseline = match &opts.baseline {
        Some(b) => Some(check_binary("baseline tern", b)?),
        None => None,
    };
    let uk = match &opts.unikernel {
        Some(u) if !u.is_file() => return Err(format!("unikernel not found at {}", u.display())),
        Some(u) => std::fs::canonicalize(u).unwrap_or_else(|_| u.clone()),
        None => build_unikernel()?,
    };
    if let Some(c) = &opts.confinement {
        confine::apply(&tern, c, &mut baseline)?;
        confine::bind(&tern, &uk);
    }
    let machine = report::Machine::probe();
    // Check the Linux kit before spending time on the rest.
    let kit = if opts.linux { Some(linux_kit()?) } else { None };

    let mut ours = Measured::new(tern.clone());
    let mut base = baseline.clone().map(Measured::new);
    let mut bins: Vec<&mut Measured> = vec![&mut ours];
    if let Some(b) = base.as_mut() {
        bins.push(b);
    }

    eprintln!(
        "tern-bench: {} timed boots{} of {} ...",
        opts.runs,
        if bins.len() > 1 {
            " each, interleaved,"
        } else {
            ""
        },
        uk.display()
    );
    // One untimed warm-up boot per binary (page cache, first-exec costs).
    for m in bins.iter() {
        boot_once(&m.tern, &uk)?;
    }
    for i in 0..opts.runs {
        // Alternate who goes first so neither always follows the other.
        let order: Vec<usize> = if i % 2 == 0 {
            (0..bins.len()).collect()
        } else {
            (0..bins.len()).rev().collect()
        };
        for k in order {
            let m = &mut bins[k];
            let (f, e) = boot_once(&m.tern, &uk)?;
            m.first_output_ms.samples.push(f);
            m.exit_ms.samples.push(e);
        }
    }
    eprintln!(
        "tern-bench: {RSS_RUNS} RSS measurements{} ...",
        if bins.len() > 1 { " each" } else { "" }
    );
    for i in 0..RSS_RUNS {
        let order: Vec<usize> = if i % 2 == 0 {
            (0..bins.len()).collect()
        } else {
            (0..bins.len()).rev().collect()
        };
        for k in order {
            let m = &mut bins[k];
            let r = rss_once(&m.tern, &uk)?;
            m.rss_outside_mib.samples.push(mib(r.outside_guest_kib));
            m.guest_rss_mib.samples.push(mib(r.guest_kib));
            m.vmrss_mib.samples.push(mib(r.vmrss_kib));
        }
    }
    drop(bins);

    let linux = match kit {
        Some(kit) => Some(linux_bench(&tern, &kit, machine.kvm_pvm)?),
        None => None,
    };

    let rep = report::Report {
        runs: opts.runs,
        unikernel: uk,
        machine,
        ours,
        baseline: base,
        linux,
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

struct Kit {
    vmlinux: PathBuf,
    initramfs_gz: PathBuf,
}

fn linux_kit() -> Result<Kit, String> {
    let dir = std::env::var_os("TERN_GUEST_DIR")
        .filter(|d| !d.is_empty())
        .ok_or("--linux needs TERN_GUEST_DIR set to the Linux guest kit directory")?;
    let dir = PathBuf::from(dir);
    let kit = Kit {
        vmlinux: dir.join("vmlinux"),
        initramfs_gz: dir.join("initramfs.cpio.gz"),
    };
    for p in [&kit.vmlinux, &kit.initramfs_gz] {
        if !p.is_file() {
            return Err(format!(
                "Linux guest kit: {} not found (TERN_GUEST_DIR={})",
                p.display(),
                dir.display()
            ));
        }
    }
    Ok(kit)
}

/// Removes a file when dropped.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn gunzip(src: &Path) -> Result<TempFile, String> {
    let dst = TempFile(
        std::env::temp_dir().join(format!("tern-bench-{}-initramfs.cpio", std::process::id())),
    );
    let out = std::fs::File::create(&dst.0)
        .map_err(|e| format!("cannot create {}: {e}", dst.0.display()))?;
    let st = Command::new("gzip")
        .arg("-dc")
        .arg(src)
        .stdout(out)
        .status()
        .map_err(|e| format!("cannot run gzip: {e}"))?;
    if !st.success() {
        return Err(format!("gzip -dc {} failed: {st}", src.display()));
    }
    Ok(dst)
}

fn linux_bench(tern: &Path, kit: &Kit, pvm: bool) -> Result<LinuxResult, String> {
    let initrd = gunzip(&kit.initramfs_gz)?;
    let (cmdline, marker, runs, timeout) = if pvm {
        (PVM_LINUX_CMDLINE, PVM_MARKER, 1, Duration::from_secs(900))
    } else {
        (HW_LINUX_CMDLINE, HW_MARKER, 3, Duration::from_secs(120))
    };
    let mut res = LinuxResult {
        pvm,
        marker,
        cmdline: cmdline.to_string(),
        first_output_ms: Stats::new(Vec::new()),
        marker_ms: Stats::new(Vec::new()),
        exit_ms: Stats::new(Vec::new()),
        notes: Vec::new(),
    };
    for run in 0..runs {
        eprintln!(
            "tern-bench: Linux kit boot {}/{runs}, until \"{marker}\"{} ...",
            run + 1,
            if pvm { " (minutes on kvm_pvm)" } else { "" }
        );
        let args: Vec<OsString> = vec![
            "--kernel".into(),
            kit.vmlinux.clone().into(),
            "--initrd".into(),
            initrd.0.clone().into(),
            "--memory".into(),
            "512".into(),
            "--cmdline".into(),
            cmdline.into(),
            "--serial".into(),
            "stdout".into(),
        ];
        let mut vm = Vm::spawn(tern, &args, timeout)?;
        let mut first = None;
        let mut marker_at = None;
        let mut last = String::new();
        while let Some((l, at)) = vm.next_line() {
            first.get_or_insert(at);
            if marker_at.is_none() && l.contains(marker) {
                marker_at = Some(at);
                if pvm {
                    break;
                }
            }
            last = l;
        }
        let Some(marker_at) = marker_at else {
            let _ = vm.drain();
            let (status, _) = vm.wait()?;
            let why = if vm.timed_out() {
                format!("killed after {} s", timeout.as_secs())
            } else {
                status.to_string()
            };
            return Err(format!(
                "Linux kit: \"{marker}\" never appeared ({why}; last console line \"{last}\"){}",
                vm.stderr_tail()
            ));
        };
        if let Some(f) = first {
            res.first_output_ms.samples.push(ms(vm.started, f));
        }
        res.marker_ms.samples.push(ms(vm.started, marker_at));
        if pvm {
            // The kit stops at /init here and would panic and reset some
            // time later; only the time to the marker is measured.
            vm.kill();
            res.notes.push(
                "kvm_pvm host: the kit boots only to /init here; the VM was killed at the marker"
                    .into(),
            );
        } else {
            let _ = vm.drain();
            let (status, exited) = vm.wait()?;
            if vm.timed_out() || !status.success() {
                return Err(format!(
                    "Linux kit: tern {status} after GUEST-READY{}",
                    vm.stderr_tail()
                ));
            }
            res.exit_ms.samples.push(ms(vm.started, exited));
        }
    }
    res.notes.dedup();
    Ok(res)
}
