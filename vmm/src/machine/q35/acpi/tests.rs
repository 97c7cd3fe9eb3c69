//! Walks the tables the way a guest does (RSDP -> XSDT -> FADT/MADT/MCFG,
//! FADT -> DSDT/FACS) and checks what Linux relies on.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::machine::layout::*;

/// A 64-bit window above a 4 GiB guest, as the machine would place it.
const MMIO64: (u64, u64) = (0x10_0000_0000, 0x10_0000_0000 + MMIO64_SIZE);

fn guest_memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn config(num_cpus: u32) -> AcpiConfig {
    AcpiConfig {
        num_cpus,
        mmio64: MMIO64,
    }
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that `[addr, addr + len)` lies in the ACPI area.
fn assert_in_area(name: &str, addr: u64, len: usize) {
    assert!(
        addr >= ACPI_START && addr + len as u64 <= ACPI_END,
        "{name} at {addr:#x}+{len:#x} is outside the ACPI area"
    );
}

/// Reads a table with a standard header, checking signature, length,
/// checksum and placement.
fn read_table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
    let header = read(mem, addr, 36);
    assert_eq!(&header[0..4], sig, "signature at {addr:#x}");
    let len = u32_at(&header, 4) as usize;
    assert!(len >= 36);
    assert_in_area(std::str::from_utf8(sig).unwrap(), addr, len);
    let table = read(mem, addr, len);
    assert_eq!(
        checksum(&table),
        0,
        "{} checksum",
        String::from_utf8_lossy(sig)
    );
    assert_eq!(&table[10..16], b"TERN  ");
    assert_eq!(&table[16..24], b"TERNVM  ");
    table
}

/// Everything a guest would find, keyed by signature.
struct Found {
    fadt: Vec<u8>,
    madt: Vec<u8>,
    mcfg: Vec<u8>,
    dsdt: Vec<u8>,
    /// (address, length) of every table including the RSDP and FACS.
    ranges: Vec<(u64, u64)>,
}

fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Found {
    let rsdp_addr = rsdp_addr.0;
    assert_eq!(rsdp_addr, ACPI_START);
    assert_eq!(
        rsdp_addr % 16,
        0,
        "the BIOS-area scan needs 16-byte alignment"
    );
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert_eq!(checksum(&rsdp[0..20]), 0, "RSDP v1 checksum");
    assert_eq!(checksum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
    let mut ranges = vec![(rsdp_addr, 36)];

    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = read_table(mem, xsdt_addr, b"XSDT");
    ranges.push((xsdt_addr, xsdt.len() as u64));
    assert_eq!((xsdt.len() - 36) % 8, 0);
    let mut fadt = None;
    let mut madt = None;
    let mut mcfg = None;
    for entry in xsdt[36..].chunks(8) {
        let addr = u64::from_le_bytes(entry.try_into().unwrap());
        let sig: [u8; 4] = read(mem, addr, 4).try_into().unwrap();
        let table = read_table(mem, addr, &sig);
        ranges.push((addr, table.len() as u64));
        let slot = match &sig {
            b"FACP" => &mut fadt,
            b"APIC" => &mut madt,
            b"MCFG" => &mut mcfg,
            other => panic!("unexpected table {}", String::from_utf8_lossy(other)),
        };
        assert!(slot.replace(table).is_none(), "duplicate table");
    }
    let fadt = fadt.expect("FADT");

    let dsdt_addr = u64_at(&fadt, 140);
    assert_ne!(dsdt_addr, 0, "X_DSDT");
    let dsdt = read_table(mem, dsdt_addr, b"DSDT");
    assert_eq!(dsdt[8], 2, "DSDT revision 2 for 64-bit integers");
    ranges.push((dsdt_addr, dsdt.len() as u64));

    let facs_addr = u64_at(&fadt, 132);
    assert_eq!(facs_addr % 64, 0, "FACS alignment");
    let facs = read(mem, facs_addr, 64);
    assert_eq!(&facs[0..4], b"FACS");
    assert_eq!(u32_at(&facs, 4), 64);
    assert_in_area("FACS", facs_addr, 64);
    ranges.push((facs_addr, 64));

    Found {
        fadt,
        madt: madt.expect("MADT"),
        mcfg: mcfg.expect("MCFG"),
        dsdt,
        ranges,
    }
}

fn check_no_overlap(mut ranges: Vec<(u64, u64)>) {
    ranges.sort();
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "tables overlap: {pair:x?}"
        );
    }
}

