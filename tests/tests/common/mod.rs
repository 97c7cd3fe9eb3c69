//! Shared helpers for the integration tests: find the `tern` binary and the
//! guests, run tern with a deadline, and check the host has KVM.

#![allow(dead_code)]

pub mod heartbeat;
pub mod netns;
pub mod openapi;
pub mod vm;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The test unikernel built by build.rs.
pub const UNIKERNEL: &str = env!("TERN_UNIKERNEL");

/// Fails the test (never skips) when /dev/kvm is missing.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: tern's integration tests boot real guests under KVM and cannot run on this host"
    );
}

/// Whether /dev/kvm is the kvm_pvm software hypervisor, where no Linux
/// userspace runs (see docs/pvm.md).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The `tern` binary: `$TERN_BIN`, or `target/<profile>/tern` next to this
/// test executable (`target/<profile>/deps/`).
pub fn tern_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TERN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("tern");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --bins) or set TERN_BIN",
        bin.display()
    );
    bin
}

/// The Linux guest kit: `$TERN_GUEST_DIR` (CI points it at ../shared/guest),
/// else the cache of tools/guest-image/build.sh.
pub fn guest_dir() -> PathBuf {
    let valid = |d: &Path| {
        ["vmlinux", "bzImage", "initramfs.cpio.gz"]
            .iter()
            .all(|f| d.join(f).exists())
    };
    if let Some(d) = std::env::var_os("TERN_GUEST_DIR") {
        let d = PathBuf::from(d);
        assert!(
            valid(&d),
            "TERN_GUEST_DIR={} lacks vmlinux, bzImage or initramfs.cpio.gz",
            d.display()
        );
        return d;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("tern/guest/current"));
    match cache {
        Some(d) if valid(&d) => d,
        _ => panic!(
            "no Linux guest kit: set TERN_GUEST_DIR (e.g. to ../shared/guest) or run tools/guest-image/build.sh"
        ),
    }
}

/// The kit's initramfs, uncompressed once per test run: gunzip inside the
/// guest runs emulated on software-KVM hosts and costs tens of seconds.
pub fn uncompressed_initramfs(kit: &Path) -> PathBuf {
    let plain = kit.join("initramfs.cpio");
    if plain.exists() {
        return plain;
    }
    let out = std::env::temp_dir().join(format!("tern-test-initramfs-{}.cpio", std::process::id()));
    if !out.exists() {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "gunzip -c '{}' > '{}'",
                kit.join("initramfs.cpio.gz").display(),
                out.display()
            ))
            .status()
            .expect("run gunzip");
        assert!(status.success(), "gunzip of the kit's initramfs failed");
    }
    out
}

/// What a tern run left behind.
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (the guest's serial console).
    pub stdout: String,
    /// Everything on stderr (tern's own lines).
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// The exit code; panics with the output if killed by a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("tern killed by a signal: {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Collects `child`'s output and exit status, killing it once `deadline`
/// has passed; says whether the deadline killed it.
pub fn wait_child(mut child: Child, deadline: Duration) -> (Run, bool) {
    let start = Instant::now();
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let mut killed = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            killed = true;
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let run = Run {
        status,
        stdout: String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned(),
        elapsed: start.elapsed(),
    };
    (run, killed)
}

/// Runs `cmd`, killing it after `deadline` (a hang is a failure, not a wait).
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Run {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let (run, killed) = wait_child(child, deadline);
    if killed {
        panic!("tern did not finish within {deadline:?}: {run}");
    }
    run
}

/// Runs tern with `args` and a deadline.
pub fn tern(args: &[&str], deadline: Duration) -> Run {
    let mut cmd = Command::new(tern_bin());
    cmd.args(args);
    run_with_deadline(cmd, deadline)
}

/// Boots the test unikernel with `cpus` vCPUs and its command line.
pub fn unikernel(cpus: u32, cmdline: &str) -> Run {
    require_kvm();
    let cpus = cpus.to_string();
    tern(
        &[
            "--kernel",
            UNIKERNEL,
            "--cpus",
            &cpus,
            "--memory",
            "64",
            "--cmdline",
            cmdline,
        ],
        Duration::from_secs(60),
    )
}

/// Asserts that `haystack` has a line equal to `line` (trimmed).
pub fn assert_line(run: &Run, line: &str) {
    assert!(
        run.stdout.lines().any(|l| l.trim_end() == line),
        "expected the line `{line}` in the guest's output: {run}"
    );
}
