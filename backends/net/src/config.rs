//! The virtio-net device configuration space (`struct virtio_net_config`,
//! virtio 1.2 §5.1.4), the offered feature bits, and the mapping of
//! negotiated guest offloads to tap offloads (`TUNSETOFFLOAD`).

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of the configuration space we serve: mac, status,
/// max_virtqueue_pairs, mtu (speed/duplex and RSS fields are not offered).
pub const CONFIG_SPACE_SIZE: usize = 12;
/// Largest virtqueue the backend accepts (`VHOST_USER_SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queue pairs: `queues_per_thread` masks are 64-bit (2 per pair + ctrl).
pub const MAX_QUEUE_PAIRS: u16 = 31;

/// Tap offload flags (`linux/if_tun.h`).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// What the tap accepts in `TUNSETOFFLOAD` (probed at startup).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapOffloads {
    /// TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN.
    pub tso: bool,
    /// TUN_F_UFO.
    pub ufo: bool,
}

/// The values of the device configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    /// Queue pairs (`max_virtqueue_pairs`).
    pub queue_pairs: u16,
    /// `VIRTIO_NET_F_MTU` value, if offered.
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// The configuration space as the driver sees it (little-endian).
    pub fn to_bytes(self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        b[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        b
    }

    /// `size` bytes from `offset`; bytes past the end read as zero; empty on overflow.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        let bytes = self.to_bytes();
        (offset..end)
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    /// Virtio feature bits offered for this configuration and tap (without
    /// the vhost-user specific bits).
    pub fn device_features(&self, tap: TapOffloads) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            // The tap accepts partially checksummed and GSO frames from us.
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN);
        if self.queue_pairs > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        if tap.tso {
            f |= bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN);
        }
        if tap.ufo {
            f |= bit(VIRTIO_NET_F_HOST_UFO);
            if tap.tso {
                f |= bit(VIRTIO_NET_F_GUEST_UFO);
            }
        }
        f
    }
}

/// The `TUNSETOFFLOAD` flags for the acked virtio features: what the tap may
/// hand us (and we hand to the guest) unchecksummed or unsegmented.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |b: u32| acked & (1u64 << b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        // Every GSO offload needs partial checksums.
        return 0;
    }
    let mut t = TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        t |= TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        t |= TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && t & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        t |= TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        t |= TUN_F_UFO;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_net::virtio_net_config;

    fn cfg(pairs: u16, mtu: Option<u16>) -> NetConfig {
        NetConfig {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            queue_pairs: pairs,
            mtu,
        }
    }

    #[test]
    fn layout_matches_bindings() {
        assert!(size_of::<virtio_net_config>() >= CONFIG_SPACE_SIZE);
        assert_eq!(offset_of!(virtio_net_config, mac), 0);
        assert_eq!(offset_of!(virtio_net_config, status), 6);
        assert_eq!(offset_of!(virtio_net_config, max_virtqueue_pairs), 8);
        assert_eq!(offset_of!(virtio_net_config, mtu), 10);
    }

    #[test]
    fn serialises_little_endian() {
        let b = cfg(4, Some(9000)).to_bytes();
        assert_eq!(&b[0..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 4);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 9000);
        let c = cfg(1, None);
        assert_eq!(c.read(0, 6), vec![0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(c.read(10, 8), vec![0; 8]);
        assert!(c.read(u32::MAX, 2).is_empty());
    }

    #[test]
    fn features() {
        let bit = |b: u32| 1u64 << b;
        let f = cfg(1, None).device_features(TapOffloads::default());
        assert_ne!(f & bit(VIRTIO_F_VERSION_1), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_MAC), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        assert_eq!(f & (bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_MTU)), 0);
        assert_eq!(
            f & (bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_UFO)),
            0
        );
        let f = cfg(2, Some(1400)).device_features(TapOffloads {
            tso: true,
            ufo: true,
        });
        for b in [
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_UFO,
        ] {
            assert_ne!(f & bit(b), 0, "feature {b}");
        }
    }

    #[test]
    fn offload_mapping() {
        let bit = |b: u32| 1u64 << b;
        assert_eq!(tap_offloads(0), 0);
        // GSO without GUEST_CSUM is meaningless: nothing.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            tap_offloads(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        // ECN alone (no TSO) is not passed on.
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
            TUN_F_CSUM
        );
        // Host-side (device receive) features do not change the tap offloads.
        assert_eq!(
            tap_offloads(bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_CSUM)),
            0
        );
    }
}
