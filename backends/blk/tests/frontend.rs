//! End-to-end tests of the `tern-blk` binary through a real vhost-user
//! connection (see `common/` for the frontend and driver).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{blk, discard_segment, pattern, rd, wr, Backend, TestFrontend};

const DISK: u64 = 16 << 20;

/// A scratch dir with a `DISK`-byte raw image filled with a pattern.
fn raw_image(name: &str) -> (PathBuf, PathBuf) {
    let dir = common::scratch_dir(name);
    let img = dir.join("disk.raw");
    std::fs::write(&img, pattern(DISK as usize, 7)).unwrap();
    (dir, img)
}

fn start(dir: &Path, img: &Path, extra: &[&str]) -> Backend {
    let mut args = vec!["--image", img.to_str().unwrap(), "--log-level", "debug"];
    args.extend_from_slice(extra);
    Backend::spawn(&dir.join("blk.sock"), &args)
}

#[test]
fn config_read_write_flush_get_id() {
    let (dir, img) = raw_image("basic");
    let mut be = start(
        &dir,
        &img,
        &["--format", "raw", "--serial", "tern-serial-1"],
    );
    let mut fe = TestFrontend::connect(&be.socket, 1, true);

    // Configuration space and features.
    assert_eq!(fe.capacity(), DISK / 512);
    let cfg = fe.config(0, 60);
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        512,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(cfg[34..36].try_into().unwrap()),
        1,
        "num_queues"
    );
    assert_ne!(fe.features & blk::F_VERSION_1, 0);
    assert_eq!(fe.features & (blk::F_RO | blk::F_MQ), 0);

    // Write a pattern with a three-descriptor chain (odd sizes, unaligned
    // addresses), then read it back with a differently split chain.
    let data = pattern(3 * 4096, 42);
    let a = fe.alloc(1000, 4096, 3);
    let b = fe.alloc(4096, 4096, 0);
    let c = fe.alloc(3 * 4096 - 1000 - 4096, 512, 0);
    fe.poke(a, &data[..1000]);
    fe.poke(b, &data[1000..5096]);
    fe.poke(c, &data[5096..]);
    let (st, used) = fe.request(
        0,
        blk::T_OUT,
        64,
        &[rd(a, 1000), rd(b, 4096), rd(c, (3 * 4096 - 5096) as u32)],
    );
    assert_eq!((st, used), (blk::S_OK, 1));

    let r1 = fe.alloc(512, 512, 0);
    let r2 = fe.alloc(3 * 4096 - 512, 4096, 0);
    let (st, used) = fe.request(0, blk::T_IN, 64, &[wr(r1, 512), wr(r2, 3 * 4096 - 512)]);
    assert_eq!((st, used), (blk::S_OK, 3 * 4096 + 1));
    let mut back = fe.peek(r1, 512);
    back.extend(fe.peek(r2, 3 * 4096 - 512));
    assert!(back == data, "read back what was written");

    // The file has it too, and untouched data around it is intact.
    let file = std::fs::read(&img).unwrap();
    assert!(file[64 * 512..64 * 512 + data.len()] == data[..]);
    let orig = pattern(DISK as usize, 7);
    assert!(file[..64 * 512] == orig[..64 * 512]);

    // Unwritten data reads as the original file content.
    let r = fe.alloc(8192, 4096, 0);
    let (st, _) = fe.request(0, blk::T_IN, 1000, &[wr(r, 8192)]);
    assert_eq!(st, blk::S_OK);
    assert!(fe.peek(r, 8192) == orig[1000 * 512..1000 * 512 + 8192]);

    // Read past the end: IOERR; the last sector itself is fine.
    let (st, used) = fe.request(0, blk::T_IN, DISK / 512, &[wr(r, 512)]);
    assert_eq!((st, used), (blk::S_IOERR, 1));
    let (st, _) = fe.request(0, blk::T_IN, DISK / 512 - 1, &[wr(r, 1024)]);
    assert_eq!(st, blk::S_IOERR);
    let (st, _) = fe.request(0, blk::T_IN, DISK / 512 - 1, &[wr(r, 512)]);
    assert_eq!(st, blk::S_OK);

    // GET_ID: the serial, zero padded to 20 bytes.
    let id = fe.alloc(20, 8, 0);
    fe.poke(id, &[0xee; 20]);
    let (st, used) = fe.request(0, blk::T_GET_ID, 0, &[wr(id, 20)]);
    assert_eq!((st, used), (blk::S_OK, 21));
    let mut want = b"tern-serial-1".to_vec();
    want.resize(20, 0);
    assert_eq!(fe.peek(id, 20), want);

    // FLUSH.
    let (st, used) = fe.request(0, blk::T_FLUSH, 0, &[]);
    assert_eq!((st, used), (blk::S_OK, 1));

    // Unknown request type.
    let (st, _) = fe.request(0, 0x77, 0, &[]);
    assert_eq!(st, blk::S_UNSUPP);

    assert!(
        fe.queues[0].calls > 0,
        "completions were signalled on the call eventfd"
    );

    // Disconnect: the backend exits 0 and removes its socket.
    drop(fe);
    let status = be.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(!be.socket.exists(), "socket removed");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn discard_punches_holes_in_raw() {
    let (dir, img) = raw_image("discard");
    let be = start(&dir, &img, &[]);
    let mut fe = TestFrontend::connect(&be.socket, 1, false);
    let before = common::allocated_bytes(&img);
    assert!(before >= DISK, "image starts fully allocated ({before})");

    // Two segments, 4 MiB total, 4 KiB aligned.
    let seg = fe.alloc(32, 16, 0);
    let mut table = discard_segment(2048, 4096, 0).to_vec();
    table.extend(discard_segment(16384, 4096, 0));
    fe.poke(seg, &table);
    let (st, _) = fe.request(0, blk::T_DISCARD, 0, &[rd(seg, 32)]);
    assert_eq!(st, blk::S_OK);
    let after = common::allocated_bytes(&img);
    assert!(
        after + (4 << 20) <= before,
        "allocated bytes {before} -> {after}: discard did not free blocks"
    );
    // Discarded ranges read as zeros.
    let r = fe.alloc(4096, 4096, 0);
    let (st, _) = fe.request(0, blk::T_IN, 2048, &[wr(r, 4096)]);
    assert_eq!(st, blk::S_OK);
    assert!(fe.peek(r, 4096).iter().all(|&b| b == 0));

    // WRITE_ZEROES with UNMAP.
    fe.poke(seg, &discard_segment(100, 8, 1));
    let (st, _) = fe.request(0, blk::T_WRITE_ZEROES, 0, &[rd(seg, 16)]);
    assert_eq!(st, blk::S_OK);
    let file = std::fs::read(&img).unwrap();
    assert!(file[100 * 512..108 * 512].iter().all(|&b| b == 0));
    assert_ne!(file[108 * 512..109 * 512], [0u8; 512]);

    // UNMAP flag on a DISCARD is unsupported; too many segments is an error.
    fe.poke(seg, &discard_segment(0, 8, 1));
    let (st, _) = fe.request(0, blk::T_DISCARD, 0, &[rd(seg, 16)]);
    assert_eq!(st, blk::S_UNSUPP);
    let many = fe.alloc(16 * 17, 16, 0);
    let (st, _) = fe.request(0, blk::T_DISCARD, 0, &[rd(many, 16 * 17)]);
    assert_eq!(st, blk::S_IOERR);
    drop(fe);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn read_only_refuses_writes() {
    let (dir, img) = raw_image("readonly");
    let before = std::fs::read(&img).unwrap();
    let be = start(&dir, &img, &["--readonly"]);
    let mut fe = TestFrontend::connect(&be.socket, 1, true);
    assert_ne!(fe.features & blk::F_RO, 0, "VIRTIO_BLK_F_RO offered");

    let w = fe.alloc(4096, 4096, 0);
    fe.poke(w, &[0x5a; 4096]);
    let (st, used) = fe.request(0, blk::T_OUT, 0, &[rd(w, 4096)]);
    assert_eq!((st, used), (blk::S_IOERR, 1));
    let seg = fe.alloc(16, 16, 0);
    fe.poke(seg, &discard_segment(0, 8, 0));
    let (st, _) = fe.request(0, blk::T_DISCARD, 0, &[rd(seg, 16)]);
    assert_eq!(st, blk::S_IOERR);
    fe.poke(seg, &discard_segment(0, 8, 0));
    let (st, _) = fe.request(0, blk::T_WRITE_ZEROES, 0, &[rd(seg, 16)]);
    assert_eq!(st, blk::S_IOERR);

    // Reads work.
    let (st, _) = fe.request(0, blk::T_IN, 0, &[wr(w, 4096)]);
    assert_eq!(st, blk::S_OK);
    assert!(fe.peek(w, 4096) == before[..4096]);
    drop(fe);
    assert!(std::fs::read(&img).unwrap() == before, "image unchanged");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_queues_are_both_served() {
    let (dir, img) = raw_image("mq");
    let be = start(&dir, &img, &["--queues", "2"]);
    let mut fe = TestFrontend::connect(&be.socket, 2, true);
    assert_ne!(fe.features & blk::F_MQ, 0);
    let cfg = fe.config(34, 2);
    assert_eq!(u16::from_le_bytes([cfg[0], cfg[1]]), 2);

    // Both queues in flight at once: write different sectors, then read them back.
    let a = fe.alloc(8192, 4096, 0);
    let b = fe.alloc(8192, 4096, 0);
    fe.poke(a, &pattern(8192, 1));
    fe.poke(b, &pattern(8192, 2));
    let ha = fe.submit(0, blk::T_OUT, 0, &[rd(a, 8192)], true);
    let hb = fe.submit(1, blk::T_OUT, 16, &[rd(b, 8192)], true);
    fe.queues[1].kick();
    fe.queues[0].kick();
    for (q, h) in [(0usize, ha), (1, hb)] {
        let used = fe.queues[q]
            .wait_used(&fe.mem, Duration::from_secs(10))
            .expect("queue served");
        assert_eq!(used.id, h);
        let st = fe.peek(TestFrontend::header_addr(q) + 0x100, 1)[0];
        assert_eq!(st, blk::S_OK, "queue {q}");
    }
    for round in 0..20u64 {
        let q = (round % 2) as usize;
        let r = fe.alloc(8192, 4096, 0);
        let (st, _) = fe.request(q, blk::T_IN, 16 * (round % 2), &[wr(r, 8192)]);
        assert_eq!(st, blk::S_OK);
        assert!(fe.peek(r, 8192) == pattern(8192, 1 + (round % 2) as u8));
        fe.free_all();
    }
    drop(fe);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_chain_does_not_kill_the_backend() {
    let (dir, img) = raw_image("malformed");
    let mut be = start(&dir, &img, &[]);
    let mut fe = TestFrontend::connect(&be.socket, 1, true);
    let r = fe.alloc(4096, 4096, 0);

    // Status descriptor not writable: unanswerable, returned with length 0.
    let head = fe.submit(0, blk::T_IN, 0, &[wr(r, 4096)], false);
    fe.queues[0].kick();
    let used = fe.queues[0]
        .wait_used(&fe.mem, Duration::from_secs(10))
        .expect("chain returned");
    assert_eq!(used, common::Used { id: head, len: 0 });
    assert_eq!(
        fe.peek(TestFrontend::header_addr(0) + 0x100, 1)[0],
        0xff,
        "status untouched"
    );

    // Data outside guest memory and a wrong-direction buffer: IOERR.
    let (st, _) = fe.request(0, blk::T_IN, 0, &[wr(0x4000_0000, 512)]);
    assert_eq!(st, blk::S_IOERR);
    let (st, _) = fe.request(0, blk::T_IN, 0, &[rd(r, 512)]);
    assert_eq!(st, blk::S_IOERR);
    let (st, _) = fe.request(0, blk::T_OUT, 0, &[rd(r, 100)]);
    assert_eq!(st, blk::S_IOERR);

    // A following good request still completes.
    let (st, used) = fe.request(0, blk::T_IN, 0, &[wr(r, 4096)]);
    assert_eq!((st, used), (blk::S_OK, 4097));
    assert!(be.is_running());
    drop(fe);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn keep_listening_serves_a_reconnect() {
    let (dir, img) = raw_image("reconnect");
    let mut be = start(&dir, &img, &["--keep-listening"]);
    for round in 0..2u8 {
        let mut fe = TestFrontend::connect(&be.socket, 1, round == 0);
        let w = fe.alloc(512, 512, 0);
        fe.poke(w, &[round + 1; 512]);
        let (st, _) = fe.request(0, blk::T_OUT, 0, &[rd(w, 512)]);
        assert_eq!(st, blk::S_OK);
        let (st, _) = fe.request(0, blk::T_IN, 0, &[wr(w, 512)]);
        assert_eq!(st, blk::S_OK);
        assert_eq!(fe.peek(w, 512), vec![round + 1; 512]);
        drop(fe);
        std::thread::sleep(Duration::from_millis(100));
        assert!(be.is_running(), "still listening after disconnect {round}");
        assert!(be.socket.exists());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn startup_errors_exit_2_with_one_line() {
    let dir = common::scratch_dir("errors");
    let sock = dir.join("s.sock");
    let missing = dir.join("missing.img");
    let (st, err) = common::run_to_exit(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("missing.img"), "{err}");

    // Not a qcow2 file.
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let (st, err) = common::run_to_exit(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("qcow2") || err.contains("Qcow2"), "{err}");

    // Socket in use by a live backend.
    let be = Backend::spawn(&sock, &["--image", img.to_str().unwrap()]);
    let (st, err) = common::run_to_exit(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("in use"), "{err}");
    // The liveness probe must not have ended the live backend.
    std::thread::sleep(Duration::from_millis(200));
    let mut be = be;
    assert!(be.is_running(), "probe killed the live backend");
    drop(TestFrontend::connect(&be.socket, 1, true));
    assert!(be.wait(Duration::from_secs(10)).success());

    // A stale socket file (no listener) is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let be = Backend::spawn(&stale, &["--image", img.to_str().unwrap()]);
    let fe = TestFrontend::connect(&be.socket, 1, true);
    drop(fe);
    drop(be);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn qcow2_end_to_end() {
    let dir = common::scratch_dir("qcow2");
    let img = dir.join("disk.qcow2");
    tern_image::create_qcow2(&img, DISK, 16, None).unwrap();
    // No --format: probed.
    let mut be = start(&dir, &img, &["--serial", "q"]);
    let mut fe = TestFrontend::connect(&be.socket, 1, true);
    assert_eq!(fe.capacity(), DISK / 512);

    // Fresh image reads zeros.
    let r = fe.alloc(65536, 4096, 0);
    let (st, _) = fe.request(0, blk::T_IN, 0, &[wr(r, 65536)]);
    assert_eq!(st, blk::S_OK);
    assert!(fe.peek(r, 65536).iter().all(|&b| b == 0));

    // Writes spanning cluster boundaries (64 KiB clusters), multi-descriptor.
    let data = pattern(3 * 65536, 9);
    let a = fe.alloc(100_000, 4096, 1);
    let b = fe.alloc(3 * 65536 - 100_000, 4096, 0);
    fe.poke(a, &data[..100_000]);
    fe.poke(b, &data[100_000..]);
    let sector = 65536 / 512 - 3;
    let (st, _) = fe.request(
        0,
        blk::T_OUT,
        sector,
        &[rd(a, 100_000), rd(b, (3 * 65536 - 100_000) as u32)],
    );
    assert_eq!(st, blk::S_OK);
    let (st, _) = fe.request(0, blk::T_FLUSH, 0, &[]);
    assert_eq!(st, blk::S_OK);
    let r = fe.alloc(3 * 65536, 4096, 0);
    let (st, used) = fe.request(0, blk::T_IN, sector, &[wr(r, 3 * 65536)]);
    assert_eq!((st, used), (blk::S_OK, 3 * 65536 + 1));
    assert!(fe.peek(r, 3 * 65536) == data);

    // Write zeroes over part of it.
    let seg = fe.alloc(16, 16, 0);
    fe.poke(seg, &discard_segment(sector + 8, 16, 1));
    let (st, _) = fe.request(0, blk::T_WRITE_ZEROES, 0, &[rd(seg, 16)]);
    assert_eq!(st, blk::S_OK);
    drop(fe);
    assert!(be.wait(Duration::from_secs(10)).success());

    // A valid qcow2 by QEMU's checker too, when it is installed.
    if let Ok(out) = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img)
        .output()
    {
        assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The data persisted, through the image library's own reader.
    let image = tern_image::open(&img, tern_image::Format::Qcow2, true, false).unwrap();
    let mut back = vec![0u8; 3 * 65536];
    image.read_at(&mut back, sector * 512).unwrap();
    let mut want = data.clone();
    want[8 * 512..24 * 512].fill(0);
    assert!(back == want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn signals_usr1_logs_term_exits_and_removes_socket() {
    let (dir, img) = raw_image("signals");
    let mut be = start(&dir, &img, &[]);
    let pid = be.child.id() as libc::pid_t;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(be.is_running(), "SIGUSR1 only logs");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(be.wait(Duration::from_secs(10)).success());
    assert!(!be.socket.exists(), "socket removed on SIGTERM");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn direct_io_round_trip_or_clear_error() {
    let (dir, img) = raw_image("direct");
    let sock = dir.join("blk.sock");
    let args = [
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--direct",
    ];
    // Probe: does this filesystem take O_DIRECT?
    use std::os::unix::fs::OpenOptionsExt;
    let supported = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img)
        .is_ok();
    if !supported {
        let (st, err) = common::run_to_exit(&args);
        assert_eq!(st.code(), Some(2), "{err}");
        assert!(err.contains("O_DIRECT"), "{err}");
        return;
    }
    let be = Backend::spawn(&sock, &args[2..]);
    let mut fe = TestFrontend::connect(&be.socket, 1, true);
    // Unaligned guest buffers go through the bounce buffer; aligned ones do not.
    let data = pattern(8192, 3);
    let a = fe.alloc(1000, 4096, 7);
    let b = fe.alloc(8192 - 1000, 4096, 0);
    fe.poke(a, &data[..1000]);
    fe.poke(b, &data[1000..]);
    let (st, _) = fe.request(0, blk::T_OUT, 8, &[rd(a, 1000), rd(b, 8192 - 1000)]);
    assert_eq!(st, blk::S_OK);
    let r = fe.alloc(8192, 4096, 0);
    let (st, _) = fe.request(0, blk::T_IN, 8, &[wr(r, 8192)]);
    assert_eq!(st, blk::S_OK);
    assert!(fe.peek(r, 8192) == data);
    drop(fe);
    let file = std::fs::read(&img).unwrap();
    assert!(file[4096..4096 + 8192] == data[..]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dirty_log_marks_pages_the_device_wrote() {
    let (dir, img) = raw_image("dirtylog");
    let be = start(&dir, &img, &[]);
    let mut fe = TestFrontend::connect_opts(&be.socket, 1, true, true);
    assert!(fe
        .protocol_features
        .contains(vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD));
    let log = fe.start_dirty_log();

    // A read into two data pages (zero-copy path), one page left alone.
    let r = fe.alloc(3 * 4096, 4096, 0);
    let (st, _) = fe.request(0, blk::T_IN, 0, &[wr(r, 8192)]);
    assert_eq!(st, blk::S_OK);
    assert!(common::page_dirty(&log, r));
    assert!(common::page_dirty(&log, r + 4096));
    assert!(
        !common::page_dirty(&log, r + 8192),
        "untouched page is clean"
    );
    // The status byte's page and the used ring's page.
    assert!(common::page_dirty(
        &log,
        TestFrontend::header_addr(0) + 0x100
    ));
    assert!(common::page_dirty(&log, fe.queues[0].used));

    // A write does not dirty its source buffer; GET_ID dirties its buffer.
    let w = fe.alloc(4096, 4096, 0);
    let (st, _) = fe.request(0, blk::T_OUT, 0, &[rd(w, 4096)]);
    assert_eq!(st, blk::S_OK);
    assert!(!common::page_dirty(&log, w));
    let id = fe.alloc(4096, 4096, 0);
    let (st, _) = fe.request(0, blk::T_GET_ID, 0, &[wr(id, 20)]);
    assert_eq!(st, blk::S_OK);
    assert!(common::page_dirty(&log, id));
    drop(fe);
    let _ = std::fs::remove_dir_all(dir);
}
