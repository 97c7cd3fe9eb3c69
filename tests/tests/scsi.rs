//! virtio-scsi through tern-scsi: drives with `interface=virtio-scsi` become
//! the LUNs of one controller. The test unikernel's polling virtio-scsi
//! driver asks every LUN what an initiator asks, writes and reads patterns
//! the host then finds in the files (qemu-img is the referee for qcow2),
//! unmaps a range of a raw file, and checks the exact sense of failing
//! commands; the API shows the controller and its LUNs, and a killed
//! external backend leaves tern running with the controller disconnected;
//! a kernel-only Linux boot shows Linux's SCSI stack finding the eight
//! disks.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::openapi::{request, spec, validate_against, validate_response};
use common::{
    guest_dir, is_pvm_host, require_kvm, tern, tern_bin, uncompressed_initramfs, Run, UNIKERNEL,
};

/// The byte the unikernel writes at absolute offset `o` of LUN `lun`
/// (`pattern_byte` in tests/guests/unikernel/scsi_test.c).
fn pattern(lun: u64, o: u64) -> u8 {
    ((o.wrapping_mul(7).wrapping_add(0x5a) ^ (o >> 9)).wrapping_add(lun * 0x1d)) as u8
}

/// The regions `scsipattern=1` writes on every writable LUN: WRITE(10) and
/// WRITE(16), (offset, length).
const REGIONS: [(u64, u64); 2] = [(0x10000, 0x4000), (0x100000, 0x10000)];
/// What `scsiunmap=L` unmaps: (offset, length).
const UNMAP: (u64, u64) = (2 << 20, 1 << 20);

const MIB: u64 = 1 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tern-scsi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (qemu-utils) must be installed")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// One LUN the host prepares.
struct Lun {
    path: PathBuf,
    mib: u64,
    qcow2: bool,
    ro: bool,
}

impl Lun {
    fn drive(&self, index: usize) -> String {
        let mut d = format!(
            "path={},interface=virtio-scsi,id=lun{index},serial=SER-{index}",
            self.path.display()
        );
        if self.qcow2 {
            d.push_str(",format=qcow2");
        }
        if self.ro {
            d.push_str(",ro=on");
        }
        d
    }
}

/// A raw image of `mib` MiB with known non-zero bytes in its first 64 KiB
/// and in the range `scsiunmap` unmaps (so that the unmap has blocks to
/// free), and, with `mbr`, an MBR with one Linux partition from LBA 2048.
fn raw_image(path: &Path, mib: u64, mbr: bool) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(mib * MIB).expect("size image");
    let mut head = vec![0u8; 64 << 10];
    for (i, b) in head.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 | 1;
    }
    if mbr {
        head[..512].fill(0);
        let sectors = u32::try_from(mib * MIB / 512).expect("small image");
        head[446 + 4] = 0x83;
        head[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        head[446 + 12..446 + 16].copy_from_slice(&(sectors - 2048).to_le_bytes());
        head[510] = 0x55;
        head[511] = 0xaa;
    }
    f.write_all_at(&head, 0).expect("write image");
    if mib * MIB >= UNMAP.0 + UNMAP.1 {
        f.write_all_at(&vec![0xa5u8; UNMAP.1 as usize], UNMAP.0)
            .expect("write image");
    }
    f.sync_all().expect("sync image");
}

fn qcow2_image(path: &Path, mib: u64) {
    let out = qemu_img(&["create", "-q", "-f", "qcow2", s(path), &format!("{mib}M")]);
    assert!(out.status.success(), "qemu-img create: {out:?}");
}

/// Eight LUNs: raw ones of different sizes, LUN 3 qcow2, LUN 5 read-only.
/// With `mbr`, each raw LUN has a partition table.
fn eight_luns(dir: &Scratch, mbr: bool) -> Vec<Lun> {
    let sizes = [8u64, 6, 10, 16, 4, 5, 12, 7];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &mib)| {
            let qcow2 = i == 3;
            let lun = Lun {
                path: dir.path(&format!("lun{i}.{}", if qcow2 { "qcow2" } else { "raw" })),
                mib,
                qcow2,
                ro: i == 5,
            };
            if qcow2 {
                qcow2_image(&lun.path, mib);
            } else {
                raw_image(&lun.path, mib, mbr);
            }
            lun
        })
        .collect()
}

