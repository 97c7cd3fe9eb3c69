//! The test unikernel's heartbeat with its snapshot aids, booted over the
//! API: for tests where one VM moves between tern processes (migration).
//! The same helpers as snapshot.rs has for itself, shared here.

use std::path::Path;
use std::time::Duration;

use super::vm::{Beat, Scratch, Vm};
use super::UNIKERNEL;

/// The usual wait for a guest line.
pub const T: Duration = Duration::from_secs(30);

/// `{"vcpu_count": 1, "mem_size_mib": mib}`.
pub fn machine(mib: u64) -> serde_json::Value {
    serde_json::json!({ "vcpu_count": 1, "mem_size_mib": mib })
}

/// Starts a tern on `dir/<name>.sock` (inside `netns` if given),
/// configures it over the API and boots the unikernel with `cmdline`.
pub fn boot(
    dir: &Scratch,
    name: &str,
    netns: Option<&str>,
    machine: serde_json::Value,
    devices: &[(&str, serde_json::Value)],
    cmdline: &str,
) -> Vm {
    let vm = Vm::start_in(netns, Some(&dir.path(&format!("{name}.sock"))), &[]);
    vm.expect("PUT", "/machine-config", Some(&machine.to_string()), 204);
    let boot =
        serde_json::json!({ "kernel_image_path": UNIKERNEL, "boot_args": cmdline }).to_string();
    vm.expect("PUT", "/boot-source", Some(&boot), 204);
    for (path, body) in devices {
        vm.expect("PUT", path, Some(&body.to_string()), 204);
    }
    vm.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );
    vm
}

/// The `sum=` of the unikernel's `MEMPATTERN` line.
pub fn pattern_sum(vm: &Vm) -> u64 {
    let l = vm.wait_line("MEMPATTERN ", T);
    let s = l
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sum=0x"))
        .unwrap_or_else(|| panic!("no sum in {l}"));
    u64::from_str_radix(s, 16).unwrap()
}

/// Checks that the heartbeats of a VM now in `vm` continue from `last`:
/// the first complete one is the next beat (or the one after, when the
/// move cut the next line), none skipped, all ok, and the pattern
/// checksum, where printed, is `sum`. Waits for `beats` of them.
pub fn assert_continues(vm: &Vm, last: &Beat, sum: Option<u64>, beats: usize) -> Vec<Beat> {
    vm.wait_until(T, &format!("{beats} heartbeats"), || {
        vm.beats().len() >= beats
    });
    let after = vm.beats();
    let first = &after[0];
    assert!(
        first.n > last.n && first.n <= last.n + 2,
        "the counter did not continue from {} (first beat here: {}):\n{}",
        last.n,
        first.n,
        vm.output()
    );
    for w in after.windows(2) {
        assert_eq!(w[1].n, w[0].n + 1, "beats skipped:\n{}", vm.output());
    }
    for b in &after {
        assert!(b.ok, "beat {} is BAD:\n{}", b.n, vm.output());
        if let (Some(want), Some(got)) = (sum, b.mem) {
            assert_eq!(
                got,
                want,
                "pattern checksum changed at beat {}:\n{}",
                b.n,
                vm.output()
            );
        }
    }
    after
}

/// The unikernel's disk pattern byte at absolute offset `o` (snapblk).
pub fn snapblk_byte(o: u64) -> u8 {
    (((o.wrapping_mul(13).wrapping_add(0x3c)) ^ (o >> 8)) ^ 0xa5) as u8
}
/// snapblk: the pattern region (offset, length).
pub const SB_A: (u64, u64) = (1 << 20, 8 << 10);
const SB_B: u64 = 2 << 20;
const SB_SLOTS: u64 = 2048;

/// The sector the unikernel writes at beat `n` (snapblk).
pub fn snapblk_sector(n: u64) -> Vec<u8> {
    let mut s = Vec::with_capacity(512);
    s.extend_from_slice(&0x5041_4e53u32.to_le_bytes());
    s.extend_from_slice(&(n as u32).to_le_bytes());
    for i in 2..128u32 {
        s.extend_from_slice(&((n as u32).wrapping_mul(0x9e37_79b1).wrapping_add(i)).to_le_bytes());
    }
    s
}

/// Where the sector of beat `n` goes (snapblk).
pub fn snapblk_offset(n: u64) -> usize {
    (SB_B + (n % SB_SLOTS) * 512) as usize
}

/// The beat numbers of the `SNAPBLK n ok` lines (each must be ok).
pub fn snapblk_beats(vm: &Vm) -> Vec<u64> {
    vm.lines()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("SNAPBLK ")?;
            let (n, verdict) = rest.split_once(' ')?;
            let n: u64 = n.parse().ok()?;
            assert_eq!(verdict, "ok", "disk beat {n}: {l}\n{}", vm.output());
            Some(n)
        })
        .collect()
}

/// A raw disk of 8 MiB whose first 64 KiB hold known bytes.
pub fn raw_disk(path: &Path) {
    let mut head = vec![0u8; 64 << 10];
    for (i, b) in head.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 | 1;
    }
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&head, 0).unwrap();
    f.sync_all().unwrap();
}

/// Asserts that `image` holds the snapblk pattern and the sector of every
/// beat in `beats`.
pub fn assert_disk_has(image: &[u8], beats: &[u64], what: &str) {
    let (a, len) = SB_A;
    for o in a..a + len {
        assert_eq!(
            image[o as usize],
            snapblk_byte(o),
            "{what}: pattern byte at {o:#x}"
        );
    }
    for &n in beats {
        let off = snapblk_offset(n);
        assert_eq!(
            &image[off..off + 512],
            &snapblk_sector(n)[..],
            "{what}: the sector of beat {n} at {off:#x}"
        );
    }
}
