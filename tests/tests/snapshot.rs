//! Snapshot and restore with the test unikernel: the heartbeat counter
//! continues in a new tern process and a 64 MiB memory pattern survives;
//! a vhost-user disk and a NIC carry on; diff snapshots merged over a full
//! one; three clones on their own qcow2 overlays; and damaged, mismatched
//! or impossible snapshots refused with clear errors, never losing a good
//! snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::heartbeat::{
    assert_continues, assert_disk_has, boot, machine, pattern_sum, raw_disk, snapblk_beats,
    snapblk_byte, snapblk_offset, SB_A,
};
use common::netns::Netns;
use common::vm::{allocated_bytes, Beat, Scratch, Vm};

const T: Duration = Duration::from_secs(30);

/// Pauses, snapshots (Full or Diff) and returns the last heartbeat before.
fn pause_and_snapshot(vm: &Vm, kind: &str, state: &Path, mem: &Path) -> Beat {
    vm.pause();
    let last = vm.last_beat().expect("no heartbeat before the snapshot");
    vm.snapshot(kind, state, mem);
    assert!(state.exists() && mem.exists(), "snapshot files missing");
    last
}

/// A guest of `mib` MiB with a managed raw disk it writes every beat
/// (snapblk=1) and a `pattern_mib` MiB memory pattern, paused and
/// snapshotted (Full) into `state`/`mem` after three beats. Returns the
/// still-running tern, the disk, the pattern's checksum and the last beat.
fn disk_guest_snapshot(
    dir: &Scratch,
    mib: u64,
    pattern_mib: u64,
    state: &Path,
    mem: &Path,
) -> (Vm, std::path::PathBuf, u64, Beat) {
    let disk = dir.path("disk.raw");
    raw_disk(&disk);
    let drive = serde_json::json!({
        "drive_id": "disk0", "path_on_host": disk, "is_root_device": false, "is_read_only": false
    });
    let vm = boot(
        dir,
        "orig",
        None,
        machine(mib),
        &[("/drives/disk0", drive)],
        &format!("action=heartbeat period=50 snapblk=1 mempattern={pattern_mib}"),
    );
    let sum = pattern_sum(&vm);
    vm.wait_line("SNAPBLK 00:", T);
    vm.wait_beat(3, T);
    let last = pause_and_snapshot(&vm, "Full", state, mem);
    (vm, disk, sum, last)
}

/// A guest of `mib` MiB without devices holding a `pattern_mib` MiB
/// memory pattern, snapshotted (Full) into `state`/`mem` after `beats`
/// beats and killed. Returns the pattern's checksum and the last beat.
fn pattern_guest_snapshot(
    dir: &Scratch,
    mib: u64,
    pattern_mib: u64,
    beats: u64,
    state: &Path,
    mem: &Path,
) -> (u64, Beat) {
    let mut vm = boot(
        dir,
        "orig",
        None,
        machine(mib),
        &[],
        &format!("action=heartbeat period=50 mempattern={pattern_mib}"),
    );
    let sum = pattern_sum(&vm);
    vm.wait_beat(beats, T);
    let last = pause_and_snapshot(&vm, "Full", state, mem);
    vm.kill();
    (sum, last)
}

fn restore_cli(state: &Path, mem: &Path, extra: &[&str]) -> Vm {
    let arg = format!("{},{}", state.display(), mem.display());
    let mut args = vec!["--restore", &arg];
    args.extend_from_slice(extra);
    Vm::start(None, &args)
}

/// A fresh `tern --api-sock` that loads the snapshot with `resume_vm`.
fn restore_api(dir: &Scratch, name: &str, netns: Option<&str>, body: serde_json::Value) -> Vm {
    let vm = Vm::start_in(netns, Some(&dir.path(&format!("{name}.sock"))), &[]);
    vm.expect("PUT", "/snapshot/load", Some(&body.to_string()), 204);
    vm
}

/// sha256 of a file (through sha256sum: the files are up to 128 MiB and
/// the tests run unoptimised).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils)");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn cp_sparse(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), to.display());
}

