//! The HTTP API over the real Unix socket, with real guests: the full
//! configure/start/pause/resume flow, every error class, several clients,
//! socket hygiene, Ctrl-Alt-Del, and clients the project did not write
//! (curl) or did (ternctl). Every answer is validated against
//! `api-spec/tern.yaml`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::openapi::{request, validate_response};
use common::{require_kvm, tern_bin, UNIKERNEL};

/// A tern started with `--api-sock`, its console lines collected as they
/// arrive.
struct Tern {
    child: Child,
    sock: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Tern {
    fn start(tag: &str, extra: &[&str]) -> Self {
        require_kvm();
        let dir = TempDir::new(tag);
        let sock = dir.0.join("api.sock");
        let mut child = Command::new(tern_bin())
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            });
        }
        let t = Self {
            child,
            sock,
            lines,
            _dir: dir,
        };
        // Connectable, not just present: the file appears at bind(), a
        // moment before listen().
        t.wait_for(
            || UnixStream::connect(&t.sock).is_ok(),
            "the API socket to accept connections",
        );
        t
    }

    /// A request whose answer must be `status` and conform to the spec.
    fn call(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> serde_json::Value {
        let (got, text) = request(&self.sock, method, path, body);
        assert_eq!(
            got,
            status,
            "{method} {path} {body:?} answered {got} {text}\n{}",
            self.output()
        );
        if let Err(e) = validate_response(method, path, got, &text) {
            panic!(
                "{method} {path}: answer {got} {text} does not conform to api-spec/tern.yaml: {e}"
            );
        }
        if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"))
        }
    }

    /// A refused request: `status`, and a fault message containing `says`.
    fn refused(&self, method: &str, path: &str, body: Option<&str>, status: u16, says: &str) {
        let v = self.call(method, path, body, status);
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(says),
            "{method} {path}: fault_message `{msg}` should name `{says}`"
        );
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn wait_for(&self, cond: impl FnMut() -> bool, what: &str) {
        self.wait_within(Duration::from_secs(30), cond, what)
    }

    fn wait_within(&self, limit: Duration, mut cond: impl FnMut() -> bool, what: &str) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The highest `HEARTBEAT n` printed so far.
    fn heartbeat(&self) -> u64 {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("HEARTBEAT ")?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn configure_and_start(&self, cmdline: &str) {
        self.call(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
            204,
        );
        let boot =
            serde_json::json!({ "kernel_image_path": UNIKERNEL, "boot_args": cmdline }).to_string();
        self.call("PUT", "/boot-source", Some(&boot), 204);
        self.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            204,
        );
    }

    fn wait_exit(&mut self) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "tern did not exit:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn configure_start_pause_resume_and_reuse_the_config() {
    let mut t = Tern::start("flow", &[]);
    let info = t.call("GET", "/", None, 200);
    assert_eq!(info["state"], "Not started");
    t.configure_and_start("checks=acpi cpus=2 action=heartbeat period=10 beats=100 code=6");
    t.wait_for(|| t.heartbeat() >= 3, "heartbeats");
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");

    t.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Paused");
    // Pausing a paused VM is fine.
    t.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    std::thread::sleep(Duration::from_millis(100));
    let at_pause = t.heartbeat();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        t.heartbeat(),
        at_pause,
        "the counter advanced while paused:\n{}",
        t.output()
    );

    t.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
    t.wait_for(|| t.heartbeat() >= at_pause + 3, "heartbeats after resume");

    let devices = t.call("GET", "/devices", None, 200);
    let ids: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    for id in [
        "host-bridge",
        "lpc",
        "com1",
        "i8042",
        "rtc",
        "acpi-pm",
        "debug-exit",
    ] {
        assert!(ids.contains(&id), "{id} missing from {devices}");
    }
    let metrics = t.call("GET", "/metrics", None, 200);
    assert!(
        metrics["vcpu_exits"]["io"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        metrics["api_requests"]["total"].as_u64().unwrap() >= 10,
        "{metrics}"
    );
    assert!(metrics["boot_time_ms"].as_f64().unwrap() > 0.0, "{metrics}");

    // The effective configuration boots the same VM from --config-file.
    let config = t.call("GET", "/vm/config", None, 200);
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    let file = std::env::temp_dir().join(format!("tern-api-config-{}.json", std::process::id()));
    std::fs::write(&file, config.to_string()).unwrap();
    assert_eq!(
        t.wait_exit(),
        (6 << 1) | 1,
        "the first VM ends after its beats:\n{}",
        t.output()
    );
    let again = common::tern(
        &["--config-file", file.to_str().unwrap()],
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&file);
    assert_eq!(again.code(), (6 << 1) | 1, "{again}");
    common::assert_line(
        &again,
        "TERN-UNIKERNEL v1 cmdline=checks=acpi cpus=2 action=heartbeat period=10 beats=100 code=6",
    );
    common::assert_line(&again, "ACPI MADT cpus=2 ioapics=1");
    common::assert_line(&again, "HEARTBEAT 100");
}

