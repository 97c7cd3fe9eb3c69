//! Corrupt and unsupported images give the right error, never a panic.

mod common;

use std::path::Path;

use common::*;
use tern_image::{create_qcow2, open, Format, ImageError};

fn patch(p: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, b).unwrap();
}

fn fresh(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    qemu_create(&p, 4 << 20, 65536);
    qemu_io(&p, "write -P 0x5a 0 128k");
    p
}

fn open_err(p: &Path) -> ImageError {
    match open(p, Format::Qcow2, false, false) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => e,
    }
}

fn expect_unsupported(p: &Path, words: &str) {
    match open_err(p) {
        ImageError::Unsupported(m) => assert!(m.contains(words), "message {m:?} lacks {words:?}"),
        e => panic!("expected Unsupported({words}), got {e:?}"),
    }
}

fn expect_corrupt(p: &Path, words: &str) {
    match open_err(p) {
        ImageError::Corrupt(m) => assert!(m.contains(words), "message {m:?} lacks {words:?}"),
        e => panic!("expected Corrupt({words}), got {e:?}"),
    }
}

#[test]
fn bad_magic() {
    let dir = TempDir::new("bad-magic");
    let p = fresh(&dir, "a.qcow2");
    patch(&p, 0, b"QFI\0");
    expect_corrupt(&p, "magic");
}

#[test]
fn incompatible_feature_bits() {
    let dir = TempDir::new("incompat");
    for (bit, words) in [
        (0, "dirty"),
        (1, "corrupt"),
        (2, "external data"),
        (3, "compression type"),
        (4, "extended L2"),
        (9, "unknown"),
    ] {
        let p = fresh(&dir, &format!("bit{bit}.qcow2"));
        patch(&p, 72, &(1u64 << bit).to_be_bytes());
        expect_unsupported(&p, words);
        let _ = std::fs::remove_file(&p);
    }
}

#[test]
fn unsupported_header_fields() {
    let dir = TempDir::new("fields");
    let p = fresh(&dir, "order.qcow2");
    patch(&p, 96, &5u32.to_be_bytes());
    expect_unsupported(&p, "refcount_order");
    let p = fresh(&dir, "version.qcow2");
    patch(&p, 4, &4u32.to_be_bytes());
    expect_unsupported(&p, "version");
    let p = fresh(&dir, "cbits.qcow2");
    patch(&p, 20, &30u32.to_be_bytes());
    expect_unsupported(&p, "cluster_bits");
    let p = fresh(&dir, "crypt.qcow2");
    patch(&p, 32, &1u32.to_be_bytes());
    expect_unsupported(&p, "encrypted");
}

#[test]
fn truncated_files() {
    let dir = TempDir::new("trunc");
    let p = fresh(&dir, "a.qcow2");
    let full = std::fs::read(&p).unwrap();
    for len in [0usize, 3, 50, 100] {
        std::fs::write(&p, &full[..len]).unwrap();
        expect_corrupt(&p, if len < 4 { "magic" } else { "truncated" });
    }
    // Header intact but the tables are gone.
    std::fs::write(&p, &full[..65536]).unwrap();
    expect_corrupt(&p, "past the end of the file");
}

#[test]
fn l1_offset_past_eof() {
    let dir = TempDir::new("l1-eof");
    let p = fresh(&dir, "a.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    expect_corrupt(&p, "L1 table");
    let p = fresh(&dir, "b.qcow2");
    patch(&p, 40, &12345u64.to_be_bytes());
    expect_corrupt(&p, "aligned");
    let p = fresh(&dir, "c.qcow2");
    patch(&p, 36, &0u32.to_be_bytes());
    expect_corrupt(&p, "entries");
}

#[test]
fn l2_offset_past_eof_is_corrupt_on_read() {
    let dir = TempDir::new("l2-eof");
    let p = fresh(&dir, "a.qcow2");
    let b = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    patch(&p, l1, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut buf = [0u8; 512];
    match img.read_at(&mut buf, 0) {
        Err(ImageError::Corrupt(m)) => assert!(m.contains("L2 table"), "{m}"),
        r => panic!("expected Corrupt, got {r:?}"),
    }
    assert!(matches!(img.write_at(&buf, 0), Err(ImageError::Corrupt(_))));
}

#[test]
fn data_cluster_past_eof_is_corrupt() {
    let dir = TempDir::new("data-eof");
    let p = fresh(&dir, "a.qcow2");
    let b = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(b[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    patch(&p, l2, &((1u64 << 63) | (1 << 45)).to_be_bytes());
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut buf, 0),
        Err(ImageError::Corrupt(_))
    ));
    assert!(matches!(img.write_at(&buf, 0), Err(ImageError::Corrupt(_))));
    // The second cluster is intact.
    img.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
    drop(img);
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        b.len() as u64,
        "file grew"
    );
}

