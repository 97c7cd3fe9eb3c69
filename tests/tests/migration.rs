//! Live migration with the test unikernel: the heartbeat counter, a memory
//! pattern, pages rewritten at every beat, a vhost-user disk and a NIC
//! carry on in another tern process (over a Unix socket, over TCP between
//! two network namespaces, and passing the memory fd); throttling and the
//! downtime limit; aborts at several points leave the source running with
//! its disk; bad or incompatible streams are refused and the destination
//! stays usable; the dirty-rate measurement.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::heartbeat::{
    assert_continues, assert_disk_has, boot, machine, pattern_sum, raw_disk, snapblk_beats, T,
};
use common::netns::Netns;
use common::vm::{Scratch, Vm};
use serde_json::{json, Value};
use tern::migration::protocol::{self, Frame};

/// `GET /migration`.
fn migration(vm: &Vm) -> Value {
    vm.expect("GET", "/migration", None, 200)
}

/// Polls `GET /migration` until its status is one of `states`; returns it.
fn wait_status(vm: &Vm, states: &[&str], limit: Duration) -> Value {
    let mut last = Value::Null;
    vm.wait_until(
        limit,
        &format!("GET /migration status in {states:?}"),
        || {
            last = migration(vm);
            states.iter().any(|s| last["status"] == *s)
        },
    );
    last
}

/// `PUT /migration/receive` on `url`.
fn receive(vm: &Vm, url: &str) {
    vm.expect(
        "PUT",
        "/migration/receive",
        Some(&json!({ "url": url }).to_string()),
        204,
    );
}

/// `PUT /migration/send` with `body` (which must hold `url`).
fn send(vm: &Vm, body: Value) {
    vm.expect("PUT", "/migration/send", Some(&body.to_string()), 204);
}

fn unix_url(p: &Path) -> String {
    format!("unix:{}", p.display())
}

/// The `(N ms downtime)` of the source's last words.
fn stderr_downtime(vm: &Vm) -> f64 {
    let err = vm.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("the VM migrated to"))
        .unwrap_or_else(|| panic!("no `the VM migrated to` line:\n{}", vm.output()));
    let (_, rest) = line.split_once('(').expect("(N ms downtime)");
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Waits for a source to exit after a completed migration: status 0 and
/// its last words.
fn assert_source_exited(src: &mut Vm) {
    let code = src.wait_exit(T);
    assert_eq!(code, Some(0), "source exit status:\n{}", src.output());
    assert!(
        src.stderr().contains("the VM migrated to"),
        "source's last words:\n{}",
        src.output()
    );
}

/// Waits for `n` more heartbeats, then for the disk writes to come
/// through: pauses the VM and returns the beats that wrote the disk.
fn disk_beats_after(vm: &Vm, n: usize) -> Vec<u64> {
    vm.wait_more_beats(n, T);
    vm.pause();
    let b = snapblk_beats(vm);
    vm.resume();
    b
}

#[test]
fn unix_socket_migration_keeps_counter_pattern_dirty_pages_and_disk() {
    let dir = Scratch::new("mig-unix");
    let disk = dir.path("disk.raw");
    raw_disk(&disk);
    let drive = json!({
        "drive_id": "disk0", "path_on_host": disk, "is_root_device": false, "is_read_only": false
    });
    let mut src = boot(
        &dir,
        "src",
        None,
        machine(128),
        &[("/drives/disk0", drive)],
        "action=heartbeat period=50 mempattern=32 memcheck=4 memdirty=64 memdirtyspan=1024 snapblk=1",
    );
    let sum = pattern_sum(&src);
    src.wait_line("SNAPBLK 00:", T);
    src.wait_beat(4, T);

    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    // Before any migration (docs say `none`; tern answers "").
    let m = migration(&dst);
    assert!(m["status"] == "none" || m["status"] == "", "{m}");
    let url = unix_url(&dir.path("mig.sock"));
    receive(&dst, &url);
    let m = migration(&dst);
    assert_eq!(m["role"], "destination", "{m}");
    send(&src, json!({ "url": url, "downtime_limit_ms": 100 }));
    assert_source_exited(&mut src);
    let last = src.last_beat().unwrap();
    let src_disk = snapblk_beats(&src);

    let m = wait_status(&dst, &["completed", "failed"], T);
    assert_eq!(m["status"], "completed", "{m}\n{}", dst.output());
    assert!(m["bytes_sent"].as_u64().unwrap() >= 32 << 20, "{m}");
    assert_eq!(dst.expect("GET", "/", None, 200)["state"], "Running");
    let after = assert_continues(&dst, &last, Some(sum), 5);
    assert!(after.iter().any(|b| b.mem == Some(sum)), "{after:?}");
    assert!(
        after.iter().all(|b| b.dirty_ok == Some(true)),
        "{after:?}\n{}",
        dst.output()
    );
    // The destination's own tern-blk serves the disk: its writes and the
    // source's are all in the file.
    let dst_disk = disk_beats_after(&dst, 2);
    assert!(
        dst_disk.len() >= 5 && dst_disk[0] > last.n.saturating_sub(1),
        "disk beats at the destination: {dst_disk:?}\n{}",
        dst.output()
    );
    dst.pause();
    let image = std::fs::read(&disk).unwrap();
    assert_disk_has(&image, &src_disk, "the source's writes");
    assert_disk_has(&image, &dst_disk, "the destination's writes");
    eprintln!(
        "migrated at beat {}: {} bytes sent, round {}, source writes {}, destination writes {}",
        last.n,
        m["bytes_sent"],
        m["round"],
        src_disk.len(),
        dst_disk.len()
    );
}

