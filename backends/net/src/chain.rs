//! Parsing of virtio-net descriptor chains (virtio 1.2 §5.1.6): transmit
//! chains, receive buffers and control-queue commands.
//!
//! The parsers are pure functions of the chain and the guest memory it points
//! into (only control commands read guest memory, nothing is written). Every
//! guest-controlled address, length and direction is validated here; a chain
//! that fails is malformed and is returned to the driver with used length 0.

use std::fmt;
use std::ops::Deref;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// `struct virtio_net_hdr_v1` with `num_buffers`: always 12 bytes with VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest frame (Ethernet header) after the virtio-net header.
pub const MIN_FRAME: usize = 14;
/// Largest transmit chain (header + a 64 KiB GSO frame + Ethernet header).
pub const MAX_TX_LEN: u64 = (VNET_HDR_LEN + MIN_FRAME + 65535) as u64;
/// Most bytes of command data accepted on the control queue.
pub const MAX_CTRL_DATA: usize = 4096;

/// A guest buffer checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptors (or only empty ones).
    Empty,
    /// The first descriptor cannot hold the 12-byte virtio-net header.
    HeaderTooShort(u32),
    /// Descriptor `index` has the wrong direction (rx: not device-writable,
    /// tx: not device-readable, ctrl: readable after writable).
    WrongDirection(usize),
    /// A buffer lies (partly) outside guest memory.
    OutOfRange { addr: u64, len: u32 },
    /// A transmit frame shorter than an Ethernet header.
    FrameTooShort(u64),
    /// A transmit chain longer than the largest frame.
    TooLong(u64),
    /// A control command without class/command bytes or without an ack byte.
    BadCommand,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Empty => write!(f, "empty chain"),
            ChainError::HeaderTooShort(n) => {
                write!(f, "header descriptor of {n} bytes (< {VNET_HDR_LEN})")
            }
            ChainError::WrongDirection(i) => write!(f, "descriptor {i} has the wrong direction"),
            ChainError::OutOfRange { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} outside guest memory")
            }
            ChainError::FrameTooShort(n) => write!(f, "frame of {n} bytes"),
            ChainError::TooLong(n) => write!(f, "chain of {n} bytes"),
            ChainError::BadCommand => write!(f, "malformed control command"),
        }
    }
}

/// A malformed chain: its head (to return it) and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub head: u16,
    pub error: ChainError,
}

/// A frame to transmit: header and frame bytes, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxChain {
    pub head: u16,
    pub segments: Vec<Segment>,
    /// Total bytes including the header.
    pub len: u64,
}

/// Receive buffers of one chain, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxChain {
    pub head: u16,
    pub segments: Vec<Segment>,
    /// Total bytes the chain can hold.
    pub capacity: u64,
}

/// A control-queue command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlCommand {
    pub head: u16,
    pub class: u8,
    pub cmd: u8,
    pub data: Vec<u8>,
    /// Where the ack byte goes.
    pub ack: GuestAddress,
}

struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

fn collect<M>(chain: &mut DescriptorChain<M>) -> Vec<Desc>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // The iterator stops at the queue size (and on loops) by itself.
    chain
        .map(|d| Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        })
        .collect()
}

/// Check direction and range of every descriptor; zero-length ones are skipped.
fn segments<G: GuestMemory + ?Sized>(
    mem: &G,
    descs: &[Desc],
    writable: bool,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut segs = Vec::with_capacity(descs.len());
    let mut total = 0u64;
    for (i, d) in descs.iter().enumerate() {
        if d.writable != writable {
            return Err(ChainError::WrongDirection(i));
        }
        if d.len == 0 {
            continue;
        }
        if !mem.check_range(d.addr, d.len as usize, access) {
            return Err(ChainError::OutOfRange {
                addr: d.addr.0,
                len: d.len,
            });
        }
        total += u64::from(d.len);
        segs.push(Segment {
            addr: d.addr,
            len: d.len,
        });
    }
    Ok((segs, total))
}

fn check_header(descs: &[Desc]) -> Result<(), ChainError> {
    match descs.first() {
        None => Err(ChainError::Empty),
        Some(d) if (d.len as usize) < VNET_HDR_LEN => Err(ChainError::HeaderTooShort(d.len)),
        Some(_) => Ok(()),
    }
}

