//! `tern-bench net`: the data path of `tern-net`, driven directly over
//! vhost-user (no guest: on a software-KVM host in-guest networking would
//! measure the instruction emulator), against the same UDP traffic between
//! two host sockets over a veth pair. See tools/bench/README.md.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_vhost_driver::net::{feat, pkt, tso4_hdr, NetFrontend, NetOptions, HDR_LEN};
use tern_vhost_driver::{Desc, QueueDriver};

use crate::flags::{number, Flags};
use crate::report::Machine;

pub const USAGE: &str = "\
usage: tern-bench net [--seconds N] [--tern-net PATH] [--json PATH] [--no-mq]

Drives tern-net's data path directly as a vhost-user frontend (memfd guest
memory, split virtqueues, one driver thread per queue pair) on a tap in a
network namespace this program creates and deletes, and sends the same UDP
traffic between host sockets over a veth pair between two namespaces:

  guest->host: the frontend sends UDP frames from 10.88.0.2 to sink sockets
               on the tap's 10.88.0.1 (veth: sender socket -> sink socket)
  host->guest: sender sockets in the namespace send UDP to 10.88.0.2; the
               frontend receives the frames (veth: the reverse direction)

with 64-byte and 1472-byte UDP payloads, and guest->host TCP in 64 KiB
frames the device segments (TSO: virtio-net header with NEEDS_CSUM and
gso_type TCPV4, HOST_TSO4 negotiated; the frontend runs a minimal TCP
sender: handshake, window, go-back-N) against a TCP stream of 64 KiB writes
over the veth pair; 1 queue pair and 4 pairs (one flow per pair) unless
--no-mq. Rates count what arrived at the receiving end (sink socket, or the
frontend's rx queue); Gbit/s is UDP/TCP payload; TCP pkt/s are 64 KiB
frames.

  --seconds N        seconds per measurement (default 5), after 0.5 s warm-up
  --tern-net PATH    backend to measure (default: tern-net next to this
                     program, i.e. target/release/tern-net)
  --json PATH        also write the results as JSON
  --no-mq            skip the 4-queue-pair measurements
  --case TEXT        only the cases whose key contains TEXT (repeatable;
                     keys: g2h_udp64_1q, h2g_udp1472_4q, g2h_tcp_tso64k_1q, ...)

Needs root (ip netns, CAP_NET_ADMIN) and iproute2.
";

/// The target: tern-net Gbit/s >= 70% of veth for large frames.
const TARGET_LARGE_GBPS: f64 = 0.70;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x88, 0x00, 0x02];
const GUEST_MAC_STR: &str = "52:54:00:88:00:02";
const GUEST_IP: [u8; 4] = [10, 88, 0, 2];
const HOST_IP: [u8; 4] = [10, 88, 0, 1];
/// Entries per virtqueue.
const QUEUE_SIZE: u16 = 256;
/// Bytes per tx frame slot and per rx buffer.
const BUF: u32 = 2048;
/// UDP ports: flow i goes to SINK_PORT + i from SRC_PORT + i.
const SINK_PORT: u16 = 9000;
const SRC_PORT: u16 = 7000;
/// Queue pairs of the multi-queue cases.
const MQ_PAIRS: usize = 4;
/// TCP payload of one TSO frame: 44 segments of TSO_MSS bytes (64 KiB
/// frames: 64294 bytes with the headers).
const TSO_PAYLOAD: usize = 44 * TSO_MSS as usize;
const TSO_MSS: u16 = 1460;
/// Ethernet + IPv4 + TCP (no options) of a TSO frame.
const TSO_HDR: usize = 14 + 20 + 20;
const WARMUP: Duration = Duration::from_millis(500);
/// Ethernet + IPv4 + UDP headers.
const L2_L4: usize = 14 + 20 + 8;

pub struct Options {
    tern_net: PathBuf,
    seconds: u64,
    json: Option<PathBuf>,
    mq: bool,
    /// Only cases whose key contains one of these.
    cases: Vec<String>,
}

/// `tern-bench net ARGS...`.
pub fn main(it: impl Iterator<Item = OsString>) -> Result<(), String> {
    match parse(it)? {
        Some(o) => run(&o),
        None => {
            print!("{USAGE}");
            Ok(())
        }
    }
}

/// Reads `tern-bench net`'s options; `None` for `--help`.
pub fn parse(it: impl Iterator<Item = OsString>) -> Result<Option<Options>, String> {
    let mut o = Options {
        tern_net: PathBuf::new(),
        seconds: 5,
        json: None,
        mq: true,
        cases: Vec::new(),
    };
    let mut tern_net = None;
    let mut args = Flags::new(it);
    while let Some((flag, inline, arg)) = args.next()? {
        let mut value = || args.value_os(&flag, &inline);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => o.seconds = number(&flag, value()?, 1)?,
            "--tern-net" => tern_net = Some(PathBuf::from(value()?)),
            "--json" => o.json = Some(PathBuf::from(value()?)),
            "--no-mq" => o.mq = false,
            "--case" => o.cases.push(value()?.to_string_lossy().into_owned()),
            _ => {
                return Err(format!(
                    "unknown option '{arg}' (see tern-bench net --help)"
                ))
            }
        }
    }
    o.tern_net = match tern_net {
        Some(p) => p,
        None => crate::exe_dir()?.join("tern-net"),
    };
    Ok(Some(o))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    GuestToHost,
    HostToGuest,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::GuestToHost => "guest->host",
            Dir::HostToGuest => "host->guest",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Dir::GuestToHost => "g2h",
            Dir::HostToGuest => "h2g",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy)]
struct Case {
    dir: Dir,
    /// UDP payload bytes, or TCP payload per TSO frame (`tcp`).
    payload: usize,
    pairs: usize,
    /// TCP in TSO frames (guest->host only) instead of UDP.
    tcp: bool,
}

