//! A minimal virtio-net driver over the vhost-user frontend of this crate,
//! for driving `tern-net` without a VMM: queue pairs laid out as
//! rx0, tx0, rx1, tx1, ..., ctrl; receive buffers posted from the data
//! region; frames sent with the 12-byte `virtio_net_hdr_v1`.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::{guest_memory_sized, layout, Desc, Used, VirtQueue};

/// virtio-net feature bits and constants (virtio 1.2 §5.1).
pub mod feat {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    /// Control classes / commands / acks.
    pub const CTRL_RX: u8 = 0;
    pub const CTRL_MAC: u8 = 1;
    pub const CTRL_MQ: u8 = 4;
    pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
}

/// Size of `virtio_net_hdr_v1` (with `num_buffers`).
pub const HDR_LEN: usize = 12;

/// `virtio_net_hdr` flags and GSO types.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;

/// A `virtio_net_hdr_v1` asking the device for TCP/IPv4 segmentation (and
/// the checksums) of a frame whose Ethernet, IPv4 and TCP headers take
/// `hdr_len` bytes (TCP at `l4_start`), in segments of `mss` payload bytes.
/// The frame's TCP checksum field must hold the folded pseudo-header sum
/// (see [`pkt::tcp_partial`]). Needs HOST_TSO4 (and CSUM) negotiated.
pub fn tso4_hdr(hdr_len: u16, l4_start: u16, mss: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = HDR_F_NEEDS_CSUM;
    h[1] = GSO_TCPV4;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&l4_start.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // TCP checksum offset
    h
}

/// How to connect a [`NetFrontend`].
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Features to accept if offered (PROTOCOL_FEATURES is always accepted).
    pub features: u64,
    /// Entries per queue (power of two, at most 1024).
    pub queue_size: u16,
    /// Bytes of the data region.
    pub data_size: u64,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            features: feat::VERSION_1
                | feat::MAC
                | feat::STATUS
                | feat::MTU
                | feat::CTRL_VQ
                | feat::MQ
                | feat::EVENT_IDX,
            queue_size: 256,
            data_size: 32 << 20,
        }
    }
}

/// A received frame.
#[derive(Clone, Debug)]
pub struct RxFrame {
    /// The virtio-net header as the device wrote it.
    pub hdr: [u8; HDR_LEN],
    /// The Ethernet frame.
    pub data: Vec<u8>,
    /// `num_buffers` from the header.
    pub num_buffers: u16,
    /// Used length of each buffer the frame occupied.
    pub used_lens: Vec<u32>,
}

/// A posted receive buffer.
#[derive(Clone, Copy, Debug)]
struct Posted {
    head: u16,
    addr: u64,
}

/// A connected vhost-user virtio-net frontend.
pub struct NetFrontend {
    pub frontend: Frontend,
    pub mem: GuestMemoryMmap,
    /// rx0, tx0, rx1, tx1, ..., ctrl (if CTRL_VQ was negotiated).
    pub queues: Vec<VirtQueue>,
    pub features: u64,
    /// Queue pairs of the device.
    pub pairs: usize,
    data_size: u64,
    next_data: u64,
    posted: Vec<VecDeque<Posted>>,
}