/// Parse a transmit chain: device-readable descriptors only, the first one
/// holding at least the virtio-net header, followed by at least an Ethernet
/// header of frame.
pub fn parse_tx<M>(mut chain: DescriptorChain<M>) -> Result<TxChain, Malformed>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let fail = |error| Malformed { head, error };
    let descs = collect(&mut chain);
    check_header(&descs).map_err(fail)?;
    let (segments, len) = segments(chain.memory(), &descs, false).map_err(fail)?;
    if len < (VNET_HDR_LEN + MIN_FRAME) as u64 {
        return Err(fail(ChainError::FrameTooShort(
            len.saturating_sub(VNET_HDR_LEN as u64),
        )));
    }
    if len > MAX_TX_LEN {
        return Err(fail(ChainError::TooLong(len)));
    }
    Ok(TxChain {
        head,
        segments,
        len,
    })
}

/// Parse a receive chain: device-writable descriptors only, the first one
/// large enough for the virtio-net header.
pub fn parse_rx<M>(mut chain: DescriptorChain<M>) -> Result<RxChain, Malformed>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let fail = |error| Malformed { head, error };
    let descs = collect(&mut chain);
    check_header(&descs).map_err(fail)?;
    let (segments, capacity) = segments(chain.memory(), &descs, true).map_err(fail)?;
    Ok(RxChain {
        head,
        segments,
        capacity,
    })
}

/// Parse a control command: device-readable `class`, `command` and data,
/// then a device-writable ack byte (first byte of the first writable descriptor).
pub fn parse_ctrl<M>(mut chain: DescriptorChain<M>) -> Result<CtrlCommand, Malformed>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let fail = |error| Malformed { head, error };
    let descs = collect(&mut chain);
    let Some(split) = descs.iter().position(|d| d.writable) else {
        return Err(fail(ChainError::BadCommand));
    };
    let mem = chain.memory();
    let (out, out_len) = segments(mem, &descs[..split], false).map_err(fail)?;
    let (inp, _) = segments(mem, &descs[split..], true).map_err(|e| match e {
        ChainError::WrongDirection(i) => fail(ChainError::WrongDirection(split + i)),
        e => fail(e),
    })?;
    let Some(ack) = inp.first() else {
        return Err(fail(ChainError::BadCommand));
    };
    if out_len < 2 || out_len > (MAX_CTRL_DATA + 2) as u64 {
        return Err(fail(ChainError::BadCommand));
    }
    let mut bytes = Vec::with_capacity(out_len as usize);
    for s in &out {
        let start = bytes.len();
        bytes.resize(start + s.len as usize, 0);
        mem.read_slice(&mut bytes[start..], s.addr).map_err(|_| {
            fail(ChainError::OutOfRange {
                addr: s.addr.0,
                len: s.len,
            })
        })?;
    }
    Ok(CtrlCommand {
        head,
        class: bytes[0],
        cmd: bytes[1],
        data: bytes[2..].to_vec(),
        ack: ack.addr,
    })
}

/// The effect of an accepted control command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlEffect {
    None,
    /// `VQ_PAIRS_SET`: the driver now uses this many pairs.
    SetPairs(u16),
}

/// The ack (`VIRTIO_NET_OK` / `VIRTIO_NET_ERR`) for a control command on a
/// device with `max_pairs` queue pairs (`mq`: VIRTIO_NET_F_MQ negotiated).
///
/// Receive filtering (RX mode, MAC table) is accepted and not applied: the
/// tap hands us every frame the host routes to it, which is a superset.
pub fn ctrl_answer(c: &CtrlCommand, max_pairs: u16, mq: bool) -> (u8, CtrlEffect) {
    let ok = (VIRTIO_NET_OK as u8, CtrlEffect::None);
    let err = (VIRTIO_NET_ERR as u8, CtrlEffect::None);
    match (u32::from(c.class), u32::from(c.cmd)) {
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
            if !mq || c.data.len() != 2 {
                return err;
            }
            let n = u16::from_le_bytes([c.data[0], c.data[1]]);
            if n == 0 || n > max_pairs {
                return err;
            }
            (VIRTIO_NET_OK as u8, CtrlEffect::SetPairs(n))
        }
        (VIRTIO_NET_CTRL_RX, cmd) if cmd <= VIRTIO_NET_CTRL_RX_NOBCAST && c.data.len() == 1 => ok,
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if c.data.len() == 6 => ok,
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if mac_tables_valid(&c.data) => ok,
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => ok,
        _ => err,
    }
}