#[test]
fn every_error_class_is_answered_and_the_vm_keeps_running() {
    let t = Tern::start("errors", &[]);
    // Before boot.
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
        400,
        "vcpu_count",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 100000, "mem_size_mib": 64}"#),
        400,
        "vcpu_count",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
        400,
        "mem_size_mib",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 4194304}"#),
        400,
        "mem_size_mib",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "two", "mem_size_mib": 64}"#),
        400,
        "invalid type",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "turbo": 1}"#),
        400,
        "turbo",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1,"#),
        400,
        "machine-config",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some("[1, 64]"),
        400,
        "JSON object",
    );
    // A patch is checked merged with what is configured, not on its own.
    t.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 33}"#),
        204,
    );
    t.refused(
        "PATCH",
        "/machine-config",
        Some(r#"{"huge_pages": "2M"}"#),
        400,
        "multiple of the 2 MiB",
    );
    assert_eq!(
        t.call("GET", "/machine-config", None, 200)["huge_pages"],
        "None"
    );
    t.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/"}"#),
        400,
        "not a regular file",
    );
    t.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent"}"#),
        400,
        "kernel_image_path",
    );
    t.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "boot source",
    );
    t.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        400,
        "not started",
    );
    t.refused(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        400,
        "not started",
    );
    t.refused("GET", "/no/such/thing", None, 404, "/no/such/thing");
    t.refused("DELETE", "/machine-config", None, 405, "DELETE");
    let big = format!(r#"{{"boot_args": "{}"}}"#, "x".repeat(100 << 10));
    t.refused("PUT", "/boot-source", Some(&big), 413, "too large");

    t.configure_and_start("action=heartbeat period=20");
    t.wait_for(|| t.heartbeat() >= 2, "heartbeats");
    // After boot: pre-boot resources are closed, InstanceStart once.
    t.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        "already started",
    );
    t.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        400,
        "after the VM started",
    );
    t.refused(
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count": 2}"#),
        400,
        "after the VM started",
    );
    let boot = serde_json::json!({ "kernel_image_path": UNIKERNEL }).to_string();
    t.refused(
        "PUT",
        "/boot-source",
        Some(&boot),
        400,
        "after the VM started",
    );
    t.refused(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Sleeping"}"#),
        400,
        "Sleeping",
    );
    t.refused(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        400,
        "Reboot",
    );
    // The VM kept running through all of it.
    let before = t.heartbeat();
    t.wait_for(|| t.heartbeat() > before + 2, "heartbeats after the errors");
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
}

#[test]
fn ctrl_alt_del_reaches_the_guest_keyboard() {
    let mut t = Tern::start("cad", &[]);
    t.configure_and_start("action=heartbeat period=20 code=9");
    t.wait_for(|| t.output().contains("KBD init"), "the guest's i8042 init");
    let init = t.output();
    assert!(init.contains("selftest=0x55"), "{init}");
    t.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        204,
    );
    assert_eq!(t.wait_exit(), (9 << 1) | 1, "{}", t.output());
    let out = t.output();
    for byte in [
        "KBD 0x1d", "KBD 0x38", "KBD 0xe0", "KBD 0x53", "KBD 0xd3", "KBD 0xb8", "KBD 0x9d",
    ] {
        assert!(out.contains(byte), "{byte} not seen by the guest:\n{out}");
    }
    assert!(out.contains("KBD ctrl-alt-del"), "{out}");
}

