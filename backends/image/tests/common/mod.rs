//! Helpers shared by the integration tests: temp dirs, qemu-img, patterns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use tern_image::DiskImage;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tern-image-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{tool} not found: these tests use it as the reference; install qemu-utils (apt-get install qemu-utils)")
        }
        Err(e) => panic!("running {tool}: {e}"),
    }
}

/// Runs qemu-img and asserts success.
pub fn qemu_img(args: &[&str]) -> Output {
    let o = run("qemu-img", args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs qemu-io on a qcow2 image and asserts success.
pub fn qemu_io(path: &Path, cmd: &str) {
    let p = path.to_str().expect("utf-8 path");
    let o = run("qemu-io", &["-f", "qcow2", "-c", cmd, p]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("error"),
        "qemu-io {cmd:?} failed: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img create -f qcow2 -o cluster_size=..`.
pub fn qemu_create(path: &Path, size: u64, cluster_size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster_size}"),
        path.to_str().expect("utf-8 path"),
        &size.to_string(),
    ]);
}

/// `qemu-img check`: exit status 0 means no errors and no leaks.
pub fn qemu_check(path: &Path) {
    let o = run(
        "qemu-img",
        &["check", "-f", "qcow2", path.to_str().expect("utf-8 path")],
    );
    assert!(
        o.status.success(),
        "qemu-img check {} reported problems (exit {:?}):\n{}\n{}",
        path.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img convert -O raw` and returns the raw bytes.
pub fn qemu_to_raw(path: &Path) -> Vec<u8> {
    let out = path.with_extension("converted.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
    let data = std::fs::read(&out).expect("read converted image");
    let _ = std::fs::remove_file(&out);
    data
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `data` at `off` to both the image and the expected content.
pub fn write_both(img: &dyn DiskImage, expected: &mut [u8], data: &[u8], off: u64) {
    img.write_at(data, off)
        .unwrap_or_else(|e| panic!("write {} at {off:#x}: {e}", data.len()));
    expected[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Reads the whole image.
pub fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).expect("read whole image");
    buf
}

/// Asserts two images are equal, reporting the first difference.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
}

/// The standard write sequence: unaligned, cluster-straddling, 1 MiB spans,
/// the last cluster, overwrites. The image must be at least 8 MiB.
pub fn exercise(img: &dyn DiskImage, expected: &mut [u8], cs: u64) {
    let size = img.size();
    let w = |expected: &mut [u8], seed: u64, off: u64, len: usize| {
        write_both(img, expected, &pattern(seed, len), off)
    };
    w(expected, 1, 0, 1);
    w(expected, 2, 511, 1000);
    w(expected, 3, cs - 100, 300);
    w(expected, 4, 3 * cs + 17, 2 * cs as usize + 5);
    w(expected, 5, (1 << 20) + 12345, 1 << 20);
    w(expected, 6, 4 << 20, 1 << 20);
    w(expected, 7, size - cs + 7, cs as usize - 7);
    w(expected, 8, size - 1, 1);
    // Overwrite parts of allocated clusters.
    w(expected, 9, 600, 50);
    w(expected, 10, (1 << 20) + 12000, 1000);
    // Read back some pieces, then everything.
    for &(off, len) in &[
        (0u64, 4096usize),
        (cs - 200, 600),
        ((1 << 20) + 12000, 70000),
        (size - cs, cs as usize),
    ] {
        let mut buf = vec![0u8; len];
        img.read_at(&mut buf, off).expect("read back");
        assert_same(
            &format!("read at {off:#x}"),
            &buf,
            &expected[off as usize..off as usize + len],
        );
    }
    assert_same("whole image", &read_all(img), expected);
}
