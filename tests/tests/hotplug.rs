//! Hot plug and unplug on a running VM (ACPI PCI hot plug): the test
//! unikernel polls the hot plug registers at every heartbeat (`hotplug=1`),
//! reports new devices with the PCI IDs it reads from their slot, and ejects
//! what tern asks back. Real tern, real backends, real /dev/kvm.

mod common;

use std::path::Path;
use std::time::Duration;

use common::heartbeat::{boot, machine, T};
use common::vm::{raw_image, Scratch, Vm};
use serde_json::{json, Value};

fn devices(vm: &Vm) -> Vec<Value> {
    vm.expect("GET", "/devices", None, 200)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn device(vm: &Vm, id: &str) -> Option<Value> {
    devices(vm).into_iter().find(|d| d["id"] == id)
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Waits for the guest's `HOTPLUG up slot=N ...` line for `slot`.
fn wait_up(vm: &Vm, slot: u64, nth: usize) -> String {
    let want = format!("HOTPLUG up slot={slot} ");
    vm.wait_until(T, &format!("the guest to see slot {slot} come"), || {
        vm.lines().iter().filter(|l| l.starts_with(&want)).count() >= nth
    });
    vm.lines()
        .into_iter()
        .rev()
        .find(|l| l.starts_with(&want))
        .unwrap_or_default()
}

fn slot_of(d: &Value) -> u64 {
    let a = d["pci_address"].as_str().unwrap_or_default();
    u64::from_str_radix(
        a.rsplit(':').next().unwrap_or("").trim_end_matches(".0"),
        16,
    )
    .unwrap_or_else(|_| panic!("pci address {a}"))
}

#[test]
fn disk_plugged_and_unplugged_is_seen_by_the_guest_and_freed() {
    let dir = Scratch::new("hp-disk");
    let img = dir.path("hot.raw");
    raw_image(&img, 8);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[],
        "action=heartbeat period=20 hotplug=1",
    );
    vm.wait_beat(2, T);
    let pid = vm.pid();

    vm.expect(
        "PUT",
        "/drives/hot",
        Some(&json!({ "path_on_host": img }).to_string()),
        204,
    );
    let d = device(&vm, "hot").expect("the new drive in GET /devices");
    assert_eq!(d["kind"], "virtio-blk", "{d}");
    let slot = slot_of(&d);
    let backend = d["backend_pid"].as_u64().expect("managed backend pid");
    // The guest reads virtio-blk's PCI IDs (1af4:1042) from the new slot.
    let line = wait_up(&vm, slot, 1);
    assert!(
        line.contains("vendor=1af4 device=1042"),
        "the guest saw {line}"
    );
    let cfg = vm.expect("GET", "/vm/config", None, 200);
    assert_eq!(cfg["drives"][0]["pci_slot"], slot, "{cfg}");
    // The guest drives the new disk: 64 KiB at 1 MiB, written and read back;
    // the host finds the same bytes in the file.
    let done = format!("HOTPLUG blk slot={slot} ");
    vm.wait_until(T, "the guest's I/O on the plugged disk", || {
        vm.lines().iter().any(|l| l.starts_with(&done))
    });
    let line = vm
        .lines()
        .into_iter()
        .find(|l| l.starts_with(&done))
        .unwrap_or_default();
    assert!(
        line.contains("capacity=16384 write=0 read=0 mismatches=0"),
        "{line}"
    );
    let data = std::fs::read(&img).unwrap();
    let want: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(31) as u64 + slot) as u8)
        .collect();
    assert!(
        data[1 << 20..(1 << 20) + 65536] == want[..],
        "the host reads the guest's pattern from the image"
    );

    vm.expect("DELETE", "/drives/hot", None, 204);
    vm.wait_until(T, "the guest to eject the slot", || {
        vm.lines()
            .iter()
            .any(|l| l == &format!("HOTPLUG ejected slot={slot}"))
    });
    vm.wait_until(T, "the drive to leave GET /devices", || {
        device(&vm, "hot").is_none()
    });
    vm.wait_until(T, "the backend process to exit", || {
        !Path::new(&format!("/proc/{backend}")).exists()
    });
    let cfg = vm.expect("GET", "/vm/config", None, 200);
    assert!(cfg.get("drives").is_none(), "{cfg}");
    // The guest keeps running, and the slot can be used again.
    vm.wait_more_beats(3, T);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn refusals_are_exact_and_change_nothing() {
    let dir = Scratch::new("hp-refuse");
    let root = dir.path("root.raw");
    raw_image(&root, 8);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[(
            "/drives/root",
            json!({ "path_on_host": root, "is_root_device": true }),
        )],
        "action=heartbeat period=20 hotplug=1",
    );
    vm.wait_beat(2, T);
    let before = devices(&vm);
    let says = |method: &str, path: &str, body: Option<Value>, what: &str| {
        let msg = vm.refused(method, path, body.map(|b| b.to_string()).as_deref());
        assert!(
            msg.contains(what),
            "{method} {path}: `{msg}` should say `{what}`"
        );
    };
    says("DELETE", "/drives/root", None, "root device");
    says(
        "DELETE",
        "/drives/nope",
        None,
        "no drive or network interface nope",
    );
    says(
        "PUT",
        "/drives/root",
        Some(json!({ "path_on_host": root })),
        "cannot be changed",
    );
    says(
        "PUT",
        "/drives/pinned",
        Some(json!({ "path_on_host": root, "pci_slot": 1 })),
        "pci_slot 1",
    );
    vm.pause();
    says(
        "PUT",
        "/drives/late",
        Some(json!({ "path_on_host": root, "is_read_only": true })),
        "paused",
    );
    says("DELETE", "/drives/root", None, "paused");
    vm.resume();
    assert_eq!(devices(&vm), before, "refusals leave the VM unchanged");
}

