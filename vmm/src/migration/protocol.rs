//! The migration stream: a sequence of frames, each one bincode-encoded
//! [`Frame`] (bincode's length prefixes do the framing). The source opens
//! with `Hello` (protocol version and the VM's configuration); the
//! destination answers `Ready` or `Refused` before any page moves; then
//! come `Pages` batches and `RoundEnd` marks (each answered `Received` once
//! the destination holds the round), the final `State`, and the
//! `Complete` / `Resumed` handshake.
//!
//! A `Pages` frame is only a header: the list of page runs it carries.
//! The bytes of its runs that are not zero follow it raw, in run order,
//! then the CRC-32 of those bytes (4 bytes, little-endian). Raw bytes
//! rather than a bincode byte string let the destination read them in
//! pieces into a reused buffer and on into guest memory, and the source
//! write them from one, with no per-batch allocation; all-zero runs carry
//! no bytes at all. The `State` body is a bincode byte string with its CRC.

use std::borrow::Cow;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// The stream version this tern speaks: 2 since page batches carry raw
/// bytes after a header (version 1 had them inside the bincode frame).
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest frame a destination accepts (a `Pages` header is at most
/// [`MAX_RUNS`] runs; the state a few MiB at most).
const MAX_FRAME: usize = 64 << 20;
/// Most bytes of page data (runs that are not zero) in one batch.
pub const MAX_BATCH: usize = 4 << 20;
/// Most runs in one batch.
pub const MAX_RUNS: usize = 4096;

/// A run of guest memory in a `Pages` batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Byte offset in guest RAM (file order: low RAM, then high).
    pub offset: u64,
    /// Bytes in the run.
    pub len: u32,
    /// The run is all zeros: no bytes follow for it.
    pub zero: bool,
}

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
    /// Source: runs of guest memory; the bytes of the runs that are not
    /// zero follow the frame raw, then their CRC-32 (see the module).
    Pages {
        /// The runs, in the order their bytes follow.
        runs: Vec<PageRun>,
        /// The bytes of the non-zero runs, concatenated: not part of the
        /// bincode frame but written after it by [`send`] and read by
        /// [`recv`] (the destination's fast path reads them itself, see
        /// [`recv_head`]).
        #[serde(skip)]
        data: Cow<'a, [u8]>,
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
    /// Destination: it has read every page up to `RoundEnd { round }`.
    /// The source waits for it before reading the dirty log again,
    /// so a round's time covers the pages' arrival, not just their trip
    /// into socket buffers (which on TCP hold tens of MiB: left in flight
    /// at the pause, they would add to the downtime).
    Received {
        /// The round.
        round: u32,
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
    /// The stream ended inside a frame.
    #[error("migration stream: the stream ended early, in {0}")]
    Truncated(&'static str),
    /// A `Pages` header breaks the limits.
    #[error("migration stream: bad page batch: {0}")]
    BadBatch(String),
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
        bincode::error::DecodeError::Io { inner, .. }
            if inner.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            "the stream ended early".into()
        }
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

/// Writes one frame (for `Pages`, its header, data and CRC).
pub fn send(w: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    send_head(w, frame)?;
    if let Frame::Pages { runs, data } = frame {
        let want = data_len(runs)?;
        if want != data.len() as u64 {
            return Err(ProtocolError::BadBatch(format!(
                "its runs hold {want} bytes of data but {} come",
                data.len()
            )));
        }
        w.write_all(data)?;
        w.write_all(&crc32fast::hash(data).to_le_bytes())?;
    }
    Ok(())
}

/// Writes a frame's bincode part only (for `Pages`, the header: its data
/// and CRC are the caller's to write).
pub fn send_head(w: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    bincode::serde::encode_into_std_write(frame, w, config())?;
    Ok(())
}

/// Encodes a frame's bincode part into `out` (appended).
pub fn encode_head(out: &mut Vec<u8>, frame: &Frame) -> Result<(), ProtocolError> {
    bincode::serde::encode_into_std_write(frame, out, config())?;
    Ok(())
}

/// Reads one frame, checking payload checksums; a `Pages` frame comes
/// with its data.
pub fn recv(r: &mut impl Read) -> Result<Frame<'static>, ProtocolError> {
    let frame = recv_head(r)?;
    if let Frame::Pages { runs, .. } = frame {
        let mut data = vec![0u8; data_len(&runs)? as usize];
        read_payload(r, &mut data)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&data);
        check_trailer(r, crc)?;
        return Ok(Frame::Pages {
            runs,
            data: Cow::Owned(data),
        });
    }
    Ok(frame)
}