/// The `tern-scsi` next to `tern`.
fn tern_scsi() -> PathBuf {
    let bin = tern_bin().with_file_name("tern-scsi");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

fn boot_unikernel(drives: &[String], cmdline: &str) -> Run {
    require_kvm();
    let _ = tern_scsi();
    let mut args: Vec<&str> = vec![
        "--kernel",
        UNIKERNEL,
        "--memory",
        "64",
        "--cmdline",
        cmdline,
    ];
    for d in drives {
        args.push("--drive");
        args.push(d);
    }
    tern(&args, Duration::from_secs(600))
}

/// The guest's line that starts with `prefix` (trimmed), or a failure.
fn line<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .map(str::trim_end)
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with `{prefix}`: {run}"))
}

fn assert_line(run: &Run, expected: &str) {
    assert!(
        run.stdout.lines().any(|l| l.trim_end() == expected),
        "expected the line `{expected}`: {run}"
    );
}

/// `key=value` of a line.
fn field<'a>(l: &'a str, key: &str) -> &'a str {
    l.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in `{l}`"))
}

/// With `TERN_SCSI_TEST_LOG=DIR`, keeps a run's output as `DIR/<tag>.log`.
fn save_log(run: &Run, tag: &str) {
    if let Some(dir) = std::env::var_os("TERN_SCSI_TEST_LOG") {
        let _ = std::fs::write(Path::new(&dir).join(format!("{tag}.log")), format!("{run}"));
    }
}

/// What a missing LUN must answer: the virtio-scsi response for a bad
/// target (VIRTIO_SCSI_S_BAD_TARGET, 3), to every command.
fn assert_missing_lun(run: &Run, lun: u32) {
    for cmd in ["tur", "inquiry"] {
        let l = line(run, &format!("SCSI lun {lun} {cmd} "));
        assert_eq!(
            field(l, "response"),
            "3",
            "{cmd} to the missing LUN {lun}: VIRTIO_SCSI_S_BAD_TARGET: {l}"
        );
    }
}