#[test]
fn twenty_plug_unplug_cycles_leak_nothing() {
    let dir = Scratch::new("hp-cycles");
    let img = dir.path("cycle.raw");
    raw_image(&img, 4);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[],
        "action=heartbeat period=10 hotplug=1",
    );
    vm.wait_beat(2, T);
    let pid = vm.pid();
    let fds = || count(&format!("/proc/{pid}/fd"));
    let threads = || count(&format!("/proc/{pid}/task"));
    let rss = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // One cycle first, so lazily created things (log threads' buffers,
    // allocator arenas) exist before counting.
    let cycle = |i: usize| {
        vm.expect(
            "PUT",
            "/drives/cyc",
            Some(&json!({ "path_on_host": img }).to_string()),
            204,
        );
        let slot = slot_of(&device(&vm, "cyc").expect("plugged"));
        wait_up(&vm, slot, i);
        vm.expect("DELETE", "/drives/cyc", None, 204);
        vm.wait_until(T, "the unplug", || device(&vm, "cyc").is_none());
    };
    cycle(1);
    std::thread::sleep(Duration::from_millis(300));
    let (fd0, th0, rss0) = (fds(), threads(), rss());
    for i in 2..=21 {
        cycle(i);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fd1, th1, rss1) = (fds(), threads(), rss());
    assert_eq!(fd1, fd0, "file descriptors before and after 20 cycles");
    assert!(th1 <= th0, "threads: {th0} before, {th1} after");
    assert!(
        rss1 < rss0 + 4096,
        "RSS grew from {rss0} kB to {rss1} kB over 20 cycles"
    );
    vm.wait_more_beats(3, T);
}

