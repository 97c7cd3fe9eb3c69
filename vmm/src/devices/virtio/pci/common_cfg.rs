//! The virtio-pci common configuration structure (virtio 1.2 §4.1.4.3):
//! feature negotiation, device status and per-queue setup, as registers.

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready; queues may be used.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// "No MSI-X vector" for config and queue vectors.
pub const NO_VECTOR: u16 = 0xffff;

/// Register offsets within the structure.
pub mod reg {
    /// Which 32 bits of the device features to show.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// The device features, 32 bits at a time.
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// Which 32 bits of the driver features to write.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// The driver features, 32 bits at a time.
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// MSI-X vector for config changes.
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// Number of queues.
    pub const NUM_QUEUES: u64 = 0x12;
    /// Device status.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// Config generation.
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// The queue the following registers address.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// Queue size.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// The queue's MSI-X vector.
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// Queue enable.
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// The queue's notify offset (in multiplier units).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// Descriptor table address (64-bit).
    pub const QUEUE_DESC: u64 = 0x20;
    /// Driver (avail) ring address.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// Device (used) ring address.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure.
    pub const SIZE: u64 = 0x38;
}

/// One queue's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// MSI-X vector.
    pub msix_vector: u16,
    /// Enabled by the driver.
    pub enabled: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What a write asks the transport to do beyond storing the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// The driver wrote 0 to device_status: reset the device.
    Reset,
    /// The driver set DRIVER_OK: activate.
    Activate,
}

/// The common configuration registers (saved whole in snapshots).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CommonCfg {
    /// Features the device offers.
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// MSI-X vector for config changes.
    pub config_msix_vector: u16,
    /// Device status.
    pub status: u8,
    /// Config generation.
    pub config_generation: u8,
    queue_select: u16,
    /// Every queue.
    pub queues: Vec<QueueState>,
    msix_vectors: u16,
}

fn write_part(v: &mut u64, offset_in_field: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        let shift = (offset_in_field + i as u64) * 8;
        if shift < 64 {
            *v = (*v & !(0xff << shift)) | (u64::from(*b) << shift);
        }
    }
}

impl CommonCfg {
    /// Registers for a device with these features and queues, and
    /// `msix_vectors` MSI-X table entries.
    pub fn new(device_features: u64, num_queues: usize, queue_max: u16, msix_vectors: u16) -> Self {
        Self {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![QueueState::new(queue_max); num_queues],
            msix_vectors,
        }
    }

    /// Back to the reset state (keeps what the device offers).
    pub fn reset(&mut self) {
        let max = self.queues.first().map(|q| q.max_size).unwrap_or(0);
        *self = Self::new(
            self.device_features,
            self.queues.len(),
            max,
            self.msix_vectors,
        );
    }

    fn selected(&self) -> Option<&QueueState> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// Value of the field that starts at `base` (its full width).
    fn field(&self, base: u64) -> u64 {
        let q = self.selected();
        match base {
            reg::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            reg::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            reg::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            reg::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            reg::CONFIG_MSIX_VECTOR => u64::from(self.config_msix_vector),
            reg::NUM_QUEUES => self.queues.len() as u64,
            reg::DEVICE_STATUS => u64::from(self.status),
            reg::CONFIG_GENERATION => u64::from(self.config_generation),
            reg::QUEUE_SELECT => u64::from(self.queue_select),
            reg::QUEUE_SIZE => q.map_or(0, |q| u64::from(q.size)),
            reg::QUEUE_MSIX_VECTOR => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            reg::QUEUE_ENABLE => q.map_or(0, |q| u64::from(q.enabled)),
            // Queue i notifies at notify_off i (times the multiplier).
            reg::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            reg::QUEUE_DESC => q.map_or(0, |q| q.desc),
            reg::QUEUE_DRIVER => q.map_or(0, |q| q.avail),
            reg::QUEUE_DEVICE => q.map_or(0, |q| q.used),
            _ => 0,
        }
    }

    /// Start and width of the field containing `offset`.
    fn locate(offset: u64) -> Option<(u64, u64)> {
        let fields: [(u64, u64); 16] = [
            (reg::DEVICE_FEATURE_SELECT, 4),
            (reg::DEVICE_FEATURE, 4),
            (reg::DRIVER_FEATURE_SELECT, 4),
            (reg::DRIVER_FEATURE, 4),
            (reg::CONFIG_MSIX_VECTOR, 2),
            (reg::NUM_QUEUES, 2),
            (reg::DEVICE_STATUS, 1),
            (reg::CONFIG_GENERATION, 1),
            (reg::QUEUE_SELECT, 2),
            (reg::QUEUE_SIZE, 2),
            (reg::QUEUE_MSIX_VECTOR, 2),
            (reg::QUEUE_ENABLE, 2),
            (reg::QUEUE_NOTIFY_OFF, 2),
            (reg::QUEUE_DESC, 8),
            (reg::QUEUE_DRIVER, 8),
            (reg::QUEUE_DEVICE, 8),
        ];
        fields
            .into_iter()
            .find(|&(b, w)| offset >= b && offset < b + w)
    }