#[test]
fn unikernel_eight_luns_inquiry_io_unmap_and_sense() {
    let dir = Scratch::new("uk");
    let luns = eight_luns(&dir, false);
    let ro_before = std::fs::read(&luns[5].path).expect("read ro image");
    let unmap_blocks_before = std::fs::metadata(&luns[2].path).expect("stat").blocks();
    let drives: Vec<String> = luns.iter().enumerate().map(|(i, l)| l.drive(i)).collect();
    let run = boot_unikernel(
        &drives,
        "checks=scsi scsiluns=8 scsiro=5 scsiunmap=2 scsipattern=1 action=exit code=5",
    );
    eprintln!("unikernel run took {:?}", run.elapsed);
    save_log(&run, "unikernel");
    assert_line(&run, "RESULT pass");
    assert_eq!(run.code(), 11, "{run}");
    assert_line(&run, "SCSI controllers=1");

    // The controller's config, from tern-scsi through tern.
    let ctl = line(&run, "SCSI 00:01.0 features=");
    assert_eq!(field(ctl, "num_queues"), "1", "{ctl}");
    assert_eq!(field(ctl, "cdb_size"), "32", "{ctl}");
    assert_eq!(field(ctl, "sense_size"), "96", "{ctl}");
    assert!(
        field(ctl, "max_lun").parse::<u32>().unwrap_or(0) >= 7,
        "{ctl}"
    );

    // REPORT LUNS: exactly the eight.
    let report = line(&run, "SCSI report-luns ");
    assert_eq!(field(report, "n"), "8", "{report}");
    let mut listed: Vec<u32> = field(report, "luns")
        .split(',')
        .map(|n| n.parse().expect("LUN number"))
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, (0..8).collect::<Vec<u32>>(), "{report}");

    for (i, lun) in luns.iter().enumerate() {
        assert_line(&run, &format!("SCSI lun {i} tur ok"));
        let inq = line(&run, &format!("SCSI lun {i} inquiry "));
        assert_eq!(
            (field(inq, "qual"), field(inq, "type")),
            ("0", "0"),
            "a connected direct-access device: {inq}"
        );
        assert_eq!(field(inq, "vendor"), "TERN", "{inq}");
        assert_line(&run, &format!("SCSI lun {i} serial=SER-{i}"));
        let pages = line(&run, &format!("SCSI lun {i} vpd00 "));
        for p in ["00", "80", "83", "b0", "b2"] {
            assert!(
                field(pages, "pages").split(',').any(|x| x == p),
                "VPD page {p} listed: {pages}"
            );
        }
        let ids = line(&run, &format!("SCSI lun {i} vpd83 "));
        assert!(field(ids, "n").parse::<u32>().unwrap_or(0) >= 1, "{ids}");
        let limits = line(&run, &format!("SCSI lun {i} vpdb0 "));
        assert!(
            field(limits, "max_unmap_lba").parse::<u64>().unwrap_or(0) > 0,
            "{limits}"
        );
        let prov = line(&run, &format!("SCSI lun {i} vpdb2 "));
        assert_eq!(field(prov, "lbpu"), "1", "UNMAP supported: {prov}");
        let cap = line(&run, &format!("SCSI lun {i} capacity "));
        let bs: u64 = field(cap, "block_size").parse().expect("block size");
        assert_eq!(
            field(cap, "blocks").parse::<u64>().expect("blocks") * bs,
            lun.mib * MIB,
            "LUN {i} has its configured size: {cap}"
        );
        if lun.ro {
            continue;
        }
        assert_line(
            &run,
            &format!("SCSI lun {i} write10 0x10000+0x4000 write16 0x100000+0x10000 ok"),
        );
        assert_line(&run, &format!("SCSI lun {i} read10 read16 ok"));
        let sync = if i == 0 { 16 } else { 10 };
        assert_line(&run, &format!("SCSI lun {i} sync{sync} ok"));
    }

    // What the guest wrote is in the files, each LUN with its own pattern.
    for (i, lun) in luns.iter().enumerate().filter(|(_, l)| !l.ro) {
        let data = if lun.qcow2 {
            let raw = dir.path("converted.raw");
            let out = qemu_img(&["convert", "-O", "raw", s(&lun.path), s(&raw)]);
            assert!(out.status.success(), "qemu-img convert: {out:?}");
            std::fs::read(&raw).expect("read converted image")
        } else {
            std::fs::read(&lun.path).expect("read image")
        };
        for (off, len) in REGIONS {
            for o in off..off + len {
                assert_eq!(
                    data[o as usize],
                    pattern(i as u64, o),
                    "LUN {i}: byte at {o:#x} is not the guest's pattern"
                );
            }
        }
    }
    let check = qemu_img(&["check", s(&luns[3].path)]);
    assert!(
        check.status.success(),
        "qemu-img check of the qcow2 LUN: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // UNMAP punched a hole in the raw file.
    assert_line(
        &run,
        "SCSI lun 2 unmap 0x200000+0x100000 descriptors=1 ok nonzero_words=0",
    );
    // st_blocks counts 512-byte units; the pattern writes allocated some.
    let unmap_blocks_after = std::fs::metadata(&luns[2].path).expect("stat").blocks();
    let written: u64 = REGIONS.iter().map(|r| r.1 / 512).sum();
    assert!(
        unmap_blocks_after + (UNMAP.1 / 512) * 3 / 4 <= unmap_blocks_before + written,
        "UNMAP freed the file's blocks: {unmap_blocks_before} -> {unmap_blocks_after} 512-byte blocks \
         ({written} written by the guest)"
    );
    let data = std::fs::read(&luns[2].path).expect("read image");
    assert!(
        data[UNMAP.0 as usize..(UNMAP.0 + UNMAP.1) as usize]
            .iter()
            .all(|&b| b == 0),
        "the unmapped range reads as zeros on the host"
    );

    // Failing commands, with the sense a disk gives.
    for l in [
        "SCSI lun 0 opcode-c5 response=0 status=0x2 key=0x5 asc=0x20 ascq=0x0",
        "SCSI lun 0 read16-past-end response=0 status=0x2 key=0x5 asc=0x21 ascq=0x0",
        "SCSI lun 0 read10-across-end response=0 status=0x2 key=0x5 asc=0x21 ascq=0x0",
        "SCSI lun 5 write10-ro response=0 status=0x2 key=0x7 asc=0x27 ascq=0x0",
        "SCSI lun 5 write16-ro response=0 status=0x2 key=0x7 asc=0x27 ascq=0x0",
        "SCSI lun 5 unmap-ro response=0 status=0x2 key=0x7 asc=0x27 ascq=0x0",
    ] {
        assert_line(&run, l);
    }
    assert_eq!(
        fnv1a(&std::fs::read(&luns[5].path).expect("read ro image")),
        fnv1a(&ro_before),
        "the read-only LUN's file changed"
    );
    assert_missing_lun(&run, 200);
    let tmf = line(&run, "SCSI tmf lun-reset ");
    assert!(
        ["0", "10"].contains(&field(tmf, "response")),
        "LOGICAL UNIT RESET: {tmf}"
    );
}