/// A snapshot taken after plugs and an unplug (which leaves a hole in the
/// slots) restores with every device at the address it had.
#[test]
fn snapshot_after_hot_plug_keeps_devices_at_their_addresses() {
    let dir = Scratch::new("hp-snap");
    let imgs = dir.raw_images("d", 3, 4);
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[("/drives/d0", json!({ "path_on_host": imgs[0] }))],
        "action=heartbeat period=20 hotplug=1",
    );
    vm.wait_beat(2, T);
    for (id, img) in [("d1", &imgs[1]), ("d2", &imgs[2])] {
        vm.expect(
            "PUT",
            &format!("/drives/{id}"),
            Some(&json!({ "path_on_host": img }).to_string()),
            204,
        );
        let slot = slot_of(&device(&vm, id).unwrap());
        wait_up(&vm, slot, 1);
    }
    vm.expect("DELETE", "/drives/d1", None, 204);
    vm.wait_until(T, "d1's unplug", || device(&vm, "d1").is_none());
    let addr = |vm: &Vm, id: &str| device(vm, id).map(|d| d["pci_address"].clone());
    let before = (addr(&vm, "d0"), addr(&vm, "d2"));
    assert_ne!(
        before.1,
        Some(json!("0000:00:02.0")),
        "d2 sits past the hole"
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
    let after = (addr(&restored, "d0"), addr(&restored, "d2"));
    assert_eq!(after, before, "the same devices at the same addresses");
    assert!(device(&restored, "d1").is_none());
    restored.wait_more_beats(3, T);
}

/// A NIC plugged into a running guest answers pings from the host through
/// it; after the unplug it is gone and pings go unanswered.
#[test]
fn nic_plugged_answers_pings_and_is_gone_after_unplug() {
    let ns = common::netns::Netns::new("hpnet");
    ns.tap("tn0", "10.77.0.1/24");
    let dir = Scratch::new("hp-net");
    let vm = boot(
        &dir,
        "vm",
        Some(&ns.name),
        machine(64),
        &[],
        "action=heartbeat period=20 hotplug=1 netip=10.77.0.2 netgw=10.77.0.1",
    );
    vm.wait_beat(2, T);
    let nic = json!({ "host_dev_name": "tn0", "guest_mac": "02:74:65:72:6e:07" });
    vm.expect(
        "PUT",
        "/network-interfaces/hot0",
        Some(&nic.to_string()),
        204,
    );
    let d = device(&vm, "hot0").expect("the NIC in GET /devices");
    assert_eq!(d["kind"], "virtio-net", "{d}");
    let slot = slot_of(&d);
    let line = wait_up(&vm, slot, 1);
    assert!(line.contains("vendor=1af4 device=1041"), "{line}");
    let mac = vm.wait_line("NETSERVE ", T);
    assert!(mac.contains("mac=02:74:65:72:6e:07"), "{mac}");
    let (ok, out) = ns.ping("10.77.0.2", 3, 10);
    assert!(ok, "pings through the plugged NIC: {out}\n{}", vm.output());

    vm.expect("DELETE", "/network-interfaces/hot0", None, 204);
    vm.wait_until(T, "the NIC's unplug", || device(&vm, "hot0").is_none());
    let (ok, out) = ns.ping("10.77.0.2", 2, 3);
    assert!(!ok, "no answer once the NIC is gone: {out}");
    vm.wait_more_beats(3, T);
}

