//! Raw images.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{pattern, read_all, write_both, TempDir};
use tern_image::{open, Format, ImageError};

const SIZE: u64 = 8 << 20;

fn make_raw(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let p = dir.path(name);
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

#[test]
fn read_write_flush_and_range_errors() {
    let dir = TempDir::new("raw-rw");
    let p = make_raw(&dir, "disk.raw");
    let img = open(&p, Format::Raw, false, false).unwrap();
    assert_eq!(img.size(), SIZE);
    assert!(!img.is_read_only());
    let mut expected = vec![0u8; SIZE as usize];
    write_both(&*img, &mut expected, &pattern(1, 10000), 12345);
    write_both(&*img, &mut expected, &pattern(2, 4096), SIZE - 4096);
    img.flush().unwrap();
    assert_eq!(read_all(&*img), expected);
    assert_eq!(std::fs::read(&p).unwrap(), expected);

    let mut buf = [0u8; 2];
    assert!(matches!(
        img.read_at(&mut buf, SIZE - 1),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(&buf, SIZE),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(&buf, u64::MAX),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.discard(SIZE - 1, 2),
        Err(ImageError::OutOfRange { .. })
    ));
}

#[test]
fn read_only_refuses_writes() {
    let dir = TempDir::new("raw-ro");
    let p = make_raw(&dir, "disk.raw");
    let img = open(&p, Format::Raw, true, false).unwrap();
    assert!(img.is_read_only());
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert!(matches!(img.write_at(&buf, 0), Err(ImageError::ReadOnly)));
    assert!(matches!(img.discard(0, 512), Err(ImageError::ReadOnly)));
    assert!(matches!(
        img.write_zeroes(0, 512, false),
        Err(ImageError::ReadOnly)
    ));
}

#[test]
fn discard_punches_holes_and_write_zeroes_reads_zero() {
    let dir = TempDir::new("raw-discard");
    let p = make_raw(&dir, "disk.raw");
    let img = open(&p, Format::Raw, false, false).unwrap();
    let mut expected = vec![0u8; SIZE as usize];
    write_both(&*img, &mut expected, &pattern(3, SIZE as usize), 0);
    img.flush().unwrap();
    let before = std::fs::metadata(&p).unwrap().blocks();
    img.discard(1 << 20, 4 << 20).unwrap();
    expected[1 << 20..5 << 20].fill(0);
    let after = std::fs::metadata(&p).unwrap().blocks();
    assert!(
        after + (3 << 20) / 512 <= before,
        "st_blocks {before} -> {after}: discard did not free space"
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        SIZE,
        "discard changed the file size"
    );

    img.write_zeroes(100, 5000, false).unwrap();
    expected[100..5100].fill(0);
    img.write_zeroes(6 << 20, 65536 + 3, true).unwrap();
    expected[6 << 20..(6 << 20) + 65539].fill(0);
    assert_eq!(read_all(&*img), expected);
}

#[test]
fn format_parse_and_detect() {
    assert_eq!("raw".parse::<Format>().unwrap(), Format::Raw);
    assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
    assert!(matches!(
        "vmdk".parse::<Format>(),
        Err(ImageError::UnknownFormat(_))
    ));
    let dir = TempDir::new("raw-detect");
    let p = make_raw(&dir, "disk.raw");
    assert_eq!(tern_image::detect(&p).unwrap(), Format::Raw);
    let q = dir.path("disk.qcow2");
    tern_image::create_qcow2(&q, 1 << 20, 16, None).unwrap();
    assert_eq!(tern_image::detect(&q).unwrap(), Format::Qcow2);
    let empty = dir.path("empty");
    std::fs::File::create(&empty).unwrap();
    assert_eq!(tern_image::detect(&empty).unwrap(), Format::Raw);
    assert!(matches!(
        tern_image::detect(&dir.path("missing")),
        Err(ImageError::Open { .. })
    ));
}

#[test]
fn direct_io_opens_or_refuses_clearly() {
    let dir = TempDir::new("raw-direct");
    let p = make_raw(&dir, "disk.raw");
    match open(&p, Format::Raw, false, true) {
        Ok(img) => {
            // Aligned buffer: a 4 KiB-aligned slice of a larger Vec.
            let mut v = vec![0u8; 3 * 4096];
            let start = v.as_ptr().align_offset(4096);
            let buf = &mut v[start..start + 4096];
            buf.copy_from_slice(&pattern(9, 4096));
            img.write_at(buf, 8192).unwrap();
            let want = buf.to_vec();
            buf.fill(0);
            img.read_at(buf, 8192).unwrap();
            assert_eq!(buf, &want[..]);
            // Unaligned buffers (a SCSI LUN's internal ones) are bounced.
            let mut odd = vec![0u8; 1536 + 1];
            let odd = &mut odd[1..];
            odd.copy_from_slice(&pattern(3, 1536));
            img.write_at(odd, 512).unwrap();
            let mut back = vec![0u8; 1537];
            img.read_at(&mut back[1..], 512).unwrap();
            assert_eq!(&back[1..], &pattern(3, 1536)[..]);
            assert_eq!(
                &std::fs::read(&p).unwrap()[512..2048],
                &pattern(3, 1536)[..]
            );
        }
        Err(ImageError::Unsupported(msg)) => assert!(msg.contains("O_DIRECT"), "{msg}"),
        Err(e) => panic!("unexpected error opening with O_DIRECT: {e}"),
    }
}