#[test]
fn compressed_cluster_read_is_unsupported() {
    let dir = TempDir::new("compressed");
    let raw = dir.path("src.raw");
    // Compressible content: qemu stores incompressible clusters uncompressed.
    let text: Vec<u8> = b"tern compressible block "
        .iter()
        .copied()
        .cycle()
        .take(1 << 20)
        .collect();
    std::fs::write(&raw, text).unwrap();
    let p = dir.path("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut buf = vec![0u8; 4096];
    match img.read_at(&mut buf, 0) {
        Err(ImageError::Unsupported(m)) => assert!(m.contains("compressed"), "{m}"),
        r => panic!("expected Unsupported, got {r:?}"),
    }
    assert!(matches!(
        img.write_at(&buf, 0),
        Err(ImageError::Unsupported(_))
    ));
    assert!(matches!(
        img.discard(0, 65536),
        Err(ImageError::Unsupported(_))
    ));
}

#[test]
fn snapshots_are_read_only() {
    let dir = TempDir::new("snap");
    let p = fresh(&dir, "a.qcow2");
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    expect_unsupported(&p, "snapshots");
    let img = open(&p, Format::Qcow2, true, false).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

/// Every single header byte set to 0xff or 0x00: opening and reading may fail
/// but must not panic (or allocate without bound).
#[test]
fn header_byte_fuzz_never_panics() {
    let dir = TempDir::new("fuzz");
    let orig = dir.path("orig.qcow2");
    create_qcow2(
        &orig,
        4 << 20,
        12,
        Some((Path::new("base.raw"), Format::Raw)),
    )
    .unwrap();
    std::fs::write(dir.path("base.raw"), pattern(3, 4 << 20)).unwrap();
    {
        let img = open(&orig, Format::Qcow2, false, false).unwrap();
        img.write_at(&pattern(4, 100_000), 3000).unwrap();
    }
    let content = std::fs::read(&orig).unwrap();
    let p = dir.path("f.qcow2");
    for i in 0..256 {
        for v in [0xffu8, 0x00, 0x80] {
            let mut b = content.clone();
            b[i] = v;
            std::fs::write(&p, &b).unwrap();
            if let Ok(img) = open(&p, Format::Qcow2, false, false) {
                let len = img.size().min(256 << 10) as usize;
                let mut buf = vec![0u8; len];
                let _ = img.read_at(&mut buf, 0);
                let _ = img.write_at(&buf[..len.min(5000)], 0);
                let _ = img.discard(0, (len as u64).min(8192));
            }
        }
    }
}

#[test]
fn fuzzed_tables_never_panic() {
    let dir = TempDir::new("fuzz-tables");
    let orig = dir.path("orig.qcow2");
    qemu_create(&orig, 2 << 20, 4096);
    qemu_io(&orig, "write -P 0x11 0 300k");
    let content = std::fs::read(&orig).unwrap();
    let p = dir.path("f.qcow2");
    // Corrupt bytes in the refcount table, refcount block, L1 and L2 tables.
    let mut seed = 1u64;
    for _ in 0..300 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = 4096 + (seed >> 33) as usize % (content.len() - 4096).min(8 * 4096);
        let mut b = content.clone();
        b[i] ^= (seed >> 20) as u8 | 1;
        std::fs::write(&p, &b).unwrap();
        if let Ok(img) = open(&p, Format::Qcow2, false, false) {
            let mut buf = vec![0u8; 512 << 10];
            let _ = img.read_at(&mut buf, 0);
            let _ = img.write_at(&buf[..70_000], 123);
            let _ = img.write_at(&buf[..4096], 1 << 20);
            let _ = img.write_zeroes(0, 65536, true);
        }
    }
}