/// `dev` MAC address inside `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = ns.exec_ok(&["cat", &format!("/sys/class/net/{dev}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tcp_migration_between_namespaces_keeps_the_mac_and_answers_pings() {
    const MAC: &str = "02:74:65:72:6e:01";
    // Two "hosts": a veth pair carries the migration stream; each has its
    // own tap `tn0` with the same address for the guest's NIC.
    let a = Netns::new("migA");
    let b = Netns::new("migB");
    a.exec_ok(&[
        "ip", "link", "add", "mvA", "type", "veth", "peer", "name", "mvB", "netns", &b.name,
    ]);
    a.exec_ok(&["ip", "addr", "add", "10.99.0.1/24", "dev", "mvA"]);
    a.exec_ok(&["ip", "link", "set", "mvA", "up"]);
    b.exec_ok(&["ip", "addr", "add", "10.99.0.2/24", "dev", "mvB"]);
    b.exec_ok(&["ip", "link", "set", "mvB", "up"]);
    a.tap("tn0", "10.77.0.1/24");
    b.tap("tn0", "10.77.0.1/24");
    assert_ne!(mac_of(&a, "tn0"), mac_of(&b, "tn0"));

    let dir = Scratch::new("mig-tcp");
    let nic = json!({ "iface_id": "net0", "host_dev_name": "tn0", "guest_mac": MAC });
    let mut src = boot(
        &dir,
        "src",
        Some(&a.name),
        machine(64),
        &[("/network-interfaces/net0", nic)],
        "action=heartbeat period=20 netserve=1 netip=10.77.0.2 netgw=10.77.0.1 memdirty=16",
    );
    let l = src.wait_line("NETSERVE 00:", T);
    assert!(l.contains(&format!("mac={MAC}")), "{l}");
    src.wait_beat(2, T);
    let (ok, out) = a.ping("10.77.0.2", 3, 10);
    assert!(ok, "ping at the source: {out}\n{}", src.output());

    let dst = Vm::start_in(Some(&b.name), Some(&dir.path("dst.sock")), &[]);
    receive(&dst, "tcp:10.99.0.2:7070");
    send(&src, json!({ "url": "tcp:10.99.0.2:7070" }));
    assert_source_exited(&mut src);
    let last = src.last_beat().unwrap();
    let m = wait_status(&dst, &["completed", "failed"], T);
    assert_eq!(m["status"], "completed", "{m}\n{}", dst.output());
    let after = assert_continues(&dst, &last, None, 2);
    let answered = after[0].pings.expect("pings=");

    // The destination's side reaches the guest, which answers with its MAC.
    let (ok, out) = b.ping("10.77.0.2", 3, 10);
    assert!(ok, "ping at the destination: {out}\n{}", dst.output());
    let neigh = b.exec_ok(&["ip", "neigh", "show", "10.77.0.2", "dev", "tn0"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(
        neigh.contains(MAC),
        "the destination's neighbour entry for the guest: {neigh}"
    );
    let cfg = dst.expect("GET", "/vm/config", None, 200);
    assert_eq!(cfg["network-interfaces"][0]["guest_mac"], MAC, "{cfg}");
    dst.wait_until(T, "the guest to count the new pings", || {
        dst.last_beat()
            .and_then(|b| b.pings)
            .is_some_and(|p| p >= answered + 3)
    });
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_or_fails_as_configured() {
    let dir = Scratch::new("mig-conv");
    // 128 new pages every ~10 ms (~50 MB/s) through a 4 MiB window; the
    // link is capped at 80 Mbit/s (10 MB/s).
    let cmdline = "action=heartbeat period=10 memdirty=128 memdirtyspan=1024";
    let src = boot(&dir, "src", None, machine(64), &[], cmdline);
    src.wait_beat(3, T);

    // Without auto-converge and told to fail: it fails, the VM goes on here.
    // The link is narrower here (2 MB/s): a guest slowed down many times
    // by a loaded host still dirties its window faster than that.
    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let url = unix_url(&dir.path("mig.sock"));
    receive(&dst, &url);
    send(
        &src,
        json!({ "url": url, "max_bandwidth_mbps": 16, "auto_converge": false,
                "max_iterations": 2, "on_max_iterations": "Fail" }),
    );
    let m = wait_status(&src, &["completed", "failed", "cancelled"], T);
    assert_eq!(m["status"], "failed", "{m}");
    let err = m["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.contains("converge"),
        "{err}\ndestination: {}\n{}",
        migration(&dst),
        dst.output()
    );
    assert_eq!(m["throttle_percent"], 0, "{m}");
    assert_eq!(src.expect("GET", "/", None, 200)["state"], "Running");
    let b = src.wait_more_beats(3, T);
    assert!(b.ok, "{b:?}\n{}", src.output());
    let d = wait_status(&dst, &["failed", "cancelled"], T);
    assert!(d["error"].is_string(), "{d}");
    assert_eq!(dst.expect("GET", "/", None, 200)["state"], "Not started");
    eprintln!(
        "no convergence: source says `{err}`, destination `{}`",
        d["error"]
    );

    // With auto-converge (the default) the vCPUs are held back until it
    // converges (or stop-and-copy at max_iterations).
    receive(&dst, &url);
    send(
        &src,
        json!({ "url": url, "max_bandwidth_mbps": 80, "max_iterations": 20,
                "keep_source": true }),
    );
    let mut throttle = 0u64;
    let mut rounds = 0u64;
    let start = Instant::now();
    let m = loop {
        let m = migration(&src);
        throttle = throttle.max(m["throttle_percent"].as_u64().unwrap());
        rounds = rounds.max(m["round"].as_u64().unwrap());
        if ["completed", "failed", "cancelled"]
            .iter()
            .any(|s| m["status"] == *s)
        {
            break m;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{m}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(m["status"], "completed", "{m}\n{}", src.output());
    assert!(throttle > 0, "no throttling seen: {m}");
    // Converged: it did not need the stop-and-copy of max_iterations.
    assert!(m["round"].as_u64().unwrap() < 20, "{m}");
    let last = src.last_beat().unwrap();
    assert_eq!(src.expect("GET", "/", None, 200)["state"], "Paused");
    let after = assert_continues(&dst, &last, None, 3);
    assert!(after.iter().all(|b| b.dirty_ok == Some(true)), "{after:?}");
    eprintln!(
        "throttled: up to {throttle}% in {rounds} rounds (max 20), total {} ms, downtime {} ms",
        m["total_time_ms"], m["downtime_ms"]
    );
}

/// The guest idles as an OS does, halted between beats until its local
/// APIC timer fires: the timer must go on firing on the destination.
#[test]
fn an_idle_1gib_guest_moves_within_a_50ms_downtime_limit() {
    let dir = Scratch::new("mig-idle");
    let mut src = boot(
        &dir,
        "src",
        None,
        machine(1024),
        &[],
        "action=heartbeat period=100 idle=hlt",
    );
    src.wait_beat(2, T);
    assert!(
        src.output().contains("IDLE hlt lapic_per_ms="),
        "{}",
        src.output()
    );
    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let url = unix_url(&dir.path("mig.sock"));
    receive(&dst, &url);
    send(
        &src,
        json!({ "url": url, "downtime_limit_ms": 50, "keep_source": true }),
    );
    let m = wait_status(&src, &["completed", "failed", "cancelled"], T);
    assert_eq!(m["status"], "completed", "{m}\n{}", src.output());
    // keep_source: the source stays, paused.
    assert!(src.running());
    assert_eq!(src.expect("GET", "/", None, 200)["state"], "Paused");
    let downtime = m["downtime_ms"].as_f64().unwrap();
    eprintln!(
        "idle 1 GiB: downtime {downtime:.2} ms, total {} ms, {} bytes, round {}",
        m["total_time_ms"], m["bytes_sent"], m["round"]
    );
    assert!(downtime < 50.0, "downtime {downtime} ms: {m}");
    let last = src.last_beat().unwrap();
    assert_continues(&dst, &last, None, 2);
    assert_eq!(wait_status(&dst, &["completed"], T)["status"], "completed");
}

/// A destination that takes the stream (answers `Ready`, and `Received`
/// after each round) and records every frame up to `Complete`, then hangs up without `Resumed`: the source must
/// take its VM back.
fn record_and_drop(listener: &UnixListener) -> Vec<Frame<'static>> {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let hello = protocol::recv(&mut s).expect("Hello");
    assert!(
        matches!(hello, Frame::Hello { .. }),
        "{}",
        protocol::name(&hello)
    );
    protocol::send(&mut s, &Frame::Ready).unwrap();
    let mut frames = vec![hello];
    loop {
        let f = protocol::recv(&mut s).expect("a frame");
        if let Frame::RoundEnd { round } = f {
            // The source waits for this before its next round.
            protocol::send(&mut s, &Frame::Received { round }).unwrap();
        }
        let done = matches!(f, Frame::Complete);
        frames.push(f);
        if done {
            return frames;
        }
    }
}

/// The source's migration failed or was cancelled (`want`) and its VM goes
/// on: beats continue and are ok, new disk writes land in the file (if
/// `disk`).
fn assert_source_goes_on(src: &Vm, want: &str, disk: Option<&Path>) {
    let m = wait_status(src, &["failed", "cancelled", "completed"], T);
    assert_eq!(m["status"], want, "{m}\n{}", src.output());
    assert!(m["error"].is_string(), "{m}");
    assert_eq!(src.expect("GET", "/", None, 200)["state"], "Running");
    let before = src.last_beat().unwrap().n;
    let b = src.wait_more_beats(3, T);
    assert!(b.ok, "{b:?}\n{}", src.output());
    if let Some(disk) = disk {
        let beats = disk_beats_after(src, 1);
        let new: Vec<u64> = beats.iter().copied().filter(|&n| n > before).collect();
        assert!(new.len() >= 3, "no disk writes after the abort: {beats:?}");
        src.pause();
        assert_disk_has(
            &std::fs::read(disk).unwrap(),
            &new,
            "writes after the abort",
        );
        src.resume();
    }
    eprintln!("{want}: {}", m["error"]);
}

#[test]
fn aborts_at_several_points_leave_the_source_running_with_its_disk() {
    let dir = Scratch::new("mig-abort");
    let disk = dir.path("disk.raw");
    raw_disk(&disk);
    let drive = json!({
        "drive_id": "disk0", "path_on_host": disk, "is_root_device": false, "is_read_only": false
    });
    // 64 MiB of pattern at 160 Mbit/s: round 0 alone takes over 3 s.
    let src = boot(
        &dir,
        "src",
        None,
        machine(128),
        &[("/drives/disk0", drive)],
        "action=heartbeat period=50 mempattern=64 memcheck=0 snapblk=1",
    );
    pattern_sum(&src);
    src.wait_beat(2, T);
    let url = unix_url(&dir.path("mig.sock"));
    let slow = |url: &str| json!({ "url": url, "max_bandwidth_mbps": 160 });
    let mid_stream = |src: &Vm| {
        let mut m = Value::Null;
        src.wait_until(T, "the migration to be mid-stream", || {
            m = migration(src);
            m["status"] == "active" && m["bytes_sent"].as_u64().unwrap_or(0) > 8 << 20
        });
        m
    };

    // 1. The destination dies mid-stream.
    let mut dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    receive(&dst, &url);
    send(&src, slow(&url));
    let m = mid_stream(&src);
    dst.kill();
    eprintln!("killed the destination at {} bytes", m["bytes_sent"]);
    assert_source_goes_on(&src, "failed", Some(&disk));

    // 2. DELETE /migration mid-stream; the destination is left usable.
    // (the killed one left its socket file behind)
    let url = unix_url(&dir.path("mig2.sock"));
    let dst = Vm::start(Some(&dir.path("dst2.sock")), &[]);
    receive(&dst, &url);
    send(&src, slow(&url));
    mid_stream(&src);
    src.expect("DELETE", "/migration", None, 204);
    assert_source_goes_on(&src, "cancelled", Some(&disk));
    let d = wait_status(&dst, &["failed", "cancelled"], T);
    assert_eq!(
        dst.expect("GET", "/", None, 200)["state"],
        "Not started",
        "{d}"
    );
    // Nothing to cancel now.
    src.refused("DELETE", "/migration", None);

    // 3. PUT /migration/cancel while waiting for the destination's answer
    // (it accepted the connection but never answers).
    let path = dir.path("silent.sock");
    let silent = UnixListener::bind(&path).unwrap();
    send(&src, json!({ "url": unix_url(&path) }));
    let (_conn, _) = silent.accept().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(migration(&src)["status"], "setup");
    src.expect("PUT", "/migration/cancel", Some("{}"), 204);
    assert_source_goes_on(&src, "cancelled", Some(&disk));

    // 4. The destination hangs up after the last pages and the state, before
    // saying the VM runs there: the source's paused VM and its stopped
    // disk queue start again.
    let path = dir.path("dropper.sock");
    let dropper = UnixListener::bind(&path).unwrap();
    send(
        &src,
        json!({ "url": unix_url(&path), "downtime_limit_ms": 1000 }),
    );
    let frames = record_and_drop(&dropper);
    assert!(matches!(frames.last(), Some(Frame::Complete)));
    assert_source_goes_on(&src, "failed", Some(&disk));
}

/// Encodes frames as a source would send them.
fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        protocol::send(&mut out, f).unwrap();
    }
    out
}

/// Sends `bytes` to a destination listening on `sock`, then half-closes;
/// returns the destination's answers (frames it sent before hanging up).
fn feed(sock: &Path, bytes: &[u8]) -> Vec<Frame<'static>> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // The destination may hang up before taking everything.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answers = Vec::new();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mut r = &rest[..];
    while !r.is_empty() {
        match protocol::recv(&mut r) {
            Ok(f) => answers.push(f),
            Err(_) => break,
        }
    }
    answers
}

