//! Parsing of virtio-blk requests (virtio 1.2 §5.2.6) from descriptor chains.
//!
//! [`parse`] is a pure function of the chain and the guest memory it points
//! into: it reads the 16-byte request header (and, for DISCARD/WRITE_ZEROES,
//! the segment table) but never writes guest memory and never touches the
//! image. Every guest-controlled length and address is validated here, so the
//! executor can rely on the returned [`Request`].
//!
//! Layout accepted (VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the first
//! descriptor holds the header (device-readable, at least 16 bytes; any bytes
//! past the header are data), the last descriptor holds the status byte in its
//! last byte (device-writable; any bytes before it are data), and the
//! descriptors in between are data.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::config::{BlkConfig, SECTOR_SHIFT, SECTOR_SIZE};

/// Size of `struct virtio_blk_outhdr` (type, ioprio, sector).
pub const HEADER_SIZE: u32 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_SIZE: u32 = 16;
/// Bytes of the device ID answered to GET_ID.
pub const ID_BYTES: u32 = VIRTIO_BLK_ID_BYTES;

/// The request type from the header's `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read from the disk into guest buffers.
    In,
    /// `VIRTIO_BLK_T_OUT`: write guest buffers to the disk.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: read the device serial (20 bytes).
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: deallocate ranges.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: zero ranges, optionally deallocating.
    WriteZeroes,
    /// Any other type; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestType {
    /// Decode the header's `type` field.
    pub fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// Whether the device writes the data buffers of this request type
    /// (`None`: the type carries no data).
    fn data_device_writable(self) -> Option<bool> {
        match self {
            RequestType::In | RequestType::GetId => Some(true),
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => Some(false),
            RequestType::Flush | RequestType::Unsupported(_) => None,
        }
    }
}

/// A guest buffer: `len` bytes at guest physical address `addr`, checked to lie
/// in guest memory (possibly across adjacent regions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request, checked against the disk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the driver allows deallocation.
    pub unmap: bool,
}

impl SectorRange {
    /// Byte offset of the range on the disk.
    pub fn offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    /// Byte length of the range.
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }

    /// Whether the range covers no sectors.
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// A validated request, ready for the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: RequestType,
    /// First sector (IN/OUT; 0 otherwise).
    pub sector: u64,
    /// Data buffers in order: device-writable for IN/GET_ID, device-readable
    /// for OUT/DISCARD/WRITE_ZEROES, empty for FLUSH.
    pub data: Vec<Segment>,
    /// Sum of the `data` lengths.
    pub data_len: u64,
    /// DISCARD/WRITE_ZEROES ranges read from the data buffers.
    pub ranges: Vec<SectorRange>,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Device limits a request is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Addressable disk bytes (`capacity * 512`).
    pub disk_size: u64,
    /// Maximum number of data segments.
    pub seg_max: u32,
    /// Maximum segments in a DISCARD request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one DISCARD segment.
    pub max_discard_sectors: u32,
    /// Maximum segments in a WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Maximum sectors in one WRITE_ZEROES segment.
    pub max_write_zeroes_sectors: u32,
}

impl From<&BlkConfig> for Limits {
    fn from(c: &BlkConfig) -> Self {
        Limits {
            disk_size: c.capacity << SECTOR_SHIFT,
            seg_max: c.seg_max,
            max_discard_seg: c.max_discard_seg,
            max_discard_sectors: c.max_discard_sectors,
            max_write_zeroes_seg: c.max_write_zeroes_seg,
            max_write_zeroes_sectors: c.max_write_zeroes_sectors,
        }
    }
}