#[test]
fn boot_flags_with_api_sock_boot_at_once_and_serve() {
    let mut t = Tern::start(
        "bootnow",
        &[
            "--kernel",
            UNIKERNEL,
            "--cmdline",
            "action=heartbeat period=20 beats=30 code=2",
        ],
    );
    t.wait_for(|| t.heartbeat() >= 1, "heartbeats");
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
    assert_eq!(t.wait_exit(), 5);
    assert!(!t.sock.exists(), "the socket is removed when tern exits");
}

#[test]
fn socket_mode_stale_and_live_sockets() {
    let t = Tern::start("sock", &[]);
    let mode = std::fs::metadata(&t.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    // A second tern on a live socket is refused and leaves it alone.
    let second = common::tern(
        &["--api-sock", t.sock.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(second.code(), 2, "{second}");
    assert!(second.stderr.contains("in use"), "{second}");
    t.call("GET", "/", None, 200);

    // A stale socket file (nobody listening) is replaced.
    let stale_dir = TempDir::new("stale");
    let stale = stale_dir.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut child = Command::new(tern_bin())
        .arg("--api-sock")
        .arg(&stale)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while UnixStream::connect(&stale).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tern did not take over the stale socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, _) = request(&stale, "GET", "/", None);
    assert_eq!(status, 200);
    // SIGTERM: the socket is removed.
    send_sigterm(child.id());
    let _ = child.wait();
    assert!(!stale.exists(), "the socket is removed on SIGTERM");
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

#[test]
fn several_clients_at_once_and_a_stalled_client() {
    let t = Tern::start("clients", &[]);
    t.configure_and_start("action=heartbeat period=20");
    t.wait_for(|| t.heartbeat() >= 1, "heartbeats");
    // A client that sends half a request and stalls holds nothing up.
    let mut stalled = UnixStream::connect(&t.sock).unwrap();
    stalled
        .write_all(b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .unwrap();
    let sock = t.sock.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let s = sock.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|_| request(&s, "GET", "/", None).0)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for th in threads {
        assert!(th.join().unwrap().iter().all(|&s| s == 200));
    }
    // Nine keep-alive connections opened together, each then asking twice.
    let mut conns: Vec<UnixStream> = (0..9)
        .map(|_| UnixStream::connect(&t.sock).unwrap())
        .collect();
    for round in 0..2 {
        for c in conns.iter_mut() {
            c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 512];
            let n = std::io::Read::read(c, &mut buf).unwrap_or(0);
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "connection {i}, round {round}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
    let before = t.heartbeat();
    t.wait_for(
        || t.heartbeat() > before + 2,
        "heartbeats with a stalled client",
    );
    drop(stalled);
    t.call("GET", "/", None, 200);
}

#[test]
fn curl_talks_to_the_socket() {
    let t = Tern::start("curl", &[]);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            t.sock.to_str().unwrap(),
            "http://localhost/machine-config",
        ])
        .args([
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"vcpu_count": 3, "mem_size_mib": 96}"#,
        ])
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .output()
        .expect("curl must be installed (tools/install-deps.sh)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            t.sock.to_str().unwrap(),
            "http://localhost/machine-config",
        ])
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    validate_response("GET", "/machine-config", 200, &body).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
        (Some(3), Some(96))
    );
}

