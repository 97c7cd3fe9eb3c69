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
