//! Several threads writing one qcow2 image at once.

mod common;

use common::*;
use tern_image::{open, Format};

#[test]
fn four_threads_write_disjoint_ranges() {
    const PER: usize = 3 << 20;
    let dir = TempDir::new("conc");
    let p = dir.path("d.qcow2");
    qemu_create(&p, 4 * PER as u64 + 65536, 4096);
    let img = open(&p, Format::Qcow2, false, false).unwrap();
    let mut expected = vec![0u8; 4 * PER + 65536];
    std::thread::scope(|s| {
        for t in 0..4usize {
            let img = &img;
            s.spawn(move || {
                // Unaligned chunks over [t*PER + 100, (t+1)*PER + 100): neighbours
                // share the boundary cluster, each writing a part of it.
                let mut off = 100;
                let mut i = 0;
                while off < PER + 100 {
                    let len = (9000 + 777 * (i % 7)).min(PER + 100 - off);
                    let data = pattern((t * 1000 + i) as u64, len);
                    img.write_at(&data, (t * PER + off) as u64).unwrap();
                    if i % 5 == 0 {
                        let mut back = vec![0u8; len];
                        img.read_at(&mut back, (t * PER + off) as u64).unwrap();
                        assert!(back == data, "thread {t} read back differs at {off}");
                    }
                    off += len;
                    i += 1;
                }
            });
        }
    });
    for t in 0..4usize {
        let mut off = 100;
        let mut i = 0;
        while off < PER + 100 {
            let len = (9000 + 777 * (i % 7)).min(PER + 100 - off);
            let start = t * PER + off;
            expected[start..start + len].copy_from_slice(&pattern((t * 1000 + i) as u64, len));
            off += len;
            i += 1;
        }
    }
    img.flush().unwrap();
    assert_same("concurrent writes", &read_all(&*img), &expected);
    drop(img);
    qemu_check(&p);
    assert_same("qemu-img convert", &qemu_to_raw(&p), &expected);
}
