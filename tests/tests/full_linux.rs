//! The guest kit with its userspace: `GUEST-READY`, `run=`, power-off,
//! reboot and console input. These need hardware KVM (kvm_intel/kvm_amd):
//! on a kvm_pvm host no Linux userspace runs (docs/pvm.md) and each test
//! prints `NOT RUN` and why.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_dir, is_pvm_host, require_kvm, tern, tern_bin, Run};

const DEADLINE: Duration = Duration::from_secs(120);

fn hardware_kvm_or_say_so(test: &str) -> bool {
    require_kvm();
    if is_pvm_host() {
        eprintln!(
            "NOT RUN: {test}: /dev/kvm is kvm_pvm (software KVM), where no Linux userspace runs; \
             this test needs hardware KVM"
        );
        return false;
    }
    true
}

fn kit_boot(cmdline: &str) -> Run {
    let kit = guest_dir();
    tern(
        &[
            "--kernel",
            kit.join("vmlinux").to_str().unwrap(),
            "--initrd",
            kit.join("initramfs.cpio.gz").to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512",
            "--cmdline",
            cmdline,
        ],
        DEADLINE,
    )
}

#[test]
fn hardware_kvm_guest_ready_nproc_and_poweroff() {
    if !hardware_kvm_or_say_so("guest_ready_nproc_and_poweroff") {
        return;
    }
    let run = kit_boot("console=ttyS0 panic=-1 quiet run=nproc");
    assert!(run.stdout.contains("GUEST-READY uptime="), "{run}");
    assert!(
        run.stdout.lines().any(|l| l.trim() == "2"),
        "nproc must print 2: {run}"
    );
    assert!(run.stdout.contains("GUEST-EXIT 0"), "{run}");
    assert_eq!(run.code(), 0, "poweroff -f ends tern with 0: {run}");
    assert!(run.stderr.contains("powered off"), "{run}");
}

#[test]
fn hardware_kvm_reboot_ends_tern() {
    if !hardware_kvm_or_say_so("reboot_ends_tern") {
        return;
    }
    let run = kit_boot("console=ttyS0 panic=-1 quiet halt=reboot run=true");
    assert!(run.stdout.contains("GUEST-EXIT 0"), "{run}");
    assert_eq!(run.code(), 0, "{run}");
    assert!(run.stderr.contains("reset"), "{run}");
}

#[test]
fn hardware_kvm_console_input_reaches_the_shell() {
    if !hardware_kvm_or_say_so("console_input_reaches_the_shell") {
        return;
    }
    let kit = guest_dir();
    let mut child = Command::new(tern_bin())
        .args(["--kernel", kit.join("vmlinux").to_str().unwrap()])
        .args(["--initrd", kit.join("initramfs.cpio.gz").to_str().unwrap()])
        .args([
            "--memory",
            "512",
            "--cmdline",
            "console=ttyS0 panic=-1 quiet",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let start = Instant::now();
    let mut seen = String::new();
    let mut sent = false;
    for line in stdout.lines() {
        let line = line.unwrap_or_default();
        seen.push_str(&line);
        seen.push('\n');
        if !sent && line.contains("GUEST-READY") {
            // The shell starts right after the marker; give it a moment.
            std::thread::sleep(Duration::from_secs(1));
            stdin
                .write_all(b"echo typed-$((6*7))\npoweroff -f\n")
                .unwrap();
            sent = true;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no power-off within {DEADLINE:?}:\n{seen}"
        );
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        seen.contains("typed-42"),
        "the shell never ran what was typed:\n{seen}\n{err}"
    );
    assert_eq!(status.code(), Some(0), "{seen}\n{err}");
}

#[test]
fn hardware_kvm_boots_from_the_rootfs_disk() {
    if !hardware_kvm_or_say_so("boots_from_the_rootfs_disk") {
        return;
    }
    let kit = guest_dir();
    let drive = format!("path={},root=on,ro=on", kit.join("rootfs.ext4").display());
    // No initrd: the kernel mounts /dev/vda (tern adds root=/dev/vda ro).
    let run = tern(
        &[
            "--kernel",
            kit.join("vmlinux").to_str().unwrap(),
            "--memory",
            "512",
            "--drive",
            &drive,
            "--cmdline",
            "console=ttyS0 panic=-1 quiet run=\"cat /proc/mounts\"",
        ],
        DEADLINE,
    );
    assert!(run.stdout.contains("GUEST-READY"), "{run}");
    assert!(
        run.stdout.contains("/dev/root / ext4 ro") || run.stdout.contains("/dev/vda / ext4 ro"),
        "{run}"
    );
    assert_eq!(run.code(), 0, "{run}");
}

/// A command run inside network namespace `ns`.
fn in_ns(ns: &str, cmd: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "sh", "-c", cmd]);
    c
}

