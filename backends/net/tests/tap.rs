//! End-to-end tests of the `tern-net` binary: a vhost-user frontend
//! (`tern-vhost-driver`'s net driver) on one side, a tap device in a network
//! namespace created by the test on the other. Needs root (CAP_NET_ADMIN and
//! `ip netns`); skipped with a message otherwise.

use std::fs::File;
use std::io::Read;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_vhost_driver::net::{feat, inet_checksum, pkt, NetFrontend, NetOptions, RxFrame};
use tern_vhost_driver::Desc;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_MAC_STR: &str = "52:54:00:12:34:56";
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const T: Duration = Duration::from_secs(5);

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace with IPv6 off (no router solicitations on the tap),
    /// or `None` (test skipped) when namespaces cannot be created.
    fn new() -> Option<Netns> {
        let name = format!(
            "tern-test-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        );
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = Netns { name };
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        Some(ns)
    }

    /// Run a command inside the namespace; it must succeed.
    fn exec(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Give the tap its address and bring it up.
    fn configure_tap(&self, tap: &str) {
        self.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", tap]);
        self.exec(&["ip", "link", "set", tap, "up"]);
    }

    /// Run `f` on a thread inside the namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A running `tern-net` inside a namespace.
struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_tern-net")
    }

    fn socket_path() -> PathBuf {
        let base = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        base.join(format!(
            "tern-net-{}-{}.sock",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Start `tern-net --socket S --tap tn0 --mac GUEST_MAC ARGS` in `ns`.
    fn spawn(ns: &Netns, args: &[&str]) -> Backend {
        let socket = Self::socket_path();
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, Self::binary()])
            .arg("--socket")
            .arg(&socket)
            .args([
                "--tap",
                "tn0",
                "--mac",
                GUEST_MAC_STR,
                "--log-level",
                "debug",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = Backend { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.socket.exists() {
            if let Some(st) = b.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = b.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("tern-net exited early: {st}: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "tern-net did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        b
    }

    /// SIGTERM, wait, and return its stderr.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = self.child.wait();
        err
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Namespace + backend + configured tap + connected frontend.
fn setup(args: &[&str], o: &NetOptions) -> Option<(Netns, Backend, NetFrontend)> {
    let ns = Netns::new()?;
    let be = Backend::spawn(&ns, args);
    ns.configure_tap("tn0");
    let fe = NetFrontend::connect(&be.socket, o).unwrap();
    Some((ns, be, fe))
}

/// Receive frames on `pair` (reposting a `size`-byte buffer for each one
/// used, answering ARP requests for the guest) until `want` accepts one.
fn recv_until(
    fe: &mut NetFrontend,
    pair: usize,
    size: u32,
    want: impl Fn(&RxFrame) -> bool,
) -> RxFrame {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = fe.recv(pair, left).expect("expected frame not received");
        fe.post_rx(pair, f.used_lens.len(), size, true);
        if want(&f) {
            return f;
        }
        if let Some((1, mac, ip, _, GUEST_IP)) = pkt::parse_arp(&f.data) {
            fe.send(pair, &pkt::arp(2, mac, GUEST_MAC, GUEST_IP, mac, ip));
        }
    }
}

/// ARP for the host from the guest; returns the tap's MAC.
fn resolve_host(fe: &mut NetFrontend, pair: usize, size: u32) -> [u8; 6] {
    let u = fe.send(pair, &pkt::arp_request(GUEST_MAC, GUEST_IP, HOST_IP));
    assert_eq!(u.len, 0);
    let f = recv_until(fe, pair, size, |f| {
        matches!(pkt::parse_arp(&f.data), Some((2, _, HOST_IP, _, _)))
    });
    let (_, host_mac, _, target_mac, target_ip) = pkt::parse_arp(&f.data).unwrap();
    assert_eq!(target_mac, GUEST_MAC);
    assert_eq!(target_ip, GUEST_IP);
    assert_eq!(&f.data[0..6], &GUEST_MAC, "reply is unicast to the guest");
    host_mac
}

/// Ping the host on `pair` and check the reply (checksums, id, payload).
fn ping(
    fe: &mut NetFrontend,
    pair: usize,
    size: u32,
    host_mac: [u8; 6],
    id: u16,
    len: usize,
) -> RxFrame {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + usize::from(id)) as u8).collect();
    let req = pkt::ipv4(
        host_mac,
        GUEST_MAC,
        GUEST_IP,
        HOST_IP,
        pkt::PROTO_ICMP,
        &pkt::icmp_echo(8, id, 1, &data),
    );
    fe.send(pair, &req);
    let f = recv_until(fe, pair, size, |f| {
        pkt::parse_ipv4(&f.data).is_some_and(|ip| {
            ip.proto == pkt::PROTO_ICMP
                && ip.payload.len() >= 8
                && ip.payload[0] == 0
                && u16::from_be_bytes([ip.payload[4], ip.payload[5]]) == id
        })
    });
    check_echo_reply(&f, id, &data);
    f
}

fn check_echo_reply(f: &RxFrame, id: u16, data: &[u8]) {
    let ip = pkt::parse_ipv4(&f.data).unwrap();
    assert!(ip.header_ok, "IP header checksum");
    assert_eq!((ip.src, ip.dst), (HOST_IP, GUEST_IP));
    assert_eq!(inet_checksum(ip.payload, 0), 0, "ICMP checksum");
    assert_eq!(u16::from_be_bytes([ip.payload[4], ip.payload[5]]), id);
    assert_eq!(&ip.payload[8..], data, "echo payload");
}

fn default_opts() -> NetOptions {
    NetOptions::default()
}

#[test]
fn config_arp_icmp_udp() {
    let Some((ns, be, mut fe)) = setup(&["--mtu", "1500"], &default_opts()) else {
        return;
    };
    // Configuration space and features.
    assert_eq!(fe.mac(), GUEST_MAC);
    let cfg = fe.config(0, 12);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "status LINK_UP");
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        1,
        "max_virtqueue_pairs"
    );
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500, "mtu");
    assert!(fe.has(feat::VERSION_1 | feat::MAC | feat::STATUS | feat::MTU | feat::CTRL_VQ));
    assert!(!fe.has(feat::MQ), "MQ with one pair");
    assert!(fe.has(feat::EVENT_IDX));

    fe.post_rx(0, 32, 2048, true);
    let host_mac = resolve_host(&mut fe, 0, 2048);
    let f = ping(&mut fe, 0, 2048, host_mac, 0x4242, 56);
    assert_eq!(f.num_buffers, 1, "num_buffers is 1 without MRG_RXBUF");

    // UDP to a socket in the namespace, echoed back reversed.
    let (tx, rx) = mpsc::channel();
    let server = ns.spawn(move || {
        let s = UdpSocket::bind("10.77.0.1:7777").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        let mut reply = buf[..n].to_vec();
        reply.reverse();
        s.send_to(&reply, from).unwrap();
        (buf[..n].to_vec(), from)
    });
    rx.recv_timeout(T).unwrap();
    let msg = b"hello from the guest".to_vec();
    let udp = pkt::udp(GUEST_IP, HOST_IP, 4000, 7777, &msg);
    fe.send(
        0,
        &pkt::ipv4(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, pkt::PROTO_UDP, &udp),
    );
    let (got, from) = server.join().unwrap();
    assert_eq!(got, msg);
    assert_eq!(from.to_string(), "10.77.0.2:4000");
    let f = recv_until(&mut fe, 0, 2048, |f| {
        pkt::parse_ipv4(&f.data).is_some_and(|ip| ip.proto == pkt::PROTO_UDP)
    });
    let ip = pkt::parse_ipv4(&f.data).unwrap();
    assert!(ip.header_ok);
    let u = ip.payload;
    assert_eq!(u16::from_be_bytes([u[0], u[1]]), 7777);
    assert_eq!(u16::from_be_bytes([u[2], u[3]]), 4000);
    let sum = pkt::pseudo_sum(ip.src, ip.dst, pkt::PROTO_UDP, u.len() as u16);
    assert_eq!(inet_checksum(u, sum), 0, "UDP checksum");
    let mut want = msg.clone();
    want.reverse();
    assert_eq!(&u[8..], &want[..]);

    drop(fe);
    let err = be.stop();
    assert!(err.contains("drops=0"), "{err}");
    assert!(err.contains("malformed=0"), "{err}");
}

#[test]
fn mergeable_rx_buffers() {
    let o = NetOptions {
        features: default_opts().features | feat::MRG_RXBUF,
        ..default_opts()
    };
    let Some((_ns, _be, mut fe)) = setup(&[], &o) else {
        return;
    };
    assert!(fe.has(feat::MRG_RXBUF));
    // 256-byte buffers: a 1500-byte frame needs six of them.
    fe.post_rx(0, 64, 256, true);
    let host_mac = resolve_host(&mut fe, 0, 256);
    let f = ping(&mut fe, 0, 256, host_mac, 7, 1500 - 28);
    assert_eq!(f.data.len(), 1514);
    assert!(f.num_buffers > 1, "num_buffers {}", f.num_buffers);
    assert_eq!(usize::from(f.num_buffers), f.used_lens.len());
    assert_eq!(f.used_lens.iter().sum::<u32>(), 12 + 1514);
    assert!(f.used_lens[..f.used_lens.len() - 1]
        .iter()
        .all(|&l| l == 256));
}

#[test]
fn back_pressure_keeps_frames() {
    let o = NetOptions {
        features: default_opts().features & !feat::EVENT_IDX,
        ..default_opts()
    };
    let Some((ns, be, mut fe)) = setup(&[], &o) else {
        return;
    };
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        GUEST_MAC_STR,
        "dev",
        "tn0",
        "nud",
        "permanent",
    ]);
    // No rx buffers posted: frames from the namespace must wait in the tap.
    const N: usize = 8;
    ns.spawn(|| {
        let s = UdpSocket::bind("10.77.0.1:6000").unwrap();
        for i in 0..N {
            s.send_to(format!("frame-{i}").as_bytes(), "10.77.0.2:5000")
                .unwrap();
        }
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(fe.recv(0, Duration::from_millis(100)).is_none());
    // Now post buffers a few at a time: every frame arrives, in order.
    let mut got = Vec::new();
    while got.len() < N {
        fe.post_rx(0, 3, 2048, true);
        for _ in 0..3 {
            let Some(f) = fe.recv(0, T) else { break };
            let ip = pkt::parse_ipv4(&f.data).expect("IPv4");
            assert_eq!(ip.proto, pkt::PROTO_UDP);
            got.push(String::from_utf8_lossy(&ip.payload[8..]).into_owned());
            if got.len() == N {
                break;
            }
        }
    }
    let want: Vec<String> = (0..N).map(|i| format!("frame-{i}")).collect();
    assert_eq!(got, want);
    drop(fe);
    let err = be.stop();
    assert!(err.contains("drops=0"), "{err}");
    eprintln!("{err}");
    assert!(err.contains("stalls="), "{err}");
}

#[test]
fn two_queue_pairs() {
    let Some((ns, _be, mut fe)) = setup(&["--queues", "2"], &default_opts()) else {
        return;
    };
    assert!(fe.has(feat::MQ | feat::CTRL_VQ));
    assert_eq!(fe.pairs, 2);
    let cfg = fe.config(8, 2);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 2);
    // Control queue: VQ_PAIRS_SET 2 accepted, 3 and 0 refused, RX mode accepted.
    assert_eq!(
        fe.ctrl(
            feat::CTRL_MQ,
            feat::CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        (feat::OK, 1)
    );
    assert_eq!(
        fe.ctrl(
            feat::CTRL_MQ,
            feat::CTRL_MQ_VQ_PAIRS_SET,
            &3u16.to_le_bytes()
        )
        .0,
        feat::ERR
    );
    assert_eq!(
        fe.ctrl(
            feat::CTRL_MQ,
            feat::CTRL_MQ_VQ_PAIRS_SET,
            &0u16.to_le_bytes()
        )
        .0,
        feat::ERR
    );
    assert_eq!(fe.ctrl(feat::CTRL_RX, 0, &[1]).0, feat::OK);
    assert_eq!(fe.ctrl(42, 0, &[]).0, feat::ERR);

    fe.post_rx(0, 32, 2048, true);
    fe.post_rx(1, 32, 2048, true);
    // TX on each pair: ARP then pings; the tap steers each flow's replies
    // to the queue it was sent on.
    let mut host_mac = None;
    for pair in 0..2 {
        fe.send(pair, &pkt::arp_request(GUEST_MAC, GUEST_IP, HOST_IP));
        let f = recv_any(&mut fe, |f| {
            matches!(pkt::parse_arp(&f.data), Some((2, _, HOST_IP, _, _)))
        });
        host_mac = Some(pkt::parse_arp(&f.1.data).unwrap().1);
    }
    let host_mac = host_mac.unwrap();
    let mut per_queue = [0usize; 2];
    for pair in 0..2 {
        for k in 0..4u16 {
            let id = 100 * (pair as u16 + 1) + k;
            let data = vec![id as u8; 32];
            let req = pkt::ipv4(
                host_mac,
                GUEST_MAC,
                GUEST_IP,
                HOST_IP,
                pkt::PROTO_ICMP,
                &pkt::icmp_echo(8, id, 1, &data),
            );
            fe.send(pair, &req);
            let (q, f) = recv_any(&mut fe, |f| {
                pkt::parse_ipv4(&f.data).is_some_and(|ip| {
                    ip.proto == pkt::PROTO_ICMP
                        && u16::from_be_bytes([ip.payload[4], ip.payload[5]]) == id
                })
            });
            check_echo_reply(&f, id, &data);
            per_queue[q] += 1;
        }
    }
    // Traffic from the namespace on many flows reaches both rx queues.
    ns.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        GUEST_MAC_STR,
        "dev",
        "tn0",
        "nud",
        "permanent",
    ]);
    ns.spawn(|| {
        for port in 0..32u16 {
            let s = UdpSocket::bind(("10.77.0.1", 20000 + port)).unwrap();
            s.send_to(b"flow", ("10.77.0.2", 30000 + port)).unwrap();
        }
    })
    .join()
    .unwrap();
    let mut udp = 0;
    while udp < 32 {
        let (q, _) = recv_any(&mut fe, |f| {
            pkt::parse_ipv4(&f.data).is_some_and(|ip| ip.proto == pkt::PROTO_UDP)
        });
        per_queue[q] += 1;
        udp += 1;
    }
    eprintln!("rx frames per queue: {per_queue:?}");
    assert!(
        per_queue[0] > 0 && per_queue[1] > 0,
        "rx per queue {per_queue:?}"
    );
}

