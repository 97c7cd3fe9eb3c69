//! The control queue (virtio 1.2 §5.6.6.2): task management functions and
//! asynchronous-notification queries.
//!
//! Every command is executed to completion by its queue worker before the
//! worker looks at the next one, so there is never a queued task a TMF
//! could abort: ABORT TASK / ABORT TASK SET / CLEAR TASK SET / CLEAR ACA /
//! I_T NEXUS RESET / LOGICAL UNIT RESET all answer FUNCTION COMPLETE (the
//! task, if it existed, has completed), QUERY TASK / QUERY TASK SET answer
//! FUNCTION COMPLETE (no such task). A LOGICAL UNIT RESET also returns the
//! unit's mode parameters to their defaults, as SAM requires. We report
//! no asynchronous events, so AN queries get `event_actual` 0.

use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};
use vm_memory::GuestMemory;

use crate::guest::{read_stream, stream_len, write_stream};
use crate::lun::Target;
use crate::request::Streams;

/// `VIRTIO_SCSI_S_FUNCTION_COMPLETE`: the TMF was carried out. The spec
/// gives it the value of `VIRTIO_SCSI_S_OK`; the bindings lack the name.
pub const VIRTIO_SCSI_S_FUNCTION_COMPLETE: u32 = VIRTIO_SCSI_S_OK;

/// Bytes of `virtio_scsi_ctrl_tmf_req`.
pub const TMF_REQ_SIZE: usize = 24;
/// Bytes of `virtio_scsi_ctrl_tmf_resp`.
pub const TMF_RESP_SIZE: usize = 1;
/// Bytes of `virtio_scsi_ctrl_an_req`.
pub const AN_REQ_SIZE: usize = 16;
/// Bytes of `virtio_scsi_ctrl_an_resp`.
pub const AN_RESP_SIZE: usize = 5;

/// A parsed control request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// A task management function.
    Tmf {
        /// `VIRTIO_SCSI_T_TMF_*`.
        subtype: u32,
        /// LUN field.
        lun: [u8; 8],
        /// Tag of the task (ABORT TASK, QUERY TASK).
        id: u64,
    },
    /// AN_QUERY or AN_SUBSCRIBE.
    An {
        /// LUN field.
        lun: [u8; 8],
        /// Events the driver asks about.
        event_requested: u32,
    },
}

/// Why a control request cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The chain itself is malformed.
    #[error("malformed chain: {0}")]
    Chain(#[from] crate::request::ParseError),
    /// Fewer bytes than the request type needs.
    #[error("control request of {got} readable / {got_w} writable bytes, need {need} / {need_w}")]
    TooShort {
        /// Readable bytes supplied.
        got: u64,
        /// Writable bytes supplied.
        got_w: u64,
        /// Readable bytes needed.
        need: usize,
        /// Writable bytes needed.
        need_w: usize,
    },
    /// An unknown request type.
    #[error("unknown control request type {0}")]
    UnknownType(u32),
    /// Guest memory could not be read.
    #[error("cannot read the control request")]
    Read,
}