/// The guest halts between polls until its local APIC timer fires
/// (`idle=hlt`): each restored VM beats only if the timer came back too.
#[test]
fn heartbeat_and_64mib_pattern_continue_in_a_new_process() {
    let dir = Scratch::new("snap-hb");
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let mut vm = boot(
        &dir,
        "orig",
        None,
        machine(128),
        &[],
        "action=heartbeat period=50 mempattern=64 idle=hlt",
    );
    let sum = pattern_sum(&vm);
    let b = vm.wait_beat(3, T);
    assert!(b.ok && b.mem == Some(sum), "{b:?}\n{}", vm.output());
    // Not while running.
    let msg = vm.refused(
        "PUT",
        "/snapshot/create",
        Some(
            &serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem})
                .to_string(),
        ),
    );
    assert!(msg.contains("paused"), "{msg}");
    // A diff needs dirty tracking, which this VM does not have.
    vm.pause();
    let msg = vm.refused(
        "PUT",
        "/snapshot/create",
        Some(
            &serde_json::json!({"snapshot_type": "Diff", "snapshot_path": state, "mem_file_path": mem})
                .to_string(),
        ),
    );
    assert!(msg.contains("dirty"), "{msg}");
    let last = vm.last_beat().unwrap();
    vm.snapshot("Full", &state, &mem);
    // Full: the pattern is in the file, sparse elsewhere.
    let alloc = allocated_bytes(&mem);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 << 20);
    assert!(
        (64 << 20..80 << 20).contains(&alloc),
        "memory file holds {alloc} bytes"
    );
    vm.kill();

    // tern --restore: runs at once.
    let mut r1 = restore_cli(&state, &mem, &[]);
    assert_continues(&r1, &last, Some(sum), 2);
    r1.kill();

    // PUT /snapshot/load, paused first: nothing runs until resumed.
    let r2 = Vm::start(Some(&dir.path("r2.sock")), &[]);
    let mut body = Vm::load_body(&state, &mem, false);
    r2.expect("PUT", "/snapshot/load", Some(&body.to_string()), 204);
    assert_eq!(r2.expect("GET", "/", None, 200)["state"], "Paused");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        r2.beats().is_empty(),
        "beats while paused:\n{}",
        r2.output()
    );
    r2.resume();
    assert_eq!(r2.expect("GET", "/", None, 200)["state"], "Running");
    assert_continues(&r2, &last, Some(sum), 2);
    // This tern runs a VM now: no second load.
    body["resume_vm"] = true.into();
    let msg = r2.refused("PUT", "/snapshot/load", Some(&body.to_string()));
    assert!(msg.contains("already"), "{msg}");
    drop(r2);

    // The files are still good for another restore (nothing consumed them).
    let r3 = restore_api(&dir, "r3", None, Vm::load_body(&state, &mem, true));
    assert_continues(&r3, &last, Some(sum), 1);
}

#[test]
fn vhost_user_disk_reads_the_pattern_and_new_writes_land_after_restore() {
    let dir = Scratch::new("snap-blk");
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let (mut vm, disk, sum, last) = disk_guest_snapshot(&dir, 64, 8, &state, &mem);
    let before = snapblk_beats(&vm);
    assert!(!before.is_empty(), "{}", vm.output());
    vm.kill();
    assert_disk_has(&std::fs::read(&disk).unwrap(), &before, "before restore");

    // A new tern starts a new tern-blk on the same file and the guest's
    // queue carries on at its ring positions.
    let mut r = restore_cli(&state, &mem, &[]);
    assert_continues(&r, &last, Some(sum), 3);
    // Memory shared with the backend came in lazily (userfaultfd), and the
    // backend's ring started only once all of it was there.
    r.wait_until(T, "the lazy fill's log line", || {
        r.output().contains("of guest memory filled in")
    });
    let after: Vec<u64> = snapblk_beats(&r);
    assert!(
        after.len() >= 3 && after[0] > last.n,
        "disk beats after restore: {after:?}\n{}",
        r.output()
    );
    r.kill();
    let image = std::fs::read(&disk).unwrap();
    assert_disk_has(&image, &before, "after restore (old writes)");
    assert_disk_has(&image, &after, "after restore (new writes)");
}

