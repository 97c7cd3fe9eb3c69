//! A minimal virtio-scsi driver over [`BlkFrontend`]'s generic vhost-user
//! plumbing, for driving `tern-scsi` without a VMM (its tests and
//! `tern-bench scsi`). Queue 0 is the control queue, 1 the event queue,
//! 2.. the request queues.

use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::{BlkFrontend, Desc, Options};

/// Control queue index.
pub const CONTROL_QUEUE: usize = 0;
/// Event queue index.
pub const EVENT_QUEUE: usize = 1;
/// First request queue index.
pub const REQUEST_QUEUE: usize = 2;
/// CDB bytes in a request (the device default).
pub const CDB_SIZE: usize = 32;
/// Sense bytes in a response (the device default).
pub const SENSE_SIZE: usize = 96;
/// `sizeof(virtio_scsi_cmd_req)` with the default CDB size.
pub const REQ_SIZE: usize = 19 + CDB_SIZE;
/// `sizeof(virtio_scsi_cmd_resp)` with the default sense size.
pub const RESP_SIZE: usize = 12 + SENSE_SIZE;

/// virtio-scsi response codes (virtio 1.2 §5.6.6.1).
pub const S_OK: u8 = 0;
/// The buffers cannot hold the data.
pub const S_OVERRUN: u8 = 1;
/// No such target or LUN.
pub const S_BAD_TARGET: u8 = 3;
/// Other failure (malformed request).
pub const S_FAILURE: u8 = 9;
/// TMF subtypes.
pub const TMF_ABORT_TASK: u32 = 0;
/// LOGICAL UNIT RESET.
pub const TMF_LOGICAL_UNIT_RESET: u32 = 5;
/// SCSI status GOOD.
pub const STATUS_GOOD: u8 = 0;
/// SCSI status CHECK CONDITION.
pub const STATUS_CHECK_CONDITION: u8 = 2;

/// The virtio-scsi LUN field for `lun` on target 0 (flat addressing, as Linux builds it).
pub fn lun_field(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = 1;
    b[2..4].copy_from_slice(&(0x4000 | (lun & 0x3FFF)).to_be_bytes());
    b
}

/// `virtio_scsi_cmd_req` bytes.
pub fn cmd_req(lun: [u8; 8], tag: u64, cdb: &[u8]) -> [u8; REQ_SIZE] {
    let mut h = [0u8; REQ_SIZE];
    h[..8].copy_from_slice(&lun);
    h[8..16].copy_from_slice(&tag.to_le_bytes());
    let n = cdb.len().min(CDB_SIZE);
    h[19..19 + n].copy_from_slice(&cdb[..n]);
    h
}

/// READ(16) or WRITE(16).
pub fn rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8A } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ(10) or WRITE(10).
pub fn rw10(write: bool, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = if write { 0x2A } else { 0x28 };
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// The outcome of one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdResult {
    /// virtio-scsi response code.
    pub response: u8,
    /// SCSI status.
    pub status: u8,
    /// Residual byte count.
    pub resid: u32,
    /// Sense data (`sense_len` bytes).
    pub sense: Vec<u8>,
    /// Data-in bytes (the whole data-in buffer).
    pub data: Vec<u8>,
    /// Used length reported by the device.
    pub used_len: u32,
}

impl CmdResult {
    /// (sense key, ASC, ASCQ) of fixed-format sense, if any.
    pub fn sense_key(&self) -> Option<(u8, u8, u8)> {
        (self.sense.len() >= 14 && self.sense[0] & 0x7F == 0x70)
            .then(|| (self.sense[2] & 0x0F, self.sense[12], self.sense[13]))
    }
}

/// A connected virtio-scsi frontend.
pub struct ScsiFrontend {
    /// The generic frontend (memory, queues, vhost-user connection).
    pub fe: BlkFrontend,
    /// Request header, response and a data area (guest addresses).
    req: u64,
    resp: u64,
    data: u64,
    data_len: u64,
    tag: u64,
}

impl ScsiFrontend {
    /// Connect with `request_queues` request queues and room for `max_data`
    /// bytes of data per command.
    pub fn connect(
        socket: &Path,
        request_queues: usize,
        event_idx: bool,
        max_data: u64,
    ) -> Result<ScsiFrontend, String> {
        let o = Options {
            queues: REQUEST_QUEUE + request_queues,
            event_idx,
            data_size: (max_data + (1 << 20)).div_ceil(2 << 20) * (2 << 20),
            ..Options::default()
        };
        let mut fe = BlkFrontend::connect_with(socket, &o)?;
        let req = fe.alloc(4096, 4096, 0);
        let resp = fe.alloc(4096, 4096, 0);
        let data = fe.alloc(max_data.max(4096), 4096, 0);
        Ok(ScsiFrontend {
            fe,
            req,
            resp,
            data,
            data_len: max_data.max(4096),
            tag: 0,
        })
    }