/// Issue 5 on real hardware: the kit's virtio-net NIC (served by tern-net
/// on a tap in a namespace of the test's own) pings the host end and runs
/// iperf3 both ways against it.
#[test]
fn hardware_kvm_nic_pings_the_host_and_iperf3_runs_both_ways() {
    if !hardware_kvm_or_say_so("nic_pings_the_host_and_iperf3_runs_both_ways") {
        return;
    }
    assert!(
        Command::new("iperf3").arg("--version").output().is_ok(),
        "iperf3 is needed on the host for this test (apt-get install iperf3)"
    );
    let ns = format!("tern-fl-net-{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let setup = format!(
        "ip netns add {ns} && ip netns exec {ns} sh -c 'ip link set lo up && ip tuntap add tn0 mode tap \
         && ip addr add 10.0.2.1/24 dev tn0 && ip link set tn0 up'"
    );
    assert!(Command::new("sh")
        .args(["-c", &setup])
        .status()
        .unwrap()
        .success());
    let mut server = in_ns(&ns, "iperf3 -s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kit = guest_dir();
    let cmdline = "console=ttyS0 panic=-1 quiet ip=10.0.2.2::10.0.2.1:255.255.255.0::eth0:off \
                   run=\"ping -c 3 10.0.2.1 && iperf3 -c 10.0.2.1 -t 2 && iperf3 -c 10.0.2.1 -t 2 -R\"";
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns])
        .arg(tern_bin())
        .args(["--kernel", kit.join("vmlinux").to_str().unwrap()])
        .args(["--initrd", kit.join("initramfs.cpio.gz").to_str().unwrap()])
        .args(["--memory", "512", "--cpus", "2"])
        .args(["--net", "tap=tn0,mac=02:74:65:72:6e:05"])
        .args(["--cmdline", cmdline]);
    let run = common::run_with_deadline(cmd, DEADLINE);
    let _ = server.kill();
    let _ = server.wait();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(run.stdout.contains("3 packets received"), "{run}");
    assert!(
        run.stdout.matches("receiver").count() >= 2,
        "iperf3 both ways: {run}"
    );
    assert!(run.stdout.contains("GUEST-EXIT 0"), "{run}");
    assert_eq!(run.code(), 0, "{run}");
}