fn refusal(answers: &[Frame]) -> Option<String> {
    answers.iter().find_map(|f| match f {
        Frame::Refused { reason } => Some(reason.clone()),
        _ => None,
    })
}

/// A copy of `hello` with `f` applied to its fields.
fn hello_with(
    hello: &Frame<'static>,
    f: impl FnOnce(&mut u32, &mut u64, &mut Vec<u32>),
) -> Frame<'static> {
    let Frame::Hello {
        version,
        config,
        mem_size,
        cpu_features,
        local,
    } = hello
    else {
        panic!("not a Hello");
    };
    let (mut v, mut m, mut c) = (*version, *mem_size, cpu_features.clone());
    f(&mut v, &mut m, &mut c);
    Frame::Hello {
        version: v,
        config: config.clone(),
        mem_size: m,
        cpu_features: c,
        local: *local,
    }
}

#[test]
fn bad_or_incompatible_streams_are_refused_and_the_destination_stays_usable() {
    let dir = Scratch::new("mig-bad");
    // A real stream, recorded by a destination that hangs up at the end
    // (the source then carries on).
    let src = boot(
        &dir,
        "src",
        None,
        machine(64),
        &[],
        "action=heartbeat period=20 mempattern=8 memdirty=16",
    );
    let sum = pattern_sum(&src);
    src.wait_beat(3, T);
    let rec = dir.path("rec.sock");
    let recorder = UnixListener::bind(&rec).unwrap();
    send(
        &src,
        json!({ "url": unix_url(&rec), "downtime_limit_ms": 1000 }),
    );
    let frames = record_and_drop(&recorder);
    assert_source_goes_on(&src, "failed", None);
    src.pause();
    // The recording's moment: the beat the state holds is at most the
    // source's last one now.
    let last_src = src.last_beat().unwrap();
    drop(src);
    let hello = hello_with(&frames[0], |_, _, _| {});
    let mem_size = match &hello {
        Frame::Hello { mem_size, .. } => *mem_size,
        _ => unreachable!(),
    };
    let first_pages = frames
        .iter()
        .position(|f| matches!(f, Frame::Pages { .. }))
        .expect("a Pages frame");

    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let sock = dir.path("in.sock");
    let url = unix_url(&sock);
    let try_stream = |what: &str, bytes: &[u8], want: &[&str]| -> Vec<Frame<'static>> {
        receive(&dst, &url);
        let answers = feed(&sock, bytes);
        let m = wait_status(&dst, &["failed", "cancelled", "completed"], T);
        assert_eq!(m["status"], "failed", "{what}: {m}");
        let err = m["error"].as_str().unwrap().to_lowercase();
        assert!(
            want.iter().any(|w| err.contains(w)),
            "{what}: error `{err}`, expected one of {want:?}"
        );
        assert_eq!(
            dst.expect("GET", "/", None, 200)["state"],
            "Not started",
            "{what}"
        );
        eprintln!("{what}: {err}");
        answers
    };

    // Not a tern stream at all.
    try_stream(
        "garbage",
        &[0xffu8; 4096],
        &["bad frame", "migration stream"],
    );
    try_stream(
        "HTTP",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &["bad frame", "migration stream", "expected hello"],
    );
    // Cut in the middle of the first page batch.
    let good = encode(&frames);
    let head = encode(&frames[..first_pages]).len();
    let answers = try_stream(
        "truncated",
        &good[..head + 1000],
        &["bad frame", "unexpected", "end", "eof"],
    );
    assert!(
        answers.iter().any(|f| matches!(f, Frame::Ready)),
        "the truncated stream's Hello was accepted first"
    );
    // Cut after a few frames, between frames: no State, no Complete.
    try_stream(
        "cut between frames",
        &encode(&frames[..first_pages + 1]),
        &["bad frame", "unexpected", "end", "eof"],
    );
    // One flipped bit in a page batch: its CRC.
    let mut corrupt = encode(&frames[..first_pages + 1]);
    let n = corrupt.len();
    corrupt[n - 100] ^= 0x08;
    corrupt.extend_from_slice(&encode(&frames[first_pages + 1..]));
    try_stream(
        "corrupted page batch",
        &corrupt,
        &["corrupted pages", "checksum"],
    );
    // Pages outside guest memory.
    let mut outside = encode(&frames[..first_pages]);
    outside.extend(encode(&[protocol::pages(mem_size, &[1u8; 4096])]));
    try_stream("pages beyond RAM", &outside, &["inside guest memory"]);
    // State and Complete missing their order: Complete first.
    let mut early = encode(&frames[..first_pages]);
    early.extend(encode(&[Frame::Complete]));
    try_stream("Complete without State", &early, &["state before complete"]);

    // Incompatible configurations, refused before any page.
    for (what, frame, want) in [
        (
            "version 99",
            hello_with(&hello, |v, _, _| *v = 99),
            "version",
        ),
        (
            "memory size",
            hello_with(&hello, |_, m, _| *m += 4096),
            "memory size",
        ),
        (
            "CPU features",
            hello_with(&hello, |_, _, c| c.iter_mut().for_each(|w| *w = u32::MAX)),
            "cpuid",
        ),
    ] {
        let mut bytes = encode(&[frame]);
        bytes.extend_from_slice(&good[encode(&frames[..1]).len()..]);
        let answers = try_stream(what, &bytes, &[want]);
        let why =
            refusal(&answers).unwrap_or_else(|| panic!("{what}: no Refused frame in the answer"));
        assert!(why.to_lowercase().contains(want), "{what}: {why}");
        assert!(
            !answers.iter().any(|f| matches!(f, Frame::Ready)),
            "{what}: Ready before refusing"
        );
    }
    // A configuration that is not JSON of a VM.
    let bad_config = Frame::Hello {
        version: protocol::PROTOCOL_VERSION,
        config: b"{\"machine-config\": 7}".to_vec().into(),
        mem_size,
        cpu_features: vec![0; 5],
        local: false,
    };
    let answers = try_stream(
        "bad configuration",
        &encode(&[bad_config]),
        &["configuration"],
    );
    assert!(refusal(&answers).is_some());

    // The same destination then takes the good stream and runs the VM
    // from the recording's moment.
    receive(&dst, &url);
    let answers = feed(&sock, &good);
    assert!(
        answers.iter().any(|f| matches!(f, Frame::Resumed)),
        "the good stream was not resumed:\n{}",
        dst.output()
    );
    let m = wait_status(&dst, &["completed", "failed"], T);
    assert_eq!(m["status"], "completed", "{m}");
    dst.wait_more_beats(3, T);
    let beats = dst.beats();
    assert!(
        beats[0].n >= 4 && beats[0].n <= last_src.n + 2,
        "replayed VM starts at beat {} (source was at {}):\n{}",
        beats[0].n,
        last_src.n,
        dst.output()
    );
    for b in &beats {
        assert!(b.ok && b.dirty_ok == Some(true), "{b:?}\n{}", dst.output());
        if let Some(mem) = b.mem {
            assert_eq!(mem, sum);
        }
    }
    // And refuses a second one: it runs a VM now.
    dst.refused(
        "PUT",
        "/migration/receive",
        Some(&json!({ "url": url }).to_string()),
    );
}

