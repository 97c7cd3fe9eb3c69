//! FADT (signature "FACP") and FACS.
//!
//! tern's q35 is a legacy ACPI platform, not a hardware-reduced one: the
//! guest finds fixed PM registers (ICH9-style, at `ACPI_PM_BASE`), powers off
//! by writing SLP_TYP/SLP_EN to PM1a_CNT, reads the 24-bit PM timer, and gets
//! the SCI on ISA IRQ 9. ACPI is always on (SMI_CMD = 0), so the VMM's PM1a
//! control register must report SCI_EN set.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::machine::layout::{
    ACPI_GPE0_BLK, ACPI_GPE0_BLK_LEN, ACPI_PM1A_CNT, ACPI_PM1A_EVT, ACPI_PM1_CNT_LEN,
    ACPI_PM1_EVT_LEN, ACPI_PM_TMR, ACPI_PM_TMR_LEN, ACPI_SCI_IRQ, RESET_CONTROL_PORT, RESET_VALUE,
};

/// IAPC_BOOT_ARCH bit: the platform has legacy ISA devices (COM1, RTC) that
/// the OS may not find by probing a PCI bus.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IAPC_BOOT_ARCH bit: an i8042 is present. Linux skips i8042 probing (and
/// with it the keyboard-controller reset path) when this is clear.
const BOOT_ARCH_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH bit: no VGA hardware; tells the OS not to poke VGA ports
/// or the legacy VGA memory (tern has no display).
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
// Deliberately clear: bit 3 "MSI not supported" (virtio-pci needs MSI-X),
// bit 4 "PCIe ASPM controls" (nothing to control), bit 5 "CMOS RTC not
// present" (there is an RTC at 0x70).

/// P_LVL2_LAT above 100 means "no C2 state": there is no P_BLK, and a zero
/// latency would claim a free C2.
const P_LVL2_NOT_SUPPORTED: u16 = 101;
/// P_LVL3_LAT above 1000 means "no C3 state".
const P_LVL3_NOT_SUPPORTED: u16 = 1001;

// SCI_INT is 16 bits wide; the `as` below cannot truncate.
const _: () = assert!(ACPI_SCI_IRQ <= u16::MAX as u32);

/// A generic address for a fixed register block in I/O space. The bit width
/// must be eight times the block length, or ACPICA warns "32/64X length
/// mismatch" and distrusts the X_ field.
fn io_block(port: u16, len: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, len * 8, 0, access, port.into())
}

/// Builds the FADT pointing at the DSDT and FACS already placed at
/// `dsdt_addr` and `facs_addr`.
pub(super) fn build(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // Only the X_ fields: the spec says the 32-bit DSDT/FIRMWARE_CTRL
        // must be ignored (FIRMWARE_CTRL must even be zero) when they are set.
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        // WBINVD works (KVM emulates it) and C1 (HLT) is supported.
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No sleep button at all: SLP_BUTTON set means "control-method
        // sleep button or none", and the DSDT declares none.
        .flag(Flags::SlpButton)
        // PWR_BUTTON is left clear: the power button is the fixed-feature
        // one (PM1 PWRBTN_STS/PWRBTN_EN, raising the SCI), as on QEMU's q35.
        // Linux then creates LNXPWRBN itself, and the VMM can press it
        // without any AML or GPE; the DSDT therefore has no PNP0C0C device.
        .flag(Flags::ResetRegSup);
    // TMR_VAL_EXT stays clear: the PM timer is 24 bits wide.

    fadt.sci_int = (ACPI_SCI_IRQ as u16).into();
    // SMI_CMD, ACPI_ENABLE and ACPI_DISABLE stay 0: the platform is always in
    // ACPI mode, so ACPICA never tries an SMI handshake.

    fadt.pm1a_evt_blk = u32::from(ACPI_PM1A_EVT).into();
    fadt.pm1_evt_len = ACPI_PM1_EVT_LEN;
    fadt.x_pm1a_evt_blk = io_block(ACPI_PM1A_EVT, ACPI_PM1_EVT_LEN, AccessSize::WordAccess);

    fadt.pm1a_cnt_blk = u32::from(ACPI_PM1A_CNT).into();
    fadt.pm1_cnt_len = ACPI_PM1_CNT_LEN;
    fadt.x_pm1a_cnt_blk = io_block(ACPI_PM1A_CNT, ACPI_PM1_CNT_LEN, AccessSize::WordAccess);

    fadt.pm_tmr_blk = u32::from(ACPI_PM_TMR).into();
    fadt.pm_tmr_len = ACPI_PM_TMR_LEN;
    fadt.x_pm_tmr_blk = io_block(ACPI_PM_TMR, ACPI_PM_TMR_LEN, AccessSize::DwordAccess);

    // GPE0: half status, half enable, accessed a byte at a time.
    fadt = fadt.gpe_info(u32::from(ACPI_GPE0_BLK), 0, ACPI_GPE0_BLK_LEN, 0, 0);
    fadt.x_gpe0_blk = io_block(ACPI_GPE0_BLK, ACPI_GPE0_BLK_LEN, AccessSize::ByteAccess);

    fadt.p_lvl2_lat = P_LVL2_NOT_SUPPORTED.into();
    fadt.p_lvl3_lat = P_LVL3_NOT_SUPPORTED.into();

    // CENTURY stays 0: tern's RTC need not keep a century byte, and Linux
    // then assumes 20xx for two-digit years.
    fadt.iapc_boot_arch =
        (BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT).into();

    // Linux's first reboot method is ACPI: it writes RESET_VALUE to this
    // register (ICH9's reset control at 0xCF9: full reset, CPU reset).
    fadt.reset_reg = io_block(RESET_CONTROL_PORT, 1, AccessSize::ByteAccess);
    fadt.reset_value = RESET_VALUE;

    to_bytes(&fadt.finalize())
}

/// Builds the FACS. A non-hardware-reduced platform must have one (the OS
/// keeps the global lock and waking vector there); tern never uses them.
pub(super) fn build_facs() -> Vec<u8> {
    to_bytes(&FACS::new())
}