/// `GET /devices` shows a hot plugged disk `plugging` until the guest's
/// driver has it running (DRIVER_OK), and a hot added LUN `plugging` until
/// the guest sends it a command. The guest (`hpdelay=100`) waits 100 beats
/// between finding the device and enabling it, so the window is seconds
/// long and each state is observed while the guest is known to be on that
/// side of it.
#[test]
fn plugged_devices_are_plugging_until_the_guest_enables_them() {
    let dir = Scratch::new("hp-plugging");
    let (img, lun0, lun1) = (dir.path("hot.raw"), dir.path("l0.raw"), dir.path("l1.raw"));
    for i in [&img, &lun0, &lun1] {
        raw_image(i, 4);
    }
    let vm = boot(
        &dir,
        "vm",
        None,
        machine(64),
        &[(
            "/drives/s0",
            json!({ "path_on_host": lun0, "interface": "virtio-scsi" }),
        )],
        "action=heartbeat period=20 hotplug=1 hpdelay=100",
    );
    vm.wait_until(T, "the guest's first scan", || {
        vm.lines().iter().any(|l| l == "scsi: report luns: 0")
    });
    let state = |id: &str| device(&vm, id).map(|d| d["state"].clone());
    assert_eq!(state("s0"), None, "LUNs are not PCI devices");
    assert_eq!(state("scsi0"), Some(json!("attached")));

    vm.expect(
        "PUT",
        "/drives/hot",
        Some(&json!({ "path_on_host": img }).to_string()),
        204,
    );
    assert_eq!(
        state("hot"),
        Some(json!("plugging")),
        "right after the plug"
    );
    let slot = slot_of(&device(&vm, "hot").unwrap());
    wait_up(&vm, slot, 1);
    let enabling = format!("HOTPLUG enabling slot={slot}");
    let seen = state("hot");
    assert!(
        !vm.lines().contains(&enabling),
        "the guest was to wait 100 beats before enabling the disk"
    );
    assert_eq!(seen, Some(json!("plugging")), "found, not yet enabled");
    let done = format!("HOTPLUG blk slot={slot} ");
    vm.wait_until(T, "the guest to drive the disk", || {
        vm.lines().iter().any(|l| l.starts_with(&done))
    });
    assert_eq!(state("hot"), Some(json!("attached")), "after DRIVER_OK");

    let lun_state = || {
        device(&vm, "scsi0").and_then(|c| {
            c["scsi_luns"]
                .as_array()?
                .iter()
                .find(|l| l["id"] == "s1")
                .map(|l| l["state"].clone())
        })
    };
    vm.expect(
        "PUT",
        "/drives/s1",
        Some(&json!({ "path_on_host": lun1, "interface": "virtio-scsi" }).to_string()),
        204,
    );
    assert_eq!(lun_state(), Some(json!("plugging")), "right after the add");
    vm.wait_until(T, "the guest to take the event", || {
        vm.lines()
            .iter()
            .any(|l| l == "scsi: event transport reset lun 1 rescan")
    });
    let seen = lun_state();
    assert!(
        !vm.lines().iter().any(|l| l == "scsi: report luns: 0 1"),
        "the guest was to wait 100 beats before using the LUN"
    );
    assert_eq!(seen, Some(json!("plugging")), "event taken, not yet used");
    vm.wait_until(T, "the guest to drive LUN 1", || {
        vm.lines()
            .iter()
            .any(|l| l == "scsi: lun 1 write=ok sync=ok read=ok mismatches=0")
    });
    assert_eq!(
        lun_state(),
        Some(json!("attached")),
        "after its first command"
    );
}