/// The spec's Drive schema and the server's parser agree on `interface`.
#[test]
fn drive_interface_in_the_spec_and_the_parser() {
    use serde_json::json;
    let exe = "/proc/self/exe";
    let cases = [
        json!({ "path_on_host": exe }),
        json!({ "path_on_host": exe, "interface": "virtio-blk" }),
        json!({ "path_on_host": exe, "interface": "virtio-scsi", "format": "qcow2", "is_read_only": true }),
        json!({ "socket": "/s", "interface": "virtio-scsi", "num_queues": 4, "serial": "S-1" }),
        json!({ "path_on_host": exe, "interface": "scsi" }),
        json!({ "path_on_host": exe, "interface": "Virtio-Scsi" }),
        json!({ "path_on_host": exe, "interface": null }),
        json!({ "path_on_host": exe, "interface": 8 }),
    ];
    let schema = &spec()["paths"]["/drives/{drive_id}"]["put"]["requestBody"]["content"]
        ["application/json"]["schema"];
    for body in cases {
        let server = tern::api::routes::parse("PUT", "/drives/d0", body.to_string().as_bytes());
        let in_spec = validate_against(schema, &body);
        assert_eq!(
            server.is_ok(),
            in_spec.is_ok(),
            "{body}: server {:?}, spec {in_spec:?}",
            server.err()
        );
    }
}

/// A `tern --api-sock`, its console and log lines collected; killed on drop.
struct ApiTern {
    child: Child,
    sock: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ApiTern {
    fn start(dir: &Scratch) -> Self {
        require_kvm();
        let sock = dir.path("api.sock");
        let mut child = Command::new(tern_bin())
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for pipe in pipes {
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    l.lock().expect("lines").push(line);
                }
            });
        }
        let t = Self { child, sock, lines };
        t.wait_for(
            Duration::from_secs(30),
            || std::os::unix::net::UnixStream::connect(&t.sock).is_ok(),
            "the API socket",
        );
        t
    }

    fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    fn wait_for(&self, limit: Duration, mut cond: impl FnMut() -> bool, what: &str) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A request that must answer `status`, conforming to the spec.
    fn call(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> serde_json::Value {
        let (got, text) = request(&self.sock, method, path, body);
        assert_eq!(
            got,
            status,
            "{method} {path} {body:?} answered {got} {text}\n{}",
            self.output()
        );
        if let Err(e) = validate_response(method, path, got, &text) {
            panic!("{method} {path}: {got} {text} does not conform to api-spec/tern.yaml: {e}");
        }
        if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON answer")
        }
    }

    /// A refused request whose fault message names `says`.
    fn refused(&self, path: &str, body: &serde_json::Value, says: &str) {
        let v = self.call("PUT", path, Some(&body.to_string()), 400);
        let msg = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(says),
            "PUT {path} {body}: `{msg}` should say `{says}`"
        );
    }

    fn boot(&self, cmdline: &str) {
        self.call(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
            204,
        );
        let boot =
            serde_json::json!({ "kernel_image_path": UNIKERNEL, "boot_args": cmdline }).to_string();
        self.call("PUT", "/boot-source", Some(&boot), 204);
        self.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
            204,
        );
    }

    fn device(&self, id: &str) -> serde_json::Value {
        self.call("GET", "/devices", None, 200)
            .as_array()
            .expect("device list")
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap_or_default()
    }

    fn heartbeat(&self) -> u64 {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| l.strip_prefix("HEARTBEAT ")?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }
}

