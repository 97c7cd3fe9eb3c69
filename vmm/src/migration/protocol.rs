//! The migration stream: a sequence of frames, each one bincode-encoded
//! [`Frame`] (bincode's length prefixes do the framing), with a CRC-32 over
//! every payload. The source opens with `Hello` (protocol version and the
//! VM's configuration); the destination answers `Ready` or `Refused` before
//! any page moves; then come `Pages` rounds, the final `State`, and the
//! `Complete` / `Resumed` handshake.

use std::borrow::Cow;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The stream version this tern speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame a destination accepts (a page batch is at most
/// [`MAX_BATCH`]; the state a few MiB at most).
const MAX_FRAME: usize = 64 << 20;
/// Largest run of pages in one frame.
pub const MAX_BATCH: usize = 4 << 20;

/// One message of the stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Source: the protocol version and what VM comes.
    Hello {
        /// [`PROTOCOL_VERSION`] of the source.
        version: u32,
        /// The VM's configuration, as JSON (its serde attributes are for
        /// self-describing formats).
        #[serde(
            serialize_with = "serde_bytes::serialize",
            deserialize_with = "owned_bytes"
        )]
        config: Cow<'a, [u8]>,
        /// RAM bytes.
        mem_size: u64,
        /// CPUID feature words the guest sees (leaf 1 ECX/EDX, leaf 7 EBX/
        /// ECX/EDX): the destination must offer them all.
        cpu_features: Vec<u32>,
        /// Memory comes as the memfd itself (same host, Unix socket).
        local: bool,
    },
    /// Destination: configuration accepted, send pages.
    Ready,
    /// Destination: configuration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Source: a run of guest memory at `offset` in RAM's file order.
    Pages {
        /// Byte offset in guest RAM (file order: low RAM, then high).
        offset: u64,
        /// The bytes.
        #[serde(
            serialize_with = "serde_bytes::serialize",
            deserialize_with = "owned_bytes"
        )]
        data: Cow<'a, [u8]>,
        /// CRC-32 of `data`.
        crc: u32,
    },
    /// Source: a pre-copy round ended.
    RoundEnd {
        /// Round number (0 = all memory).
        round: u32,
    },
    /// Source: the vCPU and device state (a snapshot state body), after
    /// the last pages.
    State {
        /// JSON of the state.
        #[serde(
            serialize_with = "serde_bytes::serialize",
            deserialize_with = "owned_bytes"
        )]
        body: Cow<'a, [u8]>,
        /// CRC-32 of `body`.
        crc: u32,
    },
    /// Source: nothing more; resume the VM.
    Complete,
    /// Destination: the VM runs here now.
    Resumed,
    /// Either side: giving up.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Errors on the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be encoded.
    #[error("migration stream: cannot send a frame: {}", encode_text(.0))]
    Encode(#[from] bincode::error::EncodeError),
    /// A frame could not be decoded (truncated, corrupt or not a tern stream).
    #[error("migration stream: bad frame: {}", decode_text(.0))]
    Decode(#[from] bincode::error::DecodeError),
    /// A payload's checksum does not match.
    #[error(
        "migration stream: corrupted {what} (checksum {found:#010x}, frame says {expected:#010x})"
    )]
    Checksum {
        /// Which payload.
        what: &'static str,
        /// Frame's CRC.
        expected: u32,
        /// Computed CRC.
        found: u32,
    },
    /// A frame arrived where another was due.
    #[error("migration stream: expected {expected}, got {got}")]
    Unexpected {
        /// What was due.
        expected: &'static str,
        /// What came.
        got: String,
    },
}

/// Decodes a byte payload into an owned buffer (a stream cannot lend).
fn owned_bytes<'de, 'a, D: serde::Deserializer<'de>>(d: D) -> Result<Cow<'a, [u8]>, D::Error> {
    let v: serde_bytes::ByteBuf = serde::Deserialize::deserialize(d)?;
    Ok(Cow::Owned(v.into_vec()))
}

/// bincode's errors as plain text: an I/O error by its message.
fn encode_text(e: &bincode::error::EncodeError) -> String {
    match e {
        bincode::error::EncodeError::Io { inner, .. } => inner.to_string(),
        other => other.to_string(),
    }
}

fn decode_text(e: &bincode::error::DecodeError) -> String {
    match e {
        bincode::error::DecodeError::Io { inner, .. } => inner.to_string(),
        bincode::error::DecodeError::UnexpectedEnd { .. } => "the stream ended early".into(),
        other => other.to_string(),
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_limit::<MAX_FRAME>()
}

/// Writes one frame.
pub fn send(w: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    bincode::serde::encode_into_std_write(frame, w, config())?;
    Ok(())
}

/// Reads one frame, checking payload checksums.
pub fn recv(r: &mut impl Read) -> Result<Frame<'static>, ProtocolError> {
    let frame: Frame<'static> = bincode::serde::decode_from_std_read(r, config())?;
    match &frame {
        Frame::Pages { data, crc, .. } => check("pages", data, *crc)?,
        Frame::State { body, crc } => check("state", body, *crc)?,
        _ => {}
    }
    Ok(frame)
}

fn check(what: &'static str, data: &[u8], expected: u32) -> Result<(), ProtocolError> {
    let found = crc32fast::hash(data);
    if found != expected {
        return Err(ProtocolError::Checksum {
            what,
            expected,
            found,
        });
    }
    Ok(())
}

/// A `Pages` frame borrowing `data`.
pub fn pages(offset: u64, data: &[u8]) -> Frame<'_> {
    Frame::Pages {
        offset,
        data: Cow::Borrowed(data),
        crc: crc32fast::hash(data),
    }
}

/// The frame's name, for errors.
pub fn name(f: &Frame) -> String {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Ready => "Ready",
        Frame::Refused { .. } => "Refused",
        Frame::Pages { .. } => "Pages",
        Frame::RoundEnd { .. } => "RoundEnd",
        Frame::State { .. } => "State",
        Frame::Complete => "Complete",
        Frame::Resumed => "Resumed",
        Frame::Failed { .. } => "Failed",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let mut buf = Vec::new();
        send(&mut buf, &pages(4096, &[7u8; 8192])).unwrap();
        send(&mut buf, &Frame::Complete).unwrap();
        let mut r = &buf[..];
        match recv(&mut r).unwrap() {
            Frame::Pages { offset, data, .. } => {
                assert_eq!(offset, 4096);
                assert_eq!(data.len(), 8192);
            }
            other => panic!("{}", name(&other)),
        }
        assert!(matches!(recv(&mut r).unwrap(), Frame::Complete));

        let mut bad = Vec::new();
        send(&mut bad, &pages(0, &[1u8; 64])).unwrap();
        let n = bad.len();
        bad[n - 10] ^= 0x40;
        assert!(matches!(
            recv(&mut &bad[..]),
            Err(ProtocolError::Checksum { .. })
        ));
        assert!(recv(&mut &bad[..n / 2]).is_err());
        assert!(recv(&mut &b"garbage!garbage!garbage!"[..]).is_err());
    }
}
