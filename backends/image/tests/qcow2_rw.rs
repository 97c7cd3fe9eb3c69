//! qcow2 read/write against qemu-img as the reference.

mod common;

use std::path::Path;

use common::*;
use tern_image::{create_qcow2, open, DiskImage, Format};

const SIZE: u64 = 16 << 20;

fn write_and_verify(p: &Path, cs: u64) {
    let mut expected = vec![0u8; SIZE as usize];
    {
        let img = open(p, Format::Qcow2, false, false).unwrap();
        assert_eq!(img.size(), SIZE);
        exercise(&*img, &mut expected, cs);
        img.flush().unwrap();
    }
    qemu_check(p);
    assert_same("qemu-img convert", &qemu_to_raw(p), &expected);
    // Reopen: everything comes back from disk.
    let img = open(p, Format::Qcow2, true, false).unwrap();
    assert_same("reopened", &read_all(&*img), &expected);
}

#[test]
fn qemu_created_64k_clusters() {
    let dir = TempDir::new("q64k");
    let p = dir.path("d.qcow2");
    qemu_create(&p, SIZE, 65536);
    write_and_verify(&p, 65536);
}

#[test]
fn qemu_created_4k_clusters() {
    let dir = TempDir::new("q4k");
    let p = dir.path("d.qcow2");
    qemu_create(&p, SIZE, 4096);
    write_and_verify(&p, 4096);
}

#[test]
fn qemu_created_v2_compat() {
    let dir = TempDir::new("qv2");
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
    write_and_verify(&p, 65536);
}

#[test]
fn create_qcow2_64k_and_4k_and_512() {
    for bits in [16u32, 12, 9] {
        let dir = TempDir::new("qcreate");
        let p = dir.path("d.qcow2");
        create_qcow2(&p, SIZE, bits, None).unwrap();
        qemu_check(&p);
        let info = qemu_img(&["info", p.to_str().unwrap()]);
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains(&format!("cluster_size: {}", 1u64 << bits)),
            "{info}"
        );
        assert!(info.contains("compat: 1.1"), "{info}");
        write_and_verify(&p, 1 << bits);
    }
}

#[test]
fn create_qcow2_refuses_existing_file_and_bad_cluster_bits() {
    let dir = TempDir::new("qcreate-err");
    let p = dir.path("d.qcow2");
    create_qcow2(&p, SIZE, 16, None).unwrap();
    assert!(create_qcow2(&p, SIZE, 16, None).is_err());
    assert!(matches!(
        create_qcow2(&dir.path("e.qcow2"), SIZE, 22, None),
        Err(tern_image::ImageError::Unsupported(_))
    ));
}

#[test]
fn reads_image_written_by_qemu_io() {
    let dir = TempDir::new("qemu-io");
    let p = dir.path("d.qcow2");
    qemu_create(&p, SIZE, 65536);
    qemu_io(&p, "write -P 0xab 0 64k");
    qemu_io(&p, "write -P 0xcd 100000 3000");
    qemu_io(&p, "write -P 0x11 8M 1M");
    qemu_io(&p, "write -z 8M 64k");
    let mut expected = vec![0u8; SIZE as usize];
    expected[..65536].fill(0xab);
    expected[100000..103000].fill(0xcd);
    expected[(8 << 20) + 65536..9 << 20].fill(0x11);
    let img = open(&p, Format::Qcow2, true, false).unwrap();
    assert_same("qemu-io image", &read_all(&*img), &expected);
}