/// Why a chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no descriptors.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The last descriptor is device-readable, so it cannot hold the status.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor is empty")]
    StatusEmpty,
    /// The status byte is not in guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    /// The chain has a single descriptor: no room for both header and status.
    #[error("chain too short: no request header")]
    HeaderMissing,
    /// The first descriptor is device-writable.
    #[error("header descriptor is not device-readable")]
    HeaderNotReadable,
    /// The first descriptor is shorter than the 16-byte header.
    #[error("header descriptor is {0} bytes, need 16")]
    HeaderTooShort(u32),
    /// The header is not in guest memory.
    #[error("header at {0:#x} is outside guest memory")]
    HeaderOutOfMemory(u64),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// A data descriptor's direction does not match the request type.
    #[error("data descriptor at {addr:#x} has the wrong direction for the request type")]
    WrongDirection {
        /// Guest address of the offending buffer.
        addr: u64,
    },
    /// A data buffer is not (entirely) in guest memory.
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// More data descriptors than `seg_max`.
    #[error("{0} data segments exceed seg_max")]
    TooManySegments(usize),
    /// IN/OUT data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the disk (or overflows).
    #[error("sectors {sector}+{len} bytes are beyond the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// GET_ID buffer shorter than 20 bytes.
    #[error("GET_ID buffer is {0} bytes, need 20")]
    GetIdBufferTooShort(u64),
    /// DISCARD/WRITE_ZEROES data is empty or not a whole number of segments.
    #[error("segment table of {0} bytes is not a non-zero multiple of 16")]
    BadSegmentTable(u64),
    /// More DISCARD/WRITE_ZEROES segments than the device allows.
    #[error("{0} segments exceed the device limit")]
    TooManyRanges(u64),
    /// A DISCARD/WRITE_ZEROES segment covers more sectors than the device allows.
    #[error("segment of {0} sectors exceeds the device limit")]
    RangeTooLong(u32),
    /// A DISCARD/WRITE_ZEROES segment has flags the device does not know
    /// (or UNMAP on a DISCARD).
    #[error("segment flags {0:#x} not supported")]
    UnsupportedFlags(u32),
    /// Reading the segment table failed.
    #[error("cannot read the segment table")]
    SegmentTableRead,
}

impl ParseError {
    /// The status byte the request is completed with.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::UnsupportedType(_) | ParseError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain [`parse`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// What is wrong.
    pub error: ParseError,
    /// Where to write the error status, if the chain has a usable status
    /// byte; `None` means the chain cannot be answered and is returned to the
    /// driver with used length 0.
    pub status: Option<GuestAddress>,
}

/// A descriptor reduced to what the parser needs.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// A data piece with its direction, before type checks.
#[derive(Clone, Copy, Debug)]
struct Piece {
    seg: Segment,
    writable: bool,
}

