//! virtio-blk through tern-blk: the test unikernel's polling driver writes,
//! reads and checksums disks whose files the host prepared and inspects;
//! read-only, qcow2 (with qemu-img as the referee), overlays, multi-queue,
//! external backends and a backend that dies.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_line, require_kvm, tern, tern_bin, Run, UNIKERNEL};

/// The byte the unikernel writes at absolute disk offset `o`.
fn pattern(o: u64) -> u8 {
    ((o.wrapping_mul(7).wrapping_add(0x5a)) ^ (o >> 9)) as u8
}

/// The regions `blkpattern`/`blkwrite` write: (offset, length).
const REGIONS: [(u64, u64); 4] = [
    (0x1000, 0x1000),
    (0x10000, 0x10000),
    (0xffe00, 0x400),
    (0x400000, 0x100000),
];

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-blk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw image of `mib` MiB whose first 64 KiB and 2-3 MiB hold known
/// non-zero bytes (so discard has something to free).
fn raw_image(path: &Path, mib: u64) -> Vec<u8> {
    let mut head = vec![0u8; 64 << 10];
    for (i, b) in head.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 | 1;
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&head, 0).unwrap();
    f.write_all_at(&vec![0xa5u8; 1 << 20], 2 << 20).unwrap();
    f.sync_all().unwrap();
    head
}

fn boot(drives: &[&str], cmdline: &str) -> Run {
    require_kvm();
    let mut args: Vec<&str> = vec![
        "--kernel",
        UNIKERNEL,
        "--memory",
        "64",
        "--cmdline",
        cmdline,
    ];
    for d in drives {
        args.push("--drive");
        args.push(d);
    }
    tern(&args, Duration::from_secs(120))
}

fn assert_pattern_in(image: &[u8]) {
    for (off, len) in REGIONS {
        for o in off..off + len {
            assert_eq!(
                image[o as usize],
                pattern(o),
                "byte at {o:#x} is not the guest's pattern"
            );
        }
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed")
}

#[test]
fn raw_disk_read_write_flush_discard_zeroes_id() {
    let dir = Scratch::new("raw");
    let img = dir.path("disk.raw");
    let head = raw_image(&img, 64);
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    let spec = format!("path={},id=disk0,serial=SERIAL-0", img.display());
    let run = boot(&[&spec], "checks=blk blkpattern=1 action=exit code=3");
    assert_eq!(run.code(), 7, "{run}");
    assert!(
        run.stdout
            .contains("capacity=131072 queues=1 ro=0 serial=SERIAL-0"),
        "{run}"
    );
    assert_line(&run, "BLK id SERIAL-0");
    assert_line(&run, &format!("BLK sum {:08x}", fnv1a(&head)));
    assert!(run.stdout.contains("BLK write ok offsets="), "{run}");
    for line in [
        "BLK read ok",
        "BLK read past end status=1",
        "BLK flush status=0",
        "BLK discard status=0",
        "BLK write-zeroes ok",
        "RESULT pass",
    ] {
        assert_line(&run, line);
    }
    // The driver polls with MSI-X off: tern's INTx relay sets the ISR.
    let isr_set: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.split("isr_set=").nth(1)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no done line: {run}"));
    assert!(isr_set > 0, "the ISR was never set: {run}");
    // What the guest wrote before it powered off is in the file.
    let data = std::fs::read(&img).unwrap();
    assert_pattern_in(&data);
    assert!(
        data[3 << 20..(3 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0),
        "write-zeroes range"
    );
    // Discard punched a hole: the file holds fewer blocks than before.
    let blocks_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_after < blocks_before + 2 * 2048,
        "discard did not free space: {blocks_before} -> {blocks_after}"
    );
    let hole = &data[(2 << 20) + (64 << 10)..(3 << 20) - (64 << 10)];
    assert!(
        hole.iter().all(|&b| b == 0),
        "discarded range reads back as zeros on the host"
    );
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    let dir = Scratch::new("ro");
    let img = dir.path("ro.raw");
    raw_image(&img, 16);
    let before = std::fs::read(&img).unwrap();
    let spec = format!("path={},ro=on", img.display());
    let run = boot(&[&spec], "checks=blk blkpattern=1 action=exit code=1");
    assert_eq!(run.code(), 3, "{run}");
    assert!(
        run.stdout.contains(" ro=1 "),
        "the device offers VIRTIO_BLK_F_RO: {run}"
    );
    assert_line(&run, "BLK write on ro status=1");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "a read-only image changed"
    );
}