#[test]
fn reads_image_converted_from_raw() {
    let dir = TempDir::new("convert");
    let raw = dir.path("src.raw");
    let mut content = pattern(42, SIZE as usize);
    content[2 << 20..5 << 20].fill(0); // sparse area stays unallocated
    std::fs::write(&raw, &content).unwrap();
    for cs in ["65536", "4096"] {
        let q = dir.path(&format!("c{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        let img = open(&q, Format::Qcow2, true, false).unwrap();
        assert_same("converted image", &read_all(&*img), &content);
        assert!(img.write_at(&[1], 0).is_err());
    }
}

#[test]
fn refcount_blocks_grow_with_4k_clusters() {
    // One 16-bit refcount block covers 2048 clusters of 4 KiB = 8 MiB.
    let dir = TempDir::new("rcgrow");
    let p = dir.path("d.qcow2");
    qemu_create(&p, 32 << 20, 4096);
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut expected = vec![0u8; 32 << 20];
    for (i, off) in (0..20u64).map(|i| (i, i * (1 << 20) + 777)) {
        write_both(&*img, &mut expected, &pattern(i, 1 << 20), off);
    }
    img.flush().unwrap();
    drop(img);
    assert!(std::fs::metadata(&p).unwrap().len() > 16 << 20);
    qemu_check(&p);
    assert_same("qemu-img convert", &qemu_to_raw(&p), &expected);
}

#[test]
fn refcount_table_grows_with_512_byte_clusters() {
    // 512 B clusters: a refcount block covers 128 KiB, a table cluster 64 blocks = 8 MiB.
    let dir = TempDir::new("rtgrow");
    let p = dir.path("d.qcow2");
    qemu_create(&p, 12 << 20, 512);
    let rt_before = header_u64(&p, 48);
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut expected = vec![0u8; 12 << 20];
    write_both(&*img, &mut expected, &pattern(5, 11 << 20), 1000);
    img.flush().unwrap();
    assert_same("read back", &read_all(&*img), &expected);
    drop(img);
    assert_ne!(header_u64(&p, 48), rt_before, "refcount table did not move");
    assert!(u32::from_be_bytes(std::fs::read(&p).unwrap()[56..60].try_into().unwrap()) > 1);
    qemu_check(&p);
    assert_same("qemu-img convert", &qemu_to_raw(&p), &expected);
}

fn header_u64(p: &Path, off: usize) -> u64 {
    let b = std::fs::read(p).unwrap();
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn read_only_and_out_of_range() {
    let dir = TempDir::new("qro");
    let p = dir.path("d.qcow2");
    qemu_create(&p, SIZE, 65536);
    let img = open(&p, Format::Qcow2, true, false).unwrap();
    assert!(img.is_read_only());
    assert!(matches!(
        img.write_at(&[0], 0),
        Err(tern_image::ImageError::ReadOnly)
    ));
    assert!(matches!(
        img.discard(0, 4096),
        Err(tern_image::ImageError::ReadOnly)
    ));
    let rw = open(&p, Format::Qcow2, false, false).unwrap();
    let mut b = [0u8; 2];
    assert!(matches!(
        rw.read_at(&mut b, SIZE - 1),
        Err(tern_image::ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        rw.write_at(&b, SIZE - 1),
        Err(tern_image::ImageError::OutOfRange { .. })
    ));
    let _: &dyn DiskImage = &*rw;
}

#[test]
fn direct_io_with_aligned_buffers() {
    let dir = TempDir::new("qdirect");
    let p = dir.path("d.qcow2");
    qemu_create(&p, SIZE, 65536);
    let img = match open(&p, Format::Qcow2, false, true) {
        Ok(img) => img,
        Err(tern_image::ImageError::Unsupported(m)) => {
            assert!(m.contains("O_DIRECT"), "{m}");
            return;
        }
        Err(e) => panic!("open with O_DIRECT: {e}"),
    };
    let mut v = vec![0u8; 3 << 16];
    let start = v.as_ptr().align_offset(4096);
    let buf = &mut v[start..start + (1 << 16)];
    let mut expected = vec![0u8; SIZE as usize];
    // First write allocates (buffered path), the second goes to the allocated cluster with O_DIRECT.
    for (seed, off) in [(1u64, 8192u64), (2, 4096), (3, 3 << 20)] {
        buf[..8192].copy_from_slice(&pattern(seed, 8192));
        write_both(&*img, &mut expected, &buf[..8192], off);
    }
    img.flush().unwrap();
    buf[..4096].fill(0);
    img.read_at(&mut buf[..4096], 8192).unwrap();
    assert_same("direct read", &buf[..4096], &expected[8192..12288]);
    drop(img);
    qemu_check(&p);
    assert_same("qemu-img convert", &qemu_to_raw(&p), &expected);
}