impl Drop for ApiTern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn api_managed_controller_next_to_a_blk_drive() {
    let dir = Scratch::new("api");
    let _ = tern_scsi();
    let t = ApiTern::start(&dir);
    let blk = dir.path("blk.raw");
    raw_image(&blk, 4, false);
    let (a, b) = (dir.path("a.raw"), dir.path("b.qcow2"));
    raw_image(&a, 4, false);
    qcow2_image(&b, 8);
    let put = |id: &str, body: serde_json::Value| {
        t.call(
            "PUT",
            &format!("/drives/{id}"),
            Some(&body.to_string()),
            204,
        )
    };
    put(
        "root",
        serde_json::json!({ "path_on_host": blk, "is_root_device": true }),
    );
    put(
        "sa",
        serde_json::json!({ "path_on_host": a, "interface": "virtio-scsi", "serial": "AAA" }),
    );
    put(
        "sb",
        serde_json::json!({ "path_on_host": b, "interface": "virtio-scsi", "format": "qcow2", "num_queues": 2 }),
    );
    // Clear 400s for what one controller cannot do.
    t.refused(
        "/drives/sc",
        &serde_json::json!({ "socket": "/nonexistent.sock", "interface": "virtio-scsi" }),
        "same backend",
    );
    t.refused(
        "/drives/sc",
        &serde_json::json!({ "path_on_host": a, "interface": "virtio-scsi", "is_root_device": true }),
        "root device",
    );
    t.refused(
        "/drives/sc",
        &serde_json::json!({ "path_on_host": a, "interface": "virtio-scsi", "num_queues": 4 }),
        "queues",
    );
    t.refused(
        "/drives/sc",
        &serde_json::json!({ "path_on_host": a, "interface": "virtio-sata" }),
        "virtio-sata",
    );
    let config = t.call("GET", "/vm/config", None, 200);
    let interfaces: Vec<&str> = config["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .map(|d| d["interface"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        interfaces,
        ["virtio-blk", "virtio-scsi", "virtio-scsi"],
        "{config}"
    );

    t.boot("checks=scsi scsiluns=2 scsipattern=1 action=heartbeat period=20");
    t.wait_for(
        Duration::from_secs(120),
        || t.output().contains("SCSI done"),
        "the scsi check",
    );
    let out = t.output();
    assert!(!out.contains("CHECK FAIL"), "the scsi check passes:\n{out}");
    assert!(out.contains("SCSI lun 0 serial=AAA"), "{out}");
    assert!(out.contains("SCSI lun 1 serial=sb"), "{out}");
    assert!(out.contains(" num_queues=2 "), "{out}");

