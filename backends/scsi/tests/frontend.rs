//! End-to-end tests of the `tern-scsi` binary through a real vhost-user
//! socket, driven by `tern-vhost-driver` (no VMM, no mock).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_vhost_driver::scsi::{
    lun_field, rw10, rw16, ScsiFrontend, STATUS_CHECK_CONDITION, STATUS_GOOD, S_BAD_TARGET, S_OK,
    S_OVERRUN, TMF_ABORT_TASK, TMF_LOGICAL_UNIT_RESET,
};
use tern_vhost_driver::{pattern, scratch_dir_in, Backend};

const DISK: u64 = 4 << 20;
const RO_DISK: u64 = 1 << 20;
const QCOW_DISK: u64 = 8 << 20;

struct Setup {
    dir: PathBuf,
    rw: PathBuf,
    ro: PathBuf,
    backend: Backend,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three LUNs: 0 raw read-write, 1 raw read-only, 2 qcow2.
fn start(name: &str, extra: &[&str]) -> Setup {
    start_with(name, "", extra)
}

/// [`start`], with `rw_opts` (e.g. `,direct=on`) added to LUN 0's spec.
fn start_with(name: &str, rw_opts: &str, extra: &[&str]) -> Setup {
    let dir = scratch_dir_in(&std::env::temp_dir(), &format!("scsi-{name}"));
    let rw = dir.join("rw.raw");
    let ro = dir.join("ro.raw");
    let qc = dir.join("disk.qcow2");
    std::fs::write(&rw, pattern(DISK as usize, 3)).unwrap();
    std::fs::write(&ro, vec![0xAB; RO_DISK as usize]).unwrap();
    tern_image::create_qcow2(&qc, QCOW_DISK, 16, None).unwrap();
    let luns = [
        format!("{},format=raw,serial=SN-RW{rw_opts}", rw.display()),
        format!("{},ro=on", ro.display()),
        format!("{},format=qcow2", qc.display()),
    ];
    let mut args = vec!["--log-level", "debug"];
    for l in &luns {
        args.push("--lun");
        args.push(l);
    }
    args.extend_from_slice(extra);
    let backend = Backend::spawn(
        Path::new(env!("CARGO_BIN_EXE_tern-scsi")),
        &dir.join("scsi.sock"),
        &args,
    );
    Setup {
        dir,
        rw,
        ro,
        backend,
    }
}

#[test]
fn inquiry_capacity_and_luns() {
    let s = start("inq", &["--queues", "2"]);
    let mut fe = ScsiFrontend::connect(&s.backend.socket, 2, true, 1 << 20).unwrap();
    let cfg = fe.config();
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 2, "num_queues");
    assert_eq!((u32_at(20), u32_at(24)), (96, 32), "sense_size, cdb_size");
    assert_eq!(u32_at(32), 16383, "max_lun");