/// Issue 6 on real hardware: the kit writes random data to each of two
/// virtio-scsi LUNs from userspace with O_DIRECT and reads it back; the
/// checksums agree in the guest and with what the host reads from the files.
#[test]
fn hardware_kvm_scsi_luns_read_and_write_from_userspace() {
    if !hardware_kvm_or_say_so("scsi_luns_read_and_write_from_userspace") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tern-fl-scsi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let luns: Vec<_> = (0..2).map(|i| dir.join(format!("lun{i}.raw"))).collect();
    for l in &luns {
        std::fs::File::create(l).unwrap().set_len(16 << 20).unwrap();
    }
    let script = "for d in /dev/sda /dev/sdb; do \
                  dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null; \
                  dd if=/tmp/p of=$d bs=64k count=16 oflag=direct 2>/dev/null; \
                  echo W $d $(sha256sum < /tmp/p | cut -c1-64); \
                  echo R $d $(dd if=$d bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64); \
                  done";
    let cmdline = format!("console=ttyS0 panic=-1 quiet run=\"{script}\"");
    let kit = guest_dir();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kit.join("vmlinux").display().to_string(),
        "--initrd".into(),
        kit.join("initramfs.cpio.gz").display().to_string(),
        "--memory".into(),
        "512".into(),
        "--cmdline".into(),
        cmdline,
    ];
    for (i, l) in luns.iter().enumerate() {
        args.push("--drive".into());
        args.push(format!(
            "path={},id=l{i},interface=virtio-scsi",
            l.display()
        ));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = tern(&refs, DEADLINE);
    assert_eq!(run.code(), 0, "{run}");
    for (i, dev) in ["/dev/sda", "/dev/sdb"].iter().enumerate() {
        let sum = |kind: &str| {
            run.stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{kind} {dev} ")))
                .unwrap_or_else(|| panic!("no {kind} line for {dev}: {run}"))
                .trim()
                .to_string()
        };
        let (w, r) = (sum("W"), sum("R"));
        assert_eq!(w, r, "{dev}: written and read back differ");
        let host = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 1048576 {} | sha256sum | cut -c1-64",
                luns[i].display()
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&host.stdout).trim(),
            w,
            "{dev}: the host reads what the guest wrote"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `TICK n` lines a kit guest's loop printed.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[test]
fn hardware_kvm_linux_with_a_disk_snapshots_and_restores_and_its_shell_goes_on() {
    if !hardware_kvm_or_say_so("linux_with_a_disk_snapshots_and_restores") {
        return;
    }
    let kit = guest_dir();
    let dir = common::vm::Scratch::new("full-linux-snap");
    let disk = dir.path("scratch.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    // The shell counts, and writes each count to the disk's first sector.
    let cmdline = "console=ttyS0 panic=-1 quiet run=\"i=0; while true; do i=$((i+1)); \
                   echo TICK $i; echo DISK$i | dd of=/dev/vda bs=512 count=1 conv=sync,fsync \
                   2>/dev/null; sleep 1; done\"";
    let drive = format!("path={}", disk.display());
    let vm = common::vm::Vm::start(
        Some(&dir.path("api.sock")),
        &[
            "--kernel",
            kit.join("vmlinux").to_str().unwrap(),
            "--initrd",
            kit.join("initramfs.cpio.gz").to_str().unwrap(),
            "--memory",
            "512",
            "--drive",
            &drive,
            "--cmdline",
            cmdline,
        ],
    );
    vm.wait_until(DEADLINE, "three ticks", || ticks(&vm.output()).len() >= 3);
    vm.pause();
    let before = *ticks(&vm.output()).last().unwrap();
    vm.snapshot("Full", &state, &mem);
    drop(vm);

    let arg = format!("{},{}", state.display(), mem.display());
    let r = common::vm::Vm::start(None, &["--restore", &arg]);
    r.wait_until(DEADLINE, "three ticks after restore", || {
        ticks(&r.output()).len() >= 3
    });
    let after = ticks(&r.output());
    assert_eq!(
        after[0],
        before + 1,
        "the shell's loop did not go on from {before}:\n{}",
        r.output()
    );
    // The loop's last write reached the disk through the restored device.
    let last = *after.last().unwrap();
    let sector = std::fs::read(&disk).unwrap();
    let text = String::from_utf8_lossy(&sector[..16]).into_owned();
    assert!(
        text.starts_with(&format!("DISK{last}")) || text.starts_with(&format!("DISK{}", last - 1)),
        "the disk holds {text:?}, not the count {last}"
    );
}

/// Issue 10 on real hardware: Linux's acpiphp (CONFIG_HOTPLUG_PCI_ACPI in
/// tools/guest-image/microvm.config) sees a disk hot plugged over the API
/// appear as /sys/block/vdb, and lets it go (eject) after DELETE. The kit
/// kernel must have been rebuilt with that option.
#[test]
fn hardware_kvm_linux_sees_a_hot_plugged_disk_come_and_go() {
    if !hardware_kvm_or_say_so("linux_sees_a_hot_plugged_disk_come_and_go") {
        return;
    }
    let dir = common::vm::Scratch::new("fl-hotplug");
    let img = dir.path("hot.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // Wait (up to 60 s each) for vdb to come, then to go.
    let script = "echo HP-WAIT; \
                  i=0; while [ ! -e /sys/block/vdb ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; \
                  echo HP-PLUGGED $(cat /sys/block/vdb/size); \
                  i=0; while [ -e /sys/block/vdb ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; \
                  echo HP-GONE $(ls /sys/block)";
    let cmdline = format!("console=ttyS0 panic=-1 quiet run=\"{script}\"");
    let kit = guest_dir();
    let (kernel, initrd) = (kit.join("vmlinux"), kit.join("initramfs.cpio.gz"));
    let mut vm = common::vm::Vm::start(
        Some(&dir.path("api.sock")),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "512",
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_line("HP-WAIT", DEADLINE);
    vm.expect(
        "PUT",
        "/drives/hot",
        Some(&serde_json::json!({ "path_on_host": img }).to_string()),
        204,
    );
    let plugged = vm.wait_line("HP-PLUGGED", DEADLINE);
    assert_eq!(plugged.trim(), "HP-PLUGGED 32768", "{}", vm.output());
    vm.expect("DELETE", "/drives/hot", None, 204);
    let gone = vm.wait_line("HP-GONE", DEADLINE);
    assert!(!gone.contains("vdb"), "{gone}\n{}", vm.output());
    vm.wait_until(DEADLINE, "the drive to leave GET /devices", || {
        !vm.expect("GET", "/devices", None, 200)
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == "hot"))
    });
    assert_eq!(vm.wait_exit(DEADLINE), Some(0), "{}", vm.output());
}
