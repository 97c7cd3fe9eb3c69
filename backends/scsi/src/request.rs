//! Layout of virtio-scsi requests (virtio 1.2 §5.6.6) in descriptor chains.
//!
//! A chain is reduced to two byte streams: the device-readable descriptors
//! (which must all come first) and the device-writable ones. For a command
//! the readable stream is `virtio_scsi_cmd_req` (LUN, tag, task attribute,
//! priority, CRN, CDB of `cdb_size` bytes) followed by data-out; the
//! writable stream is `virtio_scsi_cmd_resp` (sense length, residual,
//! status qualifier, status, response, sense of `sense_size` bytes)
//! followed by data-in. Descriptor boundaries carry no meaning
//! (VIRTIO_F_VERSION_1 implies ANY_LAYOUT).
//!
//! Parsing is a pure function of the chain and guest memory: it validates
//! every address and length and reads only the request header.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::guest::{read_stream, split_stream, stream_len, Segment};

/// Bytes of `virtio_scsi_cmd_req` before the CDB.
pub const CMD_REQ_FIXED: usize = 19;
/// Bytes of `virtio_scsi_cmd_resp` before the sense data.
pub const CMD_RESP_FIXED: usize = 12;
/// Most descriptors kept per chain (virtio-queue already bounds a chain by
/// the queue or indirect table size; this bounds our allocations anyway).
pub const MAX_DESCRIPTORS: usize = 1024;

/// Why a chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no descriptors.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// More descriptors than [`MAX_DESCRIPTORS`].
    #[error("chain of more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor at {0:#x} after a device-writable one")]
    WrongDirection(u64),
    /// A buffer is not (entirely) in guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The writable stream cannot hold the response.
    #[error("response buffer of {got} bytes, need {need}")]
    ResponseTooShort {
        /// Writable bytes supplied.
        got: u64,
        /// Bytes the response needs.
        need: u64,
    },
    /// The readable stream cannot hold the request header.
    #[error("request header of {got} bytes, need {need}")]
    HeaderTooShort {
        /// Readable bytes supplied.
        got: u64,
        /// Bytes the header needs.
        need: u64,
    },
    /// Reading the header from guest memory failed.
    #[error("cannot read the request header")]
    HeaderRead,
}

/// A chain split into its two streams, each buffer checked against guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
    /// The first problem found (the streams are still usable to answer).
    pub error: Option<ParseError>,
    /// The first out-of-memory writable buffer's position in the writable stream.
    bad_writable_at: Option<u64>,
}

impl Streams {
    /// Split `chain` into streams. Never reads or writes guest memory.
    pub fn collect<M>(chain: &mut DescriptorChain<M>) -> Streams
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut s = Streams::default();
        let mut count = 0usize;
        let mut seen_writable = false;
        let mut writable_len = 0u64;
        let descs: Vec<_> = chain.by_ref().take(MAX_DESCRIPTORS + 1).collect();
        let mem = chain.memory();
        for d in descs {
            count += 1;
            if count > MAX_DESCRIPTORS {
                s.error.get_or_insert(ParseError::TooManyDescriptors);
                break;
            }
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            let access = if d.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(seg.addr, seg.len as usize, access) {
                s.error.get_or_insert(ParseError::OutOfMemory {
                    addr: seg.addr.0,
                    len: seg.len,
                });
                if d.is_write_only() {
                    s.bad_writable_at.get_or_insert(writable_len);
                }
            }
            if d.is_write_only() {
                seen_writable = true;
                writable_len += u64::from(seg.len);
                if seg.len > 0 {
                    s.writable.push(seg);
                }
            } else {
                if seen_writable {
                    s.error
                        .get_or_insert(ParseError::WrongDirection(seg.addr.0));
                }
                if seg.len > 0 {
                    s.readable.push(seg);
                }
            }
        }
        if count == 0 {
            s.error = Some(ParseError::EmptyChain);
        }
        s
    }

    /// The first `n` writable bytes (where the device answers) and the
    /// rest, if they exist and lie in guest memory.
    pub fn response(&self, n: u64) -> Result<(Vec<Segment>, Vec<Segment>), ParseError> {
        let got = stream_len(&self.writable);
        match self.bad_writable_at {
            Some(at) if at < n => {
                return Err(self.error.clone().unwrap_or(ParseError::HeaderRead));
            }
            _ => {}
        }
        split_stream(&self.writable, n).ok_or(ParseError::ResponseTooShort { got, need: n })
    }
}

/// A chain [`parse_cmd`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// What is wrong.
    pub error: ParseError,
    /// Where the response goes, if the chain has room for it in guest
    /// memory; `None`: the chain is returned with used length 0.
    pub resp: Option<Vec<Segment>>,
}