/// Parse a control request from its streams.
pub fn parse<G: GuestMemory + ?Sized>(
    mem: &G,
    s: &Streams,
) -> Result<ControlRequest, ControlError> {
    if let Some(e) = &s.error {
        return Err(e.clone().into());
    }
    let got = stream_len(&s.readable);
    let got_w = stream_len(&s.writable);
    let mut t = [0u8; 4];
    if got < 4 {
        return Err(ControlError::TooShort {
            got,
            got_w,
            need: 4,
            need_w: 1,
        });
    }
    read_stream(mem, &s.readable, 0, &mut t).map_err(|_| ControlError::Read)?;
    let kind = u32::from_le_bytes(t);
    let (need, need_w) = match kind {
        VIRTIO_SCSI_T_TMF => (TMF_REQ_SIZE, TMF_RESP_SIZE),
        VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => (AN_REQ_SIZE, AN_RESP_SIZE),
        other => return Err(ControlError::UnknownType(other)),
    };
    if got < need as u64 || got_w < need_w as u64 {
        return Err(ControlError::TooShort {
            got,
            got_w,
            need,
            need_w,
        });
    }
    let mut b = vec![0u8; need];
    read_stream(mem, &s.readable, 0, &mut b).map_err(|_| ControlError::Read)?;
    let mut lun = [0u8; 8];
    if kind == VIRTIO_SCSI_T_TMF {
        lun.copy_from_slice(&b[8..16]);
        Ok(ControlRequest::Tmf {
            subtype: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            lun,
            id: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
        })
    } else {
        lun.copy_from_slice(&b[4..12]);
        Ok(ControlRequest::An {
            lun,
            event_requested: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }
}

/// The response bytes for a control request (TMF: 1 byte; AN: 5 bytes).
pub fn execute(req: &ControlRequest, target: &Target) -> Vec<u8> {
    match *req {
        ControlRequest::Tmf { subtype, lun, .. } => {
            let target_ok = lun[0] == 1 && lun[1] == 0;
            let unit = target.lookup(&lun);
            let r = match subtype {
                // The nexus is per target: no LUN needs to exist.
                VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET if target_ok => VIRTIO_SCSI_S_FUNCTION_COMPLETE,
                VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => VIRTIO_SCSI_S_BAD_TARGET,
                _ if unit.is_none() => VIRTIO_SCSI_S_BAD_TARGET,
                VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => {
                    if let Some(u) = unit {
                        u.reset();
                    }
                    VIRTIO_SCSI_S_FUNCTION_COMPLETE
                }
                VIRTIO_SCSI_T_TMF_ABORT_TASK
                | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
                | VIRTIO_SCSI_T_TMF_CLEAR_ACA
                | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET
                | VIRTIO_SCSI_T_TMF_QUERY_TASK
                | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => VIRTIO_SCSI_S_FUNCTION_COMPLETE,
                _ => VIRTIO_SCSI_S_FUNCTION_REJECTED,
            };
            vec![r as u8]
        }
        ControlRequest::An { .. } => {
            let mut v = 0u32.to_le_bytes().to_vec();
            v.push(VIRTIO_SCSI_S_OK as u8);
            v
        }
    }
}

/// Write a control response; returns the used length (0 if it cannot be written).
pub fn respond<G: GuestMemory + ?Sized>(mem: &G, s: &Streams, resp: &[u8]) -> u32 {
    match write_stream(mem, &s.writable, 0, resp) {
        Ok(()) => resp.len() as u32,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::{virtio_lun, Lun};
    use crate::metrics::Metrics;
    use std::sync::Arc;
    use tern_image::{DiskImage, ImageError};
    use virtio_bindings::virtio_scsi::VIRTIO_SCSI_S_FUNCTION_SUCCEEDED;

    struct Null;
    impl DiskImage for Null {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ImageError> {
            Ok(())
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    fn target() -> Target {
        let m = Arc::new(Metrics::new());
        Target::new(
            (0..2)
                .map(|i| Arc::new(Lun::new(i, Arc::new(Null), false, String::new(), m.clone())))
                .collect(),
        )
    }

    fn tmf(subtype: u32, lun: [u8; 8]) -> u8 {
        execute(
            &ControlRequest::Tmf {
                subtype,
                lun,
                id: 9,
            },
            &target(),
        )[0]
    }

    #[test]
    fn task_management() {
        let ok = VIRTIO_SCSI_S_FUNCTION_COMPLETE as u8;
        for st in [
            VIRTIO_SCSI_T_TMF_ABORT_TASK,
            VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
            VIRTIO_SCSI_T_TMF_CLEAR_ACA,
            VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
            VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
            VIRTIO_SCSI_T_TMF_QUERY_TASK,
            VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
        ] {
            assert_eq!(tmf(st, virtio_lun(1)), ok, "subtype {st}");
        }
        // FUNCTION SUCCEEDED is for a query that found the task: never here.
        assert_ne!(ok, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8);
        assert_eq!(
            tmf(99, virtio_lun(0)),
            VIRTIO_SCSI_S_FUNCTION_REJECTED as u8
        );
        let bad = VIRTIO_SCSI_S_BAD_TARGET as u8;
        assert_eq!(tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, virtio_lun(2)), bad);
        assert_eq!(
            tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, virtio_lun(7)),
            bad
        );
        // I_T nexus reset only needs target 0.
        assert_eq!(tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, virtio_lun(7)), ok);
        let mut other_target = virtio_lun(0);
        other_target[1] = 1;
        assert_eq!(tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, other_target), bad);
    }

    #[test]
    fn async_notification() {
        let r = execute(
            &ControlRequest::An {
                lun: virtio_lun(0),
                event_requested: 0xFF,
            },
            &target(),
        );
        assert_eq!(r, vec![0, 0, 0, 0, VIRTIO_SCSI_S_OK as u8]);
    }
}