/// Two `virtio_net_ctrl_mac` tables (u32 entries, then 6 bytes per entry).
fn mac_tables_valid(data: &[u8]) -> bool {
    let mut rest = data;
    for _ in 0..2 {
        let Some((n, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let n = u32::from_le_bytes(*n) as usize;
        let Some(tail) = n.checked_mul(6).and_then(|b| tail.get(b..)) else {
            return false;
        };
        rest = tail;
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    /// Queue area at 0, buffers at 0x10000..0x100000, a hole, a second region.
    fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    const BUF: u64 = 0x1_0000;

    fn rd(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
    }

    fn wr(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            addr,
            len,
            VRING_DESC_F_WRITE as u16,
            0,
        ))
    }

    fn tx(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<TxChain, ChainError> {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        parse_tx(q.build_desc_chain(descs).unwrap()).map_err(|m| m.error)
    }

    fn rx(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<RxChain, ChainError> {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        parse_rx(q.build_desc_chain(descs).unwrap()).map_err(|m| m.error)
    }

    fn ctrl(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<CtrlCommand, ChainError> {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        parse_ctrl(q.build_desc_chain(descs).unwrap()).map_err(|m| m.error)
    }

    #[test]
    fn tx_header_and_frame() {
        let mem = test_mem();
        let t = tx(&mem, &[rd(BUF, 12), rd(BUF + 0x100, 60), rd(0x20_0000, 40)]).unwrap();
        assert_eq!(t.len, 112);
        assert_eq!(t.segments.len(), 3);
        assert_eq!(t.segments[2].addr, GuestAddress(0x20_0000));
        // Header and frame in one descriptor (ANY_LAYOUT).
        let t = tx(&mem, &[rd(BUF, 12 + 60)]).unwrap();
        assert_eq!(t.len, 72);
        // Zero-length descriptors are ignored.
        let t = tx(
            &mem,
            &[rd(BUF, 12), rd(BUF + 0x100, 0), rd(BUF + 0x200, 14)],
        )
        .unwrap();
        assert_eq!(t.segments.len(), 2);
    }

    #[test]
    fn tx_header_too_short() {
        let mem = test_mem();
        assert_eq!(
            tx(&mem, &[rd(BUF, 10), rd(BUF + 0x100, 60)]),
            Err(ChainError::HeaderTooShort(10))
        );
    }

    #[test]
    fn tx_wrong_direction() {
        let mem = test_mem();
        assert_eq!(
            tx(&mem, &[rd(BUF, 12), wr(BUF + 0x100, 60)]),
            Err(ChainError::WrongDirection(1))
        );
        assert_eq!(tx(&mem, &[wr(BUF, 72)]), Err(ChainError::WrongDirection(0)));
    }

    #[test]
    fn tx_out_of_range() {
        let mem = test_mem();
        // In the hole between the regions.
        assert_eq!(
            tx(&mem, &[rd(BUF, 12), rd(0x18_0000, 60)]),
            Err(ChainError::OutOfRange {
                addr: 0x18_0000,
                len: 60
            })
        );
        // Running off the end of the first region.
        assert!(matches!(
            tx(&mem, &[rd(BUF, 12), rd(0xf_fff0, 60)]),
            Err(ChainError::OutOfRange { .. })
        ));
        // Past all memory.
        assert!(matches!(
            tx(&mem, &[rd(u64::MAX - 4, 12), rd(BUF, 60)]),
            Err(ChainError::OutOfRange { .. })
        ));
    }

    #[test]
    fn tx_sizes() {
        let mem = test_mem();
        assert_eq!(
            tx(&mem, &[rd(BUF, 12), rd(BUF + 0x100, 13)]),
            Err(ChainError::FrameTooShort(13))
        );
        assert_eq!(
            tx(&mem, &[rd(BUF, 12), rd(BUF + 0x100, 0x2_0000)]),
            Err(ChainError::TooLong(12 + 0x2_0000))
        );
    }

    #[test]
    fn rx_buffers() {
        let mem = test_mem();
        let r = rx(&mem, &[wr(BUF, 1526)]).unwrap();
        assert_eq!(r.capacity, 1526);
        let r = rx(
            &mem,
            &[wr(BUF, 12), wr(BUF + 0x1000, 4096), wr(0x20_0000, 100)],
        )
        .unwrap();
        assert_eq!(r.capacity, 12 + 4096 + 100);
        assert_eq!(r.segments.len(), 3);
    }

    #[test]
    fn rx_malformed() {
        let mem = test_mem();
        assert_eq!(
            rx(&mem, &[wr(BUF, 8), wr(BUF + 0x100, 1500)]),
            Err(ChainError::HeaderTooShort(8))
        );
        assert_eq!(
            rx(&mem, &[rd(BUF, 1526)]),
            Err(ChainError::WrongDirection(0))
        );
        assert_eq!(
            rx(&mem, &[wr(BUF, 12), rd(BUF + 0x100, 1500)]),
            Err(ChainError::WrongDirection(1))
        );
        assert!(matches!(
            rx(&mem, &[wr(BUF, 12), wr(0x30_0000, 1500)]),
            Err(ChainError::OutOfRange { .. })
        ));
    }

    fn write(mem: &GuestMemoryMmap, at: u64, b: &[u8]) {
        mem.write_slice(b, GuestAddress(at)).unwrap();
    }

    #[test]
    fn ctrl_commands() {
        let mem = test_mem();
        write(&mem, BUF, &[VIRTIO_NET_CTRL_MQ as u8, 0]);
        write(&mem, BUF + 0x100, &2u16.to_le_bytes());
        let c = ctrl(&mem, &[rd(BUF, 2), rd(BUF + 0x100, 2), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!((c.class, c.cmd), (VIRTIO_NET_CTRL_MQ as u8, 0));
        assert_eq!(c.data, vec![2, 0]);
        assert_eq!(c.ack, GuestAddress(BUF + 0x200));
        assert_eq!(
            ctrl_answer(&c, 2, true),
            (VIRTIO_NET_OK as u8, CtrlEffect::SetPairs(2))
        );
        assert_eq!(ctrl_answer(&c, 1, true).0, VIRTIO_NET_ERR as u8);
        assert_eq!(ctrl_answer(&c, 2, false).0, VIRTIO_NET_ERR as u8);
        // All in one readable descriptor; zero pairs refused.
        write(&mem, BUF, &[VIRTIO_NET_CTRL_MQ as u8, 0, 0, 0]);
        let c = ctrl(&mem, &[rd(BUF, 4), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!(ctrl_answer(&c, 2, true).0, VIRTIO_NET_ERR as u8);
        // RX mode: accepted.
        write(&mem, BUF, &[VIRTIO_NET_CTRL_RX as u8, 0, 1]);
        let c = ctrl(&mem, &[rd(BUF, 3), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!(ctrl_answer(&c, 1, false).0, VIRTIO_NET_OK as u8);
        // MAC table: two empty tables accepted, a truncated one refused.
        write(
            &mem,
            BUF,
            &[VIRTIO_NET_CTRL_MAC as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let c = ctrl(&mem, &[rd(BUF, 10), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!(ctrl_answer(&c, 1, false).0, VIRTIO_NET_OK as u8);
        write(
            &mem,
            BUF,
            &[VIRTIO_NET_CTRL_MAC as u8, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        );
        let c = ctrl(&mem, &[rd(BUF, 10), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!(ctrl_answer(&c, 1, false).0, VIRTIO_NET_ERR as u8);
        // Unknown class.
        write(&mem, BUF, &[99, 0]);
        let c = ctrl(&mem, &[rd(BUF, 2), wr(BUF + 0x200, 1)]).unwrap();
        assert_eq!(ctrl_answer(&c, 1, false).0, VIRTIO_NET_ERR as u8);
    }

    #[test]
    fn ctrl_malformed() {
        let mem = test_mem();
        // No ack descriptor.
        assert_eq!(ctrl(&mem, &[rd(BUF, 2)]), Err(ChainError::BadCommand));
        // No class/command.
        assert_eq!(
            ctrl(&mem, &[rd(BUF, 1), wr(BUF + 0x200, 1)]),
            Err(ChainError::BadCommand)
        );
        // Readable after writable.
        assert_eq!(
            ctrl(&mem, &[rd(BUF, 2), wr(BUF + 0x200, 1), rd(BUF, 2)]),
            Err(ChainError::WrongDirection(2))
        );
        // Ack outside memory.
        assert!(matches!(
            ctrl(&mem, &[rd(BUF, 2), wr(0x18_0000, 1)]),
            Err(ChainError::OutOfRange { .. })
        ));
    }
}
