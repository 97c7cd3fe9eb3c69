//! Fuzzes tern-scsi's guest-facing parsers (CDB, UNMAP list, MODE SELECT
//! data, LUN field) through the body shared with the crate's seeded test.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_scsi::fuzz::fuzz_one(data);
});
