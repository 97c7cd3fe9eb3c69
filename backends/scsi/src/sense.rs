//! SCSI status codes and sense data (SPC-4 §4.5): what a command that did
//! not complete with GOOD tells the initiator, in the fixed (0x70) or
//! descriptor (0x72) format.

/// SCSI status byte: the command completed without error.
pub const STATUS_GOOD: u8 = 0x00;
/// SCSI status byte: sense data describes why the command failed.
pub const STATUS_CHECK_CONDITION: u8 = 0x02;

/// Length of fixed-format sense data as built here (the minimum SPC allows
/// for a response carrying ASC/ASCQ).
pub const FIXED_SENSE_LEN: usize = 18;
/// Length of descriptor-format sense data without descriptors.
pub const DESCRIPTOR_SENSE_LEN: usize = 8;

/// Sense keys (SPC-4 table 48) this device reports.
pub mod key {
    /// No error to report (REQUEST SENSE without a pending condition).
    pub const NO_SENSE: u8 = 0x0;
    /// An unrecoverable error in the medium (image read failed).
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// A failure of the device itself (image metadata, guest memory gone).
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// The command or its parameters are not acceptable.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// A write to a write-protected unit.
    pub const DATA_PROTECT: u8 = 0x7;
    /// VERIFY with BYTCHK found data that does not match the medium.
    pub const MISCOMPARE: u8 = 0xE;
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    /// Sense key (see [`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// A sense triple.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// NO SENSE, NO ADDITIONAL SENSE INFORMATION.
    pub const NO_SENSE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAM_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// DATA PROTECT, WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// MEDIUM ERROR, WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    /// HARDWARE ERROR, INTERNAL TARGET FAILURE.
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1D, 0x00);

    /// Fixed-format sense data (response code 0x70, current error), 18 bytes.
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0F;
        // Additional sense length: bytes after byte 7.
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (response code 0x72) with no descriptors, 8 bytes.
    pub fn descriptor(&self) -> [u8; DESCRIPTOR_SENSE_LEN] {
        let mut b = [0u8; DESCRIPTOR_SENSE_LEN];
        b[0] = 0x72;
        b[1] = self.key & 0x0F;
        b[2] = self.asc;
        b[3] = self.ascq;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format() {
        let b = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(b.len(), 18);
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x21, 0x00));
        let b = Sense::WRITE_PROTECTED.fixed();
        assert_eq!((b[2], b[12], b[13]), (0x07, 0x27, 0x00));
    }

    #[test]
    fn descriptor_format() {
        let b = Sense::INVALID_OPCODE.descriptor();
        assert_eq!(b, [0x72, 0x05, 0x20, 0x00, 0, 0, 0, 0]);
    }
}
