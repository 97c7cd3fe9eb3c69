//! The CDB parser: a pure function from the bytes of a command descriptor
//! block to a typed [`Command`], or to the sense data a real disk would
//! return for it. No I/O and no device state: checks that need the unit's
//! size ([`check_range`]) or its parameter data ([`parse_unmap_list`]) are
//! separate pure functions, so every rule is unit-tested and fuzzed alone.
//!
//! Lengths follow SBC-4/SPC-4: a transfer length of 0 in READ(6)/WRITE(6)
//! means 256 blocks; in every other command it means no data.

use crate::sense::Sense;

/// Bytes per logical block of every LUN.
pub const BLOCK_SIZE: u32 = 512;
/// `log2(BLOCK_SIZE)`.
pub const BLOCK_SHIFT: u32 = 9;
/// Most blocks one UNMAP descriptor, or one WRITE SAME, may cover (2 GiB);
/// advertised in the Block Limits VPD page.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 22;
/// Most block descriptors in one UNMAP parameter list (Block Limits VPD).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// Operation codes this device implements.
pub mod op {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    /// SERVICE ACTION IN(16) service action: READ CAPACITY(16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
}

/// MODE SENSE page control (PC) field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    /// Current values.
    Current,
    /// Mask of the bits MODE SELECT may change.
    Changeable,
    /// Power-on defaults.
    Default,
}

/// A parsed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE; `desc` asks for descriptor-format sense.
    RequestSense {
        /// Descriptor format wanted.
        desc: bool,
        /// Allocation length.
        alloc_len: u32,
    },
    /// INQUIRY: standard data (`page == None`) or a VPD page.
    Inquiry {
        /// VPD page code when EVPD is set.
        page: Option<u8>,
        /// Allocation length.
        alloc_len: u32,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// SELECT REPORT (0, 1 or 2).
        select: u8,
        /// Allocation length.
        alloc_len: u32,
    },
    /// READ CAPACITY(10).
    ReadCapacity10,
    /// READ CAPACITY(16) (SERVICE ACTION IN(16), service action 0x10).
    ReadCapacity16 {
        /// Allocation length.
        alloc_len: u32,
    },
    /// READ(6/10/12/16).
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access (data from the medium; a no-op for us).
        fua: bool,
    },
    /// WRITE(6/10/12/16).
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access: the data must be durable before GOOD.
        fua: bool,
    },
    /// SYNCHRONIZE CACHE(10/16); `blocks == 0` means to the end of the unit.
    SynchronizeCache {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
    },
    /// MODE SENSE(6) or (10).
    ModeSense {
        /// MODE SENSE(10) (longer header).
        ten: bool,
        /// Disable block descriptors.
        dbd: bool,
        /// Long LBA block descriptor allowed (MODE SENSE(10) only).
        llbaa: bool,
        /// Which values.
        pc: PageControl,
        /// Page code (0x3F: all pages).
        page: u8,
        /// Subpage code (0 or 0xFF).
        subpage: u8,
        /// Allocation length.
        alloc_len: u32,
    },
    /// MODE SELECT(6) or (10); the parameter list is data-out.
    ModeSelect {
        /// MODE SELECT(10) (longer header).
        ten: bool,
        /// Parameter list length.
        param_len: u32,
    },
    /// START STOP UNIT.
    StartStopUnit {
        /// START bit.
        start: bool,
        /// Flush before stopping unless NO_FLUSH.
        no_flush: bool,
    },
    /// UNMAP; the parameter list is data-out.
    Unmap {
        /// Parameter list length.
        param_len: u32,
    },
    /// WRITE SAME(10/16).
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks (never 0: WSNZ is set in the Block Limits page).
        blocks: u32,
        /// The blocks may be deallocated when the data is zero.
        unmap: bool,
        /// No data-out buffer: the block is all zeros (WRITE SAME(16) only).
        ndob: bool,
    },
    /// VERIFY(10/16).
    Verify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Compare data-out with the medium (BYTCHK = 01b); else just check.
        bytchk: bool,
    },
}