#[test]
fn qcow2_disk_is_consistent_for_qemu_img() {
    let dir = Scratch::new("qcow2");
    let img = dir.path("disk.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    assert!(out.status.success(), "{out:?}");
    let spec = format!("path={},format=qcow2", img.display());
    let run = boot(&[&spec], "checks=blk blkpattern=1 action=exit code=2");
    assert_eq!(run.code(), 5, "{run}");
    assert_line(&run, "BLK read ok");
    assert_line(&run, &format!("BLK sum {:08x}", fnv1a(&[0u8; 64 << 10])));
    let check = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = dir.path("converted.raw");
    let conv = qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(conv.status.success(), "{conv:?}");
    assert_pattern_in(&std::fs::read(&raw).unwrap());
}

#[test]
fn qcow2_overlay_shows_the_base_and_keeps_it_unchanged() {
    let dir = Scratch::new("overlay");
    let base = dir.path("base.raw");
    let head = raw_image(&base, 32);
    let base_before = std::fs::read(&base).unwrap();
    let overlay = dir.path("overlay.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let spec = format!("path={},format=qcow2", overlay.display());
    let run = boot(&[&spec], "checks=blk blkpattern=1 action=exit code=2");
    assert_eq!(run.code(), 5, "{run}");
    assert_line(&run, &format!("BLK sum {:08x}", fnv1a(&head)));
    assert_line(&run, "BLK read ok");
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base image changed"
    );
    let check = qemu_img(&["check", overlay.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let raw = dir.path("merged.raw");
    assert!(qemu_img(&[
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        raw.to_str().unwrap()
    ])
    .status
    .success());
    let merged = std::fs::read(&raw).unwrap();
    assert_pattern_in(&merged);
    // Outside what the guest wrote, discarded or zeroed, the base shows through.
    assert_eq!(&merged[0x20000..0x30000], &base_before[0x20000..0x30000]);
}

#[test]
fn four_queues_each_complete() {
    let dir = Scratch::new("mq");
    let img = dir.path("mq.raw");
    raw_image(&img, 16);
    let spec = format!("path={},queues=4", img.display());
    let run = boot(&[&spec], "checks=blk action=exit code=0");
    assert_eq!(run.code(), 1, "{run}");
    assert!(run.stdout.contains(" queues=4 "), "{run}");
    for q in 0..4 {
        assert_line(&run, &format!("BLK queue {q} ok"));
    }
}

fn tern_blk() -> PathBuf {
    tern_bin().with_file_name("tern-blk")
}

fn external_backend(image: &Path, socket: &Path) -> Child {
    let child = Command::new(tern_blk())
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tern-blk");
    wait_for_socket(socket);
    child
}

fn wait_for_socket(socket: &Path) {
    let start = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tern-blk did not open its socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Boots the guest on the external backend at `sock` serving `img`
/// (whose first MiB is `head`): it reads `head` back and writes its
/// pattern, which lands in `img` once the backend has ended.
fn guest_io_through(sock: &Path, img: &Path, head: &[u8], mut backend: Child) {
    let spec = format!("socket={},id=ext0", sock.display());
    let run = boot(&[&spec], "checks=blk blkwrite=1 action=exit code=4");
    assert_eq!(run.code(), 9, "{run}");
    assert_line(&run, &format!("BLK sum {:08x}", fnv1a(head)));
    let _ = backend.wait();
    assert_pattern_in(&std::fs::read(img).unwrap());
}

#[test]
fn external_backend_started_by_the_test() {
    let dir = Scratch::new("ext");
    let img = dir.path("ext.raw");
    let head = raw_image(&img, 16);
    let sock = dir.path("blk.sock");
    let backend = external_backend(&img, &sock);
    guest_io_through(&sock, &img, &head, backend);
}

#[test]
fn bad_drives_are_clear_errors() {
    let run = tern(
        &["--kernel", UNIKERNEL, "--drive", "path=/nonexistent.raw"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), 2, "{run}");
    assert!(run.stderr.contains("drive drive0"), "{run}");
    let run = tern(
        &["--kernel", UNIKERNEL, "--drive", "socket=/nonexistent.sock"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code(), 2, "{run}");
    assert!(
        run.stderr
            .contains("cannot connect to vhost-user backend /nonexistent.sock"),
        "{run}"
    );
}

#[test]
fn the_driver_can_reset_and_reinitialise_the_device() {
    let dir = Scratch::new("reinit");
    let img = dir.path("reinit.raw");
    raw_image(&img, 16);
    let spec = format!("path={},queues=2", img.display());
    let run = boot(&[&spec], "checks=blk blkpasses=2 action=exit code=0");
    assert_eq!(run.code(), 1, "{run}");
    assert_line(&run, "BLK pass 2");
    // Both passes did their I/O on both queues.
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.trim() == "BLK queue 1 ok")
            .count(),
        2,
        "{run}"
    );
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.trim() == "BLK flush status=0")
            .count(),
        2,
        "{run}"
    );
}

#[test]
fn a_restarted_external_backend_is_reconnected_and_io_resumes() {
    let dir = Scratch::new("reconnect");
    let img = dir.path("re.raw");
    raw_image(&img, 16);
    let sock = dir.path("re.sock");
    let mut first = external_backend(&img, &sock);
    require_kvm();
    let spec = format!("socket={}", sock.display());
    let mut child = Command::new(tern_bin())
        .args(["--kernel", UNIKERNEL, "--memory", "64", "--drive", &spec])
        .args([
            "--cmdline",
            "checks=blk blkwrite=1 blkpasses=3 action=exit code=6",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Follow the console; when the guest is busy with the disk, kill the
    // backend and start a new one on the same socket.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut seen = String::new();
    let mut second = None;
    let mut sums = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                seen.push_str(&l);
                seen.push('\n');
                // Pass 2 has read its checksum and is writing the pattern.
                sums += usize::from(l.starts_with("BLK sum"));
                if second.is_none() && sums == 2 {
                    first.kill().unwrap();
                    let _ = first.wait();
                    let _ = std::fs::remove_file(&sock);
                    second = Some(external_backend(&img, &sock));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => assert!(std::time::Instant::now() < deadline, "no end:\n{seen}"),
        }
    }
    let status = child.wait().unwrap();
    // Already reaped when it was replaced; otherwise end it here.
    let _ = first.kill();
    let _ = first.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        second.is_some(),
        "the guest never reached pass 2's I/O:\n{seen}"
    );
    assert!(err.contains("backend reconnected"), "{err}");
    assert!(seen.contains("BLK pass 3"), "{seen}");
    assert!(
        seen.contains("RESULT pass"),
        "I/O resumed without errors after the restart:\n{seen}\n{err}"
    );
    assert_eq!(status.code(), Some(13), "{seen}\n{err}");
    if let Some(mut s) = second {
        let _ = s.wait();
    }
}

/// A tern waiting for its VM starts tern-blk ahead with `--args-on-stdin`;
/// the backend then serves what it is told on stdin, and exits quietly
/// when its stdin closes with nothing on it.
#[test]
fn a_backend_started_ahead_serves_the_arguments_it_is_given_later() {
    use std::io::Write;
    let dir = Scratch::new("ahead");
    let img = dir.path("ahead.raw");
    let head = raw_image(&img, 16);
    let sock = dir.path("blk.sock");
    let start = |stdin_args: Option<Vec<&str>>| {
        let mut child = Command::new(tern_blk())
            .arg("--args-on-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern-blk");
        // It waits: no socket yet.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!sock.exists(), "the socket appeared before the arguments");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(args) = stdin_args {
            for a in args {
                stdin.write_all(a.as_bytes()).unwrap();
                stdin.write_all(b"\0").unwrap();
            }
        }
        drop(stdin);
        child
    };

    let idle = start(None).wait_with_output().unwrap();
    assert!(idle.status.success(), "{idle:?}");
    assert!(idle.stderr.is_empty(), "{idle:?}");

    let backend = start(Some(vec![
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]));
    wait_for_socket(&sock);
    guest_io_through(&sock, &img, &head, backend);
}
