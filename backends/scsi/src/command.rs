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
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN,
};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

use crate::cdb::{self, Command};
use crate::guest::{stream_len, write_stream, GuestIn, GuestOut, Segment};
use crate::lun::{DataIn, Failure, Lun, Target};
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

/// A parsed command for an existing LUN, ready to execute.
pub struct Parsed {
    /// The unit addressed.
    pub lun: Arc<Lun>,
    /// The command.
    pub cmd: Command,
    /// Response buffers (exactly the response size).
    pub resp: Vec<Segment>,
    /// Data-out buffers.
    pub data_out: Vec<Segment>,
    /// Data-in buffers.
    pub data_in: Vec<Segment>,
    /// Bytes of data-in room.
    pub in_len: u64,
    /// Bytes of data-out.
    pub out_len: u64,
}

/// What [`prepare`] made of a chain.
pub enum Prepared {
    /// Answered already (malformed, bad target, bad CDB): the used length.
    Done(u32),
    /// A command to execute.
    Command(Parsed),
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
    match prepare(chain, target, sizes, metrics) {
        Prepared::Done(used) => used,
        Prepared::Command(p) => execute(chain.memory(), &p, target, sizes, metrics),
    }
}

/// Parse a command chain, find its LUN and parse its CDB, answering
/// whatever fails on the way (malformed chain, bad target, bad CDB).
pub fn prepare<M>(
    chain: &mut DescriptorChain<M>,
    target: &Target,
    sizes: Sizes,
    metrics: &Metrics,
) -> Prepared
where
    M: Deref,
    M::Target: GuestMemory,
{
    let resp_size = (CMD_RESP_FIXED + sizes.sense) as u32;
    let req = match parse_cmd(chain, sizes.cdb, sizes.sense) {
        Ok(r) => r,
        Err(rej) => {
            debug!("malformed command request: {}", rej.error);
            return Prepared::Done(match rej.resp {
                Some(resp) => {
                    Metrics::add(&metrics.invalid_requests, 1);
                    let r = cmd_response(VIRTIO_SCSI_S_FAILURE as u8, 0, 0, &[], sizes.sense);
                    respond(chain.memory(), &resp, &r, resp_size, metrics)
                }
                None => {
                    Metrics::add(&metrics.skipped_chains, 1);
                    0
                }
            });
        }
    };
    Metrics::add(&metrics.commands, 1);
    let mem = chain.memory();
    let in_len = stream_len(&req.data_in);
    let out_len = stream_len(&req.data_out);
    let all_resid = in_len.max(out_len);
    let Some(lun) = target.lookup(&req.lun) else {
        Metrics::add(&metrics.bad_target, 1);
        let r = answer(sizes, VIRTIO_SCSI_S_BAD_TARGET, 0, all_resid, &[]);
        return Prepared::Done(respond(mem, &req.resp, &r, resp_size, metrics));
    };
    lun.mark_seen();
    let cmd = match cdb::parse(&req.cdb) {
        Ok(c) => c,
        Err(sense) => {
            debug!(
                "LUN {}: CDB {:02x?}: {sense:?}",
                lun.info().lun,
                &req.cdb[..req.cdb.len().min(16)]
            );
            let r = check(sizes, metrics, all_resid, sense);
            return Prepared::Done(respond(mem, &req.resp, &r, resp_size, metrics));
        }
    };
    match cmd {
        Command::Read { .. } => Metrics::add(&metrics.reads, 1),
        Command::Write { .. } => Metrics::add(&metrics.writes, 1),
        _ => {}
    }
    Prepared::Command(Parsed {
        lun,
        cmd,
        resp: req.resp,
        data_out: req.data_out,
        data_in: req.data_in,
        in_len,
        out_len,
    })
}

/// Execute a prepared command synchronously and answer it; returns the used length.
pub fn execute<G: GuestMemory + ?Sized>(
    mem: &G,
    p: &Parsed,
    target: &Target,
    sizes: Sizes,
    metrics: &Metrics,
) -> u32 {
    let dout = GuestOut::new(mem, &p.data_out);
    let mut din = GuestIn::new(mem, &p.data_in);
    let result = match p.cmd {
        // REPORT LUNS is a target command: any LUN answers for all of them.
        Command::ReportLuns { select, alloc_len } => {
            let data = target.report_luns(select);
            let n = data.len().min(alloc_len as usize);
            din.put(&data[..n])
                .map_err(|_| Failure::Check(crate::sense::Sense::INTERNAL_TARGET_FAILURE))
        }
        _ => p.lun.execute(&p.cmd, &dout, &mut din),
    };
    finish(mem, p, result, din.written(), sizes, metrics)
}