impl NetFrontend {
    /// Connect to `socket`, negotiate, share memory and start every queue.
    pub fn connect(socket: &Path, o: &NetOptions) -> Result<NetFrontend, String> {
        if !o.queue_size.is_power_of_two() || o.queue_size > 1024 {
            return Err(format!("queue size {}", o.queue_size));
        }
        let e = |what: &'static str| move |err: vhost::Error| format!("vhost-user {what}: {err}");
        let mut frontend = Frontend::connect(socket, 1).map_err(e("connect"))?;
        frontend.set_owner().map_err(e("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(e("GET_FEATURES"))?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES".into());
        }
        let features = offered & (o.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        frontend.set_features(features).map_err(e("SET_FEATURES"))?;
        let proto = frontend
            .get_protocol_features()
            .map_err(e("GET_PROTOCOL_FEATURES"))?;
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if !proto.contains(wanted) {
            return Err(format!("protocol features {proto:?} lack {wanted:?}"));
        }
        frontend
            .set_protocol_features(wanted)
            .map_err(e("SET_PROTOCOL_FEATURES"))?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let qnum = frontend.get_queue_num().map_err(e("GET_QUEUE_NUM"))? as usize;
        let cfg = vec![0u8; 12];
        let (_, cfg) = frontend
            .get_config(0, 12, VhostUserConfigFlags::empty(), &cfg)
            .map_err(e("GET_CONFIG"))?;
        let pairs = usize::from(u16::from_le_bytes([cfg[8], cfg[9]])).max(1);
        let num_queues = if features & feat::CTRL_VQ != 0 {
            2 * pairs + 1
        } else {
            2 * pairs
        };
        if num_queues > qnum || num_queues > layout::MAX_QUEUES {
            return Err(format!(
                "{num_queues} queues needed, backend has {qnum}, driver supports {}",
                layout::MAX_QUEUES
            ));
        }

        let mem = guest_memory_sized(o.data_size);
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let hva = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let event_idx = features & feat::EVENT_IDX != 0;
        let mut queues = Vec::new();
        for i in 0..num_queues {
            // The control queue is the device's last queue.
            let index = if i == 2 * pairs { qnum - 1 } else { i };
            let q = VirtQueue::new(i, o.queue_size, event_idx);
            frontend
                .set_vring_num(index, q.size)
                .map_err(e("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(
                    index,
                    &VringConfigData {
                        queue_max_size: q.size,
                        queue_size: q.size,
                        flags: 0,
                        desc_table_addr: hva(q.desc),
                        used_ring_addr: hva(q.used),
                        avail_ring_addr: hva(q.avail),
                        log_addr: None,
                    },
                )
                .map_err(e("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(index, 0)
                .map_err(e("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(index, &q.call)
                .map_err(e("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(index, &q.kick)
                .map_err(e("SET_VRING_KICK"))?;
            frontend
                .set_vring_enable(index, true)
                .map_err(e("SET_VRING_ENABLE"))?;
            queues.push(q);
        }
        Ok(NetFrontend {
            frontend,
            mem,
            queues,
            features,
            pairs,
            data_size: o.data_size,
            next_data: layout::DATA_REGION,
            posted: vec![VecDeque::new(); pairs],
        })
    }

    /// Whether feature bit(s) `f` were negotiated.
    pub fn has(&self, f: u64) -> bool {
        self.features & f == f
    }

    /// Read `size` bytes of device configuration space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .unwrap();
        data
    }

    /// The MAC address from the configuration space.
    pub fn mac(&mut self) -> [u8; 6] {
        self.config(0, 6).try_into().unwrap()
    }

    /// Allocate `len` bytes of the data region (8-byte aligned).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_data.div_ceil(8) * 8;
        assert!(
            a + len <= layout::DATA_REGION + self.data_size,
            "data region exhausted"
        );
        self.next_data = a + len;
        a
    }

    /// Write `bytes` into guest memory at `addr`.
    pub fn poke(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// Index of the rx queue of `pair` in [`queues`](Self::queues).
    pub fn rx_index(pair: usize) -> usize {
        2 * pair
    }

    /// Index of the tx queue of `pair`.
    pub fn tx_index(pair: usize) -> usize {
        2 * pair + 1
    }

    /// Post `n` receive buffers of `size` bytes on `pair` (one descriptor
    /// each) and kick if `kick`.
    pub fn post_rx(&mut self, pair: usize, n: usize, size: u32, kick: bool) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(size));
            let q = &mut self.queues[Self::rx_index(pair)];
            let head = q.add_chain(
                &self.mem,
                &[Desc {
                    addr,
                    len: size,
                    write: true,
                }],
            );
            self.posted[pair].push_back(Posted { head, addr });
        }
        if kick {
            self.queues[Self::rx_index(pair)].kick();
        }
    }

    /// Post a raw receive chain (not tracked: its completion is returned by
    /// [`wait_rx_used`](Self::wait_rx_used)).
    pub fn post_rx_raw(&mut self, pair: usize, chain: &[Desc]) -> u16 {
        let q = &mut self.queues[Self::rx_index(pair)];
        let head = q.add_chain(&self.mem, chain);
        q.kick();
        head
    }

    /// Wait for the next used element of `pair`'s rx queue.
    pub fn wait_rx_used(&mut self, pair: usize, timeout: Duration) -> Option<Used> {
        self.queues[Self::rx_index(pair)].wait_used(&self.mem, timeout)
    }

    /// Receive buffers posted with [`post_rx`](Self::post_rx) not used yet.
    pub fn posted(&self, pair: usize) -> usize {
        self.posted[pair].len()
    }

    /// Receive the next frame on `pair` (buffers posted with
    /// [`post_rx`](Self::post_rx), used in order), or `None` after `timeout`.
    pub fn recv(&mut self, pair: usize, timeout: Duration) -> Option<RxFrame> {
        let first = self.wait_rx_used(pair, timeout)?;
        let mut bytes = self.take_posted(pair, first);
        let mut hdr = [0u8; HDR_LEN];
        assert!(
            bytes.len() >= HDR_LEN,
            "rx used length {} < header",
            first.len
        );
        hdr.copy_from_slice(&bytes[..HDR_LEN]);
        let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
        let mut used_lens = vec![first.len];
        for _ in 1..num_buffers.max(1) {
            let u = self
                .wait_rx_used(pair, timeout)
                .expect("rest of a merged frame");
            used_lens.push(u.len);
            bytes.extend(self.take_posted(pair, u));
        }
        Some(RxFrame {
            hdr,
            data: bytes[HDR_LEN..].to_vec(),
            num_buffers,
            used_lens,
        })
    }

    fn take_posted(&mut self, pair: usize, u: Used) -> Vec<u8> {
        let p = self.posted[pair]
            .pop_front()
            .expect("used element without a posted buffer");
        assert_eq!(p.head, u.id, "rx buffers used out of order");
        let mut v = vec![0u8; u.len as usize];
        self.mem.read_slice(&mut v, GuestAddress(p.addr)).unwrap();
        v
    }

    /// Send `frame` with header `hdr` on `pair` (header and frame in two
    /// descriptors) and wait for its completion.
    pub fn send_with_hdr(&mut self, pair: usize, hdr: &[u8; HDR_LEN], frame: &[u8]) -> Used {
        let h = self.alloc(HDR_LEN as u64);
        let f = self.alloc(frame.len() as u64);
        self.mem.write_slice(hdr, GuestAddress(h)).unwrap();
        self.mem.write_slice(frame, GuestAddress(f)).unwrap();
        self.send_raw(
            pair,
            &[
                Desc {
                    addr: h,
                    len: HDR_LEN as u32,
                    write: false,
                },
                Desc {
                    addr: f,
                    len: frame.len() as u32,
                    write: false,
                },
            ],
        )
    }

    /// Send `frame` with an all-zero header.
    pub fn send(&mut self, pair: usize, frame: &[u8]) -> Used {
        self.send_with_hdr(pair, &[0; HDR_LEN], frame)
    }

    /// Publish a raw chain on `pair`'s tx queue, kick, and wait for it.
    pub fn send_raw(&mut self, pair: usize, chain: &[Desc]) -> Used {
        let q = &mut self.queues[Self::tx_index(pair)];
        let head = q.add_chain(&self.mem, chain);
        q.kick();
        let u = q
            .wait_used(&self.mem, Duration::from_secs(10))
            .expect("tx completion timed out");
        assert_eq!(u.id, head, "tx completed chain");
        u
    }

    /// Send a control command and return (ack byte, used length).
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> (u8, u32) {
        let at = layout::HDR_BASE;
        let mut out = vec![class, cmd];
        out.extend_from_slice(data);
        self.mem.write_slice(&out, GuestAddress(at)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(at + 0x800))
            .unwrap();
        let q = self
            .queues
            .get_mut(2 * self.pairs)
            .expect("no control queue negotiated");
        let head = q.add_chain(
            &self.mem,
            &[
                Desc {
                    addr: at,
                    len: out.len() as u32,
                    write: false,
                },
                Desc {
                    addr: at + 0x800,
                    len: 1,
                    write: true,
                },
            ],
        );
        q.kick();
        let u = q
            .wait_used(&self.mem, Duration::from_secs(10))
            .expect("ctrl completion timed out");
        assert_eq!(u.id, head);
        let ack: u8 = self.mem.read_obj(GuestAddress(at + 0x800)).unwrap();
        (ack, u.len)
    }
}

/// Internet checksum (RFC 1071) of `data` with an initial `sum`.
pub fn inet_checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Minimal Ethernet/ARP/IPv4/ICMP/UDP frame builders and parsers.
pub mod pkt {
    use super::inet_checksum;

    pub const ETH_ARP: u16 = 0x0806;
    pub const ETH_IPV4: u16 = 0x0800;
    pub const PROTO_ICMP: u8 = 1;
    pub const PROTO_TCP: u8 = 6;
    pub const PROTO_UDP: u8 = 17;
    /// TCP flags.
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_PSH: u8 = 0x08;
    pub const TCP_ACK: u8 = 0x10;

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// Ethertype of a frame.
    pub fn ethertype(f: &[u8]) -> u16 {
        if f.len() < 14 {
            return 0;
        }
        u16::from_be_bytes([f[12], f[13]])
    }

    /// An ARP packet (op 1 request, 2 reply).
    pub fn arp(
        op: u16,
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src_ip: [u8; 4],
        target_mac: [u8; 6],
        target_ip: [u8; 4],
    ) -> Vec<u8> {
        let mut f = eth(dst_mac, src_mac, ETH_ARP);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&src_ip);
        f.extend_from_slice(&target_mac);
        f.extend_from_slice(&target_ip);
        f
    }

    /// An ARP request from `src` for `target_ip`, broadcast.
    pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        arp(1, [0xff; 6], src_mac, src_ip, [0; 6], target_ip)
    }

    /// ARP fields: (op, sender mac, sender ip, target mac, target ip).
    pub type Arp = (u16, [u8; 6], [u8; 4], [u8; 6], [u8; 4]);

    /// The ARP fields of a frame.
    pub fn parse_arp(f: &[u8]) -> Option<Arp> {
        if ethertype(f) != ETH_ARP || f.len() < 42 {
            return None;
        }
        let a = &f[14..];
        Some((
            u16::from_be_bytes([a[6], a[7]]),
            a[8..14].try_into().unwrap(),
            a[14..18].try_into().unwrap(),
            a[18..24].try_into().unwrap(),
            a[24..28].try_into().unwrap(),
        ))
    }

    /// An IPv4 frame with a correct header checksum.
    pub fn ipv4(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = eth(dst_mac, src_mac, ETH_IPV4);
        let total = (20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = inet_checksum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }

    /// An ICMP echo request/reply body with its checksum.
    pub fn icmp_echo(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut p = vec![kind, 0, 0, 0];
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(data);
        let c = inet_checksum(&p, 0);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// A UDP datagram body with its checksum.
    pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let len = (8 + data.len()) as u16;
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&len.to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(data);
        let c = inet_checksum(&u, pseudo_sum(src, dst, PROTO_UDP, len));
        let c = if c == 0 { 0xffff } else { c };
        u[6..8].copy_from_slice(&c.to_be_bytes());
        u
    }

    /// TCP header fields (checksum computed by the builders).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Tcp {
        pub sport: u16,
        pub dport: u16,
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        pub window: u16,
    }

    fn tcp_header(t: &Tcp, options: &[u8]) -> Vec<u8> {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40);
        let mut h = Vec::with_capacity(20 + options.len());
        h.extend_from_slice(&t.sport.to_be_bytes());
        h.extend_from_slice(&t.dport.to_be_bytes());
        h.extend_from_slice(&t.seq.to_be_bytes());
        h.extend_from_slice(&t.ack.to_be_bytes());
        h.push(((20 + options.len()) / 4) as u8 * 16);
        h.push(t.flags);
        h.extend_from_slice(&t.window.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h.extend_from_slice(options);
        h
    }

    /// A TCP segment (header, `options`, `data`) with its checksum.
    pub fn tcp(src: [u8; 4], dst: [u8; 4], t: &Tcp, options: &[u8], data: &[u8]) -> Vec<u8> {
        let mut s = tcp_header(t, options);
        s.extend_from_slice(data);
        let c = inet_checksum(&s, pseudo_sum(src, dst, PROTO_TCP, s.len() as u16));
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }

    /// The 20-byte header of a TCP segment carrying `data_len` bytes whose
    /// checksum the device completes (NEEDS_CSUM): the checksum field holds
    /// the folded pseudo-header sum, not inverted.
    pub fn tcp_partial(src: [u8; 4], dst: [u8; 4], t: &Tcp, data_len: usize) -> Vec<u8> {
        let mut h = tcp_header(t, &[]);
        let mut sum = pseudo_sum(src, dst, PROTO_TCP, (20 + data_len) as u16);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        h[16..18].copy_from_slice(&(sum as u16).to_be_bytes());
        h
    }

    /// A parsed TCP header: fields, data offset, the window-scale option.
    pub fn parse_tcp(seg: &[u8]) -> Option<(Tcp, usize, Option<u8>)> {
        if seg.len() < 20 {
            return None;
        }
        let off = usize::from(seg[12] >> 4) * 4;
        if off < 20 || off > seg.len() {
            return None;
        }
        let t = Tcp {
            sport: u16::from_be_bytes([seg[0], seg[1]]),
            dport: u16::from_be_bytes([seg[2], seg[3]]),
            seq: u32::from_be_bytes(seg[4..8].try_into().unwrap()),
            ack: u32::from_be_bytes(seg[8..12].try_into().unwrap()),
            flags: seg[13],
            window: u16::from_be_bytes([seg[14], seg[15]]),
        };
        let mut ws = None;
        let mut i = 20;
        while i < off {
            match seg[i] {
                0 => break,
                1 => i += 1,
                kind => {
                    let len = usize::from(*seg.get(i + 1)?);
                    if len < 2 || i + len > off {
                        break;
                    }
                    if kind == 3 && len == 3 {
                        ws = Some(seg[i + 2]);
                    }
                    i += len;
                }
            }
        }
        Some((t, off, ws))
    }

    /// Sum of the IPv4 pseudo header.
    pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
        let w = |b: [u8; 4]| {
            u32::from(u16::from_be_bytes([b[0], b[1]]))
                + u32::from(u16::from_be_bytes([b[2], b[3]]))
        };
        w(src) + w(dst) + u32::from(proto) + u32::from(len)
    }

    /// A parsed IPv4 frame.
    #[derive(Clone, Debug)]
    pub struct Ipv4<'a> {
        pub src: [u8; 4],
        pub dst: [u8; 4],
        pub proto: u8,
        /// The IP header's checksum verifies.
        pub header_ok: bool,
        pub payload: &'a [u8],
    }

