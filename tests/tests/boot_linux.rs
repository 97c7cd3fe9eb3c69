//! Kernel-only Linux boots of the guest kit (`TERN_GUEST_DIR`): the kernel
//! probes ACPI, PCI and memory on tern's q35 machine before it reaches
//! `Run /init`, and its log is the evidence. On this project's kvm_pvm
//! hosts no Linux userspace runs (docs/pvm.md), so the boot ends when init
//! dies and the kernel (`panic=-1`) resets: tern exits 0.
//!
//! Each boot takes minutes on a software KVM; keep them few.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{guest_dir, is_pvm_host, require_kvm, tern, uncompressed_initramfs, Run};

/// The kit README's command line for software-KVM hosts, without `quiet`
/// (the log is the evidence). `nopvspin`: PV spinlock kicks are hypercalls,
/// which spin on kvm_pvm.
const PVM_CMDLINE: &str = "console=ttyS0 panic=-1 noxsave tsc=reliable no_timer_check nopvspin \
clearcpuid=cx16,xsave,popcnt,smap,smep,fsgsbase,pcid,invpcid,rdrand,rdseed,lfence_rdtsc,rdtscp,rdpid";

const DEADLINE: Duration = Duration::from_secs(20 * 60);

fn boot(kernel: &str, cpus: u32, drives: &[String]) -> Run {
    boot_in(None, kernel, cpus, drives, &[], "")
}

/// Boots the kit's `kernel`, inside the network namespace `netns` if given,
/// with extra devices and command-line words.
fn boot_in(
    netns: Option<&str>,
    kernel: &str,
    cpus: u32,
    drives: &[String],
    nets: &[String],
    extra: &str,
) -> Run {
    require_kvm();
    let kit = guest_dir();
    let initrd = uncompressed_initramfs(&kit);
    let kernel = kit.join(kernel);
    let cpus = cpus.to_string();
    let mut args = vec![
        "--kernel",
        path(&kernel),
        "--initrd",
        path(&initrd),
        "--memory",
        "6144",
        "--cpus",
        &cpus,
    ];
    let cmdline = format!("{PVM_CMDLINE} {extra}");
    args.push("--cmdline");
    args.push(&cmdline);
    for d in drives {
        args.push("--drive");
        args.push(d);
    }
    for n in nets {
        args.push("--net");
        args.push(n);
    }
    let run = match netns {
        None => tern(&args, DEADLINE),
        Some(ns) => {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["netns", "exec", ns])
                .arg(common::tern_bin())
                .args(&args);
            common::run_with_deadline(cmd, DEADLINE)
        }
    };
    eprintln!(
        "{} booted to its end in {:?}",
        kernel.display(),
        run.elapsed
    );
    run
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn has(run: &Run, needle: &str) -> bool {
    run.stdout.contains(needle)
}

fn assert_has(run: &Run, needle: &str) {
    assert!(has(run, needle), "the kernel log lacks `{needle}`: {run}");
}