fn check_fadt(fadt: &[u8]) {
    assert_eq!(fadt.len(), 276, "FADT 6.x length");
    assert_eq!(fadt[8], 6, "FADT major revision");
    assert_eq!(u16_at(fadt, 46) as u32, ACPI_SCI_IRQ, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD: ACPI always enabled");
    assert_eq!(u32_at(fadt, 56), u32::from(ACPI_PM1A_EVT), "PM1a_EVT_BLK");
    assert_eq!(u32_at(fadt, 64), u32::from(ACPI_PM1A_CNT), "PM1a_CNT_BLK");
    assert_eq!(u32_at(fadt, 76), u32::from(ACPI_PM_TMR), "PM_TMR_BLK");
    assert_eq!(u32_at(fadt, 80), u32::from(ACPI_GPE0_BLK), "GPE0_BLK");
    assert_eq!(fadt[88], ACPI_PM1_EVT_LEN);
    assert_eq!(fadt[89], ACPI_PM1_CNT_LEN);
    assert_eq!(fadt[91], ACPI_PM_TMR_LEN);
    assert_eq!(fadt[92], ACPI_GPE0_BLK_LEN);

    // X_ generic addresses: I/O space, width = 8 * length, same port.
    for (off, port, len) in [
        (148, ACPI_PM1A_EVT, ACPI_PM1_EVT_LEN),
        (172, ACPI_PM1A_CNT, ACPI_PM1_CNT_LEN),
        (208, ACPI_PM_TMR, ACPI_PM_TMR_LEN),
        (220, ACPI_GPE0_BLK, ACPI_GPE0_BLK_LEN),
    ] {
        assert_eq!(fadt[off], 1, "X_ block at {off} is in I/O space");
        assert_eq!(fadt[off + 1], len * 8, "X_ block at {off} bit width");
        assert_eq!(
            u64_at(fadt, off + 4),
            u64::from(port),
            "X_ block at {off} address"
        );
    }

    let flags = u32_at(fadt, 112);
    let wbinvd = 1 << 0;
    let proc_c1 = 1 << 2;
    let pwr_button = 1 << 4;
    let slp_button = 1 << 5;
    let tmr_val_ext = 1 << 8;
    let reset_reg_sup = 1 << 10;
    let hw_reduced = 1 << 20;
    assert_eq!(flags, wbinvd | proc_c1 | slp_button | reset_reg_sup);
    assert_eq!(flags & (pwr_button | tmr_val_ext | hw_reduced), 0);

    let boot_arch = u16_at(fadt, 109);
    assert_eq!(
        boot_arch, 0b111,
        "legacy devices, 8042, no VGA; MSI allowed"
    );

    // RESET_REG: byte-wide I/O register at the reset control port.
    assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
    assert_eq!(u64_at(fadt, 120), u64::from(RESET_CONTROL_PORT));
    assert_eq!(fadt[128], RESET_VALUE);

    // Only the 64-bit pointers are set (the spec wants FIRMWARE_CTRL zero).
    assert_eq!(u32_at(fadt, 36), 0, "FIRMWARE_CTRL");
    assert_eq!(u32_at(fadt, 40), 0, "DSDT (32-bit)");
}

fn check_madt(madt: &[u8], num_cpus: u32) {
    assert_eq!(u32_at(madt, 36) as u64, LAPIC_START);
    assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
    let mut apic_ids = Vec::new();
    let mut ioapics = Vec::new();
    let mut overrides = Vec::new();
    let mut nmis = 0;
    let mut x2nmis = 0;
    let mut off = 44;
    while off < madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
        let e = &madt[off..off + len];
        match kind {
            0 => {
                assert_eq!(len, 8);
                assert_eq!(e[2], e[3], "xAPIC UID = APIC id");
                assert_eq!(u32_at(e, 4), 1, "enabled");
                apic_ids.push(u32::from(e[3]));
            }
            9 => {
                assert_eq!(len, 16);
                let id = u32_at(e, 4);
                assert!(id > 254, "x2APIC entry only for ids >= 255");
                assert_eq!(u32_at(e, 8), 1, "enabled");
                assert_eq!(u32_at(e, 12), id, "x2APIC UID = APIC id");
                apic_ids.push(id);
            }
            1 => {
                assert_eq!(len, 12);
                ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
            }
            2 => {
                assert_eq!(len, 10);
                assert_eq!(e[2], 0, "ISA bus");
                overrides.push((e[3], u32_at(e, 4), u16_at(e, 8)));
            }
            4 => {
                assert_eq!(e, &[4, 6, 0xff, 0, 0, 1], "all processors, LINT1");
                nmis += 1;
            }
            0xa => {
                assert_eq!(e, &[0xa, 12, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
                x2nmis += 1;
            }
            other => panic!("unexpected MADT entry type {other}"),
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(
        apic_ids,
        (0..num_cpus).collect::<Vec<_>>(),
        "one entry per vCPU"
    );
    assert_eq!(ioapics.len(), 1);
    let (ioapic_id, ioapic_addr, gsi_base) = ioapics[0];
    assert_eq!(u64::from(ioapic_addr), IOAPIC_START);
    assert_eq!(gsi_base, 0);
    if num_cpus <= 254 {
        assert!(
            !apic_ids.contains(&u32::from(ioapic_id)),
            "IOAPIC id collides"
        );
    }
    // Only the SCI override: level (0b11 << 2) | active high (0b01).
    assert_eq!(overrides, vec![(ACPI_SCI_IRQ as u8, ACPI_SCI_IRQ, 0x0d)]);
    assert_eq!(nmis, 1);
    assert_eq!(x2nmis, usize::from(num_cpus > 255));
}

fn check_mcfg(mcfg: &[u8]) {
    assert_eq!(mcfg.len(), 36 + 8 + 16, "one allocation");
    assert_eq!(u64_at(mcfg, 44), ECAM_START);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!(mcfg[54], 0, "start bus");
    assert_eq!(mcfg[55], ECAM_LAST_BUS, "end bus");
}

fn check_dsdt(dsdt: &[u8], num_cpus: u32) {
    // Name (_S5_, Package (4) { typ, typ, 0, 0 })
    let typ = match ACPI_S5_SLP_TYP {
        0 => vec![0x00],
        1 => vec![0x01],
        v => vec![0x0a, v],
    };
    let mut s5 = b"\x08_S5_\x12".to_vec();
    let mut pkg = vec![4];
    pkg.extend_from_slice(&typ);
    pkg.extend_from_slice(&typ);
    pkg.extend_from_slice(&[0, 0]);
    s5.push(pkg.len() as u8 + 1);
    s5.extend_from_slice(&pkg);
    assert!(contains(dsdt, &s5), "\\_S5_ package");

    for name in [&b"PCI0"[..], b"LPC_", b"COM1", b"PS2K", b"RTC_", b"MBRD"] {
        assert!(contains(dsdt, name), "{}", String::from_utf8_lossy(name));
    }
    // EisaId("PNP0A08") = 0x080AD041, "PNP0C02" = 0x020CD041.
    assert!(contains(dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(contains(dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
    // The ECAM reservation: Memory32Fixed (ReadWrite, ECAM_START, ECAM_SIZE).
    let mut ecam = vec![0x86, 9, 0, 1];
    ecam.extend_from_slice(&(ECAM_START as u32).to_le_bytes());
    ecam.extend_from_slice(&(ECAM_SIZE as u32).to_le_bytes());
    assert!(contains(dsdt, &ecam));
    // Processor devices C000..C(n-1), and no more.
    let last = format!("C{:03X}", num_cpus - 1);
    let past = format!("C{:03X}", num_cpus);
    assert!(contains(dsdt, last.as_bytes()));
    assert!(!contains(dsdt, past.as_bytes()));
    assert!(contains(dsdt, b"ACPI0007\0"));
}

#[test]
fn tables_walk_for_1_4_and_300_cpus() {
    for num_cpus in [1, 4, 254, 255, 256, 300] {
        let mem = guest_memory(2 << 20);
        let rsdp = create_acpi_tables(&mem, &config(num_cpus)).unwrap();
        let found = walk(&mem, rsdp);
        check_fadt(&found.fadt);
        check_madt(&found.madt, num_cpus);
        check_mcfg(&found.mcfg);
        check_dsdt(&found.dsdt, num_cpus);
        check_no_overlap(found.ranges);
    }
}

#[test]
fn mmio64_window_is_in_crs_only_when_not_empty() {
    let qword_window = |start: u64, end: u64| {
        let mut d = vec![0x8a, 43, 0, 0, 0x0c, 0x03];
        for v in [0, start, end - 1, 0, end - start] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d
    };

    let mem = guest_memory(2 << 20);
    let rsdp = create_acpi_tables(&mem, &config(2)).unwrap();
    let with = walk(&mem, rsdp).dsdt;
    assert!(contains(&with, &qword_window(MMIO64.0, MMIO64.1)));

    let mem = guest_memory(2 << 20);
    let cfg = AcpiConfig {
        num_cpus: 2,
        mmio64: (0, 0),
    };
    let rsdp = create_acpi_tables(&mem, &cfg).unwrap();
    let without = walk(&mem, rsdp).dsdt;
    assert_eq!(with.len() - without.len(), 46, "one QWordMemory descriptor");
    assert!(!contains(&without, &[0x8a, 43, 0]));
}

#[test]
fn bad_configs_are_rejected() {
    let mem = guest_memory(2 << 20);
    for n in [0, MAX_CPUS + 1] {
        assert!(matches!(
            create_acpi_tables(&mem, &config(n)),
            Err(AcpiError::BadCpuCount(m)) if m == n
        ));
    }
    for mmio64 in [(MMIO64.1, MMIO64.0), (MMIO32_START, HIGH_RAM_START + 1)] {
        let cfg = AcpiConfig {
            num_cpus: 1,
            mmio64,
        };
        assert!(matches!(
            create_acpi_tables(&mem, &cfg),
            Err(AcpiError::BadMmio64 { .. })
        ));
    }
}

#[test]
fn too_many_tables_write_nothing() {
    let mem = guest_memory(2 << 20);
    let err = create_acpi_tables(&mem, &config(MAX_CPUS)).unwrap_err();
    match err {
        AcpiError::TooLarge {
            needed, available, ..
        } => {
            assert_eq!(available, ACPI_END - ACPI_START);
            assert!(needed > available);
        }
        other => panic!("unexpected error {other}"),
    }
    let area = read(&mem, ACPI_START, (ACPI_END - ACPI_START) as usize);
    assert!(area.iter().all(|&b| b == 0), "nothing written");
}

#[test]
fn missing_acpi_area_is_an_error() {
    let mem = guest_memory(ACPI_START);
    let err = create_acpi_tables(&mem, &config(1)).unwrap_err();
    assert!(matches!(err, AcpiError::GuestMemory { .. }), "{err}");
}

/// The hot plug AML as the ACPI compiler reads it back: the slot devices
/// with `_EJ0`, the notifier and the GPE handler.
#[test]
fn dsdt_hot_plug_aml_decompiles() {
    let mem = guest_memory(64 << 20);
    let rsdp = create_acpi_tables(&mem, &config(2)).unwrap();
    let found = walk(&mem, rsdp);
    let dir = std::env::temp_dir().join(format!("tern-dsdt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let aml = dir.join("dsdt.aml");
    std::fs::write(&aml, &found.dsdt).unwrap();
    let out = std::process::Command::new("iasl")
        .arg("-d")
        .arg(&aml)
        .output()
        .expect("iasl (Debian: acpica-tools, installed by tools/install-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    for want in [
        "OperationRegion (PCST, SystemIO, 0xAE00, 0x10)",
        "Method (PCNT, 0, Serialized)",
        "Method (PCEJ, 1, Serialized)",
        "Device (S05)",
        "Notify (S05, 0x03)",
        "Notify (S1E, One)",
        "Method (_E01, 0, NotSerialized)",
        "\\_SB.PCI0.PCNT ()",
        "B0EJ = Local0",
    ] {
        assert!(dsl.contains(want), "missing `{want}` in:\n{dsl}");
    }
}