/// Receive on whichever rx queue has a frame accepted by `want`.
fn recv_any(fe: &mut NetFrontend, want: impl Fn(&RxFrame) -> bool) -> (usize, RxFrame) {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        for pair in 0..fe.pairs {
            if let Some(f) = fe.recv(pair, Duration::from_millis(20)) {
                fe.post_rx(pair, f.used_lens.len(), 2048, true);
                if want(&f) {
                    return (pair, f);
                }
            }
        }
    }
    panic!("expected frame not received");
}

#[test]
fn malformed_chains_do_not_kill_the_backend() {
    let Some((_ns, mut be, mut fe)) = setup(&[], &default_opts()) else {
        return;
    };
    let buf = fe.alloc(4096);
    fe.poke(buf + 12, &pkt::arp_request(GUEST_MAC, GUEST_IP, HOST_IP));
    let rd = |addr, len| Desc {
        addr,
        len,
        write: false,
    };
    let wr = |addr, len| Desc {
        addr,
        len,
        write: true,
    };
    // Header descriptor shorter than the virtio-net header.
    assert_eq!(fe.send_raw(0, &[rd(buf, 4), rd(buf + 12, 42)]).len, 0);
    // Device-writable descriptor in a tx chain.
    assert_eq!(fe.send_raw(0, &[rd(buf, 12), wr(buf + 12, 42)]).len, 0);
    // Address outside guest memory.
    assert_eq!(fe.send_raw(0, &[rd(buf, 12), rd(0x7000_0000, 42)]).len, 0);
    // Frame shorter than an Ethernet header.
    assert_eq!(fe.send_raw(0, &[rd(buf, 12), rd(buf + 12, 6)]).len, 0);
    assert!(be.is_running());

    // A read-only rx buffer is returned empty; the frame waits for a good one.
    let bad = fe.post_rx_raw(0, &[rd(buf + 2048, 2048)]);
    fe.send(0, &pkt::arp_request(GUEST_MAC, GUEST_IP, HOST_IP));
    let u = fe.wait_rx_used(0, T).expect("malformed rx chain returned");
    assert_eq!((u.id, u.len), (bad, 0));
    fe.post_rx(0, 16, 2048, true);
    let host_mac = resolve_host(&mut fe, 0, 2048);
    ping(&mut fe, 0, 2048, host_mac, 9, 100);
    assert!(be.is_running());
    drop(fe);
    let err = be.stop();
    assert!(err.contains("malformed=5"), "{err}");
}