    /// A register read (any width; bytes outside fields read 0).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match Self::locate(at) {
                Some((base, _)) => (self.field(base) >> ((at - base) * 8)) as u8,
                None => 0,
            };
        }
    }

    /// A register write; returns what the transport must do.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let Some((base, width)) = Self::locate(offset) else {
            return Effect::None;
        };
        let mut v = self.field(base);
        write_part(
            &mut v,
            offset - base,
            &data[..data.len().min((base + width - offset) as usize)],
        );
        let active = self.status & status::DRIVER_OK != 0;
        let sel = usize::from(self.queue_select);
        match base {
            reg::DEVICE_FEATURE_SELECT => self.device_feature_select = v as u32,
            reg::DRIVER_FEATURE_SELECT => self.driver_feature_select = v as u32,
            reg::DRIVER_FEATURE if self.status & status::FEATURES_OK == 0 => match self
                .driver_feature_select
            {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff)
                }
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            reg::CONFIG_MSIX_VECTOR => {
                self.config_msix_vector = if v < u64::from(self.msix_vectors) {
                    v as u16
                } else {
                    NO_VECTOR
                }
            }
            reg::DEVICE_STATUS => return self.write_status(v as u8),
            reg::QUEUE_SELECT => self.queue_select = v as u16,
            // Queue setup is frozen once the device runs.
            reg::QUEUE_SIZE if !active => {
                if let Some(q) = self.queues.get_mut(sel) {
                    // A power of two no larger than the maximum (split rings).
                    let size = v as u16;
                    if size != 0 && size <= q.max_size && size.is_power_of_two() {
                        q.size = size;
                    }
                }
            }
            reg::QUEUE_MSIX_VECTOR => {
                let vectors = self.msix_vectors;
                if let Some(q) = self.queues.get_mut(sel) {
                    q.msix_vector = if v < u64::from(vectors) {
                        v as u16
                    } else {
                        NO_VECTOR
                    };
                }
            }
            reg::QUEUE_ENABLE if !active => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.enabled = v & 1 == 1;
                }
            }
            reg::QUEUE_DESC if !active => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.desc = v;
                }
            }
            reg::QUEUE_DRIVER if !active => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.avail = v;
                }
            }
            reg::QUEUE_DEVICE if !active => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.used = v;
                }
            }
            _ => {}
        }
        Effect::None
    }

    fn write_status(&mut self, new: u8) -> Effect {
        if new == 0 {
            return Effect::Reset;
        }
        let mut new = new;
        // FEATURES_OK sticks only for a subset of what the device offers,
        // including VERSION_1 (a modern device).
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let subset = self.driver_features & !self.device_features == 0;
            let modern = self.driver_features & super::super::VIRTIO_F_VERSION_1 != 0;
            if !(subset && modern) {
                new &= !status::FEATURES_OK;
            }
        }
        let was_ok = self.status & status::DRIVER_OK != 0;
        // Bits are only ever added until a reset.
        self.status |= new;
        if !was_ok && self.status & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.status |= status::DEVICE_NEEDS_RESET;
                return Effect::None;
            }
            return Effect::Activate;
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VIRTIO_F_VERSION_1;

    fn w32(c: &mut CommonCfg, off: u64, v: u32) -> Effect {
        c.write(off, &v.to_le_bytes())
    }
    fn r32(c: &CommonCfg, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn negotiation_and_queue_setup() {
        let mut c = CommonCfg::new(VIRTIO_F_VERSION_1 | 0b101, 2, 256, 3);
        assert_eq!(r32(&c, reg::DEVICE_FEATURE), 0b101);
        w32(&mut c, reg::DEVICE_FEATURE_SELECT, 1);
        assert_eq!(r32(&c, reg::DEVICE_FEATURE), 1);
        let mut n = [0u8; 2];
        c.read(reg::NUM_QUEUES, &mut n);
        assert_eq!(u16::from_le_bytes(n), 2);
        c.write(reg::DEVICE_STATUS, &[status::ACKNOWLEDGE | status::DRIVER]);
        w32(&mut c, reg::DRIVER_FEATURE, 0b100);
        w32(&mut c, reg::DRIVER_FEATURE_SELECT, 1);
        w32(&mut c, reg::DRIVER_FEATURE, 1);
        assert_eq!(c.driver_features, VIRTIO_F_VERSION_1 | 0b100);
        c.write(reg::DEVICE_STATUS, &[status::FEATURES_OK]);
        let mut s = [0u8];
        c.read(reg::DEVICE_STATUS, &mut s);
        assert_ne!(s[0] & status::FEATURES_OK, 0);
        c.write(reg::QUEUE_SELECT, &1u16.to_le_bytes());
        c.write(reg::QUEUE_SIZE, &100u16.to_le_bytes()); // not a power of two
        c.write(reg::QUEUE_SIZE, &64u16.to_le_bytes());
        w32(&mut c, reg::QUEUE_DESC, 0x1000);
        w32(&mut c, reg::QUEUE_DESC + 4, 0x1);
        c.write(reg::QUEUE_MSIX_VECTOR, &7u16.to_le_bytes()); // out of range
        c.write(reg::QUEUE_ENABLE, &1u16.to_le_bytes());
        assert_eq!(
            c.queues[1],
            QueueState {
                max_size: 256,
                size: 64,
                msix_vector: NO_VECTOR,
                enabled: true,
                desc: 0x1_0000_1000,
                avail: 0,
                used: 0
            }
        );
        assert_eq!(
            c.write(reg::DEVICE_STATUS, &[status::DRIVER_OK]),
            Effect::Activate
        );
        assert_eq!(c.write(reg::DEVICE_STATUS, &[0]), Effect::Reset);
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_legacy() {
        let mut c = CommonCfg::new(VIRTIO_F_VERSION_1, 1, 8, 0);
        w32(&mut c, reg::DRIVER_FEATURE, 1); // not offered, and no VERSION_1
        c.write(reg::DEVICE_STATUS, &[status::FEATURES_OK]);
        assert_eq!(c.status & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK: the device needs a reset.
        assert_eq!(
            c.write(reg::DEVICE_STATUS, &[status::DRIVER_OK]),
            Effect::None
        );
        assert_ne!(c.status & status::DEVICE_NEEDS_RESET, 0);
    }
}