/// Data a command moves, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// No data.
    None,
    /// Device to initiator, at most this many bytes.
    In(u64),
    /// Initiator to device, exactly this many bytes.
    Out(u64),
}

impl Command {
    /// The data this command moves (for READ/WRITE: the exact byte count).
    pub fn transfer(&self) -> Transfer {
        let blocks = |n: u32| u64::from(n) << BLOCK_SHIFT;
        match *self {
            Command::TestUnitReady
            | Command::SynchronizeCache { .. }
            | Command::StartStopUnit { .. } => Transfer::None,
            Command::RequestSense { alloc_len, .. }
            | Command::Inquiry { alloc_len, .. }
            | Command::ReportLuns { alloc_len, .. }
            | Command::ReadCapacity16 { alloc_len }
            | Command::ModeSense { alloc_len, .. } => Transfer::In(u64::from(alloc_len)),
            Command::ReadCapacity10 => Transfer::In(8),
            Command::Read { blocks: n, .. } => Transfer::In(blocks(n)),
            Command::Write { blocks: n, .. } => Transfer::Out(blocks(n)),
            Command::ModeSelect { param_len, .. } | Command::Unmap { param_len } => {
                Transfer::Out(u64::from(param_len))
            }
            Command::WriteSame { ndob: true, .. } => Transfer::None,
            Command::WriteSame { .. } => Transfer::Out(u64::from(BLOCK_SIZE)),
            Command::Verify {
                bytchk: true,
                blocks: n,
                ..
            } => Transfer::Out(blocks(n)),
            Command::Verify { .. } => Transfer::None,
        }
    }

    /// Whether the command changes the medium (refused on a read-only unit).
    pub fn writes_medium(&self) -> bool {
        matches!(
            self,
            Command::Write { .. } | Command::WriteSame { .. } | Command::Unmap { .. }
        )
    }
}

