//! Discard and write-zeroes on qcow2.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use tern_image::{create_qcow2, open, DiskImage, Format};

const SIZE: u64 = 8 << 20;

fn fill(img: &dyn DiskImage, expected: &mut [u8]) {
    write_both(img, expected, &pattern(9, SIZE as usize), 0);
}

fn zero_ops(img: &dyn DiskImage, expected: &mut [u8], cs: u64) {
    let mut z = |off: u64, len: u64, kind: u8| {
        match kind {
            0 => img.discard(off, len),
            1 => img.write_zeroes(off, len, true),
            _ => img.write_zeroes(off, len, false),
        }
        .unwrap_or_else(|e| panic!("zeroing {len} at {off:#x}: {e}"));
        expected[off as usize..(off + len) as usize].fill(0);
    };
    z(100, 200, 0); // inside one cluster
    z(cs - 10, 3 * cs + 20, 0); // partial, whole, partial
    z(1 << 20, 2 << 20, 0); // many whole clusters
    z(4 << 20, 5 * cs + 1, 1);
    z((5 << 20) + 7, 2 * cs, 2);
    z(6 << 20, 4 * cs, 2); // whole clusters kept allocated with the zero flag
    z(SIZE - cs, cs, 0);
    z(1 << 20, cs, 0); // already zero
}

fn check_zeroing(p: &Path, cs: u64, with_data: bool) {
    let mut expected = vec![0u8; SIZE as usize];
    {
        let img = open(p, Format::Qcow2, false, false).unwrap();
        if with_data {
            fill(&*img, &mut expected);
        } else {
            expected.copy_from_slice(&read_all(&*img));
        }
        img.flush().unwrap();
        let blocks_before = std::fs::metadata(p).unwrap().blocks();
        zero_ops(&*img, &mut expected, cs);
        img.flush().unwrap();
        assert_same("after zeroing", &read_all(&*img), &expected);
        if with_data {
            let blocks_after = std::fs::metadata(p).unwrap().blocks();
            assert!(
                blocks_after < blocks_before,
                "discard freed no space ({blocks_before} -> {blocks_after})"
            );
        }
        // Writing into discarded / zero-flagged clusters works.
        write_both(&*img, &mut expected, &pattern(3, 1000), (6 << 20) + 5);
        write_both(&*img, &mut expected, &pattern(4, 1000), (1 << 20) + 5);
    }
    qemu_check(p);
    assert_same("qemu-img convert", &qemu_to_raw(p), &expected);
}

#[test]
fn zeroing_v3_64k_and_4k() {
    for cs in [65536u64, 4096] {
        let dir = TempDir::new("zero-v3");
        let p = dir.path("d.qcow2");
        qemu_create(&p, SIZE, cs);
        check_zeroing(&p, cs, true);
    }
}

#[test]
fn zeroing_v2() {
    let dir = TempDir::new("zero-v2");
    let p = dir.path("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        p.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    check_zeroing(&p, 65536, true);
}

#[test]
fn zeroing_over_backing_file_hides_base_data() {
    for bits in [16u32, 12] {
        let dir = TempDir::new("zero-backing");
        let base = dir.path("base.raw");
        std::fs::write(&base, pattern(8, SIZE as usize)).unwrap();
        let p = dir.path("ov.qcow2");
        create_qcow2(&p, SIZE, bits, Some((Path::new("base.raw"), Format::Raw))).unwrap();
        check_zeroing(&p, 1 << bits, false);
        assert_eq!(std::fs::read(&base).unwrap(), pattern(8, SIZE as usize));
    }
}

#[test]
fn zeroing_over_backing_file_v2() {
    let dir = TempDir::new("zero-backing-v2");
    let base = dir.path("base.raw");
    std::fs::write(&base, pattern(8, SIZE as usize)).unwrap();
    let p = dir.path("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p.to_str().unwrap(),
    ]);
    check_zeroing(&p, 65536, false);
}
