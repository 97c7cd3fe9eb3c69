//! The test unikernel on tern's q35 machine: PVH boot with 1, 2 and 4
//! vCPUs, the chipset through both PCI config mechanisms, the ACPI tables,
//! and every way the guest can end the VM.

mod common;

use common::{assert_line, unikernel};

fn boots_with(cpus: u32) {
    let run = unikernel(
        cpus,
        &format!("checks=pci,acpi,smp cpus={cpus} action=exit code=5"),
    );
    assert_eq!(
        run.code(),
        (5 << 1) | 1,
        "debug-exit value 5 must give status 11: {run}"
    );
    assert!(
        run.stdout.starts_with("TERN-UNIKERNEL v1 "),
        "first line: {run}"
    );
    for mech in ["cf8", "ecam"] {
        assert_line(&run, &format!("PCI {mech} 00:00.0 8086:29c0 class=060000"));
        assert_line(&run, &format!("PCI {mech} 00:1f.0 8086:2918 class=060100"));
    }
    for sig in ["XSDT", "FACP", "APIC", "MCFG", "DSDT"] {
        let ok = run
            .stdout
            .lines()
            .any(|l| l.starts_with(&format!("ACPI {sig} ")) && l.ends_with("checksum=ok"));
        assert!(ok, "{sig} missing or with a bad checksum: {run}");
    }
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("ACPI RSDP rev=2 ")),
        "{run}"
    );
    assert_line(&run, &format!("ACPI MADT cpus={cpus} ioapics=1"));
    assert_line(&run, "ACPI MCFG base=0xb0000000 buses=0-255");
    assert_line(&run, "ACPI DSDT s5=5");
    assert_line(&run, &format!("SMP online={cpus}"));
    assert_line(&run, "RESULT pass");
    assert!(!run.stdout.contains("CHECK FAIL"), "{run}");
    assert!(
        run.stderr
            .contains("tern: guest wrote 0x5 to the debug-exit port"),
        "{run}"
    );
}

#[test]
fn pvh_boot_one_vcpu() {
    boots_with(1);
}

#[test]
fn pvh_boot_two_vcpus() {
    boots_with(2);
}

#[test]
fn pvh_boot_four_vcpus() {
    boots_with(4);
}

/// Each reset or power-off path ends tern with status 0 and says which.
fn ends_cleanly(action: &str, why: &str) {
    let run = unikernel(1, &format!("checks=acpi action={action}"));
    assert_eq!(run.code(), 0, "{run}");
    assert_line(&run, "RESULT pass");
    assert!(!run.stdout.contains("did not end the VM"), "{run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(why),
        "last stderr line should say `{why}`: {run}"
    );
}

#[test]
fn reset_through_i8042() {
    ends_cleanly("i8042", "reset (i8042)");
}

#[test]
fn reset_through_cf9() {
    ends_cleanly("cf9", "reset (0xcf9 reset control)");
}

#[test]
fn reset_through_acpi_reset_register() {
    // The FADT's RESET_REG is the 0xCF9 register, as on ICH9.
    ends_cleanly("acpi-reset", "reset (0xcf9 reset control)");
}

#[test]
fn power_off_through_acpi_s5() {
    ends_cleanly("s5", "guest powered off (ACPI S5)");
}

#[test]
fn triple_fault_ends_the_vm() {
    ends_cleanly("triple-fault", "triple-faulted");
}

#[test]
fn debug_exit_hands_back_codes() {
    for (code, status) in [(0, 1), (1, 3), (42, 85), (127, 255)] {
        let run = unikernel(1, &format!("action=exit code={code}"));
        assert_eq!(run.code(), status, "code {code}: {run}");
    }
}

#[test]
fn a_failed_guest_check_is_visible_in_the_status() {
    // The guest is told to expect 3 CPUs but gets 2: its MADT check fails and
    // it exits with 0x7e instead of the requested code.
    let run = unikernel(2, "checks=acpi cpus=3 action=exit code=1");
    assert_eq!(run.code(), (0x7e << 1 | 1) & 0xff, "{run}");
    assert!(run.stdout.contains("CHECK FAIL"), "{run}");
}

