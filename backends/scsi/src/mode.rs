//! MODE SENSE and MODE SELECT (SPC-4 §6.11-6.14) with the two pages a disk
//! is expected to have: Caching (0x08, whose WCE bit Linux reads to choose
//! between write-back with SYNCHRONIZE CACHE and write-through) and Control
//! (0x0A). Pure functions over [`UnitInfo`] and [`ModeState`].

use crate::cdb::{PageControl, BLOCK_SIZE};
use crate::lun::UnitInfo;
use crate::sense::Sense;

/// Caching mode page code.
pub const PAGE_CACHING: u8 = 0x08;
/// Control mode page code.
pub const PAGE_CONTROL: u8 = 0x0A;
/// "All pages" page code.
pub const PAGE_ALL: u8 = 0x3F;

/// The mode parameters MODE SELECT may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeState {
    /// Write cache enabled: writes complete before they are durable and the
    /// initiator sends SYNCHRONIZE CACHE. Off: every write is flushed.
    pub wce: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState { wce: true }
    }
}

/// A MODE SENSE request, as parsed from the CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenseRequest {
    /// MODE SENSE(10).
    pub ten: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA block descriptor accepted.
    pub llbaa: bool,
    /// Which values.
    pub pc: PageControl,
    /// Page code.
    pub page: u8,
}

/// The caching page (20 bytes) for `pc`.
fn caching_page(pc: PageControl, state: ModeState) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = PAGE_CACHING;
    p[1] = 0x12;
    p[2] = match pc {
        // Only WCE is changeable; RCD (bit 0) stays 0: reads are cached.
        PageControl::Changeable => 0x04,
        PageControl::Current => u8::from(state.wce) << 2,
        PageControl::Default => u8::from(ModeState::default().wce) << 2,
    };
    p
}

/// The control page (12 bytes) for `pc`; nothing in it is changeable.
fn control_page(pc: PageControl) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = PAGE_CONTROL;
    p[1] = 0x0A;
    if pc != PageControl::Changeable {
        // Queue algorithm modifier 1: commands may be reordered (unrestricted).
        p[3] = 0x10;
        // Busy timeout period: unlimited.
        p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes());
    }
    p
}