/// CDB length of an operation code, from its group code (SPC-4 §4.2.5.1);
/// `None` for groups with vendor-specific or reserved lengths.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Parse a CDB. `cdb` is the CDB field of the request (normally 32 bytes);
/// bytes past the command's own length are ignored.
///
/// Errors are ILLEGAL REQUEST with INVALID COMMAND OPERATION CODE (unknown
/// opcode) or INVALID FIELD IN CDB (a reserved or unsupported field is set,
/// or the CDB is shorter than its opcode needs).
pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    let known = matches!(
        opcode,
        op::TEST_UNIT_READY
            | op::REQUEST_SENSE
            | op::READ_6
            | op::WRITE_6
            | op::INQUIRY
            | op::MODE_SELECT_6
            | op::MODE_SENSE_6
            | op::START_STOP_UNIT
            | op::READ_CAPACITY_10
            | op::READ_10
            | op::WRITE_10
            | op::VERIFY_10
            | op::SYNCHRONIZE_CACHE_10
            | op::WRITE_SAME_10
            | op::UNMAP
            | op::MODE_SELECT_10
            | op::MODE_SENSE_10
            | op::READ_16
            | op::WRITE_16
            | op::VERIFY_16
            | op::SYNCHRONIZE_CACHE_16
            | op::WRITE_SAME_16
            | op::SERVICE_ACTION_IN_16
            | op::REPORT_LUNS
            | op::READ_12
            | op::WRITE_12
    );
    if !known {
        return Err(Sense::INVALID_OPCODE);
    }
    // Every known opcode is in a group with a defined length.
    let len = cdb_len(opcode).ok_or(Sense::INVALID_OPCODE)?;
    if cdb.len() < len {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let c = &cdb[..len];
    // CONTROL byte: NACA (bit 2) asks for ACA handling, which we do not do.
    if c[len - 1] & 0x04 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let bad = Err(Sense::INVALID_FIELD_IN_CDB);
    let cmd = match opcode {
        op::TEST_UNIT_READY => Command::TestUnitReady,
        op::REQUEST_SENSE => Command::RequestSense {
            desc: c[1] & 0x01 != 0,
            alloc_len: u32::from(c[4]),
        },
        op::INQUIRY => {
            let evpd = c[1] & 0x01 != 0;
            // CMDDT (obsolete) must be zero; a page code without EVPD is invalid.
            if c[1] & 0x02 != 0 || (!evpd && c[2] != 0) {
                return bad;
            }
            Command::Inquiry {
                page: evpd.then_some(c[2]),
                alloc_len: be16(&c[3..5]),
            }
        }
        op::REPORT_LUNS => {
            let alloc_len = be32(&c[6..10]);
            // SPC-4: an allocation length below 16 is invalid.
            if c[2] > 2 || alloc_len < 16 {
                return bad;
            }
            Command::ReportLuns {
                select: c[2],
                alloc_len,
            }
        }
        op::READ_CAPACITY_10 => {
            // Without PMI the LBA field must be zero.
            if c[8] & 0x01 == 0 && be32(&c[2..6]) != 0 {
                return bad;
            }
            Command::ReadCapacity10
        }
        op::SERVICE_ACTION_IN_16 => {
            if c[1] & 0x1F != op::SAI_READ_CAPACITY_16 {
                return bad;
            }
            Command::ReadCapacity16 {
                alloc_len: be32(&c[10..14]),
            }
        }
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(&[0, c[1] & 0x1F, c[2], c[3]]));
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            rw(opcode == op::WRITE_6, lba, blocks, false)
        }
        op::READ_10 | op::WRITE_10 | op::READ_12 | op::WRITE_12 | op::READ_16 | op::WRITE_16 => {
            // RDPROTECT/WRPROTECT: no protection information on our units.
            if c[1] & 0xE0 != 0 {
                return bad;
            }
            let (lba, blocks) = match opcode {
                op::READ_10 | op::WRITE_10 => (u64::from(be32(&c[2..6])), be16(&c[7..9])),
                op::READ_12 | op::WRITE_12 => (u64::from(be32(&c[2..6])), be32(&c[6..10])),
                _ => (be64(&c[2..10]), be32(&c[10..14])),
            };
            let write = matches!(opcode, op::WRITE_10 | op::WRITE_12 | op::WRITE_16);
            rw(write, lba, blocks, c[1] & 0x08 != 0)
        }
        op::SYNCHRONIZE_CACHE_10 => Command::SynchronizeCache {
            lba: u64::from(be32(&c[2..6])),
            blocks: be16(&c[7..9]),
        },
        op::SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache {
            lba: be64(&c[2..10]),
            blocks: be32(&c[10..14]),
        },
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            let pc = match c[2] >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => return Err(Sense::SAVING_PARAMS_NOT_SUPPORTED),
            };
            let subpage = c[3];
            if subpage != 0 && subpage != 0xFF {
                return bad;
            }
            Command::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc,
                page: c[2] & 0x3F,
                subpage,
                alloc_len: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            }
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            let param_len = if ten { be16(&c[7..9]) } else { u32::from(c[4]) };
            // SP: nothing can be saved. PF=0 (vendor-specific pages) is only
            // acceptable with an empty parameter list.
            if c[1] & 0x01 != 0 || (c[1] & 0x10 == 0 && param_len != 0) {
                return bad;
            }
            Command::ModeSelect { ten, param_len }
        }
        op::START_STOP_UNIT => {
            // LOEJ (load/eject) means nothing for a fixed disk; power
            // conditions other than START_VALID (0) are not supported.
            if c[4] & 0x02 != 0 || c[4] >> 4 != 0 {
                return bad;
            }
            Command::StartStopUnit {
                start: c[4] & 0x01 != 0,
                no_flush: c[4] & 0x04 != 0,
            }
        }
        op::UNMAP => {
            // ANCHOR: anchored unmapping is not supported (ANC_SUP = 0).
            if c[1] & 0x01 != 0 {
                return bad;
            }
            Command::Unmap {
                param_len: be16(&c[7..9]),
            }
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            let sixteen = opcode == op::WRITE_SAME_16;
            // WRPROTECT and ANCHOR unsupported; NDOB exists only in the 16-byte form.
            if c[1] & 0xE0 != 0 || c[1] & 0x04 != 0 || (!sixteen && c[1] & 0x01 != 0) {
                return bad;
            }
            let (lba, blocks) = if sixteen {
                (be64(&c[2..10]), be32(&c[10..14]))
            } else {
                (u64::from(be32(&c[2..6])), be16(&c[7..9]))
            };
            // WSNZ = 1: zero blocks ("to the end") is refused, and one
            // command is bounded like one UNMAP descriptor.
            if blocks == 0 || blocks > MAX_UNMAP_BLOCKS {
                return bad;
            }
            Command::WriteSame {
                lba,
                blocks,
                unmap: c[1] & 0x08 != 0,
                ndob: sixteen && c[1] & 0x01 != 0,
            }
        }
        op::VERIFY_10 | op::VERIFY_16 => {
            // VRPROTECT unsupported; BYTCHK 10b is reserved and 11b
            // (compare one block against every block) is not supported.
            let bytchk = (c[1] >> 1) & 0x03;
            if c[1] & 0xE0 != 0 || bytchk > 1 {
                return bad;
            }
            let (lba, blocks) = if opcode == op::VERIFY_16 {
                (be64(&c[2..10]), be32(&c[10..14]))
            } else {
                (u64::from(be32(&c[2..6])), be16(&c[7..9]))
            };
            Command::Verify {
                lba,
                blocks,
                bytchk: bytchk == 1,
            }
        }
        _ => return Err(Sense::INVALID_OPCODE),
    };
    Ok(cmd)
}