    // Standard INQUIRY on every LUN, from both request queues.
    for lun in 0..3 {
        let r = fe.command(
            lun as usize % 2,
            lun_field(lun),
            &[0x12, 0, 0, 0, 96, 0],
            &[],
            96,
        );
        assert_eq!((r.response, r.status), (S_OK, STATUS_GOOD));
        assert_eq!(&r.data[8..16], b"TERN    ");
        assert_eq!(r.resid, 96 - 36);
        assert_eq!(r.used_len, 108 + 36);
    }
    // VPD pages: supported list, serial, identification, limits, provisioning.
    let r = fe.command(0, lun_field(0), &[0x12, 1, 0x00, 0, 255, 0], &[], 255);
    assert_eq!(&r.data[4..10], &[0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);
    let r = fe.command(0, lun_field(0), &[0x12, 1, 0x80, 0, 255, 0], &[], 255);
    assert_eq!(&r.data[4..9], b"SN-RW");
    let r = fe.command(0, lun_field(1), &[0x12, 1, 0x80, 0, 255, 0], &[], 255);
    assert_eq!(&r.data[4..13], b"tern-lun1");
    for page in [0x83, 0xB0, 0xB1, 0xB2] {
        let r = fe.command(0, lun_field(2), &[0x12, 1, page, 0, 255, 0], &[], 255);
        assert_eq!((r.status, r.data[1]), (STATUS_GOOD, page));
    }

    // READ CAPACITY(16) per LUN.
    for (lun, size) in [(0, DISK), (1, RO_DISK), (2, QCOW_DISK)] {
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x10;
        c[13] = 32;
        let r = fe.command(0, lun_field(lun), &c, &[], 32);
        assert_eq!(r.status, STATUS_GOOD);
        assert_eq!(
            u64::from_be_bytes(r.data[0..8].try_into().unwrap()),
            size / 512 - 1
        );
        assert_eq!(u32::from_be_bytes(r.data[8..12].try_into().unwrap()), 512);
        assert_eq!(r.data[14] & 0x80, 0x80, "LBPME");
    }

    // REPORT LUNS lists all three; a missing LUN is a bad target.
    let r = fe.command(
        0,
        lun_field(0),
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[],
        256,
    );
    assert_eq!(u32::from_be_bytes(r.data[0..4].try_into().unwrap()), 24);
    assert_eq!(r.data[8 + 2 * 8 + 1], 2);
    let r = fe.command(0, lun_field(3), &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.response, S_BAD_TARGET);
    let r = fe.command(
        0,
        [1, 1, 0x40, 0, 0, 0, 0, 0],
        &[0x12, 0, 0, 0, 36, 0],
        &[],
        36,
    );
    assert_eq!(r.response, S_BAD_TARGET);

    // MODE SENSE(6) all pages: caching page with WCE; no write protect on LUN 0.
    let r = fe.command(0, lun_field(0), &[0x1A, 0x08, 0x3F, 0, 255, 0], &[], 255);
    assert_eq!(
        (r.status, r.data[2], r.data[4], r.data[6] & 0x04),
        (STATUS_GOOD, 0, 0x08, 0x04)
    );
    let r = fe.command(0, lun_field(1), &[0x1A, 0x08, 0x08, 0, 255, 0], &[], 255);
    assert_eq!(r.data[2] & 0x80, 0x80, "write protected");

    // Task management.
    assert_eq!(fe.tmf(TMF_ABORT_TASK, lun_field(0), 1), 0);
    assert_eq!(fe.tmf(TMF_LOGICAL_UNIT_RESET, lun_field(2), 0), 0);
    assert_eq!(
        fe.tmf(TMF_LOGICAL_UNIT_RESET, lun_field(9), 0),
        S_BAD_TARGET
    );
    drop(fe);
    let mut be = s;
    assert!(be.backend.wait(Duration::from_secs(10)).success());
}

#[test]
fn write_read_round_trips() {
    let s = start("rw", &[]);
    let mut fe = ScsiFrontend::connect(&s.backend.socket, 1, true, 1 << 20).unwrap();
    // WRITE(10) then READ(10) on LUN 0, checked against the file.
    let data = pattern(8192, 42);
    let r = fe.command(0, lun_field(0), &rw10(true, 100, 16), &data, 0);
    assert_eq!((r.response, r.status), (S_OK, STATUS_GOOD));
    let r = fe.command(0, lun_field(0), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(r.status, STATUS_GOOD, "SYNCHRONIZE CACHE");
    let file = std::fs::read(&s.rw).unwrap();
    assert_eq!(&file[100 * 512..100 * 512 + 8192], &data[..]);
    let r = fe.command(0, lun_field(0), &rw10(false, 100, 16), &[], 8192);
    assert_eq!((r.status, r.used_len), (STATUS_GOOD, 108 + 8192));
    assert_eq!(r.data, data);
    // The rest of the file is the original pattern.
    let orig = pattern(DISK as usize, 3);
    let r = fe.command(0, lun_field(0), &rw16(false, 0, 100), &[], 100 * 512);
    assert_eq!(&r.data[..], &orig[..100 * 512]);

    // WRITE(16)/READ(16) on the qcow2 LUN.
    let data = pattern(65536, 9);
    let r = fe.command(0, lun_field(2), &rw16(true, 4000, 128), &data, 0);
    assert_eq!(r.status, STATUS_GOOD);
    let r = fe.command(0, lun_field(2), &rw16(false, 4000, 128), &[], 65536);
    assert_eq!(r.data, data);
    let r = fe.command(0, lun_field(2), &rw16(false, 0, 8), &[], 4096);
    assert!(
        r.data.iter().all(|&b| b == 0),
        "unallocated qcow2 reads zeros"
    );

    // Errors with the sense a disk gives.
    let r = fe.command(0, lun_field(0), &rw16(false, DISK / 512 - 1, 2), &[], 1024);
    assert_eq!(r.status, STATUS_CHECK_CONDITION);
    assert_eq!(r.sense_key(), Some((0x5, 0x21, 0x00)), "LBA out of range");
    let r = fe.command(
        0,
        lun_field(0),
        &[0xC1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
        0,
    );
    assert_eq!(r.sense_key(), Some((0x5, 0x20, 0x00)), "invalid opcode");
    let r = fe.command(0, lun_field(0), &rw10(false, 0, 8), &[], 512);
    assert_eq!(r.response, S_OVERRUN);

    // The read-only LUN refuses writes with DATA PROTECT and stays unchanged.
    let r = fe.command(0, lun_field(1), &rw10(true, 0, 1), &[0u8; 512], 0);
    assert_eq!((r.response, r.status), (S_OK, STATUS_CHECK_CONDITION));
    assert_eq!(r.sense_key(), Some((0x7, 0x27, 0x00)));
    assert!(std::fs::read(&s.ro).unwrap().iter().all(|&b| b == 0xAB));
    let r = fe.command(0, lun_field(1), &rw10(false, 0, 1), &[], 512);
    assert!(r.data.iter().all(|&b| b == 0xAB));

    // A chain whose response buffer is too short is returned unanswered.
    let r = fe.command_with(0, lun_field(0), &[0x00, 0, 0, 0, 0, 0], &[], 0, 50);
    assert_eq!(r.used_len, 0);
    // And the device keeps working.
    let r = fe.command(0, lun_field(0), &[0x00, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!((r.response, r.status, r.used_len), (S_OK, STATUS_GOOD, 108));
}

#[test]
fn engines_and_direct_io_move_the_same_bytes() {
    for (name, opts, extra) in [
        ("direct", ",direct=on", &[][..]),
        ("sync", "", &["--aio", "sync"][..]),
        ("direct-sync", ",direct=on", &["--aio", "sync"][..]),
    ] {
        let s = start_with(name, opts, extra);
        let mut fe = ScsiFrontend::connect(&s.backend.socket, 1, true, 1 << 20).unwrap();
        let orig = pattern(DISK as usize, 3);
        // Aligned and odd-sized transfers, a data-in buffer longer than the
        // transfer (residual), and a write then read back.
        let r = fe.command(0, lun_field(0), &rw16(false, 8, 8), &[], 4096 + 512);
        assert_eq!((r.response, r.status), (S_OK, STATUS_GOOD), "{name}");
        assert_eq!(r.used_len, 108 + 4096, "{name}");
        assert_eq!(&r.data[..4096], &orig[8 * 512..8 * 512 + 4096], "{name}");
        let r = fe.command(0, lun_field(0), &rw10(false, 3, 5), &[], 2560);
        assert_eq!(&r.data[..], &orig[3 * 512..8 * 512], "{name}");
        let data = pattern(3 * 65536, 77);
        let r = fe.command(0, lun_field(0), &rw16(true, 2048, 384), &data, 0);
        assert_eq!((r.response, r.status), (S_OK, STATUS_GOOD), "{name}");
        let r = fe.command(
            0,
            lun_field(0),
            &rw16(false, 2048, 384),
            &[],
            data.len() as u32,
        );
        assert_eq!(r.data, data, "{name}");
        let r = fe.command(0, lun_field(0), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0);
        assert_eq!(r.status, STATUS_GOOD, "{name}: SYNCHRONIZE CACHE");
        let file = std::fs::read(&s.rw).unwrap();
        assert_eq!(
            &file[2048 * 512..2048 * 512 + data.len()],
            &data[..],
            "{name}"
        );
        // Out of range and overrun still answered as a disk does.
        let r = fe.command(0, lun_field(0), &rw16(false, DISK / 512 - 1, 2), &[], 1024);
        assert_eq!(r.sense_key(), Some((0x5, 0x21, 0x00)), "{name}");
        let r = fe.command(0, lun_field(0), &rw10(false, 0, 8), &[], 512);
        assert_eq!(r.response, S_OVERRUN, "{name}");
    }
}

#[test]
fn unmap_punches_a_hole_in_the_raw_file() {
    let s = start("unmap", &[]);
    let mut fe = ScsiFrontend::connect(&s.backend.socket, 1, false, 1 << 20).unwrap();
    let before = tern_vhost_driver::allocated_bytes(&s.rw);
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&2048u64.to_be_bytes());
    list.extend_from_slice(&4096u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let r = fe.command(
        0,
        lun_field(0),
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &list,
        0,
    );
    assert_eq!(r.status, STATUS_GOOD);
    let after = tern_vhost_driver::allocated_bytes(&s.rw);
    assert!(after + (2 << 20) <= before, "allocated {before} -> {after}");
    let r = fe.command(0, lun_field(0), &rw16(false, 2048, 8), &[], 4096);
    assert!(r.data.iter().all(|&b| b == 0));
}