/// A validated command request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdRequest {
    /// LUN field.
    pub lun: [u8; 8],
    /// Command tag (the initiator's identifier, used by ABORT TASK).
    pub tag: u64,
    /// Task attribute (SIMPLE, ORDERED, HEAD OF QUEUE, ACA).
    pub task_attr: u8,
    /// CDB field (`cdb_size` bytes).
    pub cdb: Vec<u8>,
    /// Data-out buffers.
    pub data_out: Vec<Segment>,
    /// Response buffers (exactly the response size).
    pub resp: Vec<Segment>,
    /// Data-in buffers.
    pub data_in: Vec<Segment>,
}

/// Parse a command request with the device's current `cdb_size` and `sense_size`.
pub fn parse_cmd<M>(
    chain: &mut DescriptorChain<M>,
    cdb_size: usize,
    sense_size: usize,
) -> Result<CmdRequest, Rejection>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let streams = Streams::collect(chain);
    let resp_size = (CMD_RESP_FIXED + sense_size) as u64;
    let (resp, data_in) = match streams.response(resp_size) {
        Ok(r) => r,
        Err(error) => {
            return Err(Rejection {
                error: streams.error.clone().unwrap_or(error),
                resp: None,
            })
        }
    };
    let fail = |error: ParseError, resp: Vec<Segment>| Rejection {
        error,
        resp: Some(resp),
    };
    if let Some(e) = streams.error.clone() {
        return Err(fail(e, resp));
    }
    let hdr_size = (CMD_REQ_FIXED + cdb_size) as u64;
    let Some((hdr, data_out)) = split_stream(&streams.readable, hdr_size) else {
        let got = stream_len(&streams.readable);
        return Err(fail(
            ParseError::HeaderTooShort {
                got,
                need: hdr_size,
            },
            resp,
        ));
    };
    let mut h = vec![0u8; hdr_size as usize];
    if read_stream(chain.memory(), &hdr, 0, &mut h).is_err() {
        return Err(fail(ParseError::HeaderRead, resp));
    }
    let mut lun = [0u8; 8];
    lun.copy_from_slice(&h[0..8]);
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&h[8..16]);
    Ok(CmdRequest {
        lun,
        tag: u64::from_le_bytes(tag),
        task_attr: h[16],
        cdb: h.split_off(CMD_REQ_FIXED),
        data_out,
        resp,
        data_in,
    })
}