impl Case {
    fn key(&self) -> String {
        if self.tcp {
            format!("{}_tcp_tso64k_{}q", self.dir.key(), self.pairs)
        } else {
            format!("{}_udp{}_{}q", self.dir.key(), self.payload, self.pairs)
        }
    }
    fn name(&self) -> String {
        if self.tcp {
            format!("{} TCP TSO 64KiB {}q", self.dir.name(), self.pairs)
        } else {
            format!("{} UDP {}B {}q", self.dir.name(), self.payload, self.pairs)
        }
    }
    /// Whether the large-frame target applies.
    fn large(&self) -> bool {
        self.payload >= 1472
    }
}

/// The outcome of one measurement.
#[derive(Clone, Debug, Default)]
struct Res {
    /// Packets per second that arrived.
    pps: f64,
    /// UDP payload Gbit/s that arrived.
    gbps: f64,
    /// Packets per second the sending side got out (frames completed by
    /// tern-net / datagrams accepted by send()).
    sent_pps: f64,
    packets: u64,
    seconds: f64,
}

impl Res {
    fn json(&self) -> Value {
        json!({
            "packets_per_s": self.pps,
            "gbit_per_s": self.gbps,
            "sent_packets_per_s": self.sent_pps,
            "packets": self.packets,
            "seconds": self.seconds,
        })
    }
}

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Result<Netns, String> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip netns add {name}: {} (needs root)",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Netns { name };
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Run a command inside the namespace; returns its stdout.
    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .map_err(|e| format!("ip netns exec: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "in netns {}: {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run `f` on a thread inside the namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> JoinHandle<Result<T, String>> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns on a valid namespace fd; affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
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
    fn spawn(binary: &Path, ns: &Netns, pairs: usize) -> Result<Backend, String> {
        let socket = std::env::temp_dir().join(format!(
            "tern-bench-net-{}-{pairs}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary)
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", "tb0", "--mac", GUEST_MAC_STR, "--queues"])
            .arg(pairs.to_string())
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut b = Backend { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.socket.exists() {
            if let Ok(Some(st)) = b.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = b.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("tern-net exited early: {st}: {}", err.trim()));
            }
            if Instant::now() > deadline {
                return Err("tern-net did not create its socket within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(b)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: signalling our own child (ip netns exec execs tern-net).
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Shared counters of one measurement.
#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    /// Packets / payload bytes that arrived at the receiving end.
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    /// Packets the sending end got out.
    tx_packets: AtomicU64,
    /// TCP over tern-net: go-back-N rounds (3 duplicate ACKs, or 200 ms
    /// without a new ACK), and the
    /// largest send window seen (bytes).
    tcp_gobacks: AtomicU64,
    tcp_max_window: AtomicU64,
    /// TCP segments from the sink that arrived on another pair's rx queue.
    tcp_other_queue: AtomicU64,
}

/// Sample the counters after the warm-up and after `seconds`, then stop.
fn measure(c: &Counters, seconds: u64) -> Res {
    std::thread::sleep(WARMUP);
    let t0 = Instant::now();
    let (p0, b0, s0) = (
        c.rx_packets.load(Ordering::Relaxed),
        c.rx_bytes.load(Ordering::Relaxed),
        c.tx_packets.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (p1, b1, s1) = (
        c.rx_packets.load(Ordering::Relaxed),
        c.rx_bytes.load(Ordering::Relaxed),
        c.tx_packets.load(Ordering::Relaxed),
    );
    let secs = t0.elapsed().as_secs_f64();
    c.stop.store(true, Ordering::Relaxed);
    Res {
        pps: (p1 - p0) as f64 / secs,
        gbps: (b1 - b0) as f64 * 8.0 / secs / 1e9,
        sent_pps: (s1 - s0) as f64 / secs,
        packets: p1 - p0,
        seconds: secs,
    }
}

/// A UDP sink: counts datagrams of `payload` bytes until stopped.
fn sink(sock: UdpSocket, payload: usize, c: Arc<Counters>) -> Result<(), String> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    while !c.stop.load(Ordering::Relaxed) {
        if let Ok(n) = sock.recv(&mut buf) {
            if n == payload {
                c.rx_packets.fetch_add(1, Ordering::Relaxed);
                c.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// A UDP sender: sends `payload`-byte datagrams as fast as send() takes them.
fn sender(sock: UdpSocket, payload: usize, c: Arc<Counters>) -> Result<(), String> {
    let buf = vec![0x5au8; payload];
    let mut n = 0u64;
    while !c.stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            if sock.send(&buf).is_ok() {
                n += 1;
            }
        }
        c.tx_packets
            .fetch_add(std::mem::take(&mut n), Ordering::Relaxed);
    }
    Ok(())
}

/// A TCP sink: accepts one connection and counts the bytes read until stopped.
fn tcp_sink(listener: TcpListener, c: Arc<Counters>) -> Result<(), String> {
    use std::io::Read as _;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if c.stop.load(Ordering::Relaxed) {
                    return Err("tcp sink: no connection".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 18];
    while !c.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                c.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            // The sender resets the connection once the run is over.
            Err(_) if c.stop.load(Ordering::Relaxed) => break,
            Err(e) => return Err(format!("tcp sink read: {e}")),
        }
    }
    Ok(())
}

/// A TCP sender: writes `chunk`-byte buffers as fast as the stream takes
/// them; counts chunks.
fn tcp_sender(mut stream: TcpStream, chunk: usize, c: Arc<Counters>) -> Result<(), String> {
    stream
        .set_write_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let buf = vec![0xa5u8; chunk];
    let mut bytes = 0u64;
    while !c.stop.load(Ordering::Relaxed) {
        match stream.write(&buf) {
            Ok(n) => bytes += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(format!("tcp write: {e}")),
        }
        if bytes >= chunk as u64 {
            c.tx_packets
                .fetch_add(bytes / chunk as u64, Ordering::Relaxed);
            bytes %= chunk as u64;
        }
    }
    Ok(())
}

fn join_all(hs: Vec<JoinHandle<Result<(), String>>>) -> Result<(), String> {
    for h in hs {
        h.join().map_err(|_| "thread panicked".to_string())??;
    }
    Ok(())
}

// ---------------------------------------------------------------- tern-net

/// Per-pair driver state kept across measurements.
struct PairState {
    /// tx: frame slot gpa (header at +0, frame at +16).
    tx_slots: Vec<u64>,
    /// rx: buffer gpa per descriptor (head == slot).
    rx_bufs: Vec<u64>,
    rx_posted: bool,
    /// TSO: the TCP payload every frame carries (shared, read-only).
    tso_payload: u64,
    /// TSO: per-chain header area (virtio-net header at +0, Ethernet/IP/TCP
    /// headers at +16); chain k uses descriptors 3k..3k+2.
    tso_slots: Vec<u64>,
}

/// A tern-net instance with `pairs` queue pairs and a connected frontend.
struct TernNet {
    ns: Netns,
    _backend: Backend,
    fe: NetFrontend,
    host_mac: [u8; 6],
    state: Vec<PairState>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC '{}'", s.trim()))?;
    v.try_into().map_err(|_| format!("bad MAC '{}'", s.trim()))
}

impl TernNet {
    fn start(binary: &Path, pairs: usize) -> Result<TernNet, String> {
        let ns = Netns::new(format!("tern-bench-{}", std::process::id()))?;
        let backend = Backend::spawn(binary, &ns, pairs)?;
        ns.exec(&["ip", "addr", "add", "10.88.0.1/24", "dev", "tb0"])?;
        ns.exec(&["ip", "link", "set", "tb0", "up"])?;
        ns.exec(&[
            "ip",
            "neigh",
            "replace",
            "10.88.0.2",
            "lladdr",
            GUEST_MAC_STR,
            "dev",
            "tb0",
            "nud",
            "permanent",
        ])?;
        let host_mac = parse_mac(&ns.exec(&["cat", "/sys/class/net/tb0/address"])?)?;
        let mut fe = NetFrontend::connect(
            &backend.socket,
            &NetOptions {
                queue_size: QUEUE_SIZE,
                // CSUM + HOST_TSO4: the guest may hand over 64 KiB TCP frames.
                features: NetOptions::default().features | feat::CSUM | feat::HOST_TSO4,
                ..NetOptions::default()
            },
        )?;
        if fe.pairs != pairs {
            return Err(format!(
                "tern-net has {} queue pairs, wanted {pairs}",
                fe.pairs
            ));
        }
        if pairs > 1 {
            let (ack, _) = fe.ctrl(
                feat::CTRL_MQ,
                feat::CTRL_MQ_VQ_PAIRS_SET,
                &(pairs as u16).to_le_bytes(),
            );
            if ack != feat::OK {
                return Err(format!("VQ_PAIRS_SET {pairs} refused"));
            }
        }
        let mut state = Vec::new();
        for _ in 0..pairs {
            // Two descriptors per tx frame: header, frame.
            let tx_slots = (0..QUEUE_SIZE / 2)
                .map(|_| fe.alloc(u64::from(16 + BUF)))
                .collect();
            let rx_bufs = (0..QUEUE_SIZE).map(|_| fe.alloc(u64::from(BUF))).collect();
            let tso_payload = fe.alloc(TSO_PAYLOAD as u64);
            fe.poke(tso_payload, &vec![0xa5; TSO_PAYLOAD]);
            let tso_slots = (0..QUEUE_SIZE / 3).map(|_| fe.alloc(128)).collect();
            state.push(PairState {
                tx_slots,
                rx_bufs,
                rx_posted: false,
                tso_payload,
                tso_slots,
            });
        }
        Ok(TernNet {
            ns,
            _backend: backend,
            fe,
            host_mac,
            state,
        })
    }

    fn run(&mut self, case: &Case, seconds: u64) -> Result<Res, String> {
        let c = Arc::new(Counters::default());
        let pairs = case.pairs;
        // Host-side sockets in the namespace.
        let mut host = Vec::new();
        for i in 0..pairs as u16 {
            let c2 = c.clone();
            let payload = case.payload;
            host.push(match case.dir {
                Dir::GuestToHost if case.tcp => self.ns.spawn(move || {
                    let l = TcpListener::bind(("10.88.0.1", SINK_PORT + i))
                        .map_err(|e| format!("bind tcp sink: {e}"))?;
                    tcp_sink(l, c2)
                }),
                Dir::GuestToHost => self.ns.spawn(move || {
                    let s = UdpSocket::bind(("10.88.0.1", SINK_PORT + i))
                        .map_err(|e| format!("bind sink: {e}"))?;
                    sink(s, payload, c2)
                }),
                Dir::HostToGuest => self.ns.spawn(move || {
                    let s = UdpSocket::bind(("10.88.0.1", SRC_PORT + i))
                        .map_err(|e| format!("bind sender: {e}"))?;
                    s.connect(("10.88.0.2", SINK_PORT + i))
                        .map_err(|e| format!("connect: {e}"))?;
                    sender(s, payload, c2)
                }),
            });
        }
        // Give the sinks time to bind before frames arrive.
        std::thread::sleep(Duration::from_millis(50));
        let mem = &self.fe.mem;
        let host_mac = self.host_mac;
        if case.tcp && !self.fe.has(feat::HOST_TSO4 | feat::CSUM) {
            c.stop.store(true, Ordering::Relaxed);
            let _ = join_all(host);
            return Err("tern-net did not offer HOST_TSO4 and CSUM (tap without TSO?)".into());
        }
        let run_id = TCP_RUNS.fetch_add(1, Ordering::Relaxed);
        let mut queues: Vec<_> = self.fe.queues.iter_mut().take(2 * pairs).collect();
        let (res, outs) = std::thread::scope(|sc| {
            let mut hs = Vec::new();
            let mut it = queues.iter_mut();
            for (i, st) in self.state.iter_mut().enumerate() {
                let rxq = it.next().unwrap();
                let txq = it.next().unwrap();
                let c = &c;
                let case = *case;
                hs.push(sc.spawn(move || match case.dir {
                    Dir::GuestToHost if case.tcp => {
                        let ports = (
                            TCP_SRC_PORT + (run_id as usize * 8 + i) as u16,
                            SINK_PORT + i as u16,
                        );
                        let rx = QueueDriver::new(mem, rxq);
                        let tx = QueueDriver::new(mem, txq);
                        tcp_tso_loop(rx, tx, mem, st, host_mac, ports, c)
                    }
                    Dir::GuestToHost => {
                        let frame = pkt::ipv4(
                            host_mac,
                            GUEST_MAC,
                            GUEST_IP,
                            HOST_IP,
                            pkt::PROTO_UDP,
                            &pkt::udp(
                                GUEST_IP,
                                HOST_IP,
                                SRC_PORT + i as u16,
                                SINK_PORT + i as u16,
                                &vec![0xa5; case.payload],
                            ),
                        );
                        let qd = QueueDriver::new(mem, txq);
                        tx_loop(qd, mem, &st.tx_slots, &frame, c)
                    }
                    Dir::HostToGuest => {
                        let qd = QueueDriver::new(mem, rxq);
                        rx_loop(qd, st, case.payload, c)
                    }
                }));
            }
            let res = measure(c.as_ref(), seconds);
            if case.tcp {
                eprintln!(
                    "  (tern-net TCP: {} go-back-N rounds, largest window {} KiB, {} segments \
                     on another pair's queue)",
                    c.tcp_gobacks.load(Ordering::Relaxed),
                    c.tcp_max_window.load(Ordering::Relaxed) / 1024,
                    c.tcp_other_queue.load(Ordering::Relaxed)
                );
            }
            let outs: Vec<Result<(), String>> = hs
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("driver thread panicked".into()))
                })
                .collect();
            (res, outs)
        });
        c.stop.store(true, Ordering::Relaxed);
        let host_res = join_all(host);
        for o in outs {
            o?;
        }
        host_res?;
        Ok(res)
    }
}

/// TCP source ports of the driver's connections: fresh ones per run.
static TCP_RUNS: AtomicU64 = AtomicU64::new(0);
const TCP_SRC_PORT: u16 = 20000;
/// Unacknowledged bytes at most, whatever the sink's window says (a fixed
/// congestion window): sent in one burst, a 30 MiB window overruns the
/// sink socket's backlog while it copies out, and go-back-N follows.
const TCP_MAX_FLIGHT: u32 = 4 << 20;

/// Post every rx buffer once (descriptor h = buffer h).
fn post_rx_once(qd: &mut QueueDriver<'_>, st: &mut PairState) {
    if st.rx_posted {
        return;
    }
    for (h, &gpa) in st.rx_bufs.iter().enumerate() {
        qd.set_desc(
            h as u16,
            Desc {
                addr: gpa,
                len: BUF,
                write: true,
            },
            None,
        );
        qd.push(h as u16);
    }
    qd.commit();
    st.rx_posted = true;
}

/// `a` after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Ethernet + IPv4 header + `tcp` (header, and payload if any) of a frame
/// whose IP packet carries `data_len` more bytes after `tcp`.
fn tcp_frame(host_mac: [u8; 6], tcp: &[u8], data_len: usize) -> Vec<u8> {
    let mut f = pkt::ipv4(host_mac, GUEST_MAC, GUEST_IP, HOST_IP, pkt::PROTO_TCP, tcp);
    let total = (20 + tcp.len() + data_len) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = tern_vhost_driver::net::inet_checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Put a frame on the tx queue in chain `3 * slot`: virtio-net header,
/// `frame` (both written to the slot's header area), then `payload` (gpa,
/// len) if any.
fn tso_push(
    tx: &mut QueueDriver<'_>,
    mem: &tern_vhost_driver::vm_memory::GuestMemoryMmap,
    slot: usize,
    area: u64,
    vnet: &[u8; HDR_LEN],
    frame: &[u8],
    payload: Option<(u64, u32)>,
) -> Result<(), String> {
    use tern_vhost_driver::vm_memory::{Bytes, GuestAddress};
    assert!(frame.len() <= 128 - 16);
    mem.write_slice(vnet, GuestAddress(area))
        .map_err(|e| e.to_string())?;
    mem.write_slice(frame, GuestAddress(area + 16))
        .map_err(|e| e.to_string())?;
    let h = 3 * slot as u16;
    let rd = |addr, len| Desc {
        addr,
        len,
        write: false,
    };
    tx.set_desc(h, rd(area, HDR_LEN as u32), Some(h + 1));
    match payload {
        Some((gpa, len)) => {
            tx.set_desc(h + 1, rd(area + 16, frame.len() as u32), Some(h + 2));
            tx.set_desc(h + 2, rd(gpa, len), None);
        }
        None => tx.set_desc(h + 1, rd(area + 16, frame.len() as u32), None),
    }
    tx.push(h);
    Ok(())
}

/// One TCP connection from the "guest" (10.88.0.2:ports.0) to the sink
/// socket (10.88.0.1:ports.1) over tern-net: handshake (MSS 1460, window
/// scale), then 64 KiB frames with a TSO header (the kernel segments them on
/// the tap) as far as the receiver's window (and TCP_MAX_FLIGHT) allows, ACKs read from the rx
/// queue, go-back-N after 3 duplicate ACKs or 200 ms without progress; RST
/// when stopped.
fn tcp_tso_loop(
    mut rx: QueueDriver<'_>,
    mut tx: QueueDriver<'_>,
    mem: &tern_vhost_driver::vm_memory::GuestMemoryMmap,
    st: &mut PairState,
    host_mac: [u8; 6],
    ports: (u16, u16),
    c: &Counters,
) -> Result<(), String> {
    use tern_vhost_driver::vm_memory::{Bytes, GuestAddress};
    post_rx_once(&mut rx, st);
    let slots = st.tso_slots.clone();
    let mut free: Vec<usize> = (0..slots.len()).rev().collect();
    let mut in_flight = 0usize;
    let iss: u32 = 0x1000_0000 ^ (u32::from(ports.0) << 12);
    let tcp = |seq: u32, ack: u32, flags: u8| pkt::Tcp {
        sport: ports.0,
        dport: ports.1,
        seq,
        ack,
        flags,
        window: 0xffff,
    };
    // Read ACKs: (ack, window, window-scale option, flags) of each segment
    // from the sink; reposts the buffers.
    let read_acks = |rx: &mut QueueDriver<'_>| -> Vec<(pkt::Tcp, Option<u8>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; HDR_LEN + 14 + 60 + 60];
        while let Some(u) = rx.pop_used() {
            let id = usize::from(u.id);
            if id < st.rx_bufs.len() {
                let n = (u.len as usize).min(buf.len());
                if mem
                    .read_slice(&mut buf[..n], GuestAddress(st.rx_bufs[id]))
                    .is_ok()
                    && n > HDR_LEN
                {
                    if let Some(ip) = pkt::parse_ipv4(&buf[HDR_LEN..n]) {
                        if ip.proto == pkt::PROTO_TCP && ip.src == HOST_IP {
                            if let Some((t, _, ws)) = pkt::parse_tcp(ip.payload) {
                                if t.dport == ports.0 && t.sport == ports.1 {
                                    out.push((t, ws));
                                } else {
                                    c.tcp_other_queue.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
            }
            rx.push(u.id);
        }
        rx.commit();
        out
    };
    let reap = |tx: &mut QueueDriver<'_>,
                free: &mut Vec<usize>,
                in_flight: &mut usize|
     -> Result<u64, String> {
        let mut n = 0;
        while let Some(u) = tx.pop_used() {
            let k = usize::from(u.id / 3);
            if u.id % 3 != 0 || k >= slots.len() {
                return Err(format!("tx: used id {} is not a chain head", u.id));
            }
            free.push(k);
            *in_flight -= 1;
            n += 1;
        }
        Ok(n)
    };
    let zero_hdr = [0u8; HDR_LEN];

    // Handshake.
    let syn_opts = [2, 4, 0x05, 0xb4, 1, 3, 3, 7]; // MSS 1460, NOP, window scale 7
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut next_syn = Instant::now();
    let (irs, peer_ws, mut wnd) = 'hs: loop {
        if Instant::now() >= deadline {
            return Err("tcp: no SYN-ACK from the sink within 5 s".into());
        }
        reap(&mut tx, &mut free, &mut in_flight)?;
        if Instant::now() >= next_syn {
            if let Some(k) = free.pop() {
                let seg = pkt::tcp(
                    GUEST_IP,
                    HOST_IP,
                    &tcp(iss, 0, pkt::TCP_SYN),
                    &syn_opts,
                    &[],
                );
                tso_push(
                    &mut tx,
                    mem,
                    k,
                    slots[k],
                    &zero_hdr,
                    &tcp_frame(host_mac, &seg, 0),
                    None,
                )?;
                in_flight += 1;
                tx.commit();
            }
            next_syn = Instant::now() + Duration::from_millis(200);
        }
        for (t, ws) in read_acks(&mut rx) {
            if t.flags & pkt::TCP_RST != 0 {
                // The sink's socket may not be listening yet: SYN again.
                next_syn = Instant::now() + Duration::from_millis(20);
                continue;
            }
            if t.flags & (pkt::TCP_SYN | pkt::TCP_ACK) == pkt::TCP_SYN | pkt::TCP_ACK
                && t.ack == iss.wrapping_add(1)
            {
                break 'hs (t.seq, ws.unwrap_or(0).min(14), u32::from(t.window));
            }
        }
        if !rx.arm_and_check() {
            rx.wait_call(5);
        }
    };
    let rcv_nxt = irs.wrapping_add(1);
    let (mut snd_una, mut snd_nxt) = (iss.wrapping_add(1), iss.wrapping_add(1));
    let mut snd_max = snd_nxt; // highest sequence sent (go-back moves snd_nxt below it)
    let mut dup_acks = 0u32;
    // The handshake's ACK.
    while free.is_empty() {
        reap(&mut tx, &mut free, &mut in_flight)?;
    }
    let k = free.pop().unwrap();
    let seg = pkt::tcp(
        GUEST_IP,
        HOST_IP,
        &tcp(snd_nxt, rcv_nxt, pkt::TCP_ACK),
        &[],
        &[],
    );
    tso_push(
        &mut tx,
        mem,
        k,
        slots[k],
        &zero_hdr,
        &tcp_frame(host_mac, &seg, 0),
        None,
    )?;
    in_flight += 1;
    tx.commit();

    // Data.
    let vnet = tso4_hdr(TSO_HDR as u16, 14 + 20, TSO_MSS);
    let mut last_progress = Instant::now();
    let mut done = 0u64;
    loop {
        let stop = c.stop.load(Ordering::Relaxed);
        done += reap(&mut tx, &mut free, &mut in_flight)?;
        if done >= 4 {
            c.tx_packets
                .fetch_add(std::mem::take(&mut done), Ordering::Relaxed);
        }
        let mut progress = false;
        for (t, _) in read_acks(&mut rx) {
            if t.flags & pkt::TCP_RST != 0 {
                if c.stop.load(Ordering::Relaxed) {
                    break; // the sink closed first at the end of the run
                }
                return Err("tcp: reset by the sink".into());
            }
            if t.flags & pkt::TCP_ACK != 0 {
                if seq_after(t.ack, snd_una) && !seq_after(t.ack, snd_max) {
                    snd_una = t.ack;
                    if seq_after(snd_una, snd_nxt) {
                        snd_nxt = snd_una; // acked beyond a go-back point
                    }
                    progress = true;
                    dup_acks = 0;
                } else if t.ack == snd_una
                    && snd_max != snd_una
                    && u32::from(t.window) << peer_ws == wnd
                {
                    // The sink got something after a hole: after three, send
                    // again from the hole at once (fast retransmit).
                    dup_acks += 1;
                    if dup_acks == 3 {
                        snd_nxt = snd_una;
                        c.tcp_gobacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                wnd = u32::from(t.window) << peer_ws;
            }
        }
        if progress {
            last_progress = Instant::now();
        }
        if stop {
            break;
        }
        let mut sent = false;
        while !free.is_empty() && snd_nxt.wrapping_sub(snd_una) < wnd.min(TCP_MAX_FLIGHT) {
            let k = free.pop().unwrap();
            let hdr = pkt::tcp_partial(
                GUEST_IP,
                HOST_IP,
                &tcp(snd_nxt, rcv_nxt, pkt::TCP_ACK | pkt::TCP_PSH),
                TSO_PAYLOAD,
            );
            let frame = tcp_frame(host_mac, &hdr, TSO_PAYLOAD);
            tso_push(
                &mut tx,
                mem,
                k,
                slots[k],
                &vnet,
                &frame,
                Some((st.tso_payload, TSO_PAYLOAD as u32)),
            )?;
            in_flight += 1;
            snd_nxt = snd_nxt.wrapping_add(TSO_PAYLOAD as u32);
            if seq_after(snd_nxt, snd_max) {
                snd_max = snd_nxt;
            }
            sent = true;
        }
        if sent {
            tx.commit();
        }
        if snd_max != snd_una && last_progress.elapsed() > Duration::from_millis(200) {
            snd_nxt = snd_una; // go back N
            last_progress = Instant::now();
            c.tcp_gobacks.fetch_add(1, Ordering::Relaxed);
        }
        c.tcp_max_window
            .fetch_max(u64::from(wnd), Ordering::Relaxed);
        if !sent && !progress && !rx.arm_and_check() {
            tx.arm_and_check();
            rx.wait_call(1);
        }
    }
    // Drain, then reset the connection.
    let deadline = Instant::now() + Duration::from_secs(3);
    while in_flight > 0 || free.is_empty() {
        reap(&mut tx, &mut free, &mut in_flight)?;
        if Instant::now() > deadline {
            return Err(format!("tx: {in_flight} frames not completed after stop"));
        }
        if in_flight > 0 && !tx.arm_and_check() {
            tx.wait_call(10);
        }
    }
    let k = free.pop().unwrap();
    let seg = pkt::tcp(
        GUEST_IP,
        HOST_IP,
        &tcp(snd_nxt, rcv_nxt, pkt::TCP_RST),
        &[],
        &[],
    );
    tso_push(
        &mut tx,
        mem,
        k,
        slots[k],
        &zero_hdr,
        &tcp_frame(host_mac, &seg, 0),
        None,
    )?;
    tx.commit();
    let _ = tx.wait_call(100);
    Ok(())
}

/// Keep the tx queue full of `frame` until stopped, then drain.
fn tx_loop(
    mut qd: QueueDriver<'_>,
    mem: &tern_vhost_driver::vm_memory::GuestMemoryMmap,
    slots: &[u64],
    frame: &[u8],
    c: &Counters,
) -> Result<(), String> {
    use tern_vhost_driver::vm_memory::{Bytes, GuestAddress};
    let mut free: Vec<u16> = Vec::with_capacity(slots.len());
    for (s, &gpa) in slots.iter().enumerate() {
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(gpa))
            .map_err(|e| e.to_string())?;
        mem.write_slice(frame, GuestAddress(gpa + 16))
            .map_err(|e| e.to_string())?;
        let h = 2 * s as u16;
        qd.set_desc(
            h,
            Desc {
                addr: gpa,
                len: HDR_LEN as u32,
                write: false,
            },
            Some(h + 1),
        );
        qd.set_desc(
            h + 1,
            Desc {
                addr: gpa + 16,
                len: frame.len() as u32,
                write: false,
            },
            None,
        );
        free.push(h);
    }
    let mut sent = 0u64;
    let mut in_flight = 0usize;
    loop {
        let stop = c.stop.load(Ordering::Relaxed);
        if !stop {
            while let Some(h) = free.pop() {
                qd.push(h);
                in_flight += 1;
            }
            qd.commit();
        }
        while let Some(u) = qd.pop_used() {
            if u.id % 2 != 0 || usize::from(u.id / 2) >= slots.len() {
                return Err(format!("tx: used id {} is not a chain head", u.id));
            }
            free.push(u.id);
            in_flight -= 1;
            sent += 1;
        }
        if sent >= 32 {
            c.tx_packets
                .fetch_add(std::mem::take(&mut sent), Ordering::Relaxed);
        }
        if stop && in_flight == 0 {
            return Ok(());
        }
        if free.is_empty() || stop {
            let woke = qd.arm_and_check() || qd.wait_call(100);
            if !woke && stop {
                return Err(format!("tx: {in_flight} frames not completed after stop"));
            }
        }
    }
}

/// Keep every rx descriptor posted with a buffer, count the frames that
/// carry a `payload`-byte UDP datagram, repost, until stopped.
fn rx_loop(
    mut qd: QueueDriver<'_>,
    st: &mut PairState,
    payload: usize,
    c: &Counters,
) -> Result<(), String> {
    post_rx_once(&mut qd, st);
    let want = (HDR_LEN + L2_L4 + payload) as u32;
    let (mut n, mut bytes) = (0u64, 0u64);
    while !c.stop.load(Ordering::Relaxed) {
        let mut got = false;
        while let Some(u) = qd.pop_used() {
            if usize::from(u.id) >= st.rx_bufs.len() {
                return Err(format!("rx: used id {} out of range", u.id));
            }
            if u.len == want {
                n += 1;
                bytes += payload as u64;
            }
            qd.push(u.id);
            got = true;
        }
        if got {
            qd.commit();
            c.rx_packets
                .fetch_add(std::mem::take(&mut n), Ordering::Relaxed);
            c.rx_bytes
                .fetch_add(std::mem::take(&mut bytes), Ordering::Relaxed);
        } else if !qd.arm_and_check() {
            qd.wait_call(50);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- veth

/// Two namespaces joined by a veth pair: "host" vb0 10.89.0.1 in `a`,
/// "guest" vb1 10.89.0.2 in `b`.
struct Veth {
    a: Netns,
    b: Netns,
}

impl Veth {
    fn start() -> Result<Veth, String> {
        let pid = std::process::id();
        let a = Netns::new(format!("tern-bench-{pid}-va"))?;
        let b = Netns::new(format!("tern-bench-{pid}-vb"))?;
        a.exec(&[
            "ip", "link", "add", "vb0", "type", "veth", "peer", "name", "vb1", "netns", &b.name,
        ])?;
        a.exec(&["ip", "addr", "add", "10.89.0.1/24", "dev", "vb0"])?;
        b.exec(&["ip", "addr", "add", "10.89.0.2/24", "dev", "vb1"])?;
        a.exec(&["ip", "link", "set", "vb0", "up"])?;
        b.exec(&["ip", "link", "set", "vb1", "up"])?;
        // Resolve neighbours once so no ARP runs during measurements.
        let mac_a = a.exec(&["cat", "/sys/class/net/vb0/address"])?;
        let mac_b = b.exec(&["cat", "/sys/class/net/vb1/address"])?;
        a.exec(&[
            "ip",
            "neigh",
            "replace",
            "10.89.0.2",
            "lladdr",
            mac_b.trim(),
            "dev",
            "vb0",
            "nud",
            "permanent",
        ])?;
        b.exec(&[
            "ip",
            "neigh",
            "replace",
            "10.89.0.1",
            "lladdr",
            mac_a.trim(),
            "dev",
            "vb1",
            "nud",
            "permanent",
        ])?;
        Ok(Veth { a, b })
    }

    fn run(&self, case: &Case, seconds: u64) -> Result<Res, String> {
        // guest->host: b sends to a; host->guest: a sends to b.
        let (snd, rcv, dst_ip, src_ip) = match case.dir {
            Dir::GuestToHost => (&self.b, &self.a, "10.89.0.1", "10.89.0.2"),
            Dir::HostToGuest => (&self.a, &self.b, "10.89.0.2", "10.89.0.1"),
        };
        let c = Arc::new(Counters::default());
        let mut hs = Vec::new();
        if case.tcp {
            for i in 0..case.pairs as u16 {
                let c2 = c.clone();
                hs.push(rcv.spawn(move || {
                    let l = TcpListener::bind((dst_ip, SINK_PORT + i))
                        .map_err(|e| format!("bind tcp sink: {e}"))?;
                    tcp_sink(l, c2)
                }));
            }
            std::thread::sleep(Duration::from_millis(50));
            for i in 0..case.pairs as u16 {
                let (c2, chunk) = (c.clone(), case.payload);
                hs.push(snd.spawn(move || {
                    let s = TcpStream::connect((dst_ip, SINK_PORT + i))
                        .map_err(|e| format!("tcp connect: {e}"))?;
                    tcp_sender(s, chunk, c2)
                }));
            }
            let res = measure(&c, seconds);
            join_all(hs)?;
            return Ok(res);
        }
        for i in 0..case.pairs as u16 {
            let (c2, payload) = (c.clone(), case.payload);
            hs.push(rcv.spawn(move || {
                let s = UdpSocket::bind((dst_ip, SINK_PORT + i))
                    .map_err(|e| format!("bind sink: {e}"))?;
                sink(s, payload, c2)
            }));
        }
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..case.pairs as u16 {
            let (c2, payload) = (c.clone(), case.payload);
            hs.push(snd.spawn(move || {
                let s = UdpSocket::bind((src_ip, SRC_PORT + i))
                    .map_err(|e| format!("bind sender: {e}"))?;
                s.connect((dst_ip, SINK_PORT + i))
                    .map_err(|e| format!("connect: {e}"))?;
                sender(s, payload, c2)
            }));
        }
        let res = measure(&c, seconds);
        join_all(hs)?;
        Ok(res)
    }
}

// ---------------------------------------------------------------- run

struct Row {
    case: Case,
    tern: Res,
    veth: Res,
}

fn check_binary(p: &Path) -> Result<PathBuf, String> {
    if !p.is_file() {
        return Err(format!(
            "tern-net {} not found (build it: cargo build --release -p tern-net)",
            p.display()
        ));
    }
    Ok(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()))
}

fn brief(r: &Res) -> String {
    format!(
        "{:>10.0} pkt/s {:>7.3} Gbit/s  (sent {:>10.0} pkt/s)",
        r.pps, r.gbps, r.sent_pps
    )
}

pub fn run(o: &Options) -> Result<(), String> {
    let tern_net = check_binary(&o.tern_net)?;
    let machine = Machine::probe();
    eprintln!("tern-bench net: {}", machine.summary());
    let mut pair_counts = vec![1usize];
    if o.mq {
        // 4 pairs + ctrl = 9 queues (the driver's layout holds 16).
        pair_counts.push(MQ_PAIRS);
    }
    let mut cases = Vec::new();
    for &pairs in &pair_counts {
        for dir in [Dir::GuestToHost, Dir::HostToGuest] {
            for payload in [64usize, 1472] {
                cases.push(Case {
                    dir,
                    payload,
                    pairs,
                    tcp: false,
                });
            }
        }
        cases.push(Case {
            dir: Dir::GuestToHost,
            payload: TSO_PAYLOAD,
            pairs,
            tcp: true,
        });
    }
    if !o.cases.is_empty() {
        cases.retain(|c| o.cases.iter().any(|k| c.key().contains(k.as_str())));
        pair_counts.retain(|&p| cases.iter().any(|c| c.pairs == p));
        if cases.is_empty() {
            return Err("--case matches no case (see --help)".into());
        }
    }
    let veth = Veth::start()?;
    let mut rows = Vec::new();
    let mut k = 0;
    for &pairs in &pair_counts {
        let mut tn = TernNet::start(&tern_net, pairs)?;
        for case in cases.iter().filter(|c| c.pairs == pairs) {
            k += 1;
            eprintln!(
                "tern-bench net: [{k}/{}] {} ({} s each)",
                cases.len(),
                case.name(),
                o.seconds
            );
            let mut t = tn
                .run(case, o.seconds)
                .map_err(|e| format!("{}: tern-net: {e}", case.name()))?;
            let mut v = veth
                .run(case, o.seconds)
                .map_err(|e| format!("{}: veth: {e}", case.name()))?;
            if case.tcp {
                // Frames of TSO_PAYLOAD bytes delivered per second.
                for r in [&mut t, &mut v] {
                    r.pps = r.gbps * 1e9 / 8.0 / case.payload as f64;
                    r.packets = (r.pps * r.seconds) as u64;
                }
            }
            eprintln!("  tern-net  {}", brief(&t));
            eprintln!("  veth      {}", brief(&v));
            rows.push(Row {
                case: *case,
                tern: t,
                veth: v,
            });
        }
        drop(tn);
    }
    drop(veth);
    println!(
        "tern-net data path vs host sockets over veth ({} s per measurement, UDP, \
         queue size {QUEUE_SIZE}, rates at the receiving end, Gbit/s of UDP payload)",
        o.seconds
    );
    print!("{}", table(&rows));
    if let Some(path) = &o.json {
        let v = json!({
            "benchmark": "tern-bench net",
            "seconds": o.seconds,
            "warmup_seconds": WARMUP.as_secs_f64(),
            "queue_size": QUEUE_SIZE,
            "tern_net": tern_net.display().to_string(),
            "target": {"large_frame_gbit_vs_veth": TARGET_LARGE_GBPS},
            "tso_frame": {"tcp_payload": TSO_PAYLOAD, "mss": TSO_MSS,
                          "gso_type": "TCPV4", "features": "CSUM|HOST_TSO4"},
            "machine": machine.json(),
            "cases": rows.iter().map(row_json).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&v).map_err(|e| format!("JSON: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("tern-bench net: wrote {}", path.display());
    }
    Ok(())
}

fn verdict(row: &Row) -> Option<(f64, bool)> {
    if !row.case.large() {
        return None;
    }
    let r = row.tern.gbps / row.veth.gbps;
    Some((r, r >= TARGET_LARGE_GBPS))
}

fn row_json(row: &Row) -> Value {
    let c = &row.case;
    json!({
        "key": c.key(),
        "name": c.name(),
        "direction": c.dir.name(),
        "protocol": if c.tcp { "tcp-tso" } else { "udp" },
        "payload": c.payload,
        "queue_pairs": c.pairs,
        "tern_net": row.tern.json(),
        "veth": row.veth.json(),
        "ratio_vs_veth": {"packets_per_s": row.tern.pps / row.veth.pps,
                          "gbit_per_s": row.tern.gbps / row.veth.gbps},
        "target": verdict(row).map(|(r, ok)| json!({
            "metric": "gbit_per_s", "min_ratio": TARGET_LARGE_GBPS, "ratio": r, "ok": ok})),
    })
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<34} {:>11} {:>11} {:>7}  {:<13}",
        "metric", "tern-net", "veth", "ratio", "target"
    );
    for row in rows {
        for (label, t, v, prec, target) in [
            ("pkt/s", row.tern.pps, row.veth.pps, 0usize, None),
            ("Gbit/s", row.tern.gbps, row.veth.gbps, 3, verdict(row)),
        ] {
            let name = format!("{} {label}", row.case.name());
            let target = match target {
                Some((_, ok)) => format!(
                    ">={:.0}% {}",
                    TARGET_LARGE_GBPS * 100.0,
                    if ok { "ok" } else { "MISS" }
                ),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "{name:<34} {t:>11.prec$} {v:>11.prec$} {:>6.2}x  {target:<13}",
                t / v
            );
        }
    }
    s.push_str(
        "ratio = tern-net / veth; target from the issue: large frames (1472 B UDP, 64 KiB TSO) \
         Gbit/s >= 70% of veth.\n\
         TCP TSO 64KiB: frames of 64240 payload bytes (44 x 1460) with gso_type TCPV4, one \
         connection per pair; veth: one TCP stream of 64240-byte writes per pair; pkt/s = \
         64 KiB frames.\n",
    );
    s
}
