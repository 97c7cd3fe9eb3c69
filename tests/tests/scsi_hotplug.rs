//! virtio-scsi LUN hot add and remove on a running VM: tern asks its
//! managed tern-scsi over the control socket to open or drop a unit, and
//! tern-scsi raises a transport reset event that the test unikernel
//! (`hotplug=1`) takes from the event queue, rescanning with REPORT LUNS and
//! driving a new LUN. Real tern, real tern-scsi, real /dev/kvm.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::heartbeat::{boot, machine, T};
use common::tern_bin;
use common::vm::{raw_image, Scratch, Vm};
use serde_json::{json, Value};

fn devices(vm: &Vm) -> Vec<Value> {
    vm.expect("GET", "/devices", None, 200)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The virtio-scsi controller in `GET /devices`.
fn controller(vm: &Vm) -> Value {
    devices(vm)
        .into_iter()
        .find(|d| d["kind"] == "virtio-scsi")
        .expect("the virtio-scsi controller in GET /devices")
}

/// `(id, lun, state)` of each LUN in `GET /devices`.
fn luns(vm: &Vm) -> Vec<(String, u64, String)> {
    controller(vm)["scsi_luns"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap_or_default().to_string(),
                l["lun"].as_u64().unwrap_or(u64::MAX),
                l["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn scsi(path: &Path) -> Value {
    json!({ "path_on_host": path, "interface": "virtio-scsi" })
}

fn wait_line_eq(vm: &Vm, line: &str) {
    wait_nth(vm, line, 1);
}

/// Waits for the guest's `n`th `line`.
fn wait_nth(vm: &Vm, line: &str, n: usize) {
    vm.wait_until(T, &format!("the guest to print `{line}` ({n})"), || {
        vm.lines().iter().filter(|l| *l == line).count() >= n
    });
}

/// The scsi check's pattern byte at offset `o` of LUN `lun`
/// (`pattern_byte` in tests/guests/unikernel/scsi_test.c).
fn pattern_byte(lun: u64, o: u64) -> u8 {
    (((o.wrapping_mul(7).wrapping_add(0x5a)) ^ (o >> 9)).wrapping_add(lun * 0x1d)) as u8
}

/// The guest's 64 KiB at 1 MiB of a hot added LUN, as the host reads the file.
fn assert_pattern(img: &Path, lun: u64) {
    let data = std::fs::read(img).unwrap();
    let want: Vec<u8> = (0..65536u64)
        .map(|i| pattern_byte(lun, (1 << 20) + i))
        .collect();
    assert!(
        data[1 << 20..(1 << 20) + 65536] == want[..],
        "the host reads LUN {lun}'s pattern from {}",
        img.display()
    );
}

#[test]
fn lun_added_at_run_time_is_scanned_written_and_removed() {
    let dir = Scratch::new("shp-add");
    let imgs = dir.raw_images("l", 4, 4);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[("/drives/s0", scsi(&imgs[0]))],
        "action=heartbeat period=20 hotplug=1",
    );
    wait_line_eq(&vm, "scsi: report luns: 0");
    let slot = controller(&vm)["pci_address"].clone();
    let pid = controller(&vm)["backend_pid"].clone();

    // A LUN with the lowest free number (1).
    vm.expect("PUT", "/drives/s1", Some(&scsi(&imgs[1]).to_string()), 204);
    let c = controller(&vm);
    assert_eq!(c["luns"], json!(["s0", "s1"]), "{c}");
    assert_eq!(c["pci_address"], slot, "no new PCI device: {c}");
    assert_eq!(c["backend_pid"], pid, "the same tern-scsi: {c}");
    wait_line_eq(&vm, "scsi: event transport reset lun 1 rescan");
    wait_line_eq(&vm, "scsi: report luns: 0 1");
    wait_line_eq(&vm, "scsi: lun 1 write=ok sync=ok read=ok mismatches=0");
    assert_pattern(&imgs[1], 1);
    vm.wait_until(T, "LUN 1 attached", || {
        luns(&vm).contains(&("s1".into(), 1, "attached".into()))
    });
    // The configuration carries it (snapshots and migrations rebuild from it).
    let cfg = vm.expect("GET", "/vm/config", None, 200);
    let s1 = cfg["drives"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["drive_id"] == "s1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (&s1["lun"], &s1["interface"]),
        (&json!(1), &json!("virtio-scsi")),
        "{cfg}"
    );

    // A LUN with the number asked for, leaving a hole at 2.
    let body = json!({ "path_on_host": imgs[3], "interface": "virtio-scsi", "lun": 3 });
    vm.expect("PUT", "/drives/s3", Some(&body.to_string()), 204);
    wait_line_eq(&vm, "scsi: event transport reset lun 3 rescan");
    wait_line_eq(&vm, "scsi: report luns: 0 1 3");
    wait_line_eq(&vm, "scsi: lun 3 write=ok sync=ok read=ok mismatches=0");
    assert_pattern(&imgs[3], 3);

    // Removed: at once from the API's view, and the guest's scan drops it.
    vm.expect("DELETE", "/drives/s1", None, 204);
    assert_eq!(controller(&vm)["luns"], json!(["s0", "s3"]));
    wait_line_eq(&vm, "scsi: event transport reset lun 1 removed");
    wait_line_eq(&vm, "scsi: report luns: 0 3");
    let cfg = vm.expect("GET", "/vm/config", None, 200);
    let ids: Vec<&str> = cfg["drives"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["drive_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["s0", "s3"], "{cfg}");
    // The freed number is taken again by the next LUN without one.
    vm.expect("PUT", "/drives/s2", Some(&scsi(&imgs[2]).to_string()), 204);
    wait_nth(&vm, "scsi: report luns: 0 1 3", 2);
    wait_nth(&vm, "scsi: lun 1 write=ok sync=ok read=ok mismatches=0", 2);
    assert_eq!(
        luns(&vm)
            .iter()
            .map(|l| (l.0.as_str(), l.1))
            .collect::<Vec<_>>(),
        [("s0", 0), ("s2", 1), ("s3", 3)]
    );
    assert_pattern(&imgs[2], 1);
    vm.wait_more_beats(3, T);
}

/// A snapshot after LUN changes restores the controller with the same LUN
/// numbers (tern-scsi started with `lun=N`).
#[test]
fn snapshot_after_lun_changes_keeps_lun_numbers() {
    let dir = Scratch::new("shp-snap");
    let imgs = dir.raw_images("l", 3, 4);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[
            ("/drives/s0", scsi(&imgs[0])),
            ("/drives/s1", scsi(&imgs[1])),
        ],
        "action=heartbeat period=20 hotplug=1",
    );
    wait_line_eq(&vm, "scsi: report luns: 0 1");
    vm.expect("PUT", "/drives/s2", Some(&scsi(&imgs[2]).to_string()), 204);
    wait_line_eq(&vm, "scsi: lun 2 write=ok sync=ok read=ok mismatches=0");
    vm.expect("DELETE", "/drives/s1", None, 204);
    wait_line_eq(&vm, "scsi: report luns: 0 2");
    let before = luns(&vm);
    assert_eq!(
        before
            .iter()
            .map(|l| (l.0.as_str(), l.1))
            .collect::<Vec<_>>(),
        [("s0", 0), ("s2", 2)]
    );
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    vm.pause();
    vm.snapshot("Full", &state, &mem);
    drop(vm);
    let restored = Vm::start(
        Some(&dir.path("r.sock")),
        &[
            "--restore",
            &format!("{},{}", state.display(), mem.display()),
        ],
    );
    let after: Vec<(String, u64)> = luns(&restored).into_iter().map(|l| (l.0, l.1)).collect();
    assert_eq!(
        after,
        [("s0".to_string(), 0), ("s2".to_string(), 2)],
        "the same LUNs under the same numbers"
    );
    restored.wait_more_beats(3, T);
    // The restored tern-scsi serves LUN 2 from s2's image: a LUN added now
    // takes the free number 1.
    let img = dir.path("l3.raw");
    raw_image(&img, 4);
    restored.expect("PUT", "/drives/s3", Some(&scsi(&img).to_string()), 204);
    wait_line_eq(&restored, "scsi: report luns: 0 1 2");
    wait_line_eq(
        &restored,
        "scsi: lun 1 write=ok sync=ok read=ok mismatches=0",
    );
    assert_pattern(&img, 1);
}

/// A process killed when dropped (also when a test fails midway).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An external tern-scsi on `sock` with one LUN.
fn external_scsi(sock: &Path, img: &Path) -> Killed {
    let bin = tern_bin().with_file_name("tern-scsi");
    let child = Killed(
        Command::new(bin)
            .arg("--socket")
            .arg(sock)
            .arg("--lun")
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tern-scsi"),
    );
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < T, "tern-scsi's socket");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child
}

#[test]
fn lun_refusals_are_exact_and_change_nothing() {
    let dir = Scratch::new("shp-refuse");
    let img = dir.path("a.raw");
    raw_image(&img, 4);
    let says = |vm: &Vm, method: &str, path: &str, body: Option<Value>, what: &str| {
        let before = devices(vm);
        let msg = vm.refused(method, path, body.map(|b| b.to_string()).as_deref());
        assert!(
            msg.contains(what),
            "{method} {path}: `{msg}` should say `{what}`"
        );
        assert_eq!(devices(vm), before, "{method} {path} changed the devices");
    };

    // No controller: tern does not hot plug one.
    let blk = boot(
        &dir,
        "blk",
        None,
        machine(64),
        &[],
        "action=heartbeat period=20 hotplug=1",
    );
    blk.wait_beat(2, T);
    says(
        &blk,
        "PUT",
        "/drives/s9",
        Some(scsi(&img)),
        "no virtio-scsi controller",
    );
    drop(blk);

    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[("/drives/s0", scsi(&img))],
        "action=heartbeat period=20 hotplug=1",
    );
    wait_line_eq(&vm, "scsi: report luns: 0");
    let with = |lun: u64| json!({ "path_on_host": img, "interface": "virtio-scsi", "lun": lun });
    says(
        &vm,
        "PUT",
        "/drives/s1",
        Some(with(0)),
        "LUN 0 is in use by drive s0",
    );
    says(&vm, "PUT", "/drives/s1", Some(with(256)), "out of range");
    says(
        &vm,
        "PUT",
        "/drives/s1",
        Some(scsi(&dir.path("missing.raw"))),
        "missing.raw",
    );
    says(
        &vm,
        "PUT",
        "/drives/s1",
        Some(json!({ "socket": dir.path("x.sock"), "interface": "virtio-scsi" })),
        "path_on_host, not socket",
    );
    says(
        &vm,
        "PUT",
        "/drives/s0",
        Some(scsi(&img)),
        "cannot be changed",
    );
    says(
        &vm,
        "DELETE",
        "/drives/s0",
        None,
        "the controller's last LUN",
    );
    says(
        &vm,
        "DELETE",
        "/drives/nope",
        None,
        "no drive or network interface nope",
    );
    vm.pause();
    says(&vm, "PUT", "/drives/s1", Some(scsi(&img)), "paused");
    vm.resume();
    // Nothing reached the guest.
    vm.wait_more_beats(3, T);
    assert!(
        !vm.lines().iter().any(|l| l.starts_with("scsi: event")),
        "the guest saw no event:\n{}",
        vm.output()
    );
    drop(vm);

    // Every LUN in use.
    let shared = dir.path("shared.raw");
    raw_image(&shared, 1);
    let full: Vec<(String, Value)> = (0..256)
        .map(|i| {
            (
                format!("/drives/f{i}"),
                json!({ "path_on_host": shared, "interface": "virtio-scsi", "is_read_only": true }),
            )
        })
        .collect();
    let full: Vec<(&str, Value)> = full.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    let vm = boot(
        &dir,
        "full",
        None,
        machine(64),
        &full,
        "action=heartbeat period=20 hotplug=1",
    );
    vm.wait_beat(2, T);
    says(&vm, "PUT", "/drives/f256", Some(scsi(&img)), "256 LUNs");
    drop(vm);

    // An external backend: tern does not change what someone else serves.
    let sock = dir.path("backend.sock");
    let _ext = external_scsi(&sock, &img);
    let vm = boot(
        &dir,
        "ext",
        None,
        machine(64),
        &[(
            "/drives/e0",
            json!({ "socket": sock, "interface": "virtio-scsi" }),
        )],
        "action=heartbeat period=20 hotplug=1",
    );
    wait_line_eq(&vm, "scsi: report luns: 0");
    let other = dir.path("b.raw");
    raw_image(&other, 4);
    says(
        &vm,
        "PUT",
        "/drives/e1",
        Some(scsi(&other)),
        "external backend",
    );
    drop(vm);
}

/// The kit's command line for kernel-only boots on software-KVM hosts (as
/// tests/tests/scsi.rs), without `quiet`: the kernel log is the evidence.
const PVM_CMDLINE: &str = "console=ttyS0 panic=-1 noxsave tsc=reliable no_timer_check nopvspin \
clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid";

/// Real Linux (the kit's kernel, booted until its init, which is as far as
/// Linux gets on a kvm_pvm host): its virtio_scsi driver takes tern-scsi's
/// RESCAN event for a LUN added while it boots and attaches the disk
/// (`sd 0:0:0:1`, with the image's size), and the REMOVED event after the
/// DELETE makes it let the disk go. Minutes on a software KVM.
#[test]
fn linux_attaches_a_hot_added_lun_and_lets_a_removed_one_go() {
    let kit = common::guest_dir();
    let initrd = common::uncompressed_initramfs(&kit);
    let dir = Scratch::new("shp-linux");
    let (l0, l1) = (dir.path("l0.raw"), dir.path("l1.raw"));
    raw_image(&l0, 4);
    raw_image(&l1, 8);
    let drive = format!("path={},id=s0,interface=virtio-scsi", l0.display());
    let vm = Vm::start(
        Some(&dir.path("api.sock")),
        &[
            "--kernel",
            kit.join("vmlinux").to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "512",
            "--cpus",
            "1",
            "--cmdline",
            PVM_CMDLINE,
            "--drive",
            &drive,
        ],
    );
    let long = std::time::Duration::from_secs(20 * 60);
    let logged = |needle: &str| vm.lines().iter().any(|l| l.contains(needle));
    vm.wait_until(long, "the boot LUN's disk", || {
        logged("sd 0:0:0:0: [sda] Attached SCSI disk")
    });
    let added = std::time::Instant::now();
    vm.expect("PUT", "/drives/s1", Some(&scsi(&l1).to_string()), 204);
    vm.wait_until(long, "Linux to attach the hot added LUN", || {
        logged("sd 0:0:0:1: [sdb] Attached SCSI disk") || logged("Run /init as init process")
    });
    eprintln!("LUN 1 attached {:?} after the PUT", added.elapsed());
    assert!(
        logged("scsi 0:0:0:1: Direct-Access     TERN     VIRTUAL DISK"),
        "{}",
        vm.output()
    );
    assert!(
        logged("sd 0:0:0:1: [sdb] 16384 512-byte logical blocks"),
        "{}",
        vm.output()
    );
    assert_eq!(
        luns(&vm).iter().find(|l| l.0 == "s1").map(|l| l.2.as_str()),
        Some("attached"),
        "Linux sent the LUN commands"
    );
    vm.expect("DELETE", "/drives/s1", None, 204);
    // sd's removal flushes the disk's write cache (WCE is on by default).
    vm.wait_until(long, "Linux to let the removed LUN go", || {
        logged("sd 0:0:0:1: [sdb] Synchronizing SCSI cache") || logged("Run /init as init process")
    });
    assert!(
        logged("sd 0:0:0:1: [sdb] Synchronizing SCSI cache"),
        "{}",
        vm.output()
    );
    for l in vm.lines().iter().filter(|l| l.contains("0:0:0:1:")) {
        eprintln!("{l}");
    }
}
