//! The test unikernel built by build.rs: a PVH ELF and a Linux 64-bit boot
//! protocol ELF (no PVH note) that KVM's instruction emulator can run. No
//! /dev/kvm needed.

use std::path::Path;
use std::process::Command;

const UNIKERNEL: &str = env!("TERN_UNIKERNEL");
const UNIKERNEL_LINUX64: &str = env!("TERN_UNIKERNEL_LINUX64");
const CHECK_INSNS: &str = env!("TERN_UNIKERNEL_CHECK_INSNS");

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

struct Phdr {
    p_type: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn phdrs(elf: &[u8]) -> Vec<Phdr> {
    assert_eq!(&elf[0..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(u16_at(elf, 18), 62, "not x86-64");
    let phoff = u64_at(elf, 32) as usize;
    let phentsize = u16_at(elf, 54) as usize;
    let phnum = u16_at(elf, 56) as usize;
    (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            Phdr {
                p_type: u32_at(elf, p),
                offset: u64_at(elf, p + 8),
                paddr: u64_at(elf, p + 24),
                filesz: u64_at(elf, p + 32),
                memsz: u64_at(elf, p + 40),
            }
        })
        .collect()
}

/// The 32-bit entry from the Xen PHYS32_ENTRY note, if any.
fn pvh_entry(elf: &[u8], ph: &[Phdr]) -> Option<u32> {
    for n in ph.iter().filter(|p| p.p_type == PT_NOTE) {
        let mut o = n.offset as usize;
        let end = o + n.filesz as usize;
        while o + 12 <= end {
            let (namesz, descsz, ty) = (u32_at(elf, o), u32_at(elf, o + 4), u32_at(elf, o + 8));
            let name = &elf[o + 12..o + 12 + namesz as usize];
            let desc = o + 12 + ((namesz as usize + 3) & !3);
            if name == b"Xen\0" && ty == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
                return Some(u32_at(elf, desc));
            }
            o = desc + ((descsz as usize + 3) & !3);
        }
    }
    None
}

#[test]
fn unikernel_is_a_pvh_elf_loaded_at_1mib() {
    let elf = std::fs::read(UNIKERNEL).expect("read unikernel.elf");
    let ph = phdrs(&elf);
    let loads: Vec<&Phdr> = ph.iter().filter(|p| p.p_type == PT_LOAD).collect();
    assert!(!loads.is_empty(), "no PT_LOAD segment");
    for l in &loads {
        assert!(l.paddr >= 0x10_0000, "segment below 1 MiB: {:#x}", l.paddr);
        assert!(l.memsz >= l.filesz);
    }
    let entry = pvh_entry(&elf, &ph).expect("no XEN_ELFNOTE_PHYS32_ENTRY note") as u64;
    assert!(
        loads
            .iter()
            .any(|l| entry >= l.paddr && entry < l.paddr + l.filesz),
        "PVH entry {entry:#x} is not inside a loaded segment"
    );
    assert!(
        elf.len() < 256 * 1024,
        "unikernel.elf unexpectedly large: {} bytes",
        elf.len()
    );
}

fn check_insns(elf: &str) {
    assert!(Path::new(CHECK_INSNS).is_file());
    let out = Command::new("sh")
        .arg(CHECK_INSNS)
        .arg(elf)
        .output()
        .expect("run check-insns.sh");
    assert!(
        out.status.success(),
        "check-insns.sh {elf} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unikernel_uses_only_emulator_safe_instructions() {
    check_insns(UNIKERNEL);
}

#[test]
fn unikernel_linux64_has_no_pvh_note_and_a_64bit_entry_at_1mib() {
    let elf = std::fs::read(UNIKERNEL_LINUX64).expect("read unikernel-linux64.elf");
    let ph = phdrs(&elf);
    assert_eq!(
        pvh_entry(&elf, &ph),
        None,
        "unikernel-linux64.elf must not have a PVH note (tern would enter it through PVH)"
    );
    assert!(
        !ph.iter().any(|p| p.p_type == PT_NOTE),
        "unikernel-linux64.elf has a PT_NOTE segment"
    );
    let loads: Vec<&Phdr> = ph.iter().filter(|p| p.p_type == PT_LOAD).collect();
    assert!(!loads.is_empty(), "no PT_LOAD segment");
    for l in &loads {
        assert!(l.paddr >= 0x10_0000, "segment below 1 MiB: {:#x}", l.paddr);
        assert!(l.memsz >= l.filesz);
    }
    let entry = u64_at(&elf, 24); // e_entry
    assert!(
        loads
            .iter()
            .any(|l| entry >= l.paddr && entry < l.paddr + l.filesz),
        "e_entry {entry:#x} is not inside a loaded segment"
    );
    // Same objects as the PVH ELF, but a different entry (_start64_linux,
    // not the 32-bit _start32 at the start of the image).
    let pvh = std::fs::read(UNIKERNEL).expect("read unikernel.elf");
    assert_ne!(
        entry,
        u64_at(&pvh, 24),
        "linux64 ELF has the PVH ELF's entry"
    );
    assert!(
        elf.len() < 256 * 1024,
        "unikernel-linux64.elf unexpectedly large: {} bytes",
        elf.len()
    );
}

#[test]
fn unikernel_linux64_uses_only_emulator_safe_instructions() {
    check_insns(UNIKERNEL_LINUX64);
}