/// MODE SENSE(6)/(10) parameter data (not truncated to the allocation length).
pub fn mode_sense(req: &SenseRequest, unit: &UnitInfo, state: ModeState) -> Result<Vec<u8>, Sense> {
    let pages = match req.page {
        PAGE_CACHING => caching_page(req.pc, state),
        PAGE_CONTROL => control_page(req.pc),
        PAGE_ALL => {
            let mut v = caching_page(req.pc, state);
            v.extend(control_page(req.pc));
            v
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    // Device-specific parameter: WP for a read-only unit; DPOFUA stays 0
    // (we do not claim DPO/FUA, so Linux flushes with SYNCHRONIZE CACHE).
    let dev_specific = if unit.read_only { 0x80 } else { 0x00 };
    let long = req.ten && req.llbaa && unit.capacity > u64::from(u32::MAX);
    let mut desc = Vec::new();
    if !req.dbd {
        if long {
            desc.extend_from_slice(&unit.capacity.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        } else {
            let blocks = u32::try_from(unit.capacity).unwrap_or(u32::MAX);
            desc.extend_from_slice(&blocks.to_be_bytes());
            // Density code 0 and the 24-bit block length.
            desc.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
        }
    }
    let mut v = Vec::new();
    if req.ten {
        let len = 8 + desc.len() + pages.len() - 2;
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v.extend_from_slice(&[0, dev_specific, u8::from(long), 0]);
        v.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let len = 4 + desc.len() + pages.len() - 1;
        v.extend_from_slice(&[len as u8, 0, dev_specific, desc.len() as u8]);
    }
    v.extend(desc);
    v.extend(pages);
    Ok(v)
}

/// Apply a MODE SELECT(6)/(10) parameter list to `state`, as Linux sends it
/// (`sd`'s cache_type attribute: the caching page read back with WCE
/// changed). Every page must have its proper length and change only
/// changeable bits; block descriptors must keep the 512-byte block length.
pub fn mode_select(ten: bool, data: &[u8], state: ModeState) -> Result<ModeState, Sense> {
    let hdr = if ten { 8 } else { 4 };
    if data.is_empty() {
        return Ok(state);
    }
    if data.len() < hdr {
        return Err(Sense::PARAM_LIST_LENGTH_ERROR);
    }
    let desc_len = if ten {
        usize::from(u16::from_be_bytes([data[6], data[7]]))
    } else {
        usize::from(data[3])
    };
    let long = ten && data[4] & 0x01 != 0;
    let desc_size = if long { 16 } else { 8 };
    let pages_at = hdr + desc_len;
    if pages_at > data.len() || !desc_len.is_multiple_of(desc_size) {
        return Err(Sense::PARAM_LIST_LENGTH_ERROR);
    }
    for d in data[hdr..pages_at].chunks_exact(desc_size) {
        let bl = &d[desc_size - 3..];
        let block_len = u32::from_be_bytes([0, bl[0], bl[1], bl[2]]);
        if block_len != BLOCK_SIZE {
            return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
    }
    let mut new = state;
    let mut rest = &data[pages_at..];
    while !rest.is_empty() {
        if rest.len() < 2 {
            return Err(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        // SPF (sub-page format) pages: we have none.
        if rest[0] & 0x40 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        let code = rest[0] & 0x3F;
        let len = usize::from(rest[1]) + 2;
        if len > rest.len() {
            return Err(Sense::PARAM_LIST_LENGTH_ERROR);
        }
        let page = &rest[..len];
        // The PS bit is reserved in MODE SELECT data; ignore it as QEMU does.
        let (current, mask) = match code {
            PAGE_CACHING => (
                caching_page(PageControl::Current, new),
                caching_page(PageControl::Changeable, new),
            ),
            PAGE_CONTROL => (
                control_page(PageControl::Current),
                control_page(PageControl::Changeable),
            ),
            _ => return Err(Sense::INVALID_FIELD_IN_PARAM_LIST),
        };
        if page.len() != current.len() {
            return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        for i in 2..page.len() {
            if (page[i] ^ current[i]) & !mask[i] != 0 {
                return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
            }
        }
        if code == PAGE_CACHING {
            new.wce = page[2] & 0x04 != 0;
        }
        rest = &rest[len..];
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(ro: bool) -> UnitInfo {
        UnitInfo {
            lun: 0,
            capacity: 2048,
            read_only: ro,
            serial: String::new(),
        }
    }

    fn req(ten: bool, dbd: bool, page: u8) -> SenseRequest {
        SenseRequest {
            ten,
            dbd,
            llbaa: false,
            pc: PageControl::Current,
            page,
        }
    }

    #[test]
    fn sense6_all_pages() {
        let b = mode_sense(&req(false, false, 0x3F), &unit(false), ModeState::default()).unwrap();
        assert_eq!(usize::from(b[0]) + 1, b.len());
        assert_eq!(b[2], 0, "not write protected, no DPOFUA");
        assert_eq!(b[3], 8, "one block descriptor");
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 2048);
        assert_eq!(&b[9..12], &[0, 2, 0], "512-byte blocks");
        assert_eq!(&b[12..15], &[0x08, 0x12, 0x04], "caching page, WCE");
        assert_eq!(&b[32..34], &[0x0A, 0x0A], "control page");
        assert_eq!(b.len(), 4 + 8 + 20 + 12);
    }

    #[test]
    fn sense_write_protect_and_dbd() {
        let b = mode_sense(
            &req(false, true, 0x08),
            &unit(true),
            ModeState { wce: false },
        )
        .unwrap();
        assert_eq!(b[2], 0x80);
        assert_eq!(b[3], 0);
        assert_eq!(&b[4..7], &[0x08, 0x12, 0x00]);
        let b = mode_sense(&req(true, true, 0x0A), &unit(true), ModeState::default()).unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([b[0], b[1]])) + 2, b.len());
        assert_eq!(b[3], 0x80);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(b[8], 0x0A);
    }

    #[test]
    fn sense10_long_descriptor() {
        let mut u = unit(false);
        u.capacity = 1 << 33;
        let mut r = req(true, false, 0x08);
        r.llbaa = true;
        let b = mode_sense(&r, &u, ModeState::default()).unwrap();
        assert_eq!(b[4], 1, "LONGLBA");
        assert_eq!(&b[6..8], &[0, 16]);
        assert_eq!(u64::from_be_bytes(b[8..16].try_into().unwrap()), 1 << 33);
        // Without LLBAA the short descriptor saturates.
        r.llbaa = false;
        let b = mode_sense(&r, &u, ModeState::default()).unwrap();
        assert_eq!(&b[6..8], &[0, 8]);
        assert_eq!(&b[8..12], &[0xFF; 4]);
    }

    #[test]
    fn sense_changeable_and_unknown() {
        let mut r = req(false, true, 0x3F);
        r.pc = PageControl::Changeable;
        let b = mode_sense(&r, &unit(false), ModeState { wce: false }).unwrap();
        assert_eq!(b[4 + 2], 0x04);
        assert!(b[4 + 20 + 2..].iter().all(|&x| x == 0));
        assert_eq!(
            mode_sense(&req(false, true, 0x1C), &unit(false), ModeState::default()),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    /// What Linux sends to switch the write cache: the MODE SENSE reply
    /// with the mode data length zeroed and WCE changed.
    fn linux_select(ten: bool, wce: bool) -> Vec<u8> {
        let mut b = mode_sense(&req(ten, true, 0x08), &unit(false), ModeState::default()).unwrap();
        let hdr = if ten { 8 } else { 4 };
        b[0] = 0;
        if ten {
            b[1] = 0;
        }
        b[hdr + 2] = u8::from(wce) << 2;
        b
    }

    #[test]
    fn select_caching_page() {
        let s = mode_select(false, &linux_select(false, false), ModeState::default()).unwrap();
        assert!(!s.wce);
        let s = mode_select(true, &linux_select(true, true), ModeState { wce: false }).unwrap();
        assert!(s.wce);
        // With a block descriptor of 512-byte blocks.
        let mut b =
            mode_sense(&req(false, false, 0x08), &unit(false), ModeState::default()).unwrap();
        b[0] = 0;
        assert!(mode_select(false, &b, ModeState::default()).unwrap().wce);
        assert_eq!(
            mode_select(false, &[], ModeState::default()),
            Ok(ModeState::default())
        );
    }

    #[test]
    fn select_errors() {
        let st = ModeState::default();
        // RCD (not changeable).
        let mut b = linux_select(false, true);
        b[4 + 2] |= 0x01;
        assert_eq!(
            mode_select(false, &b, st),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
        // Wrong page length, unknown page, subpage format.
        let mut b = linux_select(false, true);
        b[4 + 1] = 0x10;
        assert!(mode_select(false, &b, st).is_err());
        let mut b = linux_select(false, true);
        b[4] = 0x1C;
        assert_eq!(
            mode_select(false, &b, st),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
        let mut b = linux_select(false, true);
        b[4] |= 0x40;
        assert_eq!(
            mode_select(false, &b, st),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
        // Truncated page, short header.
        let b = linux_select(false, true);
        assert_eq!(
            mode_select(false, &b[..10], st),
            Err(Sense::PARAM_LIST_LENGTH_ERROR)
        );
        assert_eq!(
            mode_select(true, &[0; 5], st),
            Err(Sense::PARAM_LIST_LENGTH_ERROR)
        );
        // A block descriptor with 4096-byte blocks.
        let mut b = mode_sense(&req(false, false, 0x08), &unit(false), st).unwrap();
        b[0] = 0;
        b[10] = 0x10;
        assert_eq!(
            mode_select(false, &b, st),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
        // Control page unchanged is accepted, changed is not.
        let mut b = mode_sense(&req(false, true, 0x0A), &unit(false), st).unwrap();
        b[0] = 0;
        assert_eq!(mode_select(false, &b, st), Ok(st));
        b[4 + 3] = 0;
        assert_eq!(
            mode_select(false, &b, st),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
    }
}
