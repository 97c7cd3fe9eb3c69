//! Serving one command request from a request queue: parse the chain,
//! find the LUN, parse the CDB, execute, and write `virtio_scsi_cmd_resp`.
//!
//! Responses (virtio 1.2 §5.6.6.1):
//! - a chain whose response buffer is missing, too short or outside guest
//!   memory cannot be answered: used length 0;
//! - any other malformed chain: `VIRTIO_SCSI_S_FAILURE`;
//! - a LUN field that does not address an existing LUN of target 0:
//!   `VIRTIO_SCSI_S_BAD_TARGET` (see docs/scsi.md for why not QEMU's
//!   peripheral-qualifier-3 answers);
//! - buffers that cannot hold a READ's or WRITE's data: `VIRTIO_SCSI_S_OVERRUN`;
//! - otherwise `VIRTIO_SCSI_S_OK` with the SCSI status (GOOD or CHECK
//!   CONDITION with fixed-format sense) and the residual.

use std::ops::Deref;

use log::debug;
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN,
};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::cdb::{self, Command};
use crate::guest::{stream_len, write_stream, GuestIn, GuestOut, Segment};
use crate::lun::{DataIn, Failure, Target};
use crate::metrics::Metrics;
use crate::request::{cmd_response, parse_cmd, CMD_RESP_FIXED};
use crate::sense::{STATUS_CHECK_CONDITION, STATUS_GOOD};

/// The CDB and sense sizes in force (the driver may change them in the config space).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// `cdb_size`.
    pub cdb: usize,
    /// `sense_size`.
    pub sense: usize,
}

/// Serve one command chain; returns the used length for the used ring.
pub fn serve<M>(
    chain: &mut DescriptorChain<M>,
    target: &Target,
    sizes: Sizes,
    metrics: &Metrics,
) -> u32
where
    M: Deref,
    M::Target: GuestMemory,
{
    let resp_size = (CMD_RESP_FIXED + sizes.sense) as u32;
    let req = match parse_cmd(chain, sizes.cdb, sizes.sense) {
        Ok(r) => r,
        Err(rej) => {
            debug!("malformed command request: {}", rej.error);
            return match rej.resp {
                Some(resp) => {
                    Metrics::add(&metrics.invalid_requests, 1);
                    let r = cmd_response(VIRTIO_SCSI_S_FAILURE as u8, 0, 0, &[], sizes.sense);
                    respond(chain.memory(), &resp, &r, resp_size, metrics)
                }
                None => {
                    Metrics::add(&metrics.skipped_chains, 1);
                    0
                }
            };
        }
    };
    Metrics::add(&metrics.commands, 1);
    let mem = chain.memory();
    let answer = |response: u32, status: u8, resid: u64, sense: &[u8]| {
        let resid = u32::try_from(resid).unwrap_or(u32::MAX);
        cmd_response(response as u8, status, resid, sense, sizes.sense)
    };
    let in_len = stream_len(&req.data_in);
    let out_len = stream_len(&req.data_out);
    let all_resid = in_len.max(out_len);
    let Some(lun) = target.lookup(&req.lun) else {
        Metrics::add(&metrics.bad_target, 1);
        let r = answer(VIRTIO_SCSI_S_BAD_TARGET, 0, all_resid, &[]);
        return respond(mem, &req.resp, &r, resp_size, metrics);
    };
    let check = |sense: crate::sense::Sense| {
        Metrics::add(&metrics.check_conditions, 1);
        answer(
            VIRTIO_SCSI_S_OK,
            STATUS_CHECK_CONDITION,
            all_resid,
            &sense.fixed(),
        )
    };
    let cmd = match cdb::parse(&req.cdb) {
        Ok(c) => c,
        Err(sense) => {
            debug!(
                "LUN {}: CDB {:02x?}: {sense:?}",
                lun.info().lun,
                &req.cdb[..req.cdb.len().min(16)]
            );
            let r = check(sense);
            return respond(mem, &req.resp, &r, resp_size, metrics);
        }
    };
    match cmd {
        Command::Read { .. } => Metrics::add(&metrics.reads, 1),
        Command::Write { .. } => Metrics::add(&metrics.writes, 1),
        _ => {}
    }
    let dout = GuestOut::new(mem, &req.data_out);
    let mut din = GuestIn::new(mem, &req.data_in);
    let result = match cmd {
        // REPORT LUNS is a target command: any LUN answers for all of them.
        Command::ReportLuns { select, alloc_len } => {
            let data = target.report_luns(select);
            let n = data.len().min(alloc_len as usize);
            din.put(&data[..n])
                .map_err(|_| Failure::Check(crate::sense::Sense::INTERNAL_TARGET_FAILURE))
        }
        _ => lun.execute(&cmd, &dout, &mut din),
    };
    let r = match result {
        Ok(written) => {
            let resid = match cmd.transfer() {
                cdb::Transfer::Out(n) => out_len.saturating_sub(n),
                _ => in_len.saturating_sub(written),
            };
            answer(VIRTIO_SCSI_S_OK, STATUS_GOOD, resid, &[])
        }
        Err(Failure::Check(sense)) => check(sense),
        Err(Failure::Overrun) => {
            Metrics::add(&metrics.overruns, 1);
            answer(VIRTIO_SCSI_S_OVERRUN, 0, all_resid, &[])
        }
    };
    let used = respond(mem, &req.resp, &r, resp_size, metrics);
    if used == 0 {
        return 0;
    }
    used.saturating_add(u32::try_from(din.written()).unwrap_or(u32::MAX))
}

/// Write a response; the used length covers the whole response structure
/// (0 if guest memory refused the write).
fn respond<G: GuestMemory + ?Sized>(
    mem: &G,
    resp: &[Segment],
    bytes: &[u8],
    resp_size: u32,
    metrics: &Metrics,
) -> u32 {
    match write_stream(mem, resp, 0, bytes) {
        Ok(()) => resp_size,
        Err(_) => {
            // Checked by the parser; only a racing memory table change gets here.
            Metrics::add(&metrics.queue_errors, 1);
            0
        }
    }
}
