//! Backing files: raw and qcow2 bases under a qcow2 overlay.

mod common;

use std::path::Path;

use common::*;
use tern_image::{create_qcow2, open, Format};

const SIZE: u64 = 8 << 20;

/// Writes partial clusters, full clusters and spans to the overlay, and checks
/// the merged view, the base's unchanged bytes, qemu-img check and convert.
fn exercise_overlay(overlay: &Path, base: &Path, base_content: &[u8], cs: u64) {
    let base_before = std::fs::read(base).unwrap();
    let mut expected = base_content.to_vec();
    expected.resize(SIZE as usize, 0);
    {
        let img = open(overlay, Format::Qcow2, false, false).unwrap();
        assert_same("base seen through overlay", &read_all(&*img), &expected);
        write_both(&*img, &mut expected, &pattern(100, 10), 5);
        write_both(&*img, &mut expected, &pattern(101, 300), cs - 150);
        write_both(&*img, &mut expected, &pattern(102, cs as usize), 4 * cs);
        write_both(
            &*img,
            &mut expected,
            &pattern(103, 1 << 20),
            (2 << 20) + 333,
        );
        write_both(&*img, &mut expected, &pattern(104, 7), SIZE - 7);
        write_both(&*img, &mut expected, &pattern(105, 20), 7); // again, allocated now
        img.flush().unwrap();
        assert_same("overlay after writes", &read_all(&*img), &expected);
    }
    assert_eq!(
        std::fs::read(base).unwrap(),
        base_before,
        "the base image was modified"
    );
    qemu_check(overlay);
    assert_same("qemu-img convert overlay", &qemu_to_raw(overlay), &expected);
    let img = open(overlay, Format::Qcow2, true, false).unwrap();
    assert_same("overlay reopened", &read_all(&*img), &expected);
}

fn base_content(len: usize) -> Vec<u8> {
    let mut c = pattern(77, len);
    c[1 << 20..(1 << 20) + 100_000].fill(0);
    c
}

#[test]
fn raw_base_qemu_overlay() {
    for cs in [65536u64, 4096] {
        let dir = TempDir::new("ov-raw");
        let base = dir.path("base.raw");
        let content = base_content(SIZE as usize);
        std::fs::write(&base, &content).unwrap();
        let ov = dir.path("overlay.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
            ov.to_str().unwrap(),
        ]);
        exercise_overlay(&ov, &base, &content, cs);
    }
}

#[test]
fn qcow2_base_qemu_overlay_without_format_extension() {
    let dir = TempDir::new("ov-qcow2");
    let base_raw = dir.path("base-src.raw");
    let content = base_content(SIZE as usize);
    std::fs::write(&base_raw, &content).unwrap();
    let base = dir.path("base.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        base_raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    let ov = dir.path("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        ov.to_str().unwrap(),
    ]);
    // Drop the backing-format extension so detection is used.
    let ov2 = dir.path("overlay2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        ov2.to_str().unwrap(),
    ]);
    strip_backing_format(&ov2);
    exercise_overlay(&ov, &base, &content, 65536);
    let img = open(&ov2, Format::Qcow2, true, false).unwrap();
    assert_same("detected backing format", &read_all(&*img), &content);
}

/// Renames the backing-format header extension to an unknown type, which
/// readers must ignore.
fn strip_backing_format(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let pos = b
        .windows(4)
        .position(|w| w == [0xE2, 0x79, 0x2A, 0xCA])
        .expect("backing format extension");
    b[pos..pos + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(p, b).unwrap();
}

#[test]
fn create_qcow2_overlay_chain_and_smaller_base() {
    let dir = TempDir::new("ov-chain");
    // A base smaller than the overlay: the tail reads as zeros.
    let base = dir.path("base.raw");
    let content = base_content((SIZE / 2) as usize + 1000);
    std::fs::write(&base, &content).unwrap();
    let mid = dir.path("mid.qcow2");
    create_qcow2(&mid, SIZE, 16, Some((Path::new("base.raw"), Format::Raw))).unwrap();
    qemu_check(&mid);
    let mut expected = content.clone();
    expected.resize(SIZE as usize, 0);
    {
        let img = open(&mid, Format::Qcow2, false, false).unwrap();
        write_both(&*img, &mut expected, &pattern(1, 5000), (SIZE / 2) - 2000);
    }
    let top = dir.path("top.qcow2");
    create_qcow2(&top, SIZE, 12, Some((&mid, Format::Qcow2))).unwrap();
    let info = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("base.raw"));
    let mid_before = std::fs::read(&mid).unwrap();
    {
        let img = open(&top, Format::Qcow2, false, false).unwrap();
        assert_same("chain", &read_all(&*img), &expected);
        write_both(&*img, &mut expected, &pattern(2, 3), (SIZE / 2) - 1);
        img.discard(0, 65536).unwrap();
        expected[..65536].fill(0);
        assert_same("chain after writes", &read_all(&*img), &expected);
    }
    assert_eq!(
        std::fs::read(&mid).unwrap(),
        mid_before,
        "middle image modified"
    );
    qemu_check(&top);
    assert_same("qemu-img convert chain", &qemu_to_raw(&top), &expected);
}

#[test]
fn missing_backing_file_is_an_open_error() {
    let dir = TempDir::new("ov-missing");
    let ov = dir.path("ov.qcow2");
    create_qcow2(&ov, SIZE, 16, Some((Path::new("nope.raw"), Format::Raw))).unwrap();
    match open(&ov, Format::Qcow2, false, false) {
        Err(tern_image::ImageError::Open { path, .. }) => assert!(path.ends_with("nope.raw")),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened with a missing backing file"),
    }
}
