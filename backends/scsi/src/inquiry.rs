//! INQUIRY data (SPC-4 §6.6): the standard data Linux prints at boot
//! (`Direct-Access TERN ...`) and the VPD pages sd reads to learn the
//! unit's serial, identity, block limits, rotation and provisioning.
//! Pure builders over [`UnitInfo`]; the caller truncates to the allocation
//! length.

use crate::cdb::{MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use crate::lun::UnitInfo;
use crate::sense::Sense;

/// T10 vendor identification, 8 bytes.
pub const VENDOR: &[u8; 8] = b"TERN    ";
/// Product identification, 16 bytes.
pub const PRODUCT: &[u8; 16] = b"VIRTUAL DISK    ";
/// VPD pages supported, in ascending order (page 0x00 lists them).
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];
/// Largest transfer per command in blocks (Block Limits and `max_sectors`).
pub const MAX_TRANSFER_BLOCKS: u32 = 0xFFFF;
/// Preferred unmap granularity in blocks (4 KiB: the host page / fs block).
pub const UNMAP_GRANULARITY: u32 = 8;

/// Product revision level, 4 bytes: the crate's `major.minor`, space padded.
pub fn revision() -> [u8; 4] {
    let mut r = *b"    ";
    let v = format!(
        "{}.{}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    for (d, s) in r.iter_mut().zip(v.bytes()) {
        *d = s;
    }
    r
}

/// Standard INQUIRY data, 36 bytes.
pub fn standard() -> Vec<u8> {
    let mut b = vec![0u8; 36];
    // Byte 0: peripheral qualifier 0 (connected), device type 0 (direct access).
    b[0] = 0x00;
    // Byte 1: RMB = 0, not removable.
    // Version 5: SPC-3, what QEMU reports; Linux then reads VPD pages.
    b[2] = 0x05;
    // HiSup (hierarchical LUNs in REPORT LUNS) and response data format 2.
    b[3] = 0x10 | 0x02;
    b[4] = (b.len() - 5) as u8;
    // CmdQue: tagged command queuing, so Linux keeps several commands in flight.
    b[7] = 0x02;
    b[8..16].copy_from_slice(VENDOR);
    b[16..32].copy_from_slice(PRODUCT);
    b[32..36].copy_from_slice(&revision());
    b
}

