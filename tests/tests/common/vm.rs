//! A tern process the test talks to while it runs: its API socket, its
//! console lines as they arrive, the test unikernel's heartbeat lines, and
//! scratch directories. Used by the snapshot tests, where one VM lives in
//! several processes one after the other.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::openapi::{request, validate_response};
use super::{require_kvm, tern_bin};

/// A scratch directory under the temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

/// An empty (sparse) raw image of `mib` MiB at `path`.
pub fn raw_image(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

impl Scratch {
    /// `n` empty raw images of `mib` MiB, `<prefix>0.raw` and on.
    pub fn raw_images(&self, prefix: &str, n: usize, mib: u64) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let p = self.path(&format!("{prefix}{i}.raw"));
                raw_image(&p, mib);
                p
            })
            .collect()
    }

    /// `<tmp>/tern-<tag>-<pid>`, empty.
    pub fn new(tag: &str) -> Self {
        Self::under(&std::env::temp_dir(), tag)
    }

    /// `<base>/tern-<tag>-<pid>`, empty.
    pub fn under(base: &Path, tag: &str) -> Self {
        let p = base.join(format!("tern-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// A path inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `HEARTBEAT n ...` line of the unikernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The beat number.
    pub n: u64,
    /// `mem=0x...`: the pattern's checksum, when checked at this beat.
    pub mem: Option<u64>,
    /// `dirty=ok|BAD`, when memdirty is on.
    pub dirty_ok: Option<bool>,
    /// `pings=N`, when netserve is on.
    pub pings: Option<u64>,
    /// The last word: `ok` (or no verdict, for a plain heartbeat).
    pub ok: bool,
}

/// Parses a complete heartbeat line.
pub fn parse_beat(line: &str) -> Option<Beat> {
    let mut words = line.strip_prefix("HEARTBEAT ")?.split_whitespace();
    let n = words.next()?.parse().ok()?;
    let mut b = Beat {
        n,
        mem: None,
        dirty_ok: None,
        pings: None,
        ok: true,
    };
    for w in words {
        if let Some(v) = w.strip_prefix("mem=0x") {
            b.mem = u64::from_str_radix(v, 16).ok();
        } else if let Some(v) = w.strip_prefix("dirty=") {
            b.dirty_ok = Some(v == "ok");
        } else if let Some(v) = w.strip_prefix("pings=") {
            b.pings = v.parse().ok();
        } else if w == "BAD" || w.starts_with("membad=") {
            b.ok = false;
        }
    }
    Some(b)
}

/// A line-collecting reader: complete lines only (a line cut by a kill or
/// a snapshot is kept apart as the tail).
#[derive(Default)]
struct Lines {
    complete: Vec<String>,
    tail: String,
}

fn collect(pipe: impl Read + Send + 'static, into: Arc<Mutex<Lines>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&buf).into_owned();
                    let mut l = into.lock().unwrap();
                    match s.strip_suffix('\n') {
                        Some(line) => l.complete.push(line.to_string()),
                        None => l.tail = s,
                    }
                }
            }
        }
    });
}

/// A running tern whose stdout (the guest console) and stderr (tern's own
/// lines) are collected; killed on drop.
pub struct Vm {
    child: Child,
    /// The API socket, if started with one.
    pub sock: Option<PathBuf>,
    out: Arc<Mutex<Lines>>,
    err: Arc<Mutex<Lines>>,
    started: Instant,
}

impl Vm {
    /// Starts `tern ARGS` (a fresh `--api-sock SOCK` first when `sock` is
    /// given) and waits for the socket to accept connections.
    pub fn start(sock: Option<&Path>, args: &[&str]) -> Self {
        Self::start_in(None, sock, args)
    }