    let root = t.device("root");
    assert_eq!(root["pci_address"], "0000:00:01.0", "{root}");
    let scsi = t.device("scsi0");
    assert_eq!(scsi["kind"], "virtio-scsi", "{scsi}");
    assert_eq!(scsi["pci_address"], "0000:00:02.0", "{scsi}");
    assert_eq!(scsi["state"], "attached", "{scsi}");
    assert_eq!(scsi["luns"], serde_json::json!(["sa", "sb"]), "{scsi}");
    let pid = scsi["backend_pid"].as_u64().expect("managed backend pid");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "tern-scsi runs: {scsi}"
    );
    assert!(
        scsi["backend"]
            .as_str()
            .unwrap_or_default()
            .ends_with("scsi.0.sock"),
        "{scsi}"
    );
    assert!(
        t.device("sa").is_null(),
        "LUNs are not PCI devices of their own"
    );
    // LUNs are added at run time (tests/tests/scsi_hotplug.rs), but not
    // under a number in use.
    t.refused(
        "/drives/late",
        &serde_json::json!({ "path_on_host": a, "interface": "virtio-scsi", "lun": 0 }),
        "LUN 0 is in use by drive sa",
    );
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
}

#[test]
fn external_backend_killed_shows_the_controller_disconnected() {
    let dir = Scratch::new("ext");
    let (a, b) = (dir.path("a.raw"), dir.path("b.raw"));
    raw_image(&a, 4, false);
    raw_image(&b, 6, false);
    let head = std::fs::read(&a).expect("read image");
    let sock = dir.path("scsi.sock");
    let mut backend = Command::new(tern_scsi())
        .args(["--socket", s(&sock), "--lun"])
        .arg(format!("{},serial=EXT-A", a.display()))
        .arg("--lun")
        .arg(format!("{},serial=EXT-B", b.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tern-scsi");
    let t = ApiTern::start(&dir);
    t.wait_for(
        Duration::from_secs(10),
        || sock.exists(),
        "tern-scsi's socket",
    );
    for id in ["ea", "eb"] {
        let body = serde_json::json!({ "socket": sock, "interface": "virtio-scsi" }).to_string();
        t.call("PUT", &format!("/drives/{id}"), Some(&body), 204);
    }
    t.refused(
        "/drives/ec",
        &serde_json::json!({ "socket": dir.path("other.sock"), "interface": "virtio-scsi" }),
        "same backend",
    );
    t.boot("checks=scsi scsiluns=2 scsipattern=1 action=heartbeat period=20");
    t.wait_for(
        Duration::from_secs(120),
        || t.output().contains("SCSI done"),
        "the scsi check",
    );
    let out = t.output();
    assert!(!out.contains("CHECK FAIL"), "{out}");
    assert!(out.contains("SCSI lun 1 serial=EXT-B"), "{out}");
    let scsi = t.device("scsi0");
    assert_eq!(
        (scsi["kind"].as_str(), scsi["state"].as_str()),
        (Some("virtio-scsi"), Some("attached")),
        "{scsi}"
    );
    assert_eq!(scsi["luns"], serde_json::json!(["ea", "eb"]), "{scsi}");
    assert_eq!(scsi["backend"].as_str(), Some(s(&sock)), "{scsi}");
    assert!(scsi["backend_pid"].is_null(), "not tern's process: {scsi}");

    backend.kill().expect("kill tern-scsi");
    let _ = backend.wait();
    t.wait_for(
        Duration::from_secs(30),
        || t.device("scsi0")["state"] == "disconnected",
        "the controller to show disconnected",
    );
    let before = t.heartbeat();
    t.wait_for(
        Duration::from_secs(60),
        || t.heartbeat() > before + 2,
        "heartbeats after the backend died",
    );
    assert_eq!(t.call("GET", "/", None, 200)["state"], "Running");
    // The guest's writes reached the file before the backend died.
    let data = std::fs::read(&a).expect("read image");
    for (off, len) in REGIONS {
        for o in off..off + len {
            assert_eq!(data[o as usize], pattern(0, o), "byte at {o:#x}");
        }
    }
    assert_eq!(data[..0x1000], head[..0x1000], "the rest is untouched");
}

/// The kit README's command line for software-KVM hosts, without `quiet`
/// (the log is the evidence); as in boot_linux.rs.
const PVM_CMDLINE: &str = "console=ttyS0 panic=-1 noxsave tsc=reliable no_timer_check nopvspin \
clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid";

#[test]
fn linux_sees_eight_luns_with_their_sizes_and_partitions() {
    require_kvm();
    let _ = tern_scsi();
    let kit = guest_dir();
    let initrd = uncompressed_initramfs(&kit);
    let kernel = kit.join("vmlinux");
    let dir = Scratch::new("linux");
    let luns = eight_luns(&dir, true);
    let mut args: Vec<String> = [
        "--kernel",
        s(&kernel),
        "--initrd",
        s(&initrd),
        "--memory",
        "512",
        "--cpus",
        "1",
        "--cmdline",
        PVM_CMDLINE,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for (i, l) in luns.iter().enumerate() {
        args.push("--drive".into());
        args.push(l.drive(i));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = tern(&argv, Duration::from_secs(20 * 60));
    eprintln!("the kit's vmlinux booted to its end in {:?}", run.elapsed);
    save_log(&run, "linux");
    let has = |needle: &str| run.stdout.contains(needle);
    for needle in [
        "Run /init as init process",
        "pci 0000:00:01.0: [1af4:1048] type 00 class 0x010000",
        "scsi host0: Virtio SCSI HBA",
    ] {
        assert!(has(needle), "the kernel log lacks `{needle}`: {run}");
    }
    let devices = run
        .stdout
        .lines()
        .filter(|l| l.contains("Direct-Access     TERN"))
        .count();
    assert_eq!(devices, 8, "eight `Direct-Access TERN` devices: {run}");

    // `sd 0:0:0:L: [sdX] ...`: each LUN's disk name.
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for l in run.stdout.lines() {
        let Some(rest) = l.split("sd 0:0:0:").nth(1) else {
            continue;
        };
        let Some((lun, rest)) = rest.split_once(": [") else {
            continue;
        };
        let (Ok(lun), Some((name, _))) = (lun.parse::<u64>(), rest.split_once(']')) else {
            continue;
        };
        names.insert(lun, name.to_string());
    }
    assert_eq!(names.len(), 8, "eight sd disks: {names:?}\n{run}");
    for (i, lun) in luns.iter().enumerate() {
        let sd = &names[&(i as u64)];
        let blocks = lun.mib * MIB / 512;
        assert!(
            has(&format!(
                "sd 0:0:0:{i}: [{sd}] {blocks} 512-byte logical blocks"
            )),
            "LUN {i} ({sd}) has {blocks} blocks: {run}"
        );
        assert!(
            has(&format!("sd 0:0:0:{i}: [{sd}] Write cache: ")),
            "MODE SENSE caching page of LUN {i}: {run}"
        );
        assert_eq!(
            has(&format!("sd 0:0:0:{i}: [{sd}] Write Protect is on")),
            lun.ro,
            "write protection of LUN {i}: {run}"
        );
        if !lun.qcow2 {
            assert!(
                has(&format!(" {sd}: {sd}1")),
                "the partition scan of LUN {i} found its partition: {run}"
            );
        }
    }
    // No errors from the SCSI stack: no failed command (sd logs its sense),
    // no I/O error in the partition scans.
    for bad in [
        "I/O error",
        "Sense Key",
        "Add. Sense",
        "Unhandled",
        "critical",
    ] {
        assert!(!has(bad), "the kernel log has `{bad}`: {run}");
    }
    for l in run
        .stdout
        .lines()
        .filter(|l| l.contains("scsi") || l.contains(" sd"))
    {
        let lower = l.to_ascii_lowercase();
        assert!(
            !lower.contains("error") && !lower.contains("fail"),
            "a SCSI error in the kernel log: `{l}`\n{run}"
        );
    }
    let attached = run
        .stdout
        .lines()
        .filter(|l| l.contains("Attached SCSI disk"))
        .count();
    assert_eq!(attached, 8, "sd attached every disk: {run}");
    if is_pvm_host() {
        assert_eq!(run.code(), 0, "{run}");
    }
}