/// Answer an executed command: `result` is what the unit returned,
/// `written` the bytes put into data-in. Returns the used length.
pub fn finish<G: GuestMemory + ?Sized>(
    mem: &G,
    p: &Parsed,
    result: Result<u64, Failure>,
    written: u64,
    sizes: Sizes,
    metrics: &Metrics,
) -> u32 {
    let resp_size = (CMD_RESP_FIXED + sizes.sense) as u32;
    let all_resid = p.in_len.max(p.out_len);
    let r = match result {
        Ok(written) => {
            let resid = match p.cmd.transfer() {
                cdb::Transfer::Out(n) => p.out_len.saturating_sub(n),
                _ => p.in_len.saturating_sub(written),
            };
            answer(sizes, VIRTIO_SCSI_S_OK, STATUS_GOOD, resid, &[])
        }
        Err(Failure::Check(sense)) => check(sizes, metrics, all_resid, sense),
        Err(Failure::Overrun) => {
            Metrics::add(&metrics.overruns, 1);
            answer(sizes, VIRTIO_SCSI_S_OVERRUN, 0, all_resid, &[])
        }
    };
    let used = respond(mem, &p.resp, &r, resp_size, metrics);
    if used == 0 {
        return 0;
    }
    used.saturating_add(u32::try_from(written).unwrap_or(u32::MAX))
}

/// A `virtio_scsi_cmd_resp`.
fn answer(sizes: Sizes, response: u32, status: u8, resid: u64, sense: &[u8]) -> Vec<u8> {
    let resid = u32::try_from(resid).unwrap_or(u32::MAX);
    cmd_response(response as u8, status, resid, sense, sizes.sense)
}