    /// Device configuration space (36 bytes of `virtio_scsi_config`).
    pub fn config(&mut self) -> Vec<u8> {
        self.fe.config(0, 36)
    }

    /// Submit a command on request queue `q` (0-based among request queues)
    /// to `lun` with `data_out`, a data-in buffer of `data_in` bytes, and
    /// wait for it.
    pub fn command(
        &mut self,
        q: usize,
        lun: [u8; 8],
        cdb: &[u8],
        data_out: &[u8],
        data_in: u32,
    ) -> CmdResult {
        self.command_with(q, lun, cdb, data_out, data_in, RESP_SIZE as u32)
    }

    /// [`command`](Self::command) with an explicit response buffer size
    /// (smaller than [`RESP_SIZE`] to test malformed chains).
    pub fn command_with(
        &mut self,
        q: usize,
        lun: [u8; 8],
        cdb: &[u8],
        data_out: &[u8],
        data_in: u32,
        resp_len: u32,
    ) -> CmdResult {
        assert!(data_out.len() as u64 <= self.data_len && u64::from(data_in) <= self.data_len);
        self.tag += 1;
        let mem = &self.fe.mem;
        mem.write_slice(&cmd_req(lun, self.tag, cdb), GuestAddress(self.req))
            .unwrap();
        mem.write_slice(&[0xEE; RESP_SIZE], GuestAddress(self.resp))
            .unwrap();
        let mut chain = vec![Desc {
            addr: self.req,
            len: REQ_SIZE as u32,
            write: false,
        }];
        if !data_out.is_empty() {
            mem.write_slice(data_out, GuestAddress(self.data)).unwrap();
            chain.push(Desc {
                addr: self.data,
                len: data_out.len() as u32,
                write: false,
            });
        }
        chain.push(Desc {
            addr: self.resp,
            len: resp_len,
            write: true,
        });
        if data_in > 0 {
            mem.write_slice(&vec![0u8; data_in as usize], GuestAddress(self.data))
                .unwrap();
            chain.push(Desc {
                addr: self.data,
                len: data_in,
                write: true,
            });
        }
        let qi = REQUEST_QUEUE + q;
        let head = self.fe.queues[qi].add_chain(mem, &chain);
        self.fe.queues[qi].kick();
        let used = self.fe.queues[qi]
            .wait_used(&self.fe.mem, Duration::from_secs(10))
            .expect("command timed out");
        assert_eq!(used.id, head, "completed chain");
        let r = self.fe.peek(self.resp, RESP_SIZE);
        let sense_len = u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize;
        CmdResult {
            response: r[11],
            status: r[10],
            resid: u32::from_le_bytes(r[4..8].try_into().unwrap()),
            sense: r[12..12 + sense_len.min(SENSE_SIZE)].to_vec(),
            data: self.fe.peek(self.data, data_in as usize),
            used_len: used.len,
        }
    }

    /// Send a task management function on the control queue; returns the response byte.
    pub fn tmf(&mut self, subtype: u32, lun: [u8; 8], tag: u64) -> u8 {
        let mut b = [0u8; 24];
        b[4..8].copy_from_slice(&subtype.to_le_bytes());
        b[8..16].copy_from_slice(&lun);
        b[16..24].copy_from_slice(&tag.to_le_bytes());
        self.fe.poke(self.req, &b);
        self.fe.poke(self.resp, &[0xEE]);
        let chain = [
            Desc {
                addr: self.req,
                len: 24,
                write: false,
            },
            Desc {
                addr: self.resp,
                len: 1,
                write: true,
            },
        ];
        let mem = &self.fe.mem;
        let head = self.fe.queues[CONTROL_QUEUE].add_chain(mem, &chain);
        self.fe.queues[CONTROL_QUEUE].kick();
        let used = self.fe.queues[CONTROL_QUEUE]
            .wait_used(&self.fe.mem, Duration::from_secs(10))
            .expect("TMF timed out");
        assert_eq!((used.id, used.len), (head, 1));
        self.fe.peek(self.resp, 1)[0]
    }
}