    /// Parse an IPv4 frame (options allowed).
    pub fn parse_ipv4(f: &[u8]) -> Option<Ipv4<'_>> {
        if ethertype(f) != ETH_IPV4 || f.len() < 34 {
            return None;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ihl < 20 || total < ihl || total > ip.len() {
            return None;
        }
        Some(Ipv4 {
            src: ip[12..16].try_into().unwrap(),
            dst: ip[16..20].try_into().unwrap(),
            proto: ip[9],
            header_ok: inet_checksum(&ip[..ihl], 0) == 0,
            payload: &ip[ihl..total],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        // RFC 1071 example.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(inet_checksum(&d, 0), !0xddf2);
        let f = pkt::ipv4(
            [1; 6],
            [2; 6],
            [10, 0, 0, 1],
            [10, 0, 0, 2],
            1,
            &pkt::icmp_echo(8, 1, 2, b"abc"),
        );
        let ip = pkt::parse_ipv4(&f).unwrap();
        assert!(ip.header_ok);
        assert_eq!(inet_checksum(ip.payload, 0), 0);
        let t = pkt::Tcp {
            sport: 1,
            dport: 2,
            seq: 3,
            ack: 4,
            flags: pkt::TCP_SYN,
            window: 5,
        };
        let seg = pkt::tcp([10, 0, 0, 1], [10, 0, 0, 2], &t, &[1, 3, 3, 7], b"xy");
        assert_eq!(
            inet_checksum(
                &seg,
                pkt::pseudo_sum([10, 0, 0, 1], [10, 0, 0, 2], 6, seg.len() as u16)
            ),
            0
        );
        let (p, off, ws) = pkt::parse_tcp(&seg).unwrap();
        assert_eq!(
            (p.seq, p.ack, p.flags, off, ws),
            (3, 4, pkt::TCP_SYN, 24, Some(7))
        );
        let u = pkt::udp([10, 0, 0, 1], [10, 0, 0, 2], 5, 6, b"hello");
        assert_eq!(
            inet_checksum(
                &u,
                pkt::pseudo_sum([10, 0, 0, 1], [10, 0, 0, 2], 17, u.len() as u16)
            ),
            0
        );
    }
}
