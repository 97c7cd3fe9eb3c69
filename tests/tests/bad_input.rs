//! Bad input on the command line gives one `tern: error:` line and status
//! 2, never a panic or a hang.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{require_kvm, run_with_deadline, tern, tern_bin, Run, UNIKERNEL};

const DEADLINE: Duration = Duration::from_secs(30);

fn assert_error(run: &Run, expect: &str) {
    assert_eq!(run.code(), 2, "{run}");
    assert!(!run.stderr.contains("panicked"), "tern panicked: {run}");
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("tern: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {run}");
    assert!(
        errors[0].contains(expect),
        "the error should say `{expect}`: {run}"
    );
    assert_eq!(
        run.stderr.lines().last(),
        Some(errors[0]),
        "the error is the last line: {run}"
    );
    assert!(run.stdout.is_empty(), "no guest ran: {run}");
}

fn scratch(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn missing_kernel_file() {
    require_kvm();
    let run = tern(&["--kernel", "/nonexistent/vmlinux"], DEADLINE);
    assert_error(
        &run,
        "cannot read kernel image /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    require_kvm();
    let p = scratch("not-a-kernel", b"#!/bin/sh\necho this is not a kernel\n");
    let run = tern(&["--kernel", p.to_str().unwrap()], DEADLINE);
    assert_error(&run, "is neither an ELF file nor a bzImage");
}

#[test]
fn truncated_elf() {
    require_kvm();
    let elf = std::fs::read(UNIKERNEL).unwrap();
    let p = scratch("truncated.elf", &elf[..100]);
    let run = tern(&["--kernel", p.to_str().unwrap()], DEADLINE);
    assert_error(&run, "cannot load kernel image");
}

#[test]
fn missing_initrd() {
    require_kvm();
    let run = tern(
        &["--kernel", UNIKERNEL, "--initrd", "/nonexistent/initrd"],
        DEADLINE,
    );
    assert_error(&run, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn too_little_memory() {
    let run = tern(&["--kernel", UNIKERNEL, "--memory", "8"], DEADLINE);
    assert_error(&run, "mem_size_mib 8 is out of range (32 to 1048576)");
}

#[test]
fn too_many_or_no_vcpus() {
    let run = tern(&["--kernel", UNIKERNEL, "--cpus", "0"], DEADLINE);
    assert_error(&run, "vcpu_count 0 is out of range");
    let run = tern(&["--kernel", UNIKERNEL, "--cpus", "1000"], DEADLINE);
    assert_error(&run, "vcpu_count 1000 is out of range");
}

#[test]
fn unknown_flag_and_bad_values() {
    assert_error(
        &tern(&["--kernel", UNIKERNEL, "--bogus", "1"], DEADLINE),
        "unknown option '--bogus'",
    );
    assert_error(
        &tern(&["--kernel", UNIKERNEL, "--cpus", "two"], DEADLINE),
        "invalid value 'two' for --cpus",
    );
    assert_error(
        &tern(&["--kernel", UNIKERNEL, "--cpu-template", "fast"], DEADLINE),
        "unknown CPU template 'fast'",
    );
    assert_error(
        &tern(&["--kernel", UNIKERNEL, "--serial", "tty"], DEADLINE),
        "invalid serial output 'tty'",
    );
    assert_error(&tern(&["--memory", "64"], DEADLINE), "no kernel given");
}

#[test]
fn bad_config_file() {
    let p = scratch(
        "bad.json",
        br#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}}"#,
    );
    let run = tern(&["--config-file", p.to_str().unwrap()], DEADLINE);
    assert_error(&run, "unknown field `turbo`");
    let p = scratch("truncated.json", br#"{"machine-config": {"vcpu_count": 1,"#);
    let run = tern(&["--config-file", p.to_str().unwrap()], DEADLINE);
    assert_error(&run, "invalid config file");
    let run = tern(&["--config-file", "/nonexistent.json"], DEADLINE);
    assert_error(&run, "cannot read config file /nonexistent.json");
}

#[test]
fn config_file_boots_and_flags_override_it() {
    require_kvm();
    let cfg = format!(
        r#"{{"machine-config": {{"vcpu_count": 4, "mem_size_mib": 64}},
            "boot-source": {{"kernel_image_path": "{UNIKERNEL}", "boot_args": "checks=acpi cpus=2 action=exit code=9"}}}}"#
    );
    let p = scratch("good.json", cfg.as_bytes());
    let run = tern(
        &["--config-file", p.to_str().unwrap(), "--cpus", "2"],
        DEADLINE,
    );
    assert_eq!(run.code(), 19, "{run}");
    common::assert_line(&run, "ACPI MADT cpus=2 ioapics=1");
}

#[test]
fn missing_dev_kvm() {
    // Hide /dev in a private mount namespace: tern must say what is wrong.
    let bin = tern_bin();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--", "sh", "-c"]).arg(format!(
        "mount -t tmpfs none /dev && exec '{}' --kernel '{UNIKERNEL}'",
        bin.display()
    ));
    let run = run_with_deadline(cmd, DEADLINE);
    assert_error(&run, "/dev/kvm does not exist: tern needs KVM");
}