    /// The same inside network namespace `netns` (`ip netns exec`, which
    /// execs tern: the child is tern itself).
    pub fn start_in(netns: Option<&str>, sock: Option<&Path>, args: &[&str]) -> Self {
        require_kvm();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(tern_bin());
                c
            }
            None => Command::new(tern_bin()),
        };
        if let Some(s) = sock {
            let _ = std::fs::remove_file(s);
            cmd.arg("--api-sock").arg(s);
        }
        cmd.args(args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern");
        let out = Arc::new(Mutex::new(Lines::default()));
        let err = Arc::new(Mutex::new(Lines::default()));
        collect(child.stdout.take().unwrap(), out.clone());
        collect(child.stderr.take().unwrap(), err.clone());
        let vm = Self {
            child,
            sock: sock.map(Path::to_owned),
            out,
            err,
            started: Instant::now(),
        };
        if let Some(s) = sock {
            vm.wait_until(
                Duration::from_secs(30),
                "the API socket to accept connections",
                || UnixStream::connect(s).is_ok(),
            );
        }
        vm
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A request; returns the status and body, after checking the answer
    /// against api-spec/tern.yaml.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let sock = self.sock.as_ref().expect("tern has no API socket");
        let (status, text) = request(sock, method, path, body);
        if let Err(e) = validate_response(method, path, status, &text) {
            panic!(
                "{method} {path}: answer {status} {text} does not conform to api-spec/tern.yaml: {e}"
            );
        }
        (status, text)
    }

    /// A request that must answer `status`; its body as JSON (Null if none).
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        status: u16,
    ) -> serde_json::Value {
        let (got, text) = self.call(method, path, body);
        assert_eq!(
            got,
            status,
            "{method} {path} {body:?} answered {got} {text}\n{}",
            self.output()
        );
        if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        }
    }

    /// A refused request: 400 and the fault message, which is returned.
    pub fn refused(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let v = self.expect(method, path, body, 400);
        v["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {v}"))
            .to_string()
    }

    /// `PATCH /vm {"state": "Paused"}`.
    pub fn pause(&self) {
        self.expect("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    }

    /// `PATCH /vm {"state": "Resumed"}`.
    pub fn resume(&self) {
        self.expect("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    }

    /// `PUT /snapshot/create`.
    pub fn snapshot(&self, kind: &str, state: &Path, mem: &Path) {
        let body = serde_json::json!({
            "snapshot_type": kind,
            "snapshot_path": state,
            "mem_file_path": mem,
        })
        .to_string();
        self.expect("PUT", "/snapshot/create", Some(&body), 204);
    }

    /// The body of a `PUT /snapshot/load`.
    pub fn load_body(state: &Path, mem: &Path, resume: bool) -> serde_json::Value {
        serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": resume,
        })
    }

    /// The console's complete lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.lock().unwrap().complete.clone()
    }

    /// The heartbeat lines so far.
    pub fn beats(&self) -> Vec<Beat> {
        self.out
            .lock()
            .unwrap()
            .complete
            .iter()
            .filter_map(|l| parse_beat(l))
            .collect()
    }

    /// The last heartbeat so far.
    pub fn last_beat(&self) -> Option<Beat> {
        self.beats().pop()
    }

    /// The console and tern's own lines, for failure messages.
    pub fn output(&self) -> String {
        let o = self.out.lock().unwrap();
        let e = self.err.lock().unwrap();
        format!(
            "--- console (pid {}) ---\n{}\n{}\n--- tern ---\n{}\n{}",
            self.child.id(),
            o.complete.join("\n"),
            o.tail,
            e.complete.join("\n"),
            e.tail
        )
    }

    /// tern's stderr lines so far.
    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().complete.join("\n")
    }

    /// Polls `cond` every 5 ms until it holds; fails after `limit`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a heartbeat numbered at least `n`; returns it.
    pub fn wait_beat(&self, n: u64, limit: Duration) -> Beat {
        self.wait_until(limit, &format!("HEARTBEAT {n}"), || {
            self.last_beat().is_some_and(|b| b.n >= n)
        });
        self.last_beat().unwrap()
    }

    /// Waits for `count` more heartbeats than there are now; returns the last.
    pub fn wait_more_beats(&self, count: usize, limit: Duration) -> Beat {
        let have = self.beats().len();
        self.wait_until(limit, &format!("{count} more heartbeats"), || {
            self.beats().len() >= have + count
        });
        self.last_beat().unwrap()
    }

    /// Waits for a console line starting with `prefix`; returns it.
    pub fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        self.wait_until(limit, &format!("a line `{prefix}...`"), || {
            self.lines().iter().any(|l| l.starts_with(prefix))
        });
        self.lines()
            .into_iter()
            .find(|l| l.starts_with(prefix))
            .unwrap()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, reap, and remove its runtime directory (backend sockets)
    /// that a killed tern cannot remove itself.
    pub fn kill(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("tern-{pid}")));
        // The reader threads see EOF now; give them a moment to take the rest.
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Waits for the process to end by itself; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                start.elapsed() < limit,
                "tern did not exit within {limit:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// `st_blocks * 512` of a file: the bytes it really holds on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .blocks()
        * 512
}

/// FNV-1a 64 of a whole file (to show a file did not change).
pub fn file_digest(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
