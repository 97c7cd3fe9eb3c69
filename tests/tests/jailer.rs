//! tern-jailer: a jailed tern (unprivileged uid, no capabilities, its own
//! root, a cgroup, a network namespace) boots the test unikernel with a
//! managed tern-blk disk and tern-net NIC, both confined in the same jail;
//! and each bad argument ends in one line with nothing left behind.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_kvm, run_with_deadline, tern_bin, wait_child, Run, UNIKERNEL};

const UID: u32 = 12345;
const GID: u32 = 12345;

fn jailer_bin() -> PathBuf {
    let p = tern_bin().with_file_name("tern-jailer");
    assert!(
        p.exists(),
        "{} not found: cargo build --workspace --bins",
        p.display()
    );
    p
}

/// A fresh chroot base directory; removed on drop.
struct Base(PathBuf);

impl Base {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-jail-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    /// Everything under the base, relative, sorted.
    fn contents(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                out.push(
                    e.path()
                        .strip_prefix(&self.0)
                        .unwrap()
                        .display()
                        .to_string(),
                );
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The v1 pids hierarchy's directory for the jail `id` (below this
/// process's own pids cgroup, as the jailer makes it).
fn pids_cgroup(id: &str) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, c, p) = (f.next()?, f.next()?, f.next()?);
            c.split(',').any(|c| c == "pids").then(|| p.to_string())
        })
        .expect("this host has no cgroup v1 pids hierarchy");
    PathBuf::from("/sys/fs/cgroup/pids")
        .join(rel.trim_start_matches('/'))
        .join("tern")
        .join(id)
}

