//! The fuzz body shared by the cargo-fuzz target (`backends/scsi/fuzz`)
//! and its plain-test twin below, which runs it over a few hundred thousand
//! seeded random and mutated inputs so every `cargo test` fuzzes a little
//! even where no nightly toolchain or libFuzzer is available.
//!
//! The input drives every pure parser that sees guest-controlled bytes: the
//! CDB parser (then the range check and transfer length of whatever it
//! accepted), the UNMAP parameter list, MODE SELECT data and the LUN field.
//! Each must return, never panic, and keep its documented invariants.

use crate::cdb::{self, Command, Transfer, BLOCK_SHIFT};
use crate::lun::decode_lun;
use crate::mode::{self, ModeState};
use crate::sense::Sense;

/// Capacities (in blocks) the range checks are exercised with.
const CAPACITIES: [u64; 4] = [0, 1, 2048, u64::MAX];

/// Run every parser on `data`; panics only if an invariant is broken.
pub fn fuzz_one(data: &[u8]) {
    match cdb::parse(data) {
        Ok(cmd) => check_command(data, &cmd),
        Err(sense) => {
            // Only ILLEGAL REQUEST comes out of the parser.
            assert_eq!(sense.key, crate::sense::key::ILLEGAL_REQUEST);
            assert!(
                [
                    Sense::INVALID_OPCODE,
                    Sense::INVALID_FIELD_IN_CDB,
                    Sense::SAVING_PARAMS_NOT_SUPPORTED
                ]
                .contains(&sense),
                "unexpected sense {sense:?}"
            );
        }
    }
    for cap in CAPACITIES {
        if let Ok(ranges) = cdb::parse_unmap_list(data, cap) {
            for r in ranges {
                assert!(r
                    .lba
                    .checked_add(u64::from(r.blocks))
                    .is_some_and(|e| e <= cap));
            }
        }
    }
    let (ten, rest) = match data.split_first() {
        Some((b, rest)) => (b & 1 != 0, rest),
        None => (false, data),
    };
    // MODE SELECT may only ever toggle WCE.
    let _: Result<ModeState, Sense> = mode::mode_select(ten, rest, ModeState::default());
    if let Ok(lun) = <[u8; 8]>::try_from(&data[..data.len().min(8)]) {
        if let Some(n) = decode_lun(&lun) {
            assert!(n < 16384);
        }
    }
}

fn check_command(data: &[u8], cmd: &Command) {
    let len = cdb::cdb_len(data[0]).unwrap_or(0);
    assert!(len > 0 && data.len() >= len);
    match (*cmd, cmd.transfer()) {
        (Command::Read { blocks, .. }, Transfer::In(n))
        | (Command::Write { blocks, .. }, Transfer::Out(n)) => {
            assert_eq!(n, u64::from(blocks) << BLOCK_SHIFT)
        }
        (Command::Read { .. } | Command::Write { .. }, t) => panic!("READ/WRITE transfer {t:?}"),
        _ => {}
    }
    for cap in CAPACITIES {
        let _ = cdb::check_command_range(cmd, cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Valid CDBs of every implemented command, mutated below.
    const SEEDS: &[&[u8]] = &[
        &[0x00, 0, 0, 0, 0, 0],
        &[0x03, 0, 0, 0, 18, 0],
        &[0x08, 0, 0, 1, 1, 0],
        &[0x0A, 0, 0, 1, 1, 0],
        &[0x12, 1, 0x83, 0, 255, 0],
        &[0x15, 0x10, 0, 0, 24, 0],
        &[0x1A, 0x08, 0x3F, 0, 255, 0],
        &[0x1B, 0, 0, 0, 1, 0],
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0],
        &[0x2A, 8, 0, 0, 0, 8, 0, 0, 8, 0],
        &[0x2F, 2, 0, 0, 0, 8, 0, 0, 8, 0],
        &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0x41, 8, 0, 0, 0, 0, 0, 0, 8, 0],
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],
        &[0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0],
        &[0x5A, 0x18, 0x08, 0, 0, 0, 0, 1, 0, 0],
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0x8F, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0x91, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0x93, 9, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
        &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        &[0xA8, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        &[0xAA, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        // UNMAP parameter list, MODE SELECT(6) data, a LUN field.
        &[
            0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0, 0, 0,
        ],
        &[
            0, 0, 0, 0, 0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        &[1, 0, 0x40, 5, 0, 0, 0, 0],
    ];

    #[test]
    fn fuzz_cdb_parser_seeded() {
        let mut rng = Rng(0x5eed_5c51_0000_0001);
        let mut buf = Vec::with_capacity(64);
        for i in 0..300_000u32 {
            buf.clear();
            if i.is_multiple_of(4) {
                // Pure noise of a random length up to 40 bytes.
                let n = (rng.next() % 41) as usize;
                buf.extend((0..n).map(|_| rng.next() as u8));
            } else {
                // A seed, padded to a 32-byte CDB field, with a few bytes
                // replaced, bits flipped or the tail cut off.
                let seed = SEEDS[(rng.next() % SEEDS.len() as u64) as usize];
                buf.extend_from_slice(seed);
                buf.resize(32.max(seed.len()), 0);
                for _ in 0..(1 + rng.next() % 4) {
                    let at = (rng.next() % buf.len() as u64) as usize;
                    match rng.next() % 3 {
                        0 => buf[at] = rng.next() as u8,
                        1 => buf[at] ^= 1 << (rng.next() % 8),
                        _ => buf[at] = [0x00, 0xFF, 0x80, 0x7F][(rng.next() % 4) as usize],
                    }
                }
                if rng.next().is_multiple_of(8) {
                    buf.truncate((rng.next() % 33) as usize);
                }
            }
            fuzz_one(&buf);
        }
    }

    #[test]
    fn seeds_parse() {
        for s in &SEEDS[..26] {
            let mut c = s.to_vec();
            c.resize(32, 0);
            assert!(cdb::parse(&c).is_ok(), "seed {s:02x?}");
            fuzz_one(&c);
        }
    }
}
