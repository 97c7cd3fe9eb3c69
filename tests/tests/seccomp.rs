//! seccomp: a forbidden syscall (the test hook TERN_SECCOMP_TEST_TRIGGER
//! makes the named thread call `personality`) ends tern, tern-blk and
//! tern-net from each of their thread kinds with the violation reported, at
//! levels 2 and 1; at level 0 the same run passes.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{require_kvm, tern_bin, wait_child, Run, UNIKERNEL};

/// 128 + SIGSYS.
const VIOLATION_STATUS: i32 = 159;
/// The syscall the hook makes.
const SYSCALL: &str = "syscall 135 (personality)";

/// Waits for `child` up to `deadline`, then kills it; never panics on the
/// deadline (a guest left waiting for a dead backend is expected here).
fn wait(child: Child, deadline: Duration) -> Run {
    wait_child(child, deadline).0
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-seccomp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// tern (through `prefix`, e.g. `ip netns exec NS`) booting the unikernel
/// with `extra` arguments, the hook aimed at `trigger`, at `level`.
fn tern_run(prefix: &[&str], extra: &[&str], cmdline: &str, trigger: &str, level: u8) -> Run {
    require_kvm();
    let scratch = Scratch::new(&trigger.replace(':', "-"));
    let sock = scratch.0.join("api.sock");
    let tern = tern_bin();
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(&tern);
            c
        }
        None => Command::new(&tern),
    };
    cmd.arg("--api-sock")
        .arg(&sock)
        .args([
            "--kernel",
            UNIKERNEL,
            "--memory",
            "64",
            "--seccomp-level",
            &level.to_string(),
        ])
        .args(extra)
        .args(["--cmdline", cmdline])
        .env("TERN_SECCOMP_TEST_TRIGGER", trigger)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait(cmd.spawn().expect("spawn tern"), Duration::from_secs(40))
}

/// At levels 2 and 1 the run dies by the violation of `thread` of
/// `binary`; at level 0 it passes (exit 7) and the hook's syscall returned.
fn check(binary: &str, thread: &str, run_at: impl Fn(u8) -> Run) {
    let line = format!("{binary}: seccomp violation in thread {thread}: {SYSCALL}");
    for level in [2, 1] {
        let run = run_at(level);
        assert!(
            run.stderr.contains(&line),
            "level {level}: no `{line}`: {run}"
        );
        if binary == "tern" {
            assert_eq!(
                run.status.code(),
                Some(VIOLATION_STATUS),
                "level {level}: {run}"
            );
        } else {
            assert_ne!(
                run.status.code(),
                Some(7),
                "level {level}: the guest passed with its backend dead: {run}"
            );
        }
    }
    let run = run_at(0);
    assert_eq!(run.status.code(), Some(7), "level 0: {run}");
    assert!(
        run.stderr.contains(&format!(
            "seccomp test trigger in thread {thread}: personality() returned"
        )),
        "level 0: the hook did not run: {run}"
    );
}

#[test]
fn tern_api_vmm_and_vcpu_threads_are_filtered() {
    for thread in ["api", "vmm", "vcpu"] {
        check("tern", thread, |level| {
            tern_run(
                &[],
                &[],
                "action=exit code=3",
                &format!("tern:{thread}"),
                level,
            )
        });
    }
}

#[test]
fn tern_blk_main_and_worker_threads_are_filtered() {
    for thread in ["main", "worker"] {
        check("tern-blk", thread, |level| {
            let scratch = Scratch::new(&format!("blk-{thread}-{level}"));
            let img = scratch.0.join("disk.raw");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            let drive = format!("path={}", img.display());
            tern_run(
                &[],
                &["--drive", &drive],
                "checks=blk action=exit code=3",
                &format!("tern-blk:{thread}"),
                level,
            )
        });
    }
}

#[test]
fn tern_net_main_and_worker_threads_are_filtered() {
    require_kvm();
    let ns = format!("tern-seccomp-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("iproute2 (ip)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    ip(&["netns", "add", &ns]);
    for cmd in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "tuntap", "add", "ts0", "mode", "tap"],
        &["ip", "addr", "add", "10.80.0.1/24", "dev", "ts0"],
        &["ip", "link", "set", "ts0", "up"],
    ] {
        let mut a = vec!["netns", "exec", &ns];
        a.extend_from_slice(cmd);
        ip(&a);
    }
    let result = std::panic::catch_unwind(|| {
        for thread in ["main", "worker"] {
            check("tern-net", thread, |level| {
                tern_run(
                    &["ip", "netns", "exec", &ns],
                    &["--net", "tap=ts0"],
                    "checks=net netip=10.80.0.2 netgw=10.80.0.1 action=exit code=3",
                    &format!("tern-net:{thread}"),
                    level,
                )
            });
        }
    });
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
