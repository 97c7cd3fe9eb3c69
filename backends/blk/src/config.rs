//! The virtio-blk device configuration space (`struct virtio_blk_config`,
//! virtio 1.2 §5.2.4), serialised little-endian for `VHOST_USER_GET_CONFIG`.

/// Bytes per virtio-blk sector; `capacity` and all sector numbers use this unit.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Largest virtqueue the backend accepts (`VHOST_USER_SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Data segments per request (`seg_max`): a chain also needs a header and a
/// status descriptor, so this is the queue size minus two.
pub const SEG_MAX: u32 = MAX_QUEUE_SIZE as u32 - 2;
/// Sectors per discard segment (`max_discard_sectors`): 2 GiB.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Segments per discard request (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 16;
/// Discard granularity in sectors (`discard_sector_alignment`): 4 KiB.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Sectors per write-zeroes segment (`max_write_zeroes_sectors`): 2 GiB.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// Segments per write-zeroes request (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// Size of the configuration space we serve: `struct virtio_blk_config` of
/// virtio 1.2 including the secure-erase and zoned fields (all zero here).
pub const CONFIG_SPACE_SIZE: usize = 96;

/// The values of the device configuration space the backend exposes.
///
/// Fields not listed (geometry, topology, writeback, secure erase, zoned) are
/// zero: their features are never offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors (rounded down).
    pub capacity: u64,
    /// Largest segment in bytes; informative only, `VIRTIO_BLK_F_SIZE_MAX`
    /// is not offered (0 = no limit).
    pub size_max: u32,
    /// Data segments per request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// Logical block size (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// Number of request queues (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// See [`MAX_DISCARD_SECTORS`].
    pub max_discard_sectors: u32,
    /// See [`MAX_DISCARD_SEG`].
    pub max_discard_seg: u32,
    /// See [`DISCARD_SECTOR_ALIGNMENT`].
    pub discard_sector_alignment: u32,
    /// See [`MAX_WRITE_ZEROES_SECTORS`].
    pub max_write_zeroes_sectors: u32,
    /// See [`MAX_WRITE_ZEROES_SEG`].
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    /// The configuration for a disk of `disk_size` bytes served on `num_queues` queues.
    pub fn new(disk_size: u64, num_queues: u16) -> Self {
        BlkConfig {
            capacity: disk_size >> SECTOR_SHIFT,
            size_max: 0,
            seg_max: SEG_MAX,
            blk_size: SECTOR_SIZE as u32,
            num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            discard_sector_alignment: DISCARD_SECTOR_ALIGNMENT,
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg: MAX_WRITE_ZEROES_SEG,
            write_zeroes_may_unmap: true,
        }
    }

    /// The configuration space as the driver sees it (little-endian).
    pub fn to_bytes(self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20 geometry: zero.
        put(20, &self.blk_size.to_le_bytes());
        // 24..32 topology, 32 writeback, 33 unused0: zero.
        put(34, &self.num_queues.to_le_bytes());
        put(36, &self.max_discard_sectors.to_le_bytes());
        put(40, &self.max_discard_seg.to_le_bytes());
        put(44, &self.discard_sector_alignment.to_le_bytes());
        put(48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(52, &self.max_write_zeroes_seg.to_le_bytes());
        put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        // 57..60 unused1, 60..72 secure erase, 72..96 zoned: zero.
        b
    }

    /// `size` bytes of configuration space from `offset`, as `VHOST_USER_GET_CONFIG`
    /// answers them: bytes past the end of the structure read as zero. Returns an
    /// empty vector (which the vhost-user layer reports as a failure) when the
    /// range overflows.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        let bytes = self.to_bytes();
        (offset..end)
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn layout_matches_bindings() {
        assert_eq!(size_of::<virtio_blk_config>(), CONFIG_SPACE_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, size_max), 8);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn serialises_little_endian() {
        let c = BlkConfig::new(1 << 30 | 0x1ff, 4);
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), SEG_MAX);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn read_window() {
        let c = BlkConfig::new(4096, 1);
        assert_eq!(c.read(0, 8), 8u64.to_le_bytes().to_vec());
        let tail = c.read(90, 16);
        assert_eq!(tail.len(), 16);
        assert!(tail.iter().all(|&x| x == 0));
        assert!(c.read(u32::MAX, 2).is_empty());
    }
}