/// What every kit boot must show in the kernel's own log.
fn assert_machine_as_linux_sees_it(run: &Run) {
    assert_has(run, "Run /init as init process");
    for table in ["FACP", "APIC", "MCFG", "DSDT"] {
        assert_has(run, &format!("ACPI: {table} 0x"));
    }
    for bad in [
        "ACPI Error",
        "ACPI BIOS Error",
        "ACPI Warning",
        "MMCONFIG at [mem 0xb0000000-0xbfffffff] not reserved",
    ] {
        assert!(!has(run, bad), "the kernel log has `{bad}`: {run}");
    }
    assert_has(run, "ACPI: Interpreter enabled");
    assert_has(run, "PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0xb0000000-0xbfffffff] (base 0xb0000000)");
    assert!(
        has(run, "PCI: MMCONFIG at [mem 0xb0000000-0xbfffffff] reserved"),
        "MMCONFIG must be accepted (reserved in E820 or as a motherboard resource): {run}"
    );
    assert!(
        !has(run, "PCI: Using configuration type 1 for extended access"),
        "ECAM unused: {run}"
    );
    assert_has(run, "pci 0000:00:00.0: [8086:29c0] type 00 class 0x060000");
    assert_has(run, "pci 0000:00:1f.0: [8086:2918] type 00 class 0x060100");
    assert_has(
        run,
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
    );
    // The memory map with 6 GiB: low RAM up to the ECAM window, the rest
    // above 4 GiB, and the kernel's own total.
    assert_has(
        run,
        "BIOS-e820: [mem 0x0000000000100000-0x00000000afffffff] usable",
    );
    assert_has(
        run,
        "BIOS-e820: [mem 0x00000000b0000000-0x00000000bfffffff] reserved",
    );
    assert_has(
        run,
        "BIOS-e820: [mem 0x0000000100000000-0x00000001cfffffff] usable",
    );
    let total_kib = run
        .stdout
        .lines()
        .find_map(|l| {
            let rest = l.split("Memory: ").nth(1)?;
            let total = rest.split('/').nth(1)?.split('K').next()?;
            total.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no `Memory: a/bK available` line: {run}"));
    assert!(
        ((6 << 20) - 1024..=6 << 20).contains(&total_kib),
        "the kernel counts {total_kib} KiB of RAM, not 6 GiB: {run}"
    );
    assert_has(
        run,
        "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A",
    );
    // The RTC carries the host's UTC date into the guest.
    let today = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .expect("date");
    let today = String::from_utf8_lossy(&today.stdout).trim().to_string();
    assert_has(
        run,
        &format!("rtc_cmos 00:02: setting system clock to {today}T"),
    );
    // How the boot ended: on kvm_pvm init dies (no userspace runs there) and
    // panic=-1 resets the machine, which ends tern cleanly.
    if is_pvm_host() {
        assert_eq!(run.code(), 0, "{run}");
        assert!(
            run.stderr
                .lines()
                .last()
                .unwrap_or_default()
                .contains("reset"),
            "{run}"
        );
    }
}

/// Three disks for the kernel to find: a raw one with an MBR partition
/// table (its partition scan reads through tern-blk), a plain raw one and a
/// qcow2 one.
fn disks(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let d0 = dir.join("d0.raw");
    let f = std::fs::File::create(&d0).unwrap();
    f.set_len(64 << 20).unwrap();
    let mut mbr = [0u8; 512];
    // Partition 1: Linux (0x83), LBA 2048 to the end.
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(131_072u32 - 2048).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).unwrap();
    let d1 = dir.join("d1.raw");
    std::fs::File::create(&d1)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let d2 = dir.join("d2.qcow2");
    let _ = std::fs::remove_file(&d2);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", path(&d2), "48M"])
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    vec![
        format!("path={}", d0.display()),
        format!("path={}", d1.display()),
        format!("path={},format=qcow2", d2.display()),
    ]
}

#[test]
fn linux_pvh_vmlinux_6g_two_vcpus_three_disks() {
    let dir = std::env::temp_dir().join(format!("tern-linux-disks-{}", std::process::id()));
    let run = boot("vmlinux", 2, &disks(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert_machine_as_linux_sees_it(&run);
    assert_has(&run, "smp: Brought up 1 node, 2 CPUs");
    assert_has(&run, "ACPI: Added _OSI");
    // The disks as Linux sees them: virtio-pci functions in slot order, their
    // sizes from tern-blk's config, and a partition table read through it.
    for slot in 1..=3 {
        assert_has(
            &run,
            &format!("pci 0000:00:0{slot}.0: [1af4:1042] type 00 class 0x018000"),
        );
    }
    assert_has(
        &run,
        "[vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)",
    );
    assert_has(&run, " vda: vda1");
    assert_has(
        &run,
        "[vdb] 65536 512-byte logical blocks (33.6 MB/32.0 MiB)",
    );
    assert_has(
        &run,
        "[vdc] 98304 512-byte logical blocks (50.3 MB/48.0 MiB)",
    );
}

#[test]
fn linux_bzimage_6g_with_a_nic() {
    // A namespace with a tap for the NIC, never the host's interfaces.
    let ns = format!("tern-linux-net-{}", std::process::id());
    let sh = |cmd: &str| {
        let st = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .expect("sh");
        assert!(st.success(), "{cmd}");
    };
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    sh(&format!(
        "ip netns add {ns} && ip netns exec {ns} ip tuntap add tn0 mode tap && \
         ip netns exec {ns} ip addr add 10.77.0.1/24 dev tn0 && ip netns exec {ns} ip link set tn0 up"
    ));
    let run = boot_in(
        Some(&ns),
        "bzImage",
        1,
        &[],
        &["tap=tn0,mac=02:74:65:72:6e:07".to_string()],
        "ip=10.77.0.2::10.77.0.1:255.255.255.0::eth0:off",
    );
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &ns])
        .status();
    assert_machine_as_linux_sees_it(&run);
    assert_has(&run, "smp: Brought up 1 node, 1 CPU");
    // The NIC as Linux sees it: virtio-net on virtio-pci, eth0 with the
    // configured MAC, and IP autoconfiguration done over it.
    assert_has(&run, "pci 0000:00:01.0: [1af4:1041] type 00 class 0x020000");
    assert_has(&run, "IP-Config: Complete:");
    assert_has(
        &run,
        "device=eth0, hwaddr=02:74:65:72:6e:07, ipaddr=10.77.0.2, mask=255.255.255.0, gw=10.77.0.1",
    );
}