#[test]
fn an_instruction_the_host_cannot_emulate_is_a_clear_error() {
    common::require_kvm();
    if !common::is_pvm_host() {
        // On hardware KVM popcnt just runs: there is no emulation failure to
        // provoke with a well-formed guest.
        eprintln!(
            "NOT RUN: hardware KVM host; the emulation-failure path only shows on kvm_pvm hosts"
        );
        return;
    }
    let run = unikernel(1, "action=emulator-gap");
    assert_eq!(run.code(), 2, "an emulation failure is a tern error: {run}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("KVM_EXIT_INTERNAL_ERROR"),
        "names the exit reason: {run}"
    );
    assert!(last.contains("emulation failure"), "{run}");
    assert!(
        last.contains("at guest RIP 0x1"),
        "names the guest RIP: {run}"
    );
    assert!(
        last.contains("instruction bytes [f3 48 0f b8 c0"),
        "shows the popcnt bytes: {run}"
    );
}

#[test]
fn sixty_four_vcpus_come_up() {
    let run = unikernel(64, "checks=acpi,smp cpus=64 action=exit code=0");
    assert_eq!(run.code(), 1, "{run}");
    assert_line(&run, "ACPI MADT cpus=64 ioapics=1");
    assert_line(&run, "SMP online=64");
    assert_line(&run, "RESULT pass");
}

#[test]
fn serial_output_to_a_file() {
    common::require_kvm();
    let path = std::env::temp_dir().join(format!("tern-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let serial = format!("file:{}", path.display());
    let run = common::tern(
        &[
            "--kernel",
            common::UNIKERNEL,
            "--serial",
            &serial,
            "--cmdline",
            "checks=pci action=exit code=2",
        ],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(run.code(), 5, "{run}");
    assert!(
        run.stdout.is_empty(),
        "the console went to the file, not stdout: {run}"
    );
    let text = std::fs::read_to_string(&path).expect("serial file");
    assert!(
        text.starts_with("TERN-UNIKERNEL v1 cmdline=checks=pci action=exit code=2\n"),
        "{text}"
    );
    assert!(
        text.contains("PCI ecam 00:1f.0 8086:2918 class=060100\n"),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn pvm_hosts_get_the_pvm_template_and_one_line_saying_so() {
    let run = unikernel(1, "action=exit");
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("kvm_pvm"))
        .collect();
    if common::is_pvm_host() {
        assert_eq!(lines.len(), 1, "one line about the pvm template: {run}");
        assert!(
            lines[0].contains("CPU template 'pvm'") && lines[0].contains("clearcpuid="),
            "{run}"
        );
    } else {
        assert!(lines.is_empty(), "{run}");
    }
    // An explicit template is honoured and, being the user's choice, not announced.
    common::require_kvm();
    let run = common::tern(
        &[
            "--kernel",
            common::UNIKERNEL,
            "--cpu-template",
            "baseline",
            "--cmdline",
            "action=exit",
        ],
        std::time::Duration::from_secs(30),
    );
    assert_eq!(run.code(), 1, "{run}");
    assert!(!run.stderr.contains("CPU template 'pvm'"), "{run}");
}

/// An ELF without a PVH note goes through the Linux 64-bit boot protocol:
/// long mode, identity-mapped low memory, boot_params in RSI with the
/// command line, E820 map and RSDP.
#[test]
fn elf_without_pvh_note_boots_through_the_64_bit_entry() {
    common::require_kvm();
    let run = common::tern(
        &[
            "--kernel",
            env!("TERN_UNIKERNEL_LINUX64"),
            "--cpus",
            "2",
            "--memory",
            "6144",
            "--cmdline",
            "checks=pci,acpi,smp,mem cpus=2 mem=6144 action=exit code=4",
        ],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(run.code(), 9, "{run}");
    assert_line(&run, "BOOT protocol=linux64");
    assert_line(&run, "SMP online=2");
    assert_line(&run, "MEM pattern ok pages=26");
    assert_line(&run, "RESULT pass");
}

/// RAM above the 32-bit hole: 6 GiB and 64 GiB guests see all of it in the
/// PVH memory map and can write and read back patterns above 4 GiB.
#[test]
fn memory_sizes_up_to_64_gib() {
    for mib in [32u64, 6144, 65536] {
        common::require_kvm();
        let mem = mib.to_string();
        let run = common::tern(
            &[
                "--kernel",
                common::UNIKERNEL,
                "--memory",
                &mem,
                "--cmdline",
                &format!("checks=mem mem={mib} action=exit"),
            ],
            std::time::Duration::from_secs(60),
        );
        assert_eq!(run.code(), 1, "{mib} MiB: {run}");
        assert_line(&run, "BOOT protocol=pvh");
        assert!(run.stdout.contains("MEM pattern ok"), "{run}");
        assert_line(&run, "RESULT pass");
    }
}