#[test]
fn local_migration_passes_the_memory_and_keeps_the_counter_with_near_zero_downtime() {
    let dir = Scratch::new("mig-local");
    let (mut src, sum) = dirtying_source(&dir, machine(256));
    // local needs a Unix socket.
    send(&src, json!({ "url": "tcp:127.0.0.1:1", "local": true }));
    let m = wait_status(&src, &["failed", "completed"], T);
    assert!(m["error"].as_str().unwrap().contains("unix"), "{m}");

    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let url = unix_url(&dir.path("mig.sock"));
    receive(&dst, &url);
    let t = Instant::now();
    send(&src, json!({ "url": url, "local": true }));
    assert_source_exited(&mut src);
    let exited = t.elapsed();
    let downtime = stderr_downtime(&src);
    let last = src.last_beat().unwrap();
    let m = wait_status(&dst, &["completed", "failed"], T);
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(m["bytes_sent"], 0, "local: no page copied: {m}");
    let after = assert_continues(&dst, &last, Some(sum), 30);
    assert!(after.iter().all(|b| b.dirty_ok == Some(true)));
    assert!(after.iter().any(|b| b.mem == Some(sum)), "{after:?}");
    eprintln!(
        "local: downtime {downtime:.3} ms (tern's measure), source gone {:.1} ms after the request",
        exited.as_secs_f64() * 1e3
    );
    assert!(downtime < 100.0, "local downtime {downtime} ms");
}

