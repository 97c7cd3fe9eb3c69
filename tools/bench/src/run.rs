//! Spawning tern, timing its console lines and exit, and reading its memory
//! use from /proc.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Name of the memfd tern backs guest RAM with (see vmm/src/memory.rs).
pub const GUEST_RAM_MAPPING: &str = "memfd:tern-guest-ram";

/// A running tern with its stdout pipe and a file catching its stderr.
pub struct Vm {
    pub child: Child,
    pub started: Instant,
    stdout: ChildStdout,
    buf: Vec<u8>,
    eof: bool,
    stderr_path: PathBuf,
    stderr_file: File,
    watchdog: Option<Watchdog>,
    killed_by_watchdog: bool,
    /// The jail made for this run (`--jailer`), removed on drop.
    jail_dir: Option<PathBuf>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Vm {
    /// Starts `tern ARGS`; `started` is taken just before the spawn. The
    /// process is killed if it is still running after `timeout`.
    pub fn spawn(tern: &Path, args: &[OsString], timeout: Duration) -> Result<Vm, String> {
        let stderr_path = std::env::temp_dir().join(format!(
            "tern-bench-{}-{}.stderr",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let for_child = stderr_file
            .try_clone()
            .map_err(|e| format!("cannot duplicate a file descriptor: {e}"))?;
        let (mut cmd, jail_dir) = crate::confine::command(tern, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(for_child));
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&stderr_path);
                return Err(format!("cannot start {}: {e}", tern.display()));
            }
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let watchdog = Watchdog::start(child.id(), timeout);
        Ok(Vm {
            child,
            started,
            stdout,
            buf: Vec::new(),
            eof: false,
            stderr_path,
            stderr_file,
            watchdog: Some(watchdog),
            killed_by_watchdog: false,
            jail_dir,
        })
    }

    /// The next complete console line (without the line end) and when its
    /// `\n` arrived; `None` at end of file. A last line without `\n` is
    /// returned at end of file too.
    pub fn next_line(&mut self) -> Option<(String, Instant)> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let now = Instant::now();
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some((String::from_utf8_lossy(&line).into_owned(), now));
            }
            if self.eof {
                if self.buf.is_empty() {
                    return None;
                }
                let line: Vec<u8> = std::mem::take(&mut self.buf);
                return Some((String::from_utf8_lossy(&line).into_owned(), Instant::now()));
            }
            let mut chunk = [0u8; 8192];
            match self.stdout.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    // Timestamp lines by the read that completed them: the
                    // loop above takes `now` right after this returns.
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
    }

    /// Reads the console until end of file, returning the lines.
    pub fn drain(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some((l, _)) = self.next_line() {
            lines.push(l);
        }
        lines
    }

    /// Waits for the process; returns its status and when `wait` returned.
    pub fn wait(&mut self) -> Result<(ExitStatus, Instant), String> {
        let status = self
            .child
            .wait()
            .map_err(|e| format!("waiting for tern failed: {e}"))?;
        let now = Instant::now();
        self.stop_watchdog();
        Ok((status, now))
    }

    /// Kills the process (it is expected to be running) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_watchdog();
    }

    fn stop_watchdog(&mut self) {
        if let Some(w) = self.watchdog.take() {
            self.killed_by_watchdog |= w.stop();
        }
    }

    /// Whether the watchdog killed the process.
    pub fn timed_out(&self) -> bool {
        self.watchdog
            .as_ref()
            .is_some_and(|w| w.fired.load(Ordering::SeqCst))
            || self.killed_by_watchdog
    }

    /// tern's stderr so far (its last non-empty line is why the VM ended).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        let _ = self.stderr_file.seek(SeekFrom::Start(0));
        let _ = self.stderr_file.read_to_string(&mut s);
        s
    }

    /// The last non-empty stderr line, for error messages.
    pub fn stderr_tail(&mut self) -> String {
        let s = self.stderr();
        match s.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(l) => format!(" (tern: \"{}\")", l.trim()),
            None => String::new(),
        }
    }

    /// The pid, for /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(dir) = self.jail_dir.take() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(dir);
        }
        if self.watchdog.is_some() {
            // Never leave a VM behind, whatever went wrong.
            self.kill();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Kills a pid with SIGKILL if not stopped before its deadline.
struct Watchdog {
    stop: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Watchdog {
    fn start(pid: u32, timeout: Duration) -> Watchdog {
        let (stop, rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let thread = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                f.store(true, Ordering::SeqCst);
                // SAFETY: plain kill(2) on our own child, not yet reaped (the
                // owner stops this watchdog right after reaping it).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        Watchdog {
            stop,
            fired,
            thread,
        }
    }

    fn stop(self) -> bool {
        let _ = self.stop.send(());
        let _ = self.thread.join();
        self.fired.load(Ordering::SeqCst)
    }
}

/// Memory figures of a running tern, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rss {
    /// Sum of `Rss:` over every mapping except guest RAM.
    pub outside_guest_kib: u64,
    /// `Rss:` of the guest RAM mapping(s).
    pub guest_kib: u64,
    /// `VmRSS:` from /proc/PID/status.
    pub vmrss_kib: u64,
}

/// Reads /proc/PID/smaps and /proc/PID/status.
pub fn read_rss(pid: u32) -> Result<Rss, String> {
    let smaps_path = format!("/proc/{pid}/smaps");
    let smaps = std::fs::read_to_string(&smaps_path)
        .map_err(|e| format!("cannot read {smaps_path}: {e}"))?;
    let mut rss = Rss::default();
    let mut in_guest = false;
    let mut saw_guest = false;
    for line in smaps.lines() {
        if is_mapping_header(line) {
            // address perms offset dev inode [name]
            let name = line
                .split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ");
            in_guest = name.contains(GUEST_RAM_MAPPING);
            saw_guest |= in_guest;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib = parse_kib(v).ok_or_else(|| format!("bad line in {smaps_path}: {line}"))?;
            if in_guest {
                rss.guest_kib += kib;
            } else {
                rss.outside_guest_kib += kib;
            }
        }
    }
    if !saw_guest {
        return Err(format!(
            "no mapping named {GUEST_RAM_MAPPING} in {smaps_path}: cannot tell guest RAM apart"
        ));
    }
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path)
        .map_err(|e| format!("cannot read {status_path}: {e}"))?;
    rss.vmrss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(parse_kib)
        .ok_or_else(|| format!("no VmRSS in {status_path}"))?;
    Ok(rss)
}

/// `55d0c0a00000-55d0c0a21000 r-xp ...`: the first word is a hex range.
fn is_mapping_header(line: &str) -> bool {
    let Some(first) = line.split_whitespace().next() else {
        return false;
    };
    match first.split_once('-') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_hexdigit())
                && b.bytes().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// `"   1234 kB"` -> 1234.
fn parse_kib(v: &str) -> Option<u64> {
    let v = v.trim();
    let v = v.strip_suffix("kB").unwrap_or(v).trim();
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert!(is_mapping_header(
            "7f1c2c000000-7f1c34000000 rw-s 00000000 00:01 1234 /memfd:tern-guest-ram (deleted)"
        ));
        assert!(is_mapping_header(
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]"
        ));
        assert!(!is_mapping_header("Rss:                 12 kB"));
        assert!(!is_mapping_header("VmFlags: rd wr mr mw me ac sd"));
        assert_eq!(parse_kib("   1234 kB"), Some(1234));
    }
}