/// Parse one descriptor chain into a [`Request`].
///
/// Never panics and never reads outside the guest memory of `chain`. On
/// failure the [`Rejection`] says whether and where the driver can be told.
pub fn parse<M>(mut chain: DescriptorChain<M>, limits: &Limits) -> Result<Request, Rejection>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // Keep at most this many leading descriptors; a longer chain is an error
    // anyway, but its last descriptor is still needed to answer it.
    let cap = limits.seg_max as usize + 2;
    let mut descs: Vec<Desc> = Vec::new();
    let mut count = 0usize;
    let mut last: Option<Desc> = None;
    for d in &mut chain {
        let d = Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        };
        if descs.len() < cap {
            descs.push(d);
        }
        last = Some(d);
        count += 1;
    }
    let Some(status_desc) = last else {
        return Err(reject(ParseError::EmptyChain, None));
    };
    let mem = chain.memory();

    // The status byte: last byte of the last descriptor.
    if !status_desc.writable {
        return Err(reject(ParseError::StatusNotWritable, None));
    }
    if status_desc.len == 0 {
        return Err(reject(ParseError::StatusEmpty, None));
    }
    let status = match status_desc.addr.checked_add(u64::from(status_desc.len) - 1) {
        Some(a) if mem.check_range(a, 1, Permissions::Write) => a,
        Some(a) => return Err(reject(ParseError::StatusOutOfMemory(a.0), None)),
        None => return Err(reject(ParseError::StatusOutOfMemory(u64::MAX), None)),
    };
    let fail = |e: ParseError| reject(e, Some(status));

    // The header.
    if count < 2 {
        return Err(fail(ParseError::HeaderMissing));
    }
    let header_desc = descs[0];
    if header_desc.writable {
        return Err(fail(ParseError::HeaderNotReadable));
    }
    if header_desc.len < HEADER_SIZE {
        return Err(fail(ParseError::HeaderTooShort(header_desc.len)));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    if !mem.check_range(header_desc.addr, header.len(), Permissions::Read)
        || mem.read_slice(&mut header, header_desc.addr).is_err()
    {
        return Err(fail(ParseError::HeaderOutOfMemory(header_desc.addr.0)));
    }
    let raw_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let kind = RequestType::from_raw(raw_type);
    if let RequestType::Unsupported(t) = kind {
        return Err(fail(ParseError::UnsupportedType(t)));
    }

    // Data pieces: header remainder, middle descriptors, status prefix.
    if count > cap {
        return Err(fail(ParseError::TooManySegments(count - 2)));
    }
    let mut pieces: Vec<Piece> = Vec::with_capacity(descs.len());
    let mut push =
        |addr: Option<GuestAddress>, len: u32, writable: bool| -> Result<(), Rejection> {
            if len == 0 {
                return Ok(());
            }
            let addr = addr.ok_or_else(|| {
                fail(ParseError::DataOutOfMemory {
                    addr: u64::MAX,
                    len,
                })
            })?;
            pieces.push(Piece {
                seg: Segment { addr, len },
                writable,
            });
            Ok(())
        };
    push(
        header_desc.addr.checked_add(u64::from(HEADER_SIZE)),
        header_desc.len - HEADER_SIZE,
        false,
    )?;
    for d in &descs[1..count - 1] {
        push(Some(d.addr), d.len, d.writable)?;
    }
    push(Some(status_desc.addr), status_desc.len - 1, true)?;

    let Some(want_writable) = kind.data_device_writable() else {
        // FLUSH: no data; anything supplied is ignored.
        return Ok(Request {
            kind,
            sector: 0,
            data: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status,
        });
    };

    if pieces.len() > limits.seg_max as usize {
        return Err(fail(ParseError::TooManySegments(pieces.len())));
    }
    let access = if want_writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut data = Vec::with_capacity(pieces.len());
    let mut data_len: u64 = 0;
    for p in &pieces {
        if p.writable != want_writable {
            return Err(fail(ParseError::WrongDirection { addr: p.seg.addr.0 }));
        }
        if !mem.check_range(p.seg.addr, p.seg.len as usize, access) {
            return Err(fail(ParseError::DataOutOfMemory {
                addr: p.seg.addr.0,
                len: p.seg.len,
            }));
        }
        data_len += u64::from(p.seg.len);
        data.push(p.seg);
    }

    let mut req = Request {
        kind,
        sector: 0,
        data,
        data_len,
        ranges: Vec::new(),
        status,
    };
    match kind {
        RequestType::In | RequestType::Out => {
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(ParseError::UnalignedLength(data_len)));
            }
            check_range(sector, data_len, limits.disk_size).map_err(fail)?;
            req.sector = sector;
        }
        RequestType::GetId => {
            if data_len < u64::from(ID_BYTES) {
                return Err(fail(ParseError::GetIdBufferTooShort(data_len)));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            req.ranges = parse_ranges(mem, &req, limits).map_err(fail)?;
        }
        RequestType::Flush | RequestType::Unsupported(_) => unreachable!("handled above"),
    }
    Ok(req)
}

fn reject(error: ParseError, status: Option<GuestAddress>) -> Rejection {
    Rejection { error, status }
}

/// Check that `len` bytes from `sector` lie within a disk of `disk_size` bytes.
fn check_range(sector: u64, len: u64, disk_size: u64) -> Result<(), ParseError> {
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len));
    match end {
        Some(end) if end <= disk_size => Ok(()),
        _ => Err(ParseError::OutOfRange { sector, len }),
    }
}

