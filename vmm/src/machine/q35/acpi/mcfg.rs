//! MCFG: where PCIe ECAM (MMCONFIG) lives, so the guest reaches extended
//! config space (and MSI-X capabilities past 0x100) without ports 0xCF8/0xCFC.

use acpi_tables::mcfg::MCFG;

use super::{to_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::machine::layout::{ECAM_LAST_BUS, ECAM_START};

/// The only PCI segment group.
const SEGMENT: u16 = 0;

/// Builds the MCFG: one allocation, segment 0, buses 0..=ECAM_LAST_BUS. Linux
/// uses it only if the same window is also reserved by a PNP0C01/PNP0C02
/// device in the DSDT (see `dsdt`), or it falls back to port I/O.
pub(super) fn build() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(ECAM_START, SEGMENT, 0, ECAM_LAST_BUS);
    to_bytes(&mcfg)
}