/// CHECK CONDITION with `sense`.
fn check(sizes: Sizes, metrics: &Metrics, all_resid: u64, sense: crate::sense::Sense) -> Vec<u8> {
    Metrics::add(&metrics.check_conditions, 1);
    answer(
        sizes,
        VIRTIO_SCSI_S_OK,
        STATUS_CHECK_CONDITION,
        all_resid,
        &sense.fixed(),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::Lun;
    use crate::request::tests::{
        rd, test_mem, wr, write_req, DATA, REQ, REQ_SIZE, RESP, RESP_SIZE,
    };
    use std::sync::{Arc, Mutex};
    use tern_image::{DiskImage, ImageError};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// An in-memory 1 MiB disk.
    struct MemDisk(Mutex<Vec<u8>>);

    impl DiskImage for MemDisk {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
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

    fn target() -> (Target, Arc<Metrics>) {
        let m = Arc::new(Metrics::new());
        let data = (0..1 << 20).map(|i: u32| (i >> 9) as u8).collect();
        let disk: Arc<dyn DiskImage> = Arc::new(MemDisk(Mutex::new(data)));
        let luns = (0..2)
            .map(|i| Arc::new(Lun::new(i, disk.clone(), false, String::new(), m.clone())))
            .collect();
        (Target::new(luns), m)
    }

    const SIZES: Sizes = Sizes { cdb: 32, sense: 96 };

    /// Serve a chain; returns (used length, response bytes).
    fn serve_chain(
        mem: &GuestMemoryMmap,
        t: &Target,
        m: &Metrics,
        d: &[RawDescriptor],
    ) -> (u32, Vec<u8>) {
        mem.write_slice(&[0xEE; 108], GuestAddress(RESP)).unwrap();
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let mut chain = q.build_desc_chain(d).unwrap();
        let used = serve(&mut chain, t, SIZES, m);
        let mut r = vec![0u8; 108];
        mem.read_slice(&mut r, GuestAddress(RESP)).unwrap();
        (used, r)
    }

    fn read10(lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = vec![0x28, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&blocks.to_be_bytes());
        c.push(0);
        c
    }

    #[test]
    fn good_read() {
        let mem = test_mem();
        let (t, m) = target();
        write_req(&mem, 1, 5, &read10(3, 2));
        let (used, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 2048)],
        );
        assert_eq!(used, 108 + 1024);
        assert_eq!(&r[0..4], &[0; 4], "no sense");
        assert_eq!(&r[4..8], &1024u32.to_le_bytes(), "residual");
        assert_eq!((r[10], r[11]), (STATUS_GOOD, VIRTIO_SCSI_S_OK as u8));
        let mut d = vec![0u8; 1024];
        mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
        assert!(d[..512].iter().all(|&b| b == 3) && d[512..].iter().all(|&b| b == 4));
    }

    #[test]
    fn bad_target_and_lun() {
        let mem = test_mem();
        let (t, m) = target();
        write_req(&mem, 7, 5, &[0x12, 0, 0, 0, 36, 0]);
        let (used, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 36)],
        );
        assert_eq!(used, 108);
        assert_eq!(r[11], VIRTIO_SCSI_S_BAD_TARGET as u8);
        // Target 1.
        mem.write_slice(&[1, 1, 0x40, 0], GuestAddress(REQ))
            .unwrap();
        let (_, r) = serve_chain(&mem, &t, &m, &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE)]);
        assert_eq!(r[11], VIRTIO_SCSI_S_BAD_TARGET as u8);
        assert_eq!(m.bad_target.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn check_conditions() {
        let mem = test_mem();
        let (t, m) = target();
        write_req(&mem, 0, 5, &[0xC7]);
        let (used, r) = serve_chain(&mem, &t, &m, &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE)]);
        assert_eq!(used, 108);
        assert_eq!(&r[0..4], &18u32.to_le_bytes());
        assert_eq!((r[10], r[11]), (STATUS_CHECK_CONDITION, 0));
        assert_eq!((r[12], r[14], r[24], r[25]), (0x70, 0x05, 0x20, 0x00));
        write_req(&mem, 0, 5, &read10(2048, 1));
        let (_, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 512)],
        );
        assert_eq!((r[10], r[14], r[24]), (STATUS_CHECK_CONDITION, 0x05, 0x21));
    }

    #[test]
    fn overrun_and_report_luns() {
        let mem = test_mem();
        let (t, m) = target();
        write_req(&mem, 0, 5, &read10(0, 4));
        let (_, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 512)],
        );
        assert_eq!(r[11], VIRTIO_SCSI_S_OVERRUN as u8);
        // REPORT LUNS from LUN 1 lists both.
        write_req(&mem, 1, 5, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        let (used, _) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(DATA, 256)],
        );
        assert_eq!(used, 108 + 24);
        let mut d = [0u8; 24];
        mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
        assert_eq!(&d[0..4], &16u32.to_be_bytes());
        assert_eq!(&d[16..24], &[0, 1, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn malformed_chains() {
        let mem = test_mem();
        let (t, m) = target();
        write_req(&mem, 0, 5, &read10(0, 1));
        // Header too short: FAILURE.
        let (used, r) = serve_chain(&mem, &t, &m, &[rd(REQ, 20), wr(RESP, RESP_SIZE)]);
        assert_eq!((used, r[11]), (108, VIRTIO_SCSI_S_FAILURE as u8));
        // Data-in outside guest memory: FAILURE.
        let (used, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), wr(0x18_0000, 512)],
        );
        assert_eq!((used, r[11]), (108, VIRTIO_SCSI_S_FAILURE as u8));
        // Readable after writable: FAILURE.
        let (used, r) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(RESP, RESP_SIZE), rd(DATA, 512)],
        );
        assert_eq!((used, r[11]), (108, VIRTIO_SCSI_S_FAILURE as u8));
        // Response too short or outside memory: dropped, response untouched.
        let (used, r) = serve_chain(&mem, &t, &m, &[rd(REQ, REQ_SIZE), wr(RESP, 50)]);
        assert_eq!((used, r[0]), (0, 0xEE));
        let (used, _) = serve_chain(
            &mem,
            &t,
            &m,
            &[rd(REQ, REQ_SIZE), wr(0x4000_0000, RESP_SIZE)],
        );
        assert_eq!(used, 0);
        let (used, _) = serve_chain(&mem, &t, &m, &[rd(REQ, REQ_SIZE)]);
        assert_eq!(used, 0);
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(g(&m.invalid_requests), 3);
        assert_eq!(g(&m.skipped_chains), 3);
    }
}