#[test]
fn startup_errors() {
    let Some(ns) = Netns::new() else {
        return;
    };
    let be = Backend::spawn(&ns, &[]);
    // The tap is attached to the running backend.
    let sock = Backend::socket_path();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, Backend::binary(), "--socket"])
        .arg(&sock)
        .args(["--tap", "tn0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "tern-net: tap tn0 is in use");
    // Bad MAC address.
    let out = Command::new(Backend::binary())
        .arg("--socket")
        .arg(&sock)
        .args(["--tap", "tn9", "--mac", "01:02:03:04:05:06"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("multicast"));
    assert!(!sock.exists());
    drop(be);
}

#[test]
fn keep_listening_and_sigusr1() {
    let Some(ns) = Netns::new() else {
        return;
    };
    let mut be = Backend::spawn(&ns, &["--keep-listening"]);
    ns.configure_tap("tn0");
    for round in 0..2 {
        let mut fe = NetFrontend::connect(&be.socket, &default_opts()).unwrap();
        fe.post_rx(0, 16, 2048, true);
        let host_mac = resolve_host(&mut fe, 0, 2048);
        ping(&mut fe, 0, 2048, host_mac, 300 + round, 64);
        drop(fe);
        std::thread::sleep(Duration::from_millis(100));
        assert!(be.is_running(), "still listening after round {round}");
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(be.child.id() as i32, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(100));
    let err = be.stop();
    assert!(err.matches("tx: frames=").count() >= 3, "{err}");
}

#[test]
fn guest_csum_offload_reaches_the_tap() {
    let o = NetOptions {
        features: default_opts().features | feat::GUEST_CSUM | feat::GUEST_TSO4 | feat::CSUM,
        ..default_opts()
    };
    let Some((ns, _be, mut fe)) = setup(&[], &o) else {
        return;
    };
    assert!(fe.has(feat::GUEST_CSUM | feat::GUEST_TSO4 | feat::CSUM));
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        GUEST_MAC_STR,
        "dev",
        "tn0",
        "nud",
        "permanent",
    ]);
    fe.post_rx(0, 16, 65562, true);
    ns.spawn(|| {
        let s = UdpSocket::bind("10.77.0.1:6001").unwrap();
        s.send_to(&[7u8; 100], "10.77.0.2:5001").unwrap();
    })
    .join()
    .unwrap();
    let f = recv_until(&mut fe, 0, 65562, |f| {
        pkt::parse_ipv4(&f.data).is_some_and(|ip| ip.proto == pkt::PROTO_UDP)
    });
    // TUNSETOFFLOAD(TUN_F_CSUM) took effect: the kernel leaves the UDP
    // checksum to the guest (VIRTIO_NET_HDR_F_NEEDS_CSUM with start/offset).
    assert_eq!(f.hdr[0] & 1, 1, "NEEDS_CSUM, header {:?}", f.hdr);
    let start = u16::from_le_bytes([f.hdr[6], f.hdr[7]]);
    let offset = u16::from_le_bytes([f.hdr[8], f.hdr[9]]);
    assert_eq!((start, offset), (14 + 20, 6));
}
