//! The event queue (virtio 1.2 §5.6.6.3): the driver posts empty
//! `virtio_scsi_event` buffers that the device holds until it has something
//! to report. Today that is only a transport reset for a LUN (the hook for
//! hot plug and unplug); events raised while no buffer is posted wait in a
//! short queue, and beyond it are dropped and flagged EVENTS_MISSED on the
//! next one delivered, as the spec prescribes.

use std::collections::VecDeque;

use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN, VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
};

use crate::guest::{stream_len, Segment};

/// Bytes of `struct virtio_scsi_event`.
pub const EVENT_SIZE: usize = 16;
/// Events kept while the driver has no buffer posted.
pub const MAX_PENDING: usize = 64;

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `VIRTIO_SCSI_T_*` event type.
    pub event: u32,
    /// LUN field the event is about.
    pub lun: [u8; 8],
    /// Type-specific reason.
    pub reason: u32,
}

impl Event {
    /// A transport reset for `lun`: the LUN appeared (`removed == false`,
    /// the driver rescans it) or disappeared.
    pub fn transport_reset(lun: [u8; 8], removed: bool) -> Self {
        Event {
            event: VIRTIO_SCSI_T_TRANSPORT_RESET,
            lun,
            reason: if removed {
                VIRTIO_SCSI_EVT_RESET_REMOVED
            } else {
                VIRTIO_SCSI_EVT_RESET_RESCAN
            },
        }
    }

    /// The event as the driver reads it, with EVENTS_MISSED if `missed`.
    pub fn to_bytes(self, missed: bool) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        let ev = if missed {
            self.event | VIRTIO_SCSI_T_EVENTS_MISSED
        } else {
            self.event
        };
        b[0..4].copy_from_slice(&ev.to_le_bytes());
        b[4..12].copy_from_slice(&self.lun);
        b[12..16].copy_from_slice(&self.reason.to_le_bytes());
        b
    }
}

/// A posted event buffer: the chain head and its writable stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Posted {
    /// Descriptor chain head, for the used ring.
    pub head: u16,
    /// Where the event goes (at least [`EVENT_SIZE`] bytes).
    pub buf: Vec<Segment>,
}

/// Posted buffers and undelivered events.
#[derive(Debug, Default)]
pub struct EventState {
    posted: VecDeque<Posted>,
    pending: VecDeque<Event>,
    missed: bool,
}

impl EventState {
    /// Hold a buffer the driver posted; false (do not hold) if it is too small.
    pub fn post(&mut self, head: u16, buf: Vec<Segment>) -> bool {
        if stream_len(&buf) < EVENT_SIZE as u64 {
            return false;
        }
        self.posted.push_back(Posted { head, buf });
        true
    }

    /// Queue `event`; false if it had to be dropped (reported as missed later).
    pub fn raise(&mut self, event: Event) -> bool {
        if self.pending.len() >= MAX_PENDING {
            self.missed = true;
            return false;
        }
        self.pending.push_back(event);
        true
    }

    /// The next (buffer, bytes) to deliver, if both an event and a buffer exist.
    pub fn next_delivery(&mut self) -> Option<(Posted, [u8; EVENT_SIZE])> {
        if self.pending.is_empty() || self.posted.is_empty() {
            return None;
        }
        let ev = self.pending.pop_front()?;
        let buf = self.posted.pop_front()?;
        let bytes = ev.to_bytes(std::mem::take(&mut self.missed));
        Some((buf, bytes))
    }

    /// Buffers held; forgets them (the queue is being stopped or reset).
    pub fn release_posted(&mut self) -> usize {
        let n = self.posted.len();
        self.posted.clear();
        n
    }

    /// Number of held buffers.
    pub fn posted(&self) -> usize {
        self.posted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn buf(len: u32) -> Vec<Segment> {
        vec![Segment {
            addr: GuestAddress(0x1000),
            len,
        }]
    }

    #[test]
    fn bytes() {
        let mut lun = [0u8; 8];
        lun[0] = 1;
        lun[2] = 0x40;
        lun[3] = 3;
        let b = Event::transport_reset(lun, false).to_bytes(false);
        assert_eq!(&b[0..4], &1u32.to_le_bytes());
        assert_eq!(&b[4..12], &lun);
        assert_eq!(&b[12..16], &VIRTIO_SCSI_EVT_RESET_RESCAN.to_le_bytes());
        let b = Event::transport_reset(lun, true).to_bytes(true);
        assert_eq!(&b[0..4], &(1u32 | 0x8000_0000).to_le_bytes());
        assert_eq!(&b[12..16], &VIRTIO_SCSI_EVT_RESET_REMOVED.to_le_bytes());
    }

    #[test]
    fn hold_raise_deliver() {
        let mut s = EventState::default();
        assert!(!s.post(1, buf(8)), "too small");
        let ev = Event::transport_reset([1, 0, 0x40, 0, 0, 0, 0, 0], false);
        // Event before any buffer waits.
        assert!(s.raise(ev));
        assert!(s.next_delivery().is_none());
        assert!(s.post(2, buf(16)));
        let (p, b) = s.next_delivery().unwrap();
        assert_eq!(p.head, 2);
        assert_eq!(b[0], 1);
        assert!(s.next_delivery().is_none());
        // Overflow: dropped and flagged on the next delivery.
        for _ in 0..MAX_PENDING {
            assert!(s.raise(ev));
        }
        assert!(!s.raise(ev));
        s.post(3, buf(16));
        let (_, b) = s.next_delivery().unwrap();
        assert_eq!(b[3], 0x80, "EVENTS_MISSED");
        s.post(4, buf(16));
        let (_, b) = s.next_delivery().unwrap();
        assert_eq!(b[3], 0x00);
        s.post(5, buf(16));
        s.post(6, buf(16));
        assert_eq!(s.posted(), 2);
        assert_eq!(s.release_posted(), 2);
        assert_eq!(s.posted(), 0);
    }
}