fn rw(write: bool, lba: u64, blocks: u32, fua: bool) -> Command {
    if write {
        Command::Write { lba, blocks, fua }
    } else {
        Command::Read { lba, blocks, fua }
    }
}

/// Checks that `blocks` blocks from `lba` lie on a unit of `capacity`
/// blocks: LOGICAL BLOCK ADDRESS OUT OF RANGE otherwise (also on overflow).
/// A zero-length range must still start on the unit (at most at its end).
pub fn check_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity && lba <= capacity => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

/// Checks the blocks a command addresses against a unit of `capacity`
/// blocks (commands without an LBA always pass).
pub fn check_command_range(cmd: &Command, capacity: u64) -> Result<(), Sense> {
    match *cmd {
        Command::Read { lba, blocks, .. }
        | Command::Write { lba, blocks, .. }
        | Command::WriteSame { lba, blocks, .. }
        | Command::Verify { lba, blocks, .. }
        | Command::SynchronizeCache { lba, blocks } => {
            check_range(lba, u64::from(blocks), capacity)
        }
        _ => Ok(()),
    }
}

/// One block descriptor of an UNMAP parameter list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapRange {
    /// First block.
    pub lba: u64,
    /// Number of blocks (may be 0: nothing to do).
    pub blocks: u32,
}