/// `(id, pci_address)` of every virtio device, sorted.
fn addresses(vm: &Vm) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = devices(vm)
        .into_iter()
        .filter(|d| d["kind"].as_str().is_some_and(|k| k.starts_with("virtio")))
        .map(|d| {
            (
                d["id"].as_str().unwrap_or_default().to_string(),
                d["pci_address"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A VM that had disks plugged, one unplugged (a hole in the slots) and a
/// LUN added live-migrates over a Unix socket: the destination shows every
/// device at the address it had, the LUNs under their numbers, the guest
/// reads its pattern back from the plugged disk through the destination's
/// backend, and the destination's hot plug goes on (the next disk takes
/// the hole).
#[test]
fn migration_after_hot_plug_keeps_addresses_and_the_plugged_disk() {
    let dir = Scratch::new("hp-mig");
    let imgs: Vec<_> = ["d0", "x", "d2", "s0", "s1", "y"]
        .iter()
        .map(|n| dir.path(&format!("{n}.raw")))
        .collect();
    for i in &imgs {
        raw_image(i, 4);
    }
    let mut src = boot(
        &dir,
        "src",
        None,
        machine(64),
        &[
            ("/drives/d0", json!({ "path_on_host": imgs[0] })),
            (
                "/drives/s0",
                json!({ "path_on_host": imgs[3], "interface": "virtio-scsi" }),
            ),
        ],
        "action=heartbeat period=20 hotplug=1 hpcheck=10",
    );
    src.wait_beat(2, T);
    let mut slots = Vec::new();
    for (id, img) in [("x", &imgs[1]), ("d2", &imgs[2])] {
        src.expect(
            "PUT",
            &format!("/drives/{id}"),
            Some(&json!({ "path_on_host": img }).to_string()),
            204,
        );
        let slot = slot_of(&device(&src, id).unwrap());
        let done = format!("HOTPLUG blk slot={slot} ");
        src.wait_until(T, &format!("the guest to drive {id}"), || {
            src.lines().iter().any(|l| l.starts_with(&done))
        });
        slots.push(slot);
    }
    src.expect("DELETE", "/drives/x", None, 204);
    src.wait_until(T, "x's unplug", || device(&src, "x").is_none());
    src.expect(
        "PUT",
        "/drives/s1",
        Some(&json!({ "path_on_host": imgs[4], "interface": "virtio-scsi" }).to_string()),
        204,
    );
    src.wait_until(T, "the guest to use LUN 1", || {
        src.lines()
            .iter()
            .any(|l| l == "scsi: lun 1 write=ok sync=ok read=ok mismatches=0")
    });
    let before = addresses(&src);
    let luns_before = device(&src, "scsi0").map(|c| c["luns"].clone());
    assert!(
        before
            .iter()
            .all(|(_, a)| a != &format!("0000:00:{:02x}.0", slots[0])),
        "x's slot is a hole: {before:?}"
    );

    let dst = Vm::start(Some(&dir.path("dst.sock")), &[]);
    let url = format!("unix:{}", dir.path("mig.sock").display());
    dst.expect(
        "PUT",
        "/migration/receive",
        Some(&json!({ "url": url }).to_string()),
        204,
    );
    src.expect(
        "PUT",
        "/migration/send",
        Some(&json!({ "url": url, "downtime_limit_ms": 100 }).to_string()),
        204,
    );
    assert_eq!(src.wait_exit(T), Some(0), "source:\n{}", src.output());
    dst.wait_until(T, "the migration to complete", || {
        dst.expect("GET", "/migration", None, 200)["status"] == "completed"
    });
    assert_eq!(
        addresses(&dst),
        before,
        "the same devices at the same addresses"
    );
    assert_eq!(
        device(&dst, "scsi0").map(|c| c["luns"].clone()),
        luns_before
    );
    let lun_numbers = device(&dst, "scsi0")
        .and_then(|c| c["scsi_luns"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|l| (l["id"].clone(), l["lun"].clone()))
        .collect::<Vec<_>>();
    assert_eq!(
        lun_numbers,
        [(json!("s0"), json!(0)), (json!("s1"), json!(1))]
    );
    // The guest reads d2's pattern back through the destination's tern-blk.
    let check = format!("HOTPLUG check slot={} read=0 mismatches=0", slots[1]);
    dst.wait_until(T, "the guest's pattern check on the destination", || {
        dst.lines().iter().any(|l| l == &check)
    });
    // Hot plug goes on at the destination: the next disk takes the hole.
    dst.expect(
        "PUT",
        "/drives/y",
        Some(&json!({ "path_on_host": imgs[5] }).to_string()),
        204,
    );
    let y = slot_of(&device(&dst, "y").unwrap());
    assert_eq!(y, slots[0], "y takes x's old slot");
    let done = format!("HOTPLUG blk slot={y} capacity=8192 write=0 read=0 mismatches=0");
    dst.wait_until(T, "the guest to drive y", || {
        dst.lines().iter().any(|l| l == &done)
    });
}