#[test]
fn ternctl_drives_a_vm() {
    let t = Tern::start("ternctl", &[]);
    let ternctl = tern_bin().with_file_name("ternctl");
    assert!(
        ternctl.exists(),
        "{} missing: cargo build --workspace --bins",
        ternctl.display()
    );
    let ctl = |args: &[&str]| {
        let o = Command::new(&ternctl)
            .arg("--sock")
            .arg(&t.sock)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, out, _) = ctl(&["info"]);
    assert_eq!(code, 0);
    assert!(out.contains("Not started"), "{out}");
    let (code, _, err) = ctl(&["pause"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("400") && err.contains("not started"), "{err}");
    assert_eq!(
        ctl(&[
            "put",
            "machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#
        ])
        .0,
        0
    );
    let boot = serde_json::json!({ "kernel_image_path": UNIKERNEL, "boot_args": "action=heartbeat period=20" }).to_string();
    assert_eq!(ctl(&["put", "/boot-source", &boot]).0, 0);
    assert_eq!(ctl(&["start"]).0, 0);
    t.wait_for(|| t.heartbeat() >= 2, "heartbeats");
    assert_eq!(ctl(&["pause"]).0, 0);
    assert!(ctl(&["info"]).1.contains("Paused"));
    assert_eq!(ctl(&["resume"]).0, 0);
    assert!(ctl(&["devices"]).1.contains("0000:00:1f.0"));
    assert!(ctl(&["config"]).1.contains("machine-config"));
    assert!(ctl(&["metrics"]).1.contains("vcpu_exits"));
    let missing = Command::new(&ternctl)
        .args(["--sock", "/nonexistent.sock", "info"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot connect to /nonexistent.sock")
    );
}

#[test]
fn drives_through_the_api_and_a_backend_killed_during_io() {
    let t = Tern::start("drives", &[]);
    let dir = t._dir.0.clone();
    // A managed drive (tern starts tern-blk) and an external one (the test does).
    let managed = dir.join("managed.raw");
    std::fs::File::create(&managed)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let external = dir.join("external.raw");
    std::fs::File::create(&external)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("ext.sock");
    let mut backend = Command::new(tern_bin().with_file_name("tern-blk"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            external.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    t.wait_for(|| sock.exists(), "tern-blk's socket");

    t.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        204,
    );
    let d0 = serde_json::json!({ "path_on_host": managed, "is_root_device": true }).to_string();
    t.call("PUT", "/drives/root", Some(&d0), 204);
    let d1 = serde_json::json!({ "socket": sock }).to_string();
    t.call("PUT", "/drives/ext", Some(&d1), 204);
    t.refused(
        "PUT",
        "/drives/bad",
        Some(r#"{"path_on_host": "/nonexistent.img"}"#),
        400,
        "/nonexistent.img",
    );
    t.refused(
        "PUT",
        "/drives/x",
        Some(r#"{"drive_id": "y", "socket": "/s"}"#),
        400,
        "does not match",
    );
    let config = t.call("GET", "/vm/config", None, 200);
    assert_eq!(
        config["drives"].as_array().map(Vec::len),
        Some(2),
        "{config}"
    );
    let boot = serde_json::json!({ "kernel_image_path": UNIKERNEL, "boot_args": "checks=blk blkpattern=1 blktimeout=2000 action=heartbeat period=20" }).to_string();
    t.call("PUT", "/boot-source", Some(&boot), 204);
    t.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );

    let devices = t.call("GET", "/devices", None, 200);
    let find = |v: &serde_json::Value, id: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or_default()
    };
    let root = find(&devices, "root");
    assert_eq!(root["kind"], "virtio-blk", "{devices}");
    assert_eq!(
        root["pci_address"], "0000:00:01.0",
        "the root drive takes the first slot: {devices}"
    );
    assert!(
        root["backend_pid"].as_u64().is_some(),
        "managed backend pid: {devices}"
    );
    assert_eq!(find(&devices, "ext")["pci_address"], "0000:00:02.0");
    assert_eq!(find(&devices, "ext")["state"], "attached");
    // An existing drive cannot be changed on a running VM (a new id would
    // be hot plugged).
    t.refused("PUT", "/drives/ext", Some(&d1), 400, "cannot be changed");

    // Kill the external backend while the guest is doing I/O on the disks.
    t.wait_for(
        || t.output().contains("BLK sum"),
        "the guest's first disk reads",
    );
    backend.kill().unwrap();
    let _ = backend.wait();
    t.wait_for(
        || find(&t.call("GET", "/devices", None, 200), "ext")["state"] == "disconnected",
        "the drive to show disconnected",
    );
    assert_eq!(
        find(&t.call("GET", "/devices", None, 200), "root")["state"],
        "attached"
    );
    // The guest sees its requests to that disk fail (time out), goes on, and
    // tern keeps running and answering.
    // The guest's driver times out (about 10 s of its PIT-timed polling,
    // longer on a loaded host) and goes on.
    t.wait_within(
        Duration::from_secs(180),
        || t.heartbeat() >= 3,
        "heartbeats after the backend died",
    );
    assert!(
        t.output().contains("CHECK FAIL"),
        "the guest noticed the dead disk:\n{}",
        t.output()
    );
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
}

#[test]
fn a_killed_net_backend_shows_disconnected_and_tern_keeps_running() {
    let t = Tern::start("netdead", &[]);
    // tern-net serves a tap in a namespace of the test's own; its socket is
    // an ordinary file, so tern (outside the namespace) connects to it.
    let ns = format!("tern-api-net-{}", std::process::id());
    let sh = |cmd: &str| {
        let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    sh(&format!("ip netns add {ns} && ip netns exec {ns} ip tuntap add tn0 mode tap && ip netns exec {ns} ip link set tn0 up"));
    let sock = t._dir.0.join("net.sock");
    let mut backend = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(tern_bin().with_file_name("tern-net"))
        .args(["--socket", sock.to_str().unwrap(), "--tap", "tn0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    t.wait_for(|| sock.exists(), "tern-net's socket");
    let nic = serde_json::json!({ "socket": sock, "guest_mac": "02:74:65:72:6e:09" }).to_string();
    t.call("PUT", "/network-interfaces/eth0", Some(&nic), 204);
    t.refused(
        "PUT",
        "/network-interfaces/eth1",
        Some(r#"{"host_dev_name": "tn0", "guest_mac": "zz"}"#),
        400,
        "guest_mac",
    );
    assert_eq!(
        t.call("GET", "/vm/config", None, 200)["network-interfaces"][0]["iface_id"],
        "eth0"
    );
    t.configure_and_start("action=heartbeat period=20");
    t.wait_for(|| t.heartbeat() >= 2, "heartbeats");
    let eth0 = |v: serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == "eth0")
            .cloned()
            .unwrap_or_default()
    };
    let dev = eth0(t.call("GET", "/devices", None, 200));
    assert_eq!(
        (dev["kind"].as_str(), dev["state"].as_str()),
        (Some("virtio-net"), Some("attached")),
        "{dev}"
    );
    backend.kill().unwrap();
    let _ = backend.wait();
    t.wait_for(
        || eth0(t.call("GET", "/devices", None, 200))["state"] == "disconnected",
        "the NIC to show disconnected",
    );
    let before = t.heartbeat();
    t.wait_for(
        || t.heartbeat() > before + 2,
        "heartbeats after the backend died",
    );
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
}

#[test]
fn a_killed_managed_backend_is_started_again_and_reconnected() {
    let t = Tern::start("blkrestart", &[]);
    let img = t._dir.0.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let d = serde_json::json!({ "path_on_host": img, "is_root_device": false }).to_string();
    t.call("PUT", "/drives/d0", Some(&d), 204);
    t.configure_and_start("checks=blk blktimeout=2000 action=heartbeat period=20");
    t.wait_for(|| t.output().contains("BLK sum"), "the guest's disk reads");
    let d0 = || {
        t.call("GET", "/devices", None, 200)
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == "d0")
            .cloned()
            .unwrap_or_default()
    };
    let first = d0()["backend_pid"].as_u64().expect("managed backend pid");
    // Past the restart interval, so the restart is not held back.
    std::thread::sleep(Duration::from_millis(1100));
    let st = Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    t.wait_for(
        || {
            let d = d0();
            d["state"] == "attached" && d["backend_pid"].as_u64().is_some_and(|p| p != first)
        },
        "a new tern-blk serving d0",
    );
    t.wait_for(
        || t.output().contains("backend reconnected"),
        "tern to reconnect to the restarted backend",
    );
    let before = t.heartbeat();
    t.wait_for(
        || t.heartbeat() > before + 2,
        "heartbeats after the restart",
    );
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
}