/// Raises `vm.nr_hugepages` so that at least `pages` 2 MiB pages are free,
/// and puts the old value back when dropped.
struct HugePages(Option<u64>);

impl HugePages {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";
    const FREE: &'static str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

    fn read(path: &str) -> u64 {
        std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn reserve(pages: u64) -> Self {
        let free = Self::read(Self::FREE);
        if free >= pages {
            return Self(None);
        }
        let nr = Self::read(Self::NR);
        std::fs::write(Self::NR, (nr + pages - free).to_string())
            .unwrap_or_else(|e| panic!("raising {} (needs root): {e}", Self::NR));
        let now = Self::read(Self::FREE);
        assert!(
            now >= pages,
            "the host gave only {now} free 2 MiB huge pages of {pages} (memory too fragmented?)"
        );
        Self(Some(nr))
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(nr) = self.0 {
            let _ = std::fs::write(Self::NR, nr.to_string());
        }
    }
}

/// With 2 MiB huge pages the destination reads pages straight into guest
/// memory (no writer thread): the pattern and the pages rewritten at
/// every beat arrive whole.
#[test]
fn a_huge_page_guest_migrates_with_its_pattern_and_dirty_pages() {
    let _huge = HugePages::reserve(2 * 64);
    let dir = Scratch::new("mig-huge");
    let (mut src, sum) = dirtying_source(
        &dir,
        json!({ "vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M" }),
    );
    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let url = unix_url(&dir.path("mig.sock"));
    receive(&dst, &url);
    send(&src, json!({ "url": url }));
    assert_source_exited(&mut src);
    let last = src.last_beat().unwrap();
    let m = wait_status(&dst, &["completed", "failed"], T);
    assert_eq!(m["status"], "completed", "{m}");
    assert!(m["bytes_sent"].as_u64().unwrap() >= 16 << 20, "{m}");
    let after = assert_continues(&dst, &last, Some(sum), 30);
    assert!(after.iter().all(|b| b.dirty_ok == Some(true)), "{after:?}");
    assert!(after.iter().any(|b| b.mem == Some(sum)), "{after:?}");
}

/// Shared memory (the guest's memfd) a process has mapped, from
/// /proc/PID/status, in bytes.
fn rss_shmem(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("RssShmem in /proc/PID/status");
    kib << 10
}

/// A destination that allocated its memory ahead (`prealloc`) holds it
/// all before the source connects and takes the VM into it; one prepared
/// for another size allocates anew. Either way the pattern and the pages
/// rewritten at every beat arrive whole.
#[test]
fn a_destination_with_memory_allocated_ahead_takes_the_vm_into_it() {
    let dir = Scratch::new("mig-prealloc");
    let (mut src, sum) = dirtying_source(&dir, machine(128));
    // More than the host has, of either page size: refused with the
    // reason, and nothing held.
    let probe = Vm::start(Some(&dir.path("probe.sock")), &[]);
    for huge in ["None", "2M"] {
        probe.expect(
            "PUT",
            "/machine-config",
            Some(
                &json!({ "vcpu_count": 1, "mem_size_mib": 1 << 20, "huge_pages": huge })
                    .to_string(),
            ),
            204,
        );
        let url = unix_url(&dir.path(&format!("probe-{huge}.mig")));
        let msg = probe.refused(
            "PUT",
            "/migration/receive",
            Some(&json!({ "url": url, "prealloc": true }).to_string()),
        );
        assert!(
            msg.contains("MemAvailable") || msg.contains("huge pages"),
            "{msg}"
        );
        assert!(
            rss_shmem(probe.pid()) < 16 << 20,
            "{huge}: memory held after a refusal"
        );
    }
    drop(probe);
    for (name, prepared_mib) in [("dst1", 128u64), ("dst2", 64)] {
        let dst = Vm::start(Some(&dir.path(&format!("{name}.sock"))), &[]);
        dst.expect(
            "PUT",
            "/machine-config",
            Some(&json!({ "vcpu_count": 1, "mem_size_mib": prepared_mib }).to_string()),
            204,
        );
        let url = unix_url(&dir.path(&format!("{name}.mig")));
        dst.expect(
            "PUT",
            "/migration/receive",
            Some(&json!({ "url": url, "prealloc": true }).to_string()),
            204,
        );
        // Allocated and mapped before the answer, not when pages come.
        let held = rss_shmem(dst.pid());
        assert!(
            held >= prepared_mib << 20,
            "{name}: {held} bytes of shared memory mapped after the answer"
        );
        send(&src, json!({ "url": url }));
        assert_source_exited(&mut src);
        let before = src.last_beat().unwrap();
        let m = wait_status(&dst, &["completed", "failed"], T);
        assert_eq!(m["status"], "completed", "{m}\n{}", dst.output());
        let after = assert_continues(&dst, &before, Some(sum), 30);
        assert!(after.iter().all(|b| b.dirty_ok == Some(true)), "{after:?}");
        assert!(after.iter().any(|b| b.mem == Some(sum)), "{after:?}");
        let log = dst.stderr();
        if prepared_mib == 128 {
            assert!(log.contains("into the memory allocated ahead"), "{log}");
        } else {
            assert!(
                log.contains("does not fit the VM (128 MiB): allocating anew"),
                "{log}"
            );
        }
        // The destination is the next source.
        drop(std::mem::replace(&mut src, dst));
    }
}

/// A source of `machine` holding a 16 MiB pattern and rewriting 64 pages
/// at every 5 ms beat, 10 beats in; with the pattern's checksum.
fn dirtying_source(dir: &Scratch, machine: Value) -> (Vm, u64) {
    let src = boot(
        dir,
        "src",
        None,
        machine,
        &[],
        "action=heartbeat period=5 mempattern=16 memcheck=20 memdirty=64",
    );
    let sum = pattern_sum(&src);
    src.wait_beat(10, T);
    (src, sum)
}

/// One dirty-rate measurement over `period` s: (MB/s, beats seen meanwhile
/// per second of wall time).
fn measure_dirty_rate(vm: &Vm, period: u64) -> (f64, f64) {
    let n0 = vm.last_beat().unwrap().n;
    let t0 = Instant::now();
    vm.expect(
        "PUT",
        "/dirty-rate",
        Some(&json!({ "calc_period_s": period }).to_string()),
        204,
    );
    let r = vm.expect("GET", "/dirty-rate", None, 200);
    assert_eq!(r["calc_status"], 1, "{r}");
    assert_eq!(r["calc_period"], period, "{r}");
    let mut r = Value::Null;
    vm.wait_until(T, "the dirty-rate measurement", || {
        r = vm.expect("GET", "/dirty-rate", None, 200);
        r["calc_status"] == 2
    });
    let n1 = vm.last_beat().unwrap().n;
    let beats_per_s = (n1 - n0) as f64 / t0.elapsed().as_secs_f64();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let start = r["calc_start_time"].as_u64().unwrap();
    assert!(start <= now && start + 120 > now, "{r}");
    (r["megabytes_per_second"].as_f64().unwrap(), beats_per_s)
}

#[test]
fn dirty_rate_of_an_idle_guest_is_low_and_of_a_dirtying_guest_is_its_rate() {
    let dir = Scratch::new("mig-rate");
    let idle = boot(
        &dir,
        "idle",
        None,
        machine(256),
        &[],
        "action=heartbeat period=100",
    );
    // Never measured yet.
    let r = idle.expect("GET", "/dirty-rate", None, 200);
    assert_eq!(r["calc_status"], 0, "{r}");
    idle.wait_beat(2, T);
    let (mbps, _) = measure_dirty_rate(&idle, 1);
    eprintln!("idle guest: {mbps:.3} MB/s");
    assert!(mbps < 4.0, "an idle guest dirties {mbps} MB/s");
    // Not twice at once; not out of range.
    idle.expect("PUT", "/dirty-rate", Some(r#"{"calc_period_s": 2}"#), 204);
    let msg = idle.refused("PUT", "/dirty-rate", Some(r#"{"calc_period_s": 2}"#));
    assert!(msg.contains("already"), "{msg}");
    idle.refused("PUT", "/dirty-rate", Some(r#"{"calc_period_s": 0}"#));
    drop(idle);

    // 128 new pages every 50 ms: 10.5 MB/s, through a 128 MiB window that
    // a 2 s period does not wrap. (Faster rates are possible, but on a
    // software KVM the logging's write faults slow such a guest down:
    // 256 pages every 20 ms runs at ~60% of its set rate while measured.)
    const PAGES: u64 = 128;
    const PERIOD_MS: u64 = 50;
    let busy = boot(
        &dir,
        "busy",
        None,
        machine(256),
        &[],
        &format!("action=heartbeat period={PERIOD_MS} memdirty={PAGES} memdirtyspan=32768"),
    );
    busy.wait_beat(5, T);
    // The guest's pace without logging, for the record.
    let (n0, t0) = (busy.last_beat().unwrap().n, Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let unlogged = (busy.last_beat().unwrap().n - n0) as f64 / t0.elapsed().as_secs_f64();
    let (mbps, beats_per_s) = measure_dirty_rate(&busy, 2);
    let nominal = (PAGES * 4096) as f64 / (PERIOD_MS as f64 / 1e3) / 1e6;
    let actual = (PAGES * 4096) as f64 * beats_per_s / 1e6;
    eprintln!(
        "dirtying guest: measured {mbps:.2} MB/s; it dirtied {actual:.2} MB/s \
         ({beats_per_s:.1} beats/s while logged, {unlogged:.1} beats/s before; \
         set rate {nominal:.2} MB/s at {:.0} beats/s)",
        1e3 / PERIOD_MS as f64
    );
    // The guest's beats are PIT-timed 1 ms steps plus its work: on a
    // software KVM they stretch (more so under logging), so what it
    // dirtied is counted from the beats it printed meanwhile.
    assert!(
        (mbps - actual).abs() <= 0.25 * actual,
        "measured {mbps} MB/s, the guest dirtied {actual} MB/s ({beats_per_s} beats/s)"
    );
}