/// Removes the jail's cgroup (its parent `tern` stays: other tests'
/// jails may be being made in it).
fn remove_cgroup(id: &str) {
    // The backends leave it a moment after tern (when their socket closes).
    let dir = pids_cgroup(id);
    for _ in 0..100 {
        if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--bind` options for the shared libraries of `bin` (debug builds are
/// dynamically linked; shipped binaries are static, see docs/security.md).
fn library_binds(bin: &Path) -> Vec<String> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut binds: Vec<String> = text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(|w| format!("--bind={w}"))
        .collect();
    binds.sort();
    binds.dedup();
    binds
}

fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (ip)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("tern-jail-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let uid = UID.to_string();
        let gid = GID.to_string();
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec![
                "tuntap", "add", "tj0", "mode", "tap", "user", &uid, "group", &gid,
            ],
            vec!["addr", "add", "10.79.0.1/24", "dev", "tj0"],
            vec!["link", "set", "tj0", "up"],
        ] {
            let mut args = vec!["netns", "exec", &name, "ip"];
            args.extend(cmd);
            ip(&args);
        }
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The region the unikernel's `blkpattern=1` writes, and its bytes.
fn pattern(o: u64) -> u8 {
    ((o.wrapping_mul(7).wrapping_add(0x5a)) ^ (o >> 9)) as u8
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            kids.push(p);
        }
    }
    kids
}

/// What the test saw of a jailed process while it ran.
#[derive(Debug)]
struct Observed {
    /// The device and inode of its root directory.
    root: String,
    host_etc_visible: bool,
    uid: String,
    caps: [String; 3],
    seccomp: String,
    cgroup: String,
    fds: Vec<String>,
}

fn dev_ino(p: &Path) -> String {
    std::fs::metadata(p)
        .map(|m| format!("{}:{}", m.dev(), m.ino()))
        .unwrap_or_else(|e| format!("{}: {e}", p.display()))
}

fn observe(pid: u32) -> Observed {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    Observed {
        // readlink shows "/" (the jail's root mount is not in the host's
        // tree after pivot_root): compare the directory itself.
        root: std::fs::metadata(format!("/proc/{pid}/root/"))
            .map(|m| format!("{}:{}", m.dev(), m.ino()))
            .unwrap_or_default(),
        host_etc_visible: Path::new(&format!("/proc/{pid}/root/etc")).exists(),
        uid: status_field(pid, "Uid"),
        caps: ["CapEff", "CapPrm", "CapBnd"].map(|f| status_field(pid, f)),
        seccomp: status_field(pid, "Seccomp"),
        cgroup: std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
        fds,
    }
}

#[test]
fn jailed_tern_boots_with_a_jailed_disk_and_nic_and_sees_only_its_jail() {
    require_kvm();
    let base = Base::new("boot");
    let id = format!("boot-{}", std::process::id());
    let ns = Netns::new();
    let scratch = Base::new("boot-files");
    let image = scratch.0.join("disk.raw");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    Command::new("chown")
        .arg(format!("{UID}:{GID}"))
        .arg(&image)
        .status()
        .unwrap();
    // A descriptor the jailer inherits (no CLOEXEC): it must not reach tern.
    let secret = scratch.0.join("inherited-secret");
    std::fs::write(&secret, b"x").unwrap();
    let secret_file = std::fs::File::open(&secret).unwrap();
    let secret_fd = std::os::fd::AsRawFd::as_raw_fd(&secret_file);

    let tern = tern_bin();
    let mut cmd = Command::new(jailer_bin());
    cmd.args([
        "--id",
        &id,
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .arg("--exec-file")
    .arg(&tern)
    .arg("--chroot-base-dir")
    .arg(&base.0)
    .arg("--netns")
    .arg(format!("/run/netns/{}", ns.0))
    .args([
        "--cgroup",
        "pids.max=100",
        "--resource-limit",
        "no-file=1024",
    ])
    .arg("--copy")
    .arg(tern.with_file_name("tern-blk"))
    .arg("--copy")
    .arg(tern.with_file_name("tern-net"))
    .arg(format!("--bind={}:/disk.raw", image.display()))
    .arg(format!("--bind={UNIKERNEL}:/unikernel.elf"))
    .args(library_binds(&tern))
    .args([
        "--",
        "--kernel",
        "/unikernel.elf",
        "--memory",
        "64",
        "--drive",
        "path=/disk.raw,id=disk0",
        "--net",
        "tap=tj0,mac=02:74:65:72:6e:09",
        "--cmdline",
        "checks=blk,net blkpattern=1 netip=10.79.0.2 netgw=10.79.0.1 netwait=20 action=exit code=3",
    ]);
    // SAFETY: dup2 in the child between fork and exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(secret_fd, 77) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern-jailer");
    let pid = child.id();
    let root = base.0.join("tern").join(&id).join("root");

    // Watch it from the host while the guest runs: ping it, read /proc.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (root, ns, done) = (root.clone(), ns.0.clone(), done.clone());
        move || {
            let start = Instant::now();
            let mut seen = None;
            let mut backends = Vec::new();
            while start.elapsed() < Duration::from_secs(60) && !done.load(Ordering::Relaxed) {
                let o = observe(pid);
                if o.root == dev_ino(&root) {
                    // Both backends up and past their set-up (filtered).
                    let kids: Vec<Observed> = children(pid).into_iter().map(observe).collect();
                    let ready = kids.len() >= 2 && kids.iter().all(|k| k.seccomp == "2");
                    backends = kids;
                    seen = Some(o);
                    if ready {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut pinged = None;
            for _ in 0..40 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "ping",
                        "-c",
                        "3",
                        "-W",
                        "1",
                        "10.79.0.2",
                    ])
                    .output()
                    .expect("ping");
                if out.status.success() {
                    pinged = Some(String::from_utf8_lossy(&out.stdout).into_owned());
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            (seen, backends, pinged)
        }
    });
    let (run, _) = wait_child(child, Duration::from_secs(240));
    done.store(true, Ordering::Relaxed);
    let (seen, backends, pinged) = watcher.join().unwrap();
    remove_cgroup(&id);
    drop(secret_file);

    assert_eq!(
        run.status.code(),
        Some(7),
        "the jailed guest's checks: {run}"
    );
    common::assert_line(&run, "RESULT pass");
    let seen = seen.unwrap_or_else(|| panic!("never saw tern in its jail: {run}"));
    let root_s = dev_ino(&root);
    assert_eq!(
        seen.root, root_s,
        "tern's /proc/<pid>/root is the jail's root"
    );
    assert!(!seen.host_etc_visible, "tern sees the host's /etc");
    assert!(
        seen.uid.split_whitespace().all(|u| u == UID.to_string()),
        "tern's Uid: {}",
        seen.uid
    );
    for (name, v) in ["CapEff", "CapPrm", "CapBnd"].iter().zip(&seen.caps) {
        assert_eq!(v, "0000000000000000", "tern's {name}");
    }
    assert!(
        seen.cgroup
            .lines()
            .any(|l| l.contains(":pids:") && l.ends_with(&format!("/tern/{id}"))),
        "tern is not in its pids cgroup: {}",
        seen.cgroup
    );
    assert!(
        !seen.fds.iter().any(|f| f.contains("inherited-secret")),
        "the fd opened before launch reached tern: {:?}",
        seen.fds
    );
    assert_eq!(backends.len(), 2, "tern-blk and tern-net");
    for b in &backends {
        assert_eq!(b.root, root_s, "a backend's root: {b:?}");
        assert!(
            b.uid.split_whitespace().all(|u| u == UID.to_string()),
            "a backend's uid: {b:?}"
        );
        assert_eq!(b.caps[0], "0000000000000000", "a backend's CapEff: {b:?}");
        assert_eq!(
            b.seccomp, "2",
            "a backend runs under its seccomp filter: {b:?}"
        );
    }
    let pinged = pinged
        .unwrap_or_else(|| panic!("the guest never answered pings from the host namespace: {run}"));
    assert!(pinged.contains("3 received"), "{pinged}");
    // What the guest wrote is in the host's file.
    let data = std::fs::read(&image).unwrap();
    for (off, len) in [
        (0x1000u64, 0x1000u64),
        (0x10000, 0x10000),
        (0x400000, 0x100000),
    ] {
        for o in off..off + len {
            assert_eq!(
                data[o as usize],
                pattern(o),
                "byte {o:#x} of the image is not the guest's"
            );
        }
    }
    // The limit is the one asked for.
    let _ = pinged;
}

#[test]
fn a_pids_limit_is_in_force() {
    require_kvm();
    let base = Base::new("pids");
    let id = format!("pids-{}", std::process::id());
    let tern = tern_bin();
    let mut cmd = Command::new(jailer_bin());
    cmd.args([
        "--id",
        &id,
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .arg("--exec-file")
    .arg(&tern)
    .arg("--chroot-base-dir")
    .arg(&base.0)
    .args(["--cgroup", "pids.max=2"])
    .arg(format!("--bind={UNIKERNEL}:/unikernel.elf"))
    .args(library_binds(&tern))
    .args([
        "--",
        "--kernel",
        "/unikernel.elf",
        "--cpus",
        "4",
        "--memory",
        "64",
        "--cmdline",
        "action=exit code=3",
    ]);
    let run = run_with_deadline(cmd, Duration::from_secs(60));
    remove_cgroup(&id);
    assert_ne!(
        run.status.code(),
        Some(7),
        "four vCPU threads ran under pids.max=2: {run}"
    );
    assert!(
        run.stderr.contains("Resource temporarily unavailable"),
        "tern could not start its threads: {run}"
    );
}

/// Runs the jailer with `args` and a fresh base; returns its output and
/// what it left in the base.
fn jailer_fails(base: &Base, args: &[&str]) -> (Run, Vec<String>) {
    let mut cmd = Command::new(jailer_bin());
    cmd.arg("--chroot-base-dir").arg(&base.0).args(args);
    let run = run_with_deadline(cmd, Duration::from_secs(20));
    (run, base.contents())
}

#[test]
fn bad_arguments_are_one_line_errors_leaving_nothing_behind() {
    let tern = tern_bin().display().to_string();
    let uid = UID.to_string();
    let common_args = ["--uid", &uid, "--gid", &uid, "--exec-file", &tern];
    let cases: Vec<(&str, Vec<&str>, String)> = vec![
        (
            "invalid id",
            vec!["--id", "no_such/id"],
            "tern-jailer: error: invalid id 'no_such/id': use 1 to 64 letters, digits or '-'".into(),
        ),
        (
            "missing exec file",
            vec!["--id", "e1", "--exec-file", "/nonexistent/tern"],
            "tern-jailer: error: exec file /nonexistent/tern: No such file or directory (os error 2)".into(),
        ),
        (
            "bad cgroup value",
            vec!["--id", "c1", "--cgroup", "pids.max=lots"],
            "tern-jailer: error: cgroup pids.max=lots: Invalid argument (os error 22)".into(),
        ),
        (
            "unknown cgroup file",
            vec!["--id", "c2", "--cgroup", "pids.nonsense=1"],
            "tern-jailer: error: cgroup pids.nonsense=1: No such file or directory (os error 2)".into(),
        ),
    ];
    for (what, extra, want) in cases {
        let base = Base::new("bad");
        let mut args: Vec<&str> = common_args.to_vec();
        args.extend(extra.iter().copied());
        let (run, left) = jailer_fails(&base, &args);
        assert_eq!(run.status.code(), Some(1), "{what}: {run}");
        assert_eq!(run.stderr.trim_end(), want, "{what}: {run}");
        assert_eq!(run.stderr.lines().count(), 1, "{what}: one line: {run}");
        assert!(left.is_empty(), "{what}: left behind {left:?}");
        assert!(
            !pids_cgroup("c1").exists() && !pids_cgroup("c2").exists(),
            "{what}: a cgroup was left"
        );
    }
    // An existing jail directory is refused and left exactly as it was.
    let base = Base::new("exists");
    let existing = base.0.join("tern").join("taken");
    std::fs::create_dir_all(existing.join("mine")).unwrap();
    let mut args: Vec<&str> = common_args.to_vec();
    args.extend(["--id", "taken"]);
    let (run, left) = jailer_fails(&base, &args);
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert_eq!(
        run.stderr.trim_end(),
        format!(
            "tern-jailer: error: jail directory {} already exists",
            existing.display()
        ),
        "{run}"
    );
    assert_eq!(
        left,
        vec!["tern", "tern/taken", "tern/taken/mine"],
        "the existing jail was changed"
    );
}

#[test]
fn daemonized_in_a_new_pid_namespace() {
    require_kvm();
    let base = Base::new("pidns");
    let id = format!("pidns-{}", std::process::id());
    let tern = tern_bin();
    let mut cmd = Command::new(jailer_bin());
    cmd.args([
        "--id",
        &id,
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .arg("--exec-file")
    .arg(&tern)
    .arg("--chroot-base-dir")
    .arg(&base.0)
    .args(["--daemonize", "--new-pid-ns"])
    .arg(format!("--bind={UNIKERNEL}:/unikernel.elf"))
    .args(library_binds(&tern))
    .args([
        "--",
        "--kernel",
        "/unikernel.elf",
        "--memory",
        "64",
        "--serial",
        "none",
        "--cmdline",
        "action=halt",
    ]);
    let run = run_with_deadline(cmd, Duration::from_secs(20));
    assert_eq!(
        run.status.code(),
        Some(0),
        "the jailer returns at once: {run}"
    );
    let pid_file = base.0.join("tern").join(&id).join("root/tern.pid");
    let start = Instant::now();
    let pid: u32 = loop {
        if let Some(p) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {}",
            pid_file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Wait for the exec and the boot (the main thread's filter).
    while status_field(pid, "Seccomp") != "2" && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let nspid = status_field(pid, "NSpid");
    let o = observe(pid);
    let stdio: Vec<_> = ["0", "1", "2"]
        .iter()
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    // SAFETY: kill(2) on the pid the jailer reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(
        nspid.split_whitespace().last(),
        Some("1"),
        "pid 1 in its namespace: NSpid {nspid}"
    );
    assert!(
        stdio.iter().all(|f| f == "/dev/null"),
        "stdio on /dev/null: {stdio:?}"
    );
    assert_eq!(o.seccomp, "2", "{o:?}");
}

#[test]
fn cgroup_v2_values_are_written_in_the_jails_cgroup() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let v2 = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("this host has no cgroup2 mount");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    let base = Base::new("v2");
    let id = format!("v2-{}", std::process::id());
    let mut cmd = Command::new(jailer_bin());
    let tern = tern_bin();
    cmd.args([
        "--id",
        &id,
        "--uid",
        &UID.to_string(),
        "--gid",
        &GID.to_string(),
    ])
    .arg("--exec-file")
    .arg(&tern)
    .arg("--chroot-base-dir")
    .arg(&base.0)
    .args([
        "--cgroup-version",
        "2",
        "--cgroup",
        "cgroup.max.descendants=5",
    ])
    .args(library_binds(&tern))
    .args(["--", "--version"]);
    let run = run_with_deadline(cmd, Duration::from_secs(20));
    let dir = v2.join(rel).join("tern").join(&id);
    let value = std::fs::read_to_string(dir.join("cgroup.max.descendants"));
    let _ = std::fs::remove_dir(&dir);
    assert_eq!(run.status.code(), Some(0), "{run}");
    assert!(run.stdout.starts_with("tern "), "{run}");
    assert_eq!(
        value.unwrap_or_default().trim(),
        "5",
        "in {}",
        dir.display()
    );
}