/// Parse and check an UNMAP parameter list (SBC-4 §5.32.2) for a unit of
/// `capacity` blocks. An empty list is valid and unmaps nothing.
pub fn parse_unmap_list(data: &[u8], capacity: u64) -> Result<Vec<UnmapRange>, Sense> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.len() < 8 {
        return Err(Sense::PARAM_LIST_LENGTH_ERROR);
    }
    let data_len = be16(&data[0..2]) as usize;
    let desc_len = be16(&data[2..4]) as usize;
    // UNMAP DATA LENGTH counts the bytes after itself; the descriptors must
    // fit in it and in the list actually sent, in whole 16-byte entries.
    if data_len + 2 > data.len() || desc_len + 6 > data_len || !desc_len.is_multiple_of(16) {
        return Err(Sense::PARAM_LIST_LENGTH_ERROR);
    }
    let n = desc_len / 16;
    if n > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
    }
    let mut ranges = Vec::with_capacity(n);
    for d in data[8..8 + desc_len].chunks_exact(16) {
        let lba = be64(&d[0..8]);
        let blocks = be32(&d[8..12]);
        if blocks > MAX_UNMAP_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_PARAM_LIST);
        }
        check_range(lba, u64::from(blocks), capacity)?;
        ranges.push(UnmapRange { lba, blocks });
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 32-byte CDB field holding `bytes`.
    fn cdb(bytes: &[u8]) -> [u8; 32] {
        let mut c = [0u8; 32];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn p(bytes: &[u8]) -> Result<Command, Sense> {
        parse(&cdb(bytes))
    }

    const BAD_FIELD: Result<Command, Sense> = Err(Sense::INVALID_FIELD_IN_CDB);

    #[test]
    fn test_unit_ready() {
        assert_eq!(p(&[0x00, 0, 0, 0, 0, 0]), Ok(Command::TestUnitReady));
        // NACA in the control byte.
        assert_eq!(p(&[0x00, 0, 0, 0, 0, 0x04]), BAD_FIELD);
    }

    #[test]
    fn inquiry() {
        assert_eq!(
            p(&[0x12, 0, 0, 0, 36, 0]),
            Ok(Command::Inquiry {
                page: None,
                alloc_len: 36
            })
        );
        for page in [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x89] {
            assert_eq!(
                p(&[0x12, 1, page, 0x01, 0x00, 0]),
                Ok(Command::Inquiry {
                    page: Some(page),
                    alloc_len: 256
                })
            );
        }
        // Page code without EVPD, CMDDT.
        assert_eq!(p(&[0x12, 0, 0x80, 0, 36, 0]), BAD_FIELD);
        assert_eq!(p(&[0x12, 2, 0, 0, 36, 0]), BAD_FIELD);
        assert_eq!(
            Command::Inquiry {
                page: None,
                alloc_len: 36
            }
            .transfer(),
            Transfer::In(36)
        );
    }

    #[test]
    fn report_luns() {
        assert_eq!(
            p(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]),
            Ok(Command::ReportLuns {
                select: 0,
                alloc_len: 4096
            })
        );
        assert_eq!(
            p(&[0xA0, 0, 2, 0, 0, 0, 0, 0, 0, 16, 0, 0]),
            Ok(Command::ReportLuns {
                select: 2,
                alloc_len: 16
            })
        );
        // Allocation length below 16, unknown SELECT REPORT.
        assert_eq!(p(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0]), BAD_FIELD);
        assert_eq!(p(&[0xA0, 0, 3, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), BAD_FIELD);
    }

    #[test]
    fn read_capacity() {
        assert_eq!(p(&[0x25; 1]), Ok(Command::ReadCapacity10));
        assert_eq!(Command::ReadCapacity10.transfer(), Transfer::In(8));
        // LBA without PMI is invalid; with PMI it is accepted.
        assert_eq!(p(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), BAD_FIELD);
        assert_eq!(
            p(&[0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0]),
            Ok(Command::ReadCapacity10)
        );
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x10;
        c[13] = 32;
        assert_eq!(p(&c), Ok(Command::ReadCapacity16 { alloc_len: 32 }));
        // Another SERVICE ACTION IN(16) service action (GET LBA STATUS).
        c[1] = 0x12;
        assert_eq!(p(&c), BAD_FIELD);
    }

    #[test]
    fn read_write_6() {
        assert_eq!(
            p(&[0x08, 0x1F, 0xFF, 0xFF, 0, 0]),
            Ok(Command::Read {
                lba: 0x1F_FFFF,
                blocks: 256,
                fua: false
            })
        );
        // The top 3 bits of byte 1 are not LBA bits.
        assert_eq!(
            p(&[0x0A, 0xE1, 0x02, 0x03, 8, 0]),
            Ok(Command::Write {
                lba: 0x01_0203,
                blocks: 8,
                fua: false
            })
        );
        assert_eq!(
            Command::Write {
                lba: 0,
                blocks: 8,
                fua: false
            }
            .transfer(),
            Transfer::Out(4096)
        );
    }

    #[test]
    fn read_write_10_12_16() {
        let r10 = p(&[0x28, 0x08, 0x12, 0x34, 0x56, 0x78, 0, 0x01, 0x00, 0]);
        assert_eq!(
            r10,
            Ok(Command::Read {
                lba: 0x1234_5678,
                blocks: 256,
                fua: true
            })
        );
        assert_eq!(
            p(&[0x2A, 0, 0, 0, 0, 9, 0, 0, 0, 0]),
            Ok(Command::Write {
                lba: 9,
                blocks: 0,
                fua: false
            })
        );
        assert_eq!(
            p(&[0xA8, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]),
            Ok(Command::Read {
                lba: 256,
                blocks: 65536,
                fua: false
            })
        );
        assert_eq!(
            p(&[0xAA, 0x08, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0]),
            Ok(Command::Write {
                lba: 1,
                blocks: 2,
                fua: true
            })
        );
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        c[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            p(&c),
            Ok(Command::Read {
                lba: 0x0102_0304_0506_0708,
                blocks: 7,
                fua: false
            })
        );
        c[0] = 0x8A;
        assert_eq!(
            p(&c),
            Ok(Command::Write {
                lba: 0x0102_0304_0506_0708,
                blocks: 7,
                fua: false
            })
        );
        // RDPROTECT / WRPROTECT set.
        assert_eq!(p(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]), BAD_FIELD);
        c[1] = 0x40;
        assert_eq!(p(&c), BAD_FIELD);
    }

    #[test]
    fn synchronize_cache() {
        assert_eq!(
            p(&[0x35, 0x02, 0, 0, 0, 4, 0, 0, 8, 0]),
            Ok(Command::SynchronizeCache { lba: 4, blocks: 8 })
        );
        let mut c = [0u8; 16];
        c[0] = 0x91;
        c[9] = 1;
        assert_eq!(p(&c), Ok(Command::SynchronizeCache { lba: 1, blocks: 0 }));
        assert_eq!(
            Command::SynchronizeCache { lba: 1, blocks: 0 }.transfer(),
            Transfer::None
        );
    }

    #[test]
    fn mode_sense() {
        assert_eq!(
            p(&[0x1A, 0x08, 0x3F, 0, 0xC0, 0]),
            Ok(Command::ModeSense {
                ten: false,
                dbd: true,
                llbaa: false,
                pc: PageControl::Current,
                page: 0x3F,
                subpage: 0,
                alloc_len: 0xC0
            })
        );
        assert_eq!(
            p(&[0x5A, 0x10, 0x48, 0xFF, 0, 0, 0, 0x02, 0x00, 0]),
            Ok(Command::ModeSense {
                ten: true,
                dbd: false,
                llbaa: true,
                pc: PageControl::Changeable,
                page: 0x08,
                subpage: 0xFF,
                alloc_len: 512
            })
        );
        assert!(matches!(
            p(&[0x1A, 0, 0x88, 0, 4, 0]),
            Ok(Command::ModeSense {
                pc: PageControl::Default,
                ..
            })
        ));
        // Saved values, a subpage we do not have.
        assert_eq!(
            p(&[0x1A, 0, 0xC8, 0, 4, 0]),
            Err(Sense::SAVING_PARAMS_NOT_SUPPORTED)
        );
        assert_eq!(p(&[0x1A, 0, 0x08, 1, 4, 0]), BAD_FIELD);
    }

    #[test]
    fn mode_select() {
        assert_eq!(
            p(&[0x15, 0x10, 0, 0, 24, 0]),
            Ok(Command::ModeSelect {
                ten: false,
                param_len: 24
            })
        );
        assert_eq!(
            p(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0]),
            Ok(Command::ModeSelect {
                ten: true,
                param_len: 28
            })
        );
        assert_eq!(
            Command::ModeSelect {
                ten: true,
                param_len: 28
            }
            .transfer(),
            Transfer::Out(28)
        );
        // SP (save pages), PF = 0 with parameters.
        assert_eq!(p(&[0x15, 0x11, 0, 0, 24, 0]), BAD_FIELD);
        assert_eq!(p(&[0x15, 0x00, 0, 0, 24, 0]), BAD_FIELD);
        assert!(p(&[0x15, 0x00, 0, 0, 0, 0]).is_ok());
    }

    #[test]
    fn start_stop_unit() {
        assert_eq!(
            p(&[0x1B, 1, 0, 0, 0x01, 0]),
            Ok(Command::StartStopUnit {
                start: true,
                no_flush: false
            })
        );
        assert_eq!(
            p(&[0x1B, 0, 0, 0, 0x04, 0]),
            Ok(Command::StartStopUnit {
                start: false,
                no_flush: true
            })
        );
        // LOEJ, a power condition.
        assert_eq!(p(&[0x1B, 0, 0, 0, 0x02, 0]), BAD_FIELD);
        assert_eq!(p(&[0x1B, 0, 0, 0, 0x30, 0]), BAD_FIELD);
    }

    #[test]
    fn request_sense() {
        assert_eq!(
            p(&[0x03, 0, 0, 0, 18, 0]),
            Ok(Command::RequestSense {
                desc: false,
                alloc_len: 18
            })
        );
        assert_eq!(
            p(&[0x03, 1, 0, 0, 252, 0]),
            Ok(Command::RequestSense {
                desc: true,
                alloc_len: 252
            })
        );
    }

    #[test]
    fn unmap() {
        assert_eq!(
            p(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
            Ok(Command::Unmap { param_len: 24 })
        );
        assert_eq!(p(&[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0]), BAD_FIELD);
        assert!(Command::Unmap { param_len: 24 }.writes_medium());
    }

    fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
        v[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
        for (lba, n) in ranges {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    #[test]
    fn unmap_parameter_list() {
        let cap = 2048;
        let l = unmap_list(&[(0, 8), (100, 28), (2040, 8)]);
        assert_eq!(
            parse_unmap_list(&l, cap),
            Ok(vec![
                UnmapRange { lba: 0, blocks: 8 },
                UnmapRange {
                    lba: 100,
                    blocks: 28
                },
                UnmapRange {
                    lba: 2040,
                    blocks: 8
                }
            ])
        );
        assert_eq!(parse_unmap_list(&[], cap), Ok(vec![]));
        // Header only, no descriptors.
        assert_eq!(parse_unmap_list(&unmap_list(&[]), cap), Ok(vec![]));
        // Past the end.
        assert_eq!(
            parse_unmap_list(&unmap_list(&[(2041, 8)]), cap),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            parse_unmap_list(&unmap_list(&[(u64::MAX, 2)]), cap),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        // Short list, truncated descriptors, lengths that lie.
        assert_eq!(
            parse_unmap_list(&[0, 6, 0], cap),
            Err(Sense::PARAM_LIST_LENGTH_ERROR)
        );
        let mut l = unmap_list(&[(0, 8)]);
        l.truncate(20);
        assert_eq!(
            parse_unmap_list(&l, cap),
            Err(Sense::PARAM_LIST_LENGTH_ERROR)
        );
        let mut l = unmap_list(&[(0, 8)]);
        l[3] = 15;
        assert_eq!(
            parse_unmap_list(&l, cap),
            Err(Sense::PARAM_LIST_LENGTH_ERROR)
        );
        // Too many descriptors, one too long.
        let many: Vec<_> = (0..MAX_UNMAP_DESCRIPTORS as u64 + 1)
            .map(|i| (i, 1))
            .collect();
        let mut l = unmap_list(&many);
        // 257 descriptors overflow a u16 data length? No: 6 + 16 * 257 fits.
        l[0..2].copy_from_slice(&((6 + 16 * many.len()) as u16).to_be_bytes());
        assert_eq!(
            parse_unmap_list(&l, 1 << 20),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
        assert_eq!(
            parse_unmap_list(&unmap_list(&[(0, MAX_UNMAP_BLOCKS + 1)]), u64::MAX),
            Err(Sense::INVALID_FIELD_IN_PARAM_LIST)
        );
    }

    #[test]
    fn write_same() {
        assert_eq!(
            p(&[0x41, 0x08, 0, 0, 0, 16, 0, 0, 8, 0]),
            Ok(Command::WriteSame {
                lba: 16,
                blocks: 8,
                unmap: true,
                ndob: false
            })
        );
        let mut c = [0u8; 16];
        c[0] = 0x93;
        c[1] = 0x09;
        c[9] = 1;
        c[13] = 64;
        let ws = p(&c).unwrap();
        assert_eq!(
            ws,
            Command::WriteSame {
                lba: 1,
                blocks: 64,
                unmap: true,
                ndob: true
            }
        );
        assert_eq!(ws.transfer(), Transfer::None);
        assert!(ws.writes_medium());
        c[1] = 0x08;
        assert_eq!(p(&c).unwrap().transfer(), Transfer::Out(512));
        // Zero blocks (WSNZ), too many blocks, ANCHOR, NDOB in the 10-byte form.
        c[13] = 0;
        assert_eq!(p(&c), BAD_FIELD);
        c[10..14].copy_from_slice(&(MAX_UNMAP_BLOCKS + 1).to_be_bytes());
        assert_eq!(p(&c), BAD_FIELD);
        assert_eq!(p(&[0x41, 0x04, 0, 0, 0, 0, 0, 0, 8, 0]), BAD_FIELD);
        assert_eq!(p(&[0x41, 0x01, 0, 0, 0, 0, 0, 0, 8, 0]), BAD_FIELD);
    }

    #[test]
    fn verify() {
        assert_eq!(
            p(&[0x2F, 0, 0, 0, 0, 5, 0, 0, 3, 0]),
            Ok(Command::Verify {
                lba: 5,
                blocks: 3,
                bytchk: false
            })
        );
        let mut c = [0u8; 16];
        c[0] = 0x8F;
        c[1] = 0x02;
        c[13] = 2;
        let v = p(&c).unwrap();
        assert_eq!(
            v,
            Command::Verify {
                lba: 0,
                blocks: 2,
                bytchk: true
            }
        );
        assert_eq!(v.transfer(), Transfer::Out(1024));
        // BYTCHK 10b (reserved), 11b (unsupported).
        c[1] = 0x04;
        assert_eq!(p(&c), BAD_FIELD);
        c[1] = 0x06;
        assert_eq!(p(&c), BAD_FIELD);
    }

    #[test]
    fn unknown_opcodes() {
        let known: Vec<u8> = vec![
            0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41,
            0x42, 0x55, 0x5A, 0x88, 0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA,
        ];
        for opcode in 0..=255u8 {
            let r = p(&[opcode]);
            if known.contains(&opcode) {
                assert_ne!(r, Err(Sense::INVALID_OPCODE), "opcode {opcode:#x}");
            } else {
                assert_eq!(r, Err(Sense::INVALID_OPCODE), "opcode {opcode:#x}");
            }
        }
        // Common ones Linux or tools send that we do not implement.
        for opcode in [0x1E, 0x4D, 0x9E + 1, 0xA3, 0x85, 0xA1, 0x89] {
            assert_eq!(p(&[opcode]), Err(Sense::INVALID_OPCODE));
        }
        assert_eq!(parse(&[]), Err(Sense::INVALID_OPCODE));
    }

    #[test]
    fn truncated_cdb() {
        // A CDB field shorter than the command (a driver-set cdb_size of 6).
        assert_eq!(parse(&[0x28, 0, 0, 0, 0, 0]), BAD_FIELD);
        assert_eq!(parse(&[0x88; 12]), BAD_FIELD);
        assert_eq!(parse(&[0x00; 6]), Ok(Command::TestUnitReady));
    }

    #[test]
    fn lba_ranges() {
        assert_eq!(check_range(0, 2048, 2048), Ok(()));
        assert_eq!(check_range(2047, 1, 2048), Ok(()));
        assert_eq!(check_range(2048, 0, 2048), Ok(()));
        assert_eq!(check_range(2047, 2, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(check_range(2049, 0, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(check_range(u64::MAX, 1, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        let r = Command::Read {
            lba: 2040,
            blocks: 16,
            fua: false,
        };
        assert_eq!(check_command_range(&r, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(check_command_range(&r, 4096), Ok(()));
        assert_eq!(check_command_range(&Command::TestUnitReady, 0), Ok(()));
        let s = Command::SynchronizeCache {
            lba: 5000,
            blocks: 0,
        };
        assert_eq!(check_command_range(&s, 2048), Err(Sense::LBA_OUT_OF_RANGE));
    }
}