/// A VPD page, or INVALID FIELD IN CDB for a page we do not have.
pub fn vpd(page: u8, unit: &UnitInfo) -> Result<Vec<u8>, Sense> {
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => unit.serial.as_bytes().to_vec(),
        0x83 => device_identification(unit),
        0xB0 => block_limits(),
        0xB1 => {
            let mut b = vec![0u8; 0x3C];
            // Medium rotation rate 1: a non-rotating (solid state) medium.
            b[0..2].copy_from_slice(&1u16.to_be_bytes());
            b
        }
        0xB2 => {
            let mut b = vec![0u8; 4];
            // LBPU (UNMAP), LBPWS (WRITE SAME(16) with UNMAP), LBPWS10.
            // LBPRZ stays 0: a discarded qcow2 cluster may read as backing data.
            b[1] = 0x80 | 0x40 | 0x20;
            // Provisioning type 2: thin provisioned.
            b[2] = 0x02;
            b
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut v = Vec::with_capacity(4 + body.len());
    v.push(0x00); // peripheral qualifier / device type
    v.push(page);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// Block Limits page body (0x3C bytes).
fn block_limits() -> Vec<u8> {
    let mut b = vec![0u8; 0x3C];
    // Byte 0 (page byte 4): WSNZ, WRITE SAME with zero blocks is refused.
    b[0] = 0x01;
    // Optimal transfer length granularity: 4 KiB.
    b[2..4].copy_from_slice(&(UNMAP_GRANULARITY as u16).to_be_bytes());
    b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
    // Maximum unmap LBA count and block descriptor count.
    b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
    b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    b[24..28].copy_from_slice(&UNMAP_GRANULARITY.to_be_bytes());
    // Maximum WRITE SAME length.
    b[32..40].copy_from_slice(&u64::from(MAX_UNMAP_BLOCKS).to_be_bytes());
    b
}

/// Device Identification page body: a T10 vendor ID designator (vendor,
/// product, serial) and an NAA locally assigned designator (a hash of the
/// serial and LUN number, stable across runs), both for the logical unit.
fn device_identification(unit: &UnitInfo) -> Vec<u8> {
    let mut v = Vec::new();
    // T10 vendor ID: code set 2 (ASCII), association 0 (LU), type 1.
    let mut t10 = Vec::new();
    t10.extend_from_slice(VENDOR);
    t10.extend_from_slice(PRODUCT);
    t10.extend_from_slice(unit.serial.as_bytes());
    t10.truncate(255);
    v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    v.extend_from_slice(&t10);
    // NAA: code set 1 (binary), association 0, type 3; NAA 3h (locally
    // assigned) with 60 bits of hash.
    let naa = (0x3u64 << 60) | (naa_hash(unit) & 0x0FFF_FFFF_FFFF_FFFF);
    v.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    v.extend_from_slice(&naa.to_be_bytes());
    v
}

/// FNV-1a over the serial and the LUN number.
fn naa_hash(unit: &UnitInfo) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in unit.serial.bytes().chain(unit.lun.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit() -> UnitInfo {
        UnitInfo {
            lun: 3,
            capacity: 2048,
            read_only: false,
            serial: "disk-3".into(),
        }
    }

    #[test]
    fn standard_data() {
        let b = standard();
        assert_eq!(b.len(), 36);
        assert_eq!(b[0], 0);
        assert_eq!(usize::from(b[4]) + 5, b.len());
        assert_eq!(&b[8..16], b"TERN    ");
        assert_eq!(&b[16..32], b"VIRTUAL DISK    ");
        assert_eq!(&b[32..36], b"0.1 ");
        assert_ne!(b[7] & 0x02, 0, "CmdQue");
    }

    #[test]
    fn supported_pages() {
        let b = vpd(0x00, &unit()).unwrap();
        assert_eq!(&b[..4], &[0, 0, 0, 6]);
        assert_eq!(&b[4..], &VPD_PAGES);
        for p in VPD_PAGES {
            let b = vpd(p, &unit()).unwrap();
            assert_eq!(b[1], p);
            assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])) + 4, b.len());
        }
        assert_eq!(vpd(0x89, &unit()), Err(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(vpd(0x01, &unit()), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn serial_page() {
        let b = vpd(0x80, &unit()).unwrap();
        assert_eq!(&b[4..], b"disk-3");
    }

    #[test]
    fn identification_page() {
        let b = vpd(0x83, &unit()).unwrap();
        // T10 vendor ID designator first.
        assert_eq!(&b[4..7], &[0x02, 0x01, 0x00]);
        let n = usize::from(b[7]);
        assert_eq!(&b[8..16], VENDOR);
        assert!(b[8..8 + n].ends_with(b"disk-3"));
        // Then the NAA designator.
        let naa = &b[8 + n..];
        assert_eq!(&naa[..4], &[0x01, 0x03, 0x00, 0x08]);
        assert_eq!(naa[4] >> 4, 0x3);
        // Different LUNs get different names.
        let mut other = unit();
        other.lun = 4;
        assert_ne!(vpd(0x83, &other).unwrap(), b);
    }

    #[test]
    fn limits_characteristics_provisioning() {
        let b = vpd(0xB0, &unit()).unwrap();
        assert_eq!(b.len(), 0x40);
        assert_eq!(b[4] & 1, 1, "WSNZ");
        assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), 0xFFFF);
        assert_eq!(
            u32::from_be_bytes(b[20..24].try_into().unwrap()),
            MAX_UNMAP_BLOCKS
        );
        assert_eq!(
            u32::from_be_bytes(b[24..28].try_into().unwrap()),
            MAX_UNMAP_DESCRIPTORS
        );
        let b = vpd(0xB1, &unit()).unwrap();
        assert_eq!(&b[4..6], &[0, 1], "non-rotating");
        let b = vpd(0xB2, &unit()).unwrap();
        assert_eq!(b[5] & 0xE0, 0xE0, "LBPU LBPWS LBPWS10");
        assert_eq!(b[6] & 0x07, 2);
    }
}