/// Reads one frame's bincode part, checking the `State` checksum. After a
/// `Pages` header the caller reads [`data_len`] bytes of data and then
/// [`check_trailer`].
pub fn recv_head(r: &mut impl Read) -> Result<Frame<'static>, ProtocolError> {
    let frame: Frame<'static> = bincode::serde::decode_from_std_read(r, config())?;
    if let Frame::State { body, crc } = &frame {
        let found = crc32fast::hash(body);
        if found != *crc {
            return Err(ProtocolError::Checksum {
                what: "state",
                expected: *crc,
                found,
            });
        }
    }
    Ok(frame)
}

/// The bytes of data that follow a `Pages` header with `runs`, checked
/// against the limits (at most [`MAX_RUNS`] runs, none empty, at most
/// [`MAX_BATCH`] bytes of data) before anything is read or allocated.
pub fn data_len(runs: &[PageRun]) -> Result<u64, ProtocolError> {
    if runs.len() > MAX_RUNS {
        return Err(ProtocolError::BadBatch(format!(
            "{} runs, at most {MAX_RUNS} allowed",
            runs.len()
        )));
    }
    let mut total = 0u64;
    for r in runs {
        if r.len == 0 {
            return Err(ProtocolError::BadBatch(format!(
                "an empty run at {:#x}",
                r.offset
            )));
        }
        if !r.zero {
            total += u64::from(r.len);
        }
    }
    if total > MAX_BATCH as u64 {
        return Err(ProtocolError::BadBatch(format!(
            "{total} bytes of data, at most {MAX_BATCH} allowed"
        )));
    }
    Ok(total)
}

/// Reads page data into `buf`: a stream that ends here ended early.
pub fn read_payload(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated("page data")
        } else {
            ProtocolError::Io(e)
        }
    })
}

/// Reads a `Pages` batch's CRC and compares it with `crc`, the hash of
/// the data as read.
pub fn check_trailer(r: &mut impl Read, crc: crc32fast::Hasher) -> Result<(), ProtocolError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Truncated("a page batch's checksum")
        } else {
            ProtocolError::Io(e)
        }
    })?;
    let (expected, found) = (u32::from_le_bytes(b), crc.finalize());
    if expected != found {
        return Err(ProtocolError::Checksum {
            what: "pages",
            expected,
            found,
        });
    }
    Ok(())
}

/// A `Pages` frame of one run at `offset` borrowing `data`.
pub fn pages(offset: u64, data: &[u8]) -> Frame<'_> {
    Frame::Pages {
        runs: vec![PageRun {
            offset,
            len: data.len() as u32,
            zero: false,
        }],
        data: Cow::Borrowed(data),
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
        Frame::Received { .. } => "Received",
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
        let zero_and_data = Frame::Pages {
            runs: vec![
                PageRun {
                    offset: 0,
                    len: 4096,
                    zero: true,
                },
                PageRun {
                    offset: 1 << 20,
                    len: 4096,
                    zero: false,
                },
            ],
            data: Cow::Owned(vec![3u8; 4096]),
        };
        send(&mut buf, &zero_and_data).unwrap();
        send(&mut buf, &Frame::Complete).unwrap();
        let mut r = &buf[..];
        match recv(&mut r).unwrap() {
            Frame::Pages { runs, data } => {
                assert_eq!(runs[0].offset, 4096);
                assert_eq!(data.len(), 8192);
            }
            other => panic!("{}", name(&other)),
        }
        match recv(&mut r).unwrap() {
            Frame::Pages { runs, data } => {
                assert_eq!(runs.len(), 2);
                assert!(runs[0].zero);
                assert_eq!(&data[..], &[3u8; 4096][..]);
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
        assert!(matches!(
            recv(&mut &bad[..n - 20]),
            Err(ProtocolError::Truncated(_))
        ));
        assert!(recv(&mut &bad[..n / 4]).is_err());
        assert!(recv(&mut &b"garbage!garbage!garbage!"[..]).is_err());

        // Limits are checked before anything is allocated.
        let huge = Frame::Pages {
            runs: vec![
                PageRun {
                    offset: 0,
                    len: u32::MAX,
                    zero: false,
                };
                2
            ],
            data: Cow::Borrowed(&[]),
        };
        let mut big = Vec::new();
        send_head(&mut big, &huge).unwrap();
        assert!(matches!(
            recv(&mut &big[..]),
            Err(ProtocolError::BadBatch(_))
        ));
    }
}