/// A guest of 3 GiB reaches past the PCI hole: a waiting tern registered
/// its low RAM's memory slot ahead and maps that RAM where the slot
/// points (kvm/warm.rs). Restored that way, privately mapped (no device)
/// and shared with a disk's backend (filled lazily), the guest carries
/// on with its pattern and its disk.
#[test]
fn a_guest_past_the_pci_hole_restores_into_its_slot_registered_ahead() {
    let dir = Scratch::new("snap-3g");
    let (state, mem) = (dir.path("a.state"), dir.path("a.mem"));
    let (dstate, dmem) = (dir.path("d.state"), dir.path("d.mem"));
    let debug_load = |name: &str, state: &Path, mem: &Path| {
        let vm = Vm::start(Some(&dir.path(&format!("{name}.sock"))), &[]);
        vm.expect("PUT", "/logger", Some(r#"{"level": "Debug"}"#), 204);
        let body = Vm::load_body(state, mem, true);
        vm.expect("PUT", "/snapshot/load", Some(&body.to_string()), 204);
        vm
    };

    let (sum, last) = pattern_guest_snapshot(&dir, 3072, 64, 3, &state, &mem);
    let mut r = debug_load("r", &state, &mem);
    assert_continues(&r, &last, Some(sum), 2);
    assert!(
        r.stderr().contains("registered ahead"),
        "the slot made ahead was not used:\n{}",
        r.stderr()
    );
    r.kill();

    let (mut vm, disk, sum, last) = disk_guest_snapshot(&dir, 3072, 64, &dstate, &dmem);
    vm.kill();
    let mut r = debug_load("d", &dstate, &dmem);
    assert_continues(&r, &last, Some(sum), 3);
    assert!(r.stderr().contains("registered ahead"), "{}", r.stderr());
    let after = snapblk_beats(&r);
    assert!(
        after.len() >= 2,
        "disk beats after restore: {after:?}\n{}",
        r.output()
    );
    r.kill();
    assert_disk_has(&std::fs::read(&disk).unwrap(), &after, "after restore");
}

#[test]
fn a_snapshot_taken_while_a_lazy_restore_fills_memory_restores_whole() {
    let dir = Scratch::new("snap-lazy");
    let (state, mem) = (dir.path("a.state"), dir.path("a.mem"));
    let (state2, mem2) = (dir.path("b.state"), dir.path("b.mem"));
    let (mut vm, disk, sum, last) = disk_guest_snapshot(&dir, 256, 64, &state, &mem);
    vm.kill();

    // Load, then at once pause and snapshot again: the fill of the first
    // snapshot's memory is (most likely) still going; the second snapshot
    // waits for it rather than taking unfilled pages for holes.
    let body = serde_json::json!({
        "snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true
    });
    let mut r = restore_api(&dir, "r1", None, body);
    r.pause();
    let last2 = r.last_beat().unwrap_or_else(|| last.clone());
    r.snapshot("Full", &state2, &mem2);
    r.wait_until(T, "the lazy fill's log line", || {
        r.output().contains("of guest memory filled in")
    });
    r.kill();

    let mut r2 = restore_cli(&state2, &mem2, &[]);
    assert_continues(&r2, &last2, Some(sum), 3);
    let after = snapblk_beats(&r2);
    assert!(
        after.len() >= 2 && after[0] > last.n,
        "disk beats after the second restore: {after:?}\n{}",
        r2.output()
    );
    r2.kill();
    assert_disk_has(
        &std::fs::read(&disk).unwrap(),
        &after,
        "after the second restore",
    );
}

#[test]
fn nic_answers_pings_before_and_after_restore() {
    let ns = Netns::new("snapnet");
    ns.tap("tn0", "10.77.0.1/24");
    let dir = Scratch::new("snap-net");
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let nic = serde_json::json!({
        "iface_id": "net0", "host_dev_name": "tn0", "guest_mac": "02:74:65:72:6e:01"
    });
    let mut vm = boot(
        &dir,
        "orig",
        Some(&ns.name),
        machine(64),
        &[("/network-interfaces/net0", nic)],
        "action=heartbeat period=20 netserve=1 netip=10.77.0.2 netgw=10.77.0.1",
    );
    vm.wait_line("NETSERVE 00:", T);
    vm.wait_beat(2, T);
    let (ok, out) = ns.ping("10.77.0.2", 3, 10);
    assert!(ok, "ping before the snapshot: {out}\n{}", vm.output());
    let last = pause_and_snapshot(&vm, "Full", &state, &mem);
    let answered = last.pings.expect("pings= in the heartbeat");
    // (the beat before the snapshot may predate the last replies)
    assert!(answered >= 1, "{last:?}");
    vm.kill();

    // The tap is free again once the killed tern's backend is gone.
    let r = restore_api(&dir, "r", Some(&ns.name), Vm::load_body(&state, &mem, true));
    assert_continues(&r, &last, None, 1);
    let (ok, out) = ns.ping("10.77.0.2", 3, 10);
    assert!(ok, "ping after restore: {out}\n{}", r.output());
    r.wait_until(T, "the guest to count the new pings", || {
        r.last_beat()
            .and_then(|b| b.pings)
            .is_some_and(|p| p >= answered + 3)
    });
}

#[test]
fn diff_snapshot_merged_over_the_full_one_restores_the_later_state() {
    let dir = Scratch::new("snap-diff");
    let (base_state, base_mem) = (dir.path("base.state"), dir.path("base.mem"));
    let (diff_state, diff_mem) = (dir.path("diff.state"), dir.path("diff.mem"));
    let mut vm = boot(
        &dir,
        "orig",
        None,
        serde_json::json!({ "vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": true }),
        &[],
        "action=heartbeat period=50 mempattern=64 memdirty=16",
    );
    let sum = pattern_sum(&vm);
    vm.wait_beat(2, T);
    let base_last = pause_and_snapshot(&vm, "Full", &base_state, &base_mem);
    vm.resume();
    vm.wait_beat(base_last.n + 3, T);
    let diff_last = pause_and_snapshot(&vm, "Diff", &diff_state, &diff_mem);
    vm.kill();

    // The diff holds what the guest dirtied in between: its 16 pages, its
    // stack and data, the console's page; not the 64 MiB pattern.
    let full = allocated_bytes(&base_mem);
    let diff = allocated_bytes(&diff_mem);
    assert_eq!(
        std::fs::metadata(&diff_mem).unwrap().len(),
        128 << 20,
        "a diff file has the RAM's size (sparse)"
    );
    assert!(full >= 64 << 20, "full memory file holds {full} bytes");
    assert!(
        (16 * 4096..256 << 10).contains(&diff),
        "diff memory file holds {diff} bytes (full: {full}); the guest dirtied 16 pages and a few of its own"
    );
    eprintln!("full {full} bytes allocated, diff {diff} bytes");

    // Merge into a copy of the base; the base itself stays as it was.
    let merged = dir.path("merged.mem");
    cp_sparse(&base_mem, &merged);
    let base_digest = sha256(&base_mem);
    // TODO: use `ternctl snapshot merge BASE DIFF` when it exists.
    tern::snapshot::merge_memory_files(&merged, std::slice::from_ref(&diff_mem)).expect("merge");
    let mut r = restore_cli(&diff_state, &merged, &[]);
    let after = assert_continues(&r, &diff_last, Some(sum), 2);
    // The pages memdirty rewrites held the diff's beat: dirty=ok.
    assert!(
        after.iter().all(|b| b.dirty_ok == Some(true)),
        "{after:?}\n{}",
        r.output()
    );
    r.kill();

    // The base alone still restores the base's moment.
    assert_eq!(sha256(&base_mem), base_digest);
    let r = restore_cli(&base_state, &base_mem, &[]);
    let after = assert_continues(&r, &base_last, Some(sum), 1);
    assert!(after[0].n <= base_last.n + 2);
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn overlay(base: &Path, path: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        path.to_str().unwrap(),
    ]);
}

/// What the guest sees on a qcow2 overlay, as a raw image.
fn overlay_contents(dir: &Scratch, ov: &Path) -> Vec<u8> {
    qemu_img(&["check", "-q", ov.to_str().unwrap()]);
    let raw = dir.path("converted.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        ov.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    data
}

#[test]
fn three_clones_run_at_once_on_their_own_overlays() {
    let dir = Scratch::new("snap-clones");
    // The base holds the disk pattern already, so that a fresh overlay
    // shows the clone what the original VM wrote to its own overlay.
    let base = dir.path("base.raw");
    raw_disk(&base);
    {
        use std::os::unix::fs::FileExt;
        let (a, len) = SB_A;
        let bytes: Vec<u8> = (a..a + len).map(snapblk_byte).collect();
        let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&bytes, a).unwrap();
        f.sync_all().unwrap();
    }
    let ov0 = dir.path("overlay0.qcow2");
    overlay(&base, &ov0);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let drive = serde_json::json!({
        "drive_id": "disk0", "path_on_host": ov0, "format": "qcow2",
        "is_root_device": false, "is_read_only": false
    });
    let mut vm = boot(
        &dir,
        "orig",
        None,
        machine(64),
        &[("/drives/disk0", drive)],
        "action=heartbeat period=50 snapblk=1 mempattern=16",
    );
    let sum = pattern_sum(&vm);
    vm.wait_beat(2, T);
    let last = pause_and_snapshot(&vm, "Full", &state, &mem);
    let orig_beats = snapblk_beats(&vm);
    vm.kill();
    let digests = [sha256(&base), sha256(&state), sha256(&mem)];

    let overlays: Vec<PathBuf> = (1..=3)
        .map(|i| {
            let p = dir.path(&format!("overlay{i}.qcow2"));
            overlay(&base, &p);
            p
        })
        .collect();
    let mut clones: Vec<Vm> = overlays
        .iter()
        .enumerate()
        .map(|(i, ov)| {
            let mut body = Vm::load_body(&state, &mem, true);
            body["drive_overrides"] =
                serde_json::json!([{"drive_id": "disk0", "path_on_host": ov}]);
            restore_api(&dir, &format!("clone{}", i + 1), None, body)
        })
        .collect();
    // All three run at the same time.
    let mut clone_beats = Vec::new();
    for c in &clones {
        assert_continues(c, &last, Some(sum), 3);
    }
    for c in clones.iter_mut() {
        assert!(c.running(), "{}", c.output());
        c.pause();
        clone_beats.push(snapblk_beats(c));
        c.kill();
    }

    assert_eq!(
        [sha256(&base), sha256(&state), sha256(&mem)],
        digests,
        "the base image, state file or memory file changed"
    );
    for (i, (ov, beats)) in overlays.iter().zip(&clone_beats).enumerate() {
        let after: Vec<u64> = beats.iter().copied().filter(|&n| n > last.n).collect();
        assert!(after.len() >= 3, "clone {}: {beats:?}", i + 1);
        let data = overlay_contents(&dir, ov);
        assert_disk_has(&data, &after, &format!("clone {}", i + 1));
    }
    // The original's overlay has its own beats and none of the clones'.
    let data = overlay_contents(&dir, &ov0);
    assert_disk_has(&data, &orig_beats, "original overlay");
    let base_data = std::fs::read(&base).unwrap();
    for n in last.n + 2..last.n + 6 {
        let off = snapblk_offset(n);
        assert_eq!(
            &data[off..off + 512],
            &base_data[off..off + 512],
            "a clone's beat {n} landed in the original's overlay"
        );
        assert!(
            base_data[off..off + 512].iter().all(|&b| b == 0),
            "a beat landed in the base"
        );
    }
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused_and_tern_stays_usable() {
    let dir = Scratch::new("snap-bad");
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let (sum, last) = pattern_guest_snapshot(&dir, 64, 8, 2, &state, &mem);
    let good = std::fs::read(&state).unwrap();

    // A flipped byte in the body: the checksum.
    let flipped = dir.path("flipped.state");
    let mut bad = good.clone();
    let mid = 28 + (bad.len() - 28) / 2;
    bad[mid] ^= 0x20;
    std::fs::write(&flipped, &bad).unwrap();
    // Byte 8: the format version (little-endian u32).
    let version = dir.path("version.state");
    let mut bad = good.clone();
    bad[8] = bad[8].wrapping_add(1);
    std::fs::write(&version, &bad).unwrap();
    // A state file cut short.
    let short = dir.path("short.state");
    std::fs::write(&short, &good[..good.len() - 100]).unwrap();
    // A memory file cut short.
    let short_mem = dir.path("short.mem");
    cp_sparse(&mem, &short_mem);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short_mem)
        .unwrap();
    f.set_len((64 << 20) - 4096).unwrap();
    drop(f);

    let t = Vm::start(Some(&dir.path("t.sock")), &[]);
    let load = |s: &Path, m: &Path| {
        let msg = t.refused(
            "PUT",
            "/snapshot/load",
            Some(&Vm::load_body(s, m, true).to_string()),
        );
        assert_eq!(t.expect("GET", "/", None, 200)["state"], "Not started");
        msg.to_lowercase()
    };
    let msg = load(&flipped, &mem);
    assert!(
        msg.contains("corrupt") || msg.contains("checksum"),
        "flipped byte: {msg}"
    );
    let msg = load(&version, &mem);
    assert!(msg.contains("version"), "wrong version: {msg}");
    let msg = load(&short, &mem);
    assert!(msg.contains("truncated"), "short state file: {msg}");
    let msg = load(&state, &short_mem);
    assert!(
        msg.contains("truncated") || msg.contains("size") || msg.contains("bytes"),
        "short memory file: {msg}"
    );
    let msg = load(&state, &dir.path("missing.mem"));
    assert!(msg.contains("missing.mem"), "missing memory file: {msg}");
    // The same tern then loads the good snapshot.
    t.expect(
        "PUT",
        "/snapshot/load",
        Some(&Vm::load_body(&state, &mem, true).to_string()),
        204,
    );
    assert_continues(&t, &last, Some(sum), 1);
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mount -t tmpfs at {} (the test runs as root)",
            at.display()
        );
        Self(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_snapshot_cleanly_and_keeps_the_previous_one() {
    let dir = Scratch::new("snap-full");
    let small = Tmpfs::mount(dir.path("small"), "2m");
    let (state, mem) = (small.0.join("vm.state"), small.0.join("vm.mem"));
    // The pattern comes at beat 4: the first snapshot is small, the
    // second (8 MiB of pattern) cannot fit.
    let mut vm = boot(
        &dir,
        "orig",
        None,
        machine(64),
        &[],
        "action=heartbeat period=50 mempattern=8 memfillbeat=4",
    );
    vm.wait_beat(1, T);
    let first = pause_and_snapshot(&vm, "Full", &state, &mem);
    assert!(first.n < 4, "{first:?}");
    let digests = (sha256(&state), sha256(&mem));
    vm.resume();
    pattern_sum(&vm);
    vm.wait_beat(5, T);
    vm.pause();
    let body =
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem});
    let msg = vm.refused("PUT", "/snapshot/create", Some(&body.to_string()));
    assert!(
        msg.contains("No space left") || msg.to_lowercase().contains("space"),
        "ENOSPC: {msg}"
    );
    let names: Vec<String> = std::fs::read_dir(&small.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["vm.mem", "vm.state"],
        "temporary files left behind"
    );
    assert_eq!((sha256(&state), sha256(&mem)), digests);
    // The VM is still fine and can go on.
    vm.resume();
    vm.wait_more_beats(1, T);
    vm.kill();

    // The earlier snapshot restores: before the pattern, at its beat.
    let mut r = restore_cli(&state, &mem, &[]);
    let after = assert_continues(&r, &first, None, 1);
    assert!(after[0].n <= 4, "{after:?}");
    r.kill();
}

#[test]
fn a_diff_state_is_refused_with_an_unmerged_memory_file() {
    let dir = Scratch::new("snap-diffbad");
    let (base_state, base_mem) = (dir.path("base.state"), dir.path("base.mem"));
    let (diff_state, diff_mem) = (dir.path("diff.state"), dir.path("diff.mem"));
    let mut vm = boot(
        &dir,
        "orig",
        None,
        serde_json::json!({ "vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true }),
        &[],
        "action=heartbeat period=50 memdirty=4",
    );
    vm.wait_beat(2, T);
    pause_and_snapshot(&vm, "Full", &base_state, &base_mem);
    vm.resume();
    vm.wait_more_beats(2, T);
    pause_and_snapshot(&vm, "Diff", &diff_state, &diff_mem);
    vm.kill();
    let t = Vm::start(Some(&dir.path("t.sock")), &[]);
    for mem in [&base_mem, &diff_mem] {
        let msg = t.refused(
            "PUT",
            "/snapshot/load",
            Some(&Vm::load_body(&diff_state, mem, true).to_string()),
        );
        assert!(msg.contains("diff") || msg.contains("merge"), "{msg}");
        assert_eq!(t.expect("GET", "/", None, 200)["state"], "Not started");
    }
}