/// `virtio_scsi_cmd_resp` header bytes plus the sense (truncated to `sense_size`).
pub fn cmd_response(
    response: u8,
    status: u8,
    resid: u32,
    sense: &[u8],
    sense_size: usize,
) -> Vec<u8> {
    let sense = &sense[..sense.len().min(sense_size)];
    let mut v = Vec::with_capacity(CMD_RESP_FIXED + sense.len());
    v.extend_from_slice(&(sense.len() as u32).to_le_bytes());
    v.extend_from_slice(&resid.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes()); // status qualifier
    v.push(status);
    v.push(response);
    v.extend_from_slice(sense);
    v
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Queue area at 0, data at 0x10000..0x100000, a hole, then 0x200000..0x300000.
    pub(crate) fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    pub(crate) const REQ: u64 = 0x1_0000;
    pub(crate) const RESP: u64 = 0x2_0000;
    pub(crate) const DATA: u64 = 0x3_0000;
    pub(crate) const RESP_SIZE: u32 = 108;
    pub(crate) const REQ_SIZE: u32 = 51;

    pub(crate) fn rd(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    pub(crate) fn wr(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    pub(crate) fn write_req(mem: &GuestMemoryMmap, lun: u16, tag: u64, cdb: &[u8]) {
        let mut h = [0u8; REQ_SIZE as usize];
        h[..8].copy_from_slice(&crate::lun::virtio_lun(lun));
        h[8..16].copy_from_slice(&tag.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&h, GuestAddress(REQ)).unwrap();
    }

    fn run(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<CmdRequest, Rejection> {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let mut chain = q.build_desc_chain(descs).unwrap();
        parse_cmd(&mut chain, 32, 96)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn read_request() {
        let mem = test_mem();
        write_req(&mem, 5, 77, &[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0]);
        let r = run(
            &mem,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 4096)],
        )
        .unwrap();
        assert_eq!(r.lun, crate::lun::virtio_lun(5));
        assert_eq!(r.tag, 77);
        assert_eq!(r.cdb.len(), 32);
        assert_eq!(r.cdb[0], 0x28);
        assert!(r.data_out.is_empty());
        assert_eq!(r.resp, vec![seg(RESP, RESP_SIZE)]);
        assert_eq!(r.data_in, vec![seg(DATA, 4096)]);
    }

    #[test]
    fn any_layout() {
        let mem = test_mem();
        write_req(&mem, 0, 1, &[0x2A]);
        // Header and data-out in one descriptor, header split across two;
        // response and data-in in one writable descriptor.
        let r = run(
            &mem,
            &[
                rd(REQ, 10),
                rd(REQ + 10, REQ_SIZE - 10 + 512),
                wr(RESP, RESP_SIZE + 512),
            ],
        )
        .unwrap();
        assert_eq!(r.cdb[0], 0x2A);
        assert_eq!(r.data_out, vec![seg(REQ + REQ_SIZE as u64, 512)]);
        assert_eq!(r.resp, vec![seg(RESP, RESP_SIZE)]);
        assert_eq!(r.data_in, vec![seg(RESP + RESP_SIZE as u64, 512)]);
        // Response split over two descriptors.
        let r = run(&mem, &[rd(REQ, REQ_SIZE), wr(RESP, 12), wr(DATA, 96)]).unwrap();
        assert_eq!(r.resp, vec![seg(RESP, 12), seg(DATA, 96)]);
        assert!(r.data_in.is_empty());
    }

    #[test]
    fn too_short() {
        let mem = test_mem();
        write_req(&mem, 0, 1, &[0x00]);
        // Header too short: answerable.
        let e = run(&mem, &[rd(REQ, 40), wr(RESP, RESP_SIZE)]).unwrap_err();
        assert_eq!(e.error, ParseError::HeaderTooShort { got: 40, need: 51 });
        assert_eq!(e.resp, Some(vec![seg(RESP, RESP_SIZE)]));
        // No header at all.
        let e = run(&mem, &[wr(RESP, RESP_SIZE)]).unwrap_err();
        assert!(matches!(e.error, ParseError::HeaderTooShort { got: 0, .. }));
        assert!(e.resp.is_some());
        // Response too short: unanswerable.
        let e = run(&mem, &[rd(REQ, REQ_SIZE), wr(RESP, 100)]).unwrap_err();
        assert_eq!(
            e.error,
            ParseError::ResponseTooShort {
                got: 100,
                need: 108
            }
        );
        assert_eq!(e.resp, None);
        let e = run(&mem, &[rd(REQ, REQ_SIZE)]).unwrap_err();
        assert_eq!(e.resp, None);
    }

    #[test]
    fn wrong_direction() {
        let mem = test_mem();
        write_req(&mem, 0, 1, &[0x00]);
        let e = run(
            &mem,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), rd(DATA, 512)],
        )
        .unwrap_err();
        assert_eq!(e.error, ParseError::WrongDirection(DATA));
        assert!(e.resp.is_some());
    }

    #[test]
    fn outside_guest_memory() {
        let mem = test_mem();
        write_req(&mem, 0, 1, &[0x28]);
        // Data-in in the hole: answerable.
        let e = run(
            &mem,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(0x18_0000, 512)],
        )
        .unwrap_err();
        assert_eq!(
            e.error,
            ParseError::OutOfMemory {
                addr: 0x18_0000,
                len: 512
            }
        );
        assert!(e.resp.is_some());
        // Straddling the end of the first region.
        let e = run(
            &mem,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(0xf_ff00, 512)],
        )
        .unwrap_err();
        assert!(matches!(e.error, ParseError::OutOfMemory { .. }));
        // Header outside memory: answerable.
        let e = run(&mem, &[rd(0x4000_0000, REQ_SIZE), wr(RESP, RESP_SIZE)]).unwrap_err();
        assert!(matches!(e.error, ParseError::OutOfMemory { .. }));
        assert!(e.resp.is_some());
        // Response outside memory: unanswerable.
        let e = run(&mem, &[rd(REQ, REQ_SIZE), wr(0x4000_0000, RESP_SIZE)]).unwrap_err();
        assert_eq!(e.resp, None);
        let e = run(&mem, &[rd(REQ, REQ_SIZE), wr(u64::MAX - 8, RESP_SIZE)]).unwrap_err();
        assert_eq!(e.resp, None);
        // Response partly outside (second half of a split response).
        let e = run(
            &mem,
            &[rd(REQ, REQ_SIZE), wr(RESP, 12), wr(0x4000_0000, 96)],
        )
        .unwrap_err();
        assert_eq!(e.resp, None);
    }

    #[test]
    fn response_bytes() {
        let sense = crate::sense::Sense::INVALID_OPCODE.fixed();
        let r = cmd_response(0, 2, 7, &sense, 96);
        assert_eq!(r.len(), 12 + 18);
        assert_eq!(&r[0..4], &18u32.to_le_bytes());
        assert_eq!(&r[4..8], &7u32.to_le_bytes());
        assert_eq!((r[10], r[11]), (2, 0));
        assert_eq!(r[12], 0x70);
        // A driver-set sense_size smaller than the sense truncates it.
        assert_eq!(cmd_response(0, 2, 0, &sense, 8).len(), 20);
    }
}
