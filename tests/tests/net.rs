//! virtio-net through tern-net, inside network namespaces the tests create
//! (never the host's interfaces): the test unikernel's polling driver
//! resolves and pings the tap's host end, answers the host's pings, and
//! exchanges UDP with an echo server, checksummed at both ends.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{require_kvm, run_with_deadline, tern_bin, Run, UNIKERNEL};

/// A network namespace with taps; deleted on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Output {
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

impl Netns {
    fn new(tag: &str) -> Self {
        require_kvm();
        let name = format!("tern-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A tap `dev` with `addr` (CIDR), up; `multi_queue` for several pairs.
    fn tap(&self, dev: &str, addr: &str, multi_queue: bool) {
        let mut args = vec!["ip", "tuntap", "add", dev, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.exec_ok(&args);
        self.exec_ok(&["ip", "addr", "add", addr, "dev", dev]);
        self.exec_ok(&["ip", "link", "set", dev, "up"]);
    }

    fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    fn exec_ok(&self, args: &[&str]) -> Output {
        let out = self.command(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn mac(&self, dev: &str) -> String {
        let out = self.exec_ok(&["cat", &format!("/sys/class/net/{dev}/address")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// tern, inside the namespace.
    fn tern(&self, args: &[&str], deadline: Duration) -> Run {
        let mut cmd = self.command(tern_bin().to_str().unwrap());
        cmd.args(args);
        run_with_deadline(cmd, deadline)
    }

    /// The unikernel's UDP echo server, inside the namespace; it loses about
    /// one datagram in `drop` on purpose (0: none), so the guest must resend.
    fn udp_echo(&self, bind: &str, mib: u32, drop: u32) -> Child {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guests/unikernel/tools/udp_echo.py");
        self.command("python3")
            .arg(script)
            .args([
                "--bind",
                bind,
                "--mib",
                &mib.to_string(),
                "--timeout",
                "120",
                "--drop",
                &drop.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn line_with<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line: {run}"))
}

const MAC: &str = "02:74:65:72:6e:01";
/// The UDP exchange, each way (the 20 MiB).
const UDP_MIB: u32 = 20;

#[test]
fn one_nic_arp_ping_both_ways_and_udp_exchange() {
    let ns = Netns::new("net1");
    ns.tap("tn0", "10.77.0.1/24", false);
    let tap_mac = ns.mac("tn0");
    let echo = ns.udp_echo("10.77.0.1", UDP_MIB, 1000);
    // Ping the guest from the namespace while it waits answering.
    let pinger = std::thread::spawn({
        let name = ns.name.clone();
        move || {
            std::thread::sleep(Duration::from_secs(2));
            let mut last = None;
            for _ in 0..60 {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &name,
                        "ping",
                        "-c",
                        "3",
                        "-W",
                        "1",
                        "10.77.0.2",
                    ])
                    .output()
                    .expect("ping (iputils-ping) must be installed");
                if out.status.success() {
                    return (true, String::from_utf8_lossy(&out.stdout).into_owned());
                }
                last = Some(out);
                std::thread::sleep(Duration::from_millis(500));
            }
            (false, format!("{last:?}"))
        }
    });
    let net = format!("tap=tn0,mac={MAC}");
    let cmdline = format!(
        "checks=net netip=10.77.0.2 netgw=10.77.0.1 netudp={UDP_MIB} netwait=15 action=exit code=3"
    );
    let run = ns.tern(
        &[
            "--kernel",
            UNIKERNEL,
            "--memory",
            "64",
            "--net",
            &net,
            "--cmdline",
            &cmdline,
        ],
        Duration::from_secs(240),
    );
    let (pinged, ping_out) = pinger.join().unwrap();
    let echo_out = echo.wait_with_output().unwrap();
    assert_eq!(run.code(), 7, "{run}");
    assert!(
        line_with(&run, "NET 00:01.0").contains(&format!("mac={MAC}")),
        "the configured MAC: {run}"
    );
    common::assert_line(&run, &format!("NET arp 10.77.0.1 is {tap_mac}"));
    common::assert_line(&run, "NET ping 10.77.0.1 replies=5");
    assert!(
        pinged,
        "ping from the namespace to the guest failed: {ping_out}\n{run}"
    );
    let answered: u32 = line_with(&run, "NET answered pings=")
        .trim_start_matches("NET answered pings=")
        .trim()
        .parse()
        .unwrap();
    assert!(answered >= 3, "{run}");
    // 20 MiB each way, run in ring 3 (native on a software KVM: a few
    // seconds), the same FNV at the guest's two ends and the server's
    // (`udp_echo.py --expect 20`), with datagrams lost on purpose and resent.
    common::assert_line(&run, "NET udp sent=20971520 fnv=a6ca0acf");
    common::assert_line(&run, "NET udp received=20971520 fnv=a6ca0acf");
    assert!(
        line_with(&run, "NET udp datagrams=14247 ").contains(" ring3=1 "),
        "{run}"
    );
    let server = String::from_utf8_lossy(&echo_out.stdout);
    assert!(
        server.contains("ECHO bytes=20971520 fnv=a6ca0acf")
            && server.contains(" unique=14247 bad=0 ")
            && !server.contains(" dropped=0 "),
        "echo server: {server}"
    );
}

#[test]
fn two_nics_on_two_taps_and_subnets() {
    let ns = Netns::new("net2");
    ns.tap("tn0", "10.77.0.1/24", false);
    ns.tap("tn1", "10.78.0.1/24", false);
    let run = ns.tern(
        &[
            "--kernel",
            UNIKERNEL,
            "--memory",
            "64",
            "--net",
            "tap=tn0",
            "--net",
            "tap=tn1",
            "--cmdline",
            "checks=net netip=10.77.0.2,10.78.0.2 netgw=10.77.0.1,10.78.0.1 action=exit code=1",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(run.code(), 3, "{run}");
    common::assert_line(&run, &format!("NET arp 10.77.0.1 is {}", ns.mac("tn0")));
    common::assert_line(&run, &format!("NET arp 10.78.0.1 is {}", ns.mac("tn1")));
    common::assert_line(&run, "NET ping 10.78.0.1 replies=5");
    common::assert_line(&run, "NET devices=2");
}

#[test]
fn four_queue_pairs_each_carry_traffic() {
    let ns = Netns::new("netmq");
    ns.tap("tn0", "10.77.0.1/24", true);
    let run = ns.tern(
        &[
            "--kernel",
            UNIKERNEL,
            "--memory",
            "64",
            "--net",
            "tap=tn0,queues=4",
            "--cmdline",
            "checks=net netqueues=4 action=exit code=1",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(run.code(), 3, "{run}");
    assert!(line_with(&run, "NET 00:01.0").contains("queues=4"), "{run}");
    for q in 0..4 {
        common::assert_line(&run, &format!("NET queue {q} ok"));
    }
}

#[test]
fn a_missing_tap_or_backend_is_a_clear_error() {
    require_kvm();
    let run = common::tern(
        &["--kernel", UNIKERNEL, "--net", "socket=/nonexistent.sock"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), 2, "{run}");
    assert!(run.stderr.contains("network interface net0"), "{run}");
    let run = common::tern(
        &[
            "--kernel",
            UNIKERNEL,
            "--net",
            "tap=tn0,mac=01:00:00:00:00:00",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), 2, "{run}");
    assert!(run.stderr.contains("multicast"), "{run}");
}
