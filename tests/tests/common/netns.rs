//! Network namespaces with taps for tests that need a NIC (never the
//! host's interfaces); deleted on drop.

use std::process::{Command, Output};

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 (ip) must be installed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace `tern-<tag>-<pid>`.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// A fresh namespace with `lo` up.
    pub fn new(tag: &str) -> Self {
        let name = format!("tern-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A tap `dev` with `addr` (CIDR), up.
    pub fn tap(&self, dev: &str, addr: &str) {
        self.exec_ok(&["ip", "tuntap", "add", dev, "mode", "tap"]);
        self.exec_ok(&["ip", "addr", "add", addr, "dev", dev]);
        self.exec_ok(&["ip", "link", "set", dev, "up"]);
    }

    /// `prog` run inside the namespace.
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Runs `args` inside; it must succeed.
    pub fn exec_ok(&self, args: &[&str]) -> Output {
        let out = self.command(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `ping -c count -W 1 addr` inside, retried until it succeeds or
    /// `tries` runs fail: (success, output of the last run).
    pub fn ping(&self, addr: &str, count: u32, tries: u32) -> (bool, String) {
        let mut last = String::new();
        for _ in 0..tries {
            let out = self
                .command("ping")
                .args(["-c", &count.to_string(), "-W", "1", "-i", "0.2", addr])
                .output()
                .expect("ping (iputils-ping) must be installed");
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                return (true, last);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        (false, last)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