/// Read and validate the DISCARD/WRITE_ZEROES segment table held in `req.data`.
fn parse_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    req: &Request,
    limits: &Limits,
) -> Result<Vec<SectorRange>, ParseError> {
    let (max_seg, max_sectors) = if req.kind == RequestType::Discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let seg_size = u64::from(DISCARD_SEGMENT_SIZE);
    if req.data_len == 0 || !req.data_len.is_multiple_of(seg_size) {
        return Err(ParseError::BadSegmentTable(req.data_len));
    }
    let n = req.data_len / seg_size;
    if n > u64::from(max_seg) {
        return Err(ParseError::TooManyRanges(n));
    }
    // n <= max_seg, so this is a small allocation.
    let mut table = vec![0u8; req.data_len as usize];
    let mut off = 0usize;
    for seg in &req.data {
        let dst = &mut table[off..off + seg.len as usize];
        mem.read_slice(dst, seg.addr)
            .map_err(|_| ParseError::SegmentTableRead)?;
        off += seg.len as usize;
    }
    let mut ranges = Vec::with_capacity(n as usize);
    for raw in table.chunks_exact(DISCARD_SEGMENT_SIZE as usize) {
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap());
        let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap());
        let unmap = match req.kind {
            // UNMAP is reserved for DISCARD: the spec wants UNSUPP.
            RequestType::Discard if flags != 0 => {
                return Err(ParseError::UnsupportedFlags(flags));
            }
            _ if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 => {
                return Err(ParseError::UnsupportedFlags(flags));
            }
            _ => flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        };
        if num_sectors > max_sectors {
            return Err(ParseError::RangeTooLong(num_sectors));
        }
        check_range(
            sector,
            u64::from(num_sectors) << SECTOR_SHIFT,
            limits.disk_size,
        )?;
        ranges.push(SectorRange {
            sector,
            num_sectors,
            unmap,
        });
    }
    Ok(ranges)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// Guest memory: queue area at 0, data region at 0x10000..0x100000, a
    /// hole, and a second region at 0x200000..0x300000.
    pub(crate) fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    pub(crate) const HDR: u64 = 0x1_0000;
    pub(crate) const DATA: u64 = 0x2_0000;
    pub(crate) const STATUS: u64 = 0x8_0000;
    pub(crate) const DISK: u64 = 1 << 20;

    pub(crate) fn limits() -> Limits {
        Limits::from(&BlkConfig::new(DISK, 1))
    }

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

    pub(crate) fn write_header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn run(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, Rejection> {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(chain, &limits())
    }

    fn err(r: Result<Request, Rejection>) -> (ParseError, Option<GuestAddress>) {
        let r = r.unwrap_err();
        (r.error, r.status)
    }

    #[test]
    fn read_multi_segment() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 8);
        let r = run(
            &mem,
            &[
                rd(HDR, 16),
                wr(DATA, 512),
                wr(DATA + 0x1000, 1024),
                wr(STATUS, 1),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data_len, 1536);
        assert_eq!(
            r.data,
            vec![
                Segment {
                    addr: GuestAddress(DATA),
                    len: 512
                },
                Segment {
                    addr: GuestAddress(DATA + 0x1000),
                    len: 1024
                }
            ]
        );
        assert_eq!(r.status, GuestAddress(STATUS));
    }

    #[test]
    fn any_layout_header_and_status_carry_data() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        // Header + 512 bytes of data in one descriptor.
        let r = run(&mem, &[rd(HDR, 16 + 512), wr(STATUS, 1)]).unwrap();
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(HDR + 16),
                len: 512
            }]
        );
        // IN: data + status in the last descriptor, status is its last byte.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let r = run(&mem, &[rd(HDR, 16), wr(DATA, 513)]).unwrap();
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(DATA),
                len: 512
            }]
        );
        assert_eq!(r.status, GuestAddress(DATA + 512));
    }

    #[test]
    fn bad_lengths() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::UnalignedLength(100));
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(s, Some(GuestAddress(STATUS)));
        // Segments need not be sector multiples individually, only in total.
        run(
            &mem,
            &[
                rd(HDR, 16),
                wr(DATA, 100),
                wr(DATA + 100, 412),
                wr(STATUS, 1),
            ],
        )
        .unwrap();
        // Header too short.
        let (e, s) = err(run(&mem, &[rd(HDR, 8), wr(DATA, 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::HeaderTooShort(8));
        assert_eq!(s, Some(GuestAddress(STATUS)));
        // Empty status descriptor.
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 0)]));
        assert_eq!((e, s), (ParseError::StatusEmpty, None));
    }

    #[test]
    fn out_of_range_sectors() {
        let mem = test_mem();
        let last = DISK / 512 - 1;
        write_header(&mem, VIRTIO_BLK_T_IN, last);
        run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]).unwrap();
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)]));
        assert_eq!(
            e,
            ParseError::OutOfRange {
                sector: last,
                len: 1024
            }
        );
        // Overflowing sector numbers.
        write_header(&mem, VIRTIO_BLK_T_OUT, u64::MAX / 256);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::OutOfRange { .. }));
        write_header(&mem, VIRTIO_BLK_T_OUT, u64::MAX);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::OutOfRange { .. }));
        // Zero-length read at the end is fine.
        write_header(&mem, VIRTIO_BLK_T_IN, DISK / 512);
        run(&mem, &[rd(HDR, 16), wr(STATUS, 1)]).unwrap();
    }

    #[test]
    fn chains_too_short() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        // A lone writable descriptor: answerable, but no header.
        let (e, s) = err(run(&mem, &[wr(STATUS, 1)]));
        assert_eq!(
            (e, s),
            (ParseError::HeaderMissing, Some(GuestAddress(STATUS)))
        );
        // A lone readable descriptor: nowhere to put a status.
        let (e, s) = err(run(&mem, &[rd(HDR, 16)]));
        assert_eq!((e, s), (ParseError::StatusNotWritable, None));
    }

    #[test]
    fn wrong_direction() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let (e, s) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::WrongDirection { addr: DATA });
        assert_eq!(s, Some(GuestAddress(STATUS)));
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::WrongDirection { addr: DATA });
        // Header writable.
        let (e, _) = err(run(&mem, &[wr(HDR, 16), rd(DATA, 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::HeaderNotReadable);
        // IN with header remainder (device-readable) as data.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let (e, _) = err(run(&mem, &[rd(HDR, 16 + 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::WrongDirection { addr: HDR + 16 });
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 16), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::WrongDirection { addr: DATA });
    }

    #[test]
    fn status_not_writable() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 512), rd(STATUS, 1)]));
        assert_eq!((e, s), (ParseError::StatusNotWritable, None));
    }

    #[test]
    fn addresses_outside_memory() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        // Data in the hole between regions.
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(0x18_0000, 512), wr(STATUS, 1)]));
        assert_eq!(
            e,
            ParseError::DataOutOfMemory {
                addr: 0x18_0000,
                len: 512
            }
        );
        assert!(s.is_some());
        // Data straddling the end of the first region into the hole.
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(0xf_ff00, 512), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::DataOutOfMemory { .. }));
        // Data in the second region is fine.
        run(&mem, &[rd(HDR, 16), wr(0x20_0000, 512), wr(STATUS, 1)]).unwrap();
        // Status outside memory: unanswerable.
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(0x4000_0000, 1)]));
        assert_eq!((e, s), (ParseError::StatusOutOfMemory(0x4000_0000), None));
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(u64::MAX, 2)]));
        assert_eq!((e, s), (ParseError::StatusOutOfMemory(u64::MAX), None));
        // Header outside memory: answerable.
        let (e, s) = err(run(&mem, &[rd(0x18_0000, 16), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::HeaderOutOfMemory(0x18_0000));
        assert!(s.is_some());
    }

    #[test]
    fn get_id() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_GET_ID, 12345);
        let r = run(&mem, &[rd(HDR, 16), wr(DATA, 20), wr(STATUS, 1)]).unwrap();
        assert_eq!(r.kind, RequestType::GetId);
        assert_eq!(r.data_len, 20);
        let r = run(
            &mem,
            &[rd(HDR, 16), wr(DATA, 10), wr(DATA + 64, 64), wr(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.data_len, 74);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 19), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::GetIdBufferTooShort(19));
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 20), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::WrongDirection { .. }));
    }

    fn write_segments(mem: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) {
        for (i, (s, n, f)) in segs.iter().enumerate() {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&s.to_le_bytes());
            b[8..12].copy_from_slice(&n.to_le_bytes());
            b[12..16].copy_from_slice(&f.to_le_bytes());
            mem.write_slice(&b, GuestAddress(DATA + 16 * i as u64))
                .unwrap();
        }
    }

    #[test]
    fn discard_segments() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        write_segments(&mem, &[(0, 8, 0), (64, 16, 0)]);
        let r = run(&mem, &[rd(HDR, 16), rd(DATA, 32), wr(STATUS, 1)]).unwrap();
        assert_eq!(
            r.ranges,
            vec![
                SectorRange {
                    sector: 0,
                    num_sectors: 8,
                    unmap: false
                },
                SectorRange {
                    sector: 64,
                    num_sectors: 16,
                    unmap: false
                }
            ]
        );
        // Table split across two descriptors mid-segment.
        let r = run(
            &mem,
            &[rd(HDR, 16), rd(DATA, 10), rd(DATA + 10, 22), wr(STATUS, 1)],
        )
        .unwrap();
        assert_eq!(r.ranges.len(), 2);
        // Not a whole number of segments / empty.
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 24), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::BadSegmentTable(24));
        let (e, _) = err(run(&mem, &[rd(HDR, 16), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::BadSegmentTable(0));
        // Too many segments.
        let n = crate::config::MAX_DISCARD_SEG + 1;
        write_segments(&mem, &vec![(0, 1, 0); n as usize]);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 16 * n), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::TooManyRanges(u64::from(n)));
        // UNMAP on discard -> UNSUPP.
        write_segments(&mem, &[(0, 8, 1)]);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::UnsupportedFlags(1));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Range past the end.
        write_segments(&mem, &[(DISK / 512 - 4, 8, 0)]);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::OutOfRange { .. }));
        // Too many sectors in one segment.
        write_segments(&mem, &[(0, crate::config::MAX_DISCARD_SECTORS + 1, 0)]);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]));
        assert!(matches!(e, ParseError::RangeTooLong(_)));
    }

    #[test]
    fn write_zeroes_flags() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segments(&mem, &[(8, 8, 1)]);
        let r = run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]).unwrap();
        assert_eq!(
            r.ranges,
            vec![SectorRange {
                sector: 8,
                num_sectors: 8,
                unmap: true
            }]
        );
        write_segments(&mem, &[(8, 8, 2)]);
        let (e, _) = err(run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::UnsupportedFlags(2));
    }

    #[test]
    fn flush_and_unsupported() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 99);
        let r = run(&mem, &[rd(HDR, 16), wr(STATUS, 1)]).unwrap();
        assert_eq!((r.kind, r.data_len), (RequestType::Flush, 0));
        write_header(&mem, 2 /* SCSI_CMD */, 0);
        let (e, s) = err(run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]));
        assert_eq!(e, ParseError::UnsupportedType(2));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        assert!(s.is_some());
    }

    #[test]
    fn too_many_segments() {
        let mem = test_mem();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut d = vec![rd(HDR, 16)];
        for i in 0..(crate::config::SEG_MAX as u64 + 1) {
            d.push(wr(DATA + i * 512, 512));
        }
        d.push(wr(STATUS, 1));
        // MockSplitQueue needs a queue big enough for the chain.
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 512);
        let chain = q.build_desc_chain(&d).unwrap();
        let r = parse(chain, &limits()).unwrap_err();
        assert!(matches!(r.error, ParseError::TooManySegments(_)));
        assert_eq!(r.status, Some(GuestAddress(STATUS)));
    }
}
