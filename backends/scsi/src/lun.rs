//! Logical units: a disk image with its SCSI identity and mode state, and
//! the execution of parsed commands against it. Data moves through the
//! [`DataIn`] / [`DataOut`] abstractions (guest buffers in the backend,
//! plain vectors in tests), so this module knows nothing of virtqueues.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::warn;
use tern_image::{DiskImage, ImageError};

use crate::cdb::{self, Command, BLOCK_SHIFT, BLOCK_SIZE};
use crate::inquiry;
use crate::metrics::Metrics;
use crate::mode::{self, ModeState, SenseRequest};
use crate::sense::Sense;
pub use crate::target::{Target, TargetError};

/// Most LUNs one controller serves (`max_lun` + 1 in the device config,
/// the 14-bit flat LUN space).
pub const MAX_LUNS: usize = 16384;

/// Bytes per chunk when a command generates or checks data itself (WRITE
/// SAME patterns, VERIFY compares).
const CHUNK: usize = 1 << 20;

/// What the INQUIRY and MODE SENSE builders need to know about a unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitInfo {
    /// LUN number on target 0.
    pub lun: u16,
    /// Size in 512-byte blocks.
    pub capacity: u64,
    /// Writes are refused with DATA PROTECT.
    pub read_only: bool,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
}

/// Why a transfer between guest buffers and the image failed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The image refused the operation.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A guest buffer validated at parse time is no longer mapped (a
    /// memory table change raced with the request).
    #[error("guest buffer at {0:#x} is no longer mapped")]
    GuestMemory(u64),
}

/// Device-to-initiator data: the data-in buffers of a request.
pub trait DataIn {
    /// Capacity in bytes.
    fn len(&self) -> u64;
    /// Whether there is no room at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes written so far.
    fn written(&self) -> u64;
    /// Append as much of `data` as fits; returns the bytes taken.
    fn put(&mut self, data: &[u8]) -> Result<u64, DataError>;
    /// Append `len` bytes read from `image` at `offset` (the caller made sure they fit).
    fn put_from_image(
        &mut self,
        image: &dyn DiskImage,
        offset: u64,
        len: u64,
    ) -> Result<(), DataError>;
}

/// Initiator-to-device data: the data-out buffers of a request.
pub trait DataOut {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether there is no data at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy bytes from `offset` into `buf` (the caller keeps within `len`).
    fn get(&self, offset: u64, buf: &mut [u8]) -> Result<(), DataError>;
    /// Write `len` bytes from the start of the data to `image` at `offset`.
    fn to_image(&self, image: &dyn DiskImage, offset: u64, len: u64) -> Result<(), DataError>;
}

/// Why a command did not complete with GOOD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// CHECK CONDITION with this sense data.
    Check(Sense),
    /// The buffers cannot hold the data the command moves (virtio response OVERRUN).
    Overrun,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Failure::Check(s)
    }
}

/// A logical unit.
pub struct Lun {
    info: UnitInfo,
    image: Arc<dyn DiskImage>,
    wce: AtomicBool,
    metrics: Arc<Metrics>,
    /// The raw image file for asynchronous (io_uring) READ/WRITE, if any.
    aio_file: Option<Arc<File>>,
    /// `aio_file` (and the image) are O_DIRECT.
    direct: bool,
    /// The driver has sent a command to this unit: after a hot add, the
    /// sign that the guest found it.
    seen: AtomicBool,
}

/// A READ or WRITE that may go to the disk asynchronously: every check a
/// disk makes before moving data has passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncIo {
    /// A write (else a read).
    pub write: bool,
    /// Starting LBA.
    pub lba: u64,
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes to move.
    pub len: u64,
}

impl Lun {
    /// A unit numbered `lun` over `image`. The image's size is rounded down
    /// to whole 512-byte blocks.
    pub fn new(
        lun: u16,
        image: Arc<dyn DiskImage>,
        read_only: bool,
        serial: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let read_only = read_only || image.is_read_only();
        Lun {
            info: UnitInfo {
                lun,
                capacity: image.size() >> BLOCK_SHIFT,
                read_only,
                serial,
            },
            image,
            wce: AtomicBool::new(ModeState::default().wce),
            metrics,
            aio_file: None,
            direct: false,
            seen: AtomicBool::new(false),
        }
    }

    /// Notes that the driver addressed a command to this unit.
    pub fn mark_seen(&self) {
        // Read first: the common case (already seen) then writes nothing
        // to a line every request queue shares.
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the driver has addressed a command to this unit.
    pub fn was_seen(&self) -> bool {
        self.seen.load(Ordering::Relaxed)
    }

    /// Let READ/WRITE of this (raw) unit go asynchronously through `file`,
    /// the image file opened again (with O_DIRECT when `direct`).
    pub fn with_aio_file(mut self, file: Arc<File>, direct: bool) -> Self {
        self.aio_file = Some(file);
        self.direct = direct;
        self
    }

    /// The file for asynchronous I/O, if the unit has one.
    pub fn aio_file(&self) -> Option<&Arc<File>> {
        self.aio_file.as_ref()
    }

    /// Whether the asynchronous file is O_DIRECT (buffers must be aligned).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// If `cmd` is a READ, or a WRITE that needs no cache flush after it,
    /// on a unit with an asynchronous file, and passes the checks
    /// [`execute`](Self::execute) makes before moving data (buffer room,
    /// LBA range, write protection), what to submit. Anything else (and
    /// any failing check, answered with the same sense by `execute`) goes
    /// the synchronous way.
    pub fn plan_async(&self, cmd: &Command, in_len: u64, out_len: u64) -> Option<AsyncIo> {
        self.aio_file.as_ref()?;
        let (write, lba, blocks) = match *cmd {
            Command::Read { lba, blocks, .. } => (false, lba, blocks),
            Command::Write { lba, blocks, fua } => {
                if fua || !self.wce.load(Ordering::Relaxed) || self.info.read_only {
                    return None;
                }
                (true, lba, blocks)
            }
            _ => return None,
        };
        let len = u64::from(blocks) << BLOCK_SHIFT;
        let room = if write { out_len } else { in_len };
        if len == 0 || room < len || cdb::check_command_range(cmd, self.info.capacity).is_err() {
            return None;
        }
        Some(AsyncIo {
            write,
            lba,
            offset: lba << BLOCK_SHIFT,
            len,
        })
    }

    /// The outcome of an asynchronous transfer planned by
    /// [`plan_async`](Self::plan_async): the bytes put into data-in, or the
    /// sense `execute` would give for the same failure.
    pub fn finish_async(&self, io: &AsyncIo, result: std::io::Result<u64>) -> Result<u64, Failure> {
        match result {
            Ok(_) if io.write => {
                Metrics::add(&self.metrics.bytes_written, io.len);
                Ok(0)
            }
            Ok(_) => {
                Metrics::add(&self.metrics.bytes_read, io.len);
                Ok(io.len)
            }
            Err(err) => {
                let (what, medium) = if io.write {
                    ("write", Sense::WRITE_ERROR)
                } else {
                    ("read", Sense::UNRECOVERED_READ_ERROR)
                };
                let e = DataError::Image(ImageError::Io {
                    op: what,
                    offset: io.offset,
                    err,
                });
                Err(self.io_error(what, io.lba, e, medium).into())
            }
        }
    }

    /// The unit's identity.
    pub fn info(&self) -> &UnitInfo {
        &self.info
    }

    /// Current mode parameters.
    pub fn mode_state(&self) -> ModeState {
        ModeState {
            wce: self.wce.load(Ordering::Relaxed),
        }
    }

    /// LOGICAL UNIT RESET: mode parameters return to their defaults.
    pub fn reset(&self) {
        self.wce.store(ModeState::default().wce, Ordering::Relaxed);
    }

    /// Execute `cmd` (already parsed). Returns the bytes put into `din`.
    ///
    /// Checks, in the order a disk makes them: the transfer fits the
    /// buffers (else OVERRUN), the LBA range, write protection, then the
    /// command itself.
    pub fn execute(
        &self,
        cmd: &Command,
        dout: &dyn DataOut,
        din: &mut dyn DataIn,
    ) -> Result<u64, Failure> {
        match cmd.transfer() {
            cdb::Transfer::In(n) if matches!(cmd, Command::Read { .. }) && din.len() < n => {
                return Err(Failure::Overrun)
            }
            cdb::Transfer::Out(n) if dout.len() < n => return Err(Failure::Overrun),
            _ => {}
        }
        cdb::check_command_range(cmd, self.info.capacity)?;
        if cmd.writes_medium() && self.info.read_only {
            Metrics::add(&self.metrics.read_only_rejections, 1);
            return Err(Sense::WRITE_PROTECTED.into());
        }
        match *cmd {
            Command::TestUnitReady => {}
            Command::RequestSense { desc, alloc_len } => {
                // Autosense delivers every error with its command, so
                // nothing is ever pending here.
                let s = Sense::NO_SENSE;
                let data = if desc {
                    s.descriptor().to_vec()
                } else {
                    s.fixed().to_vec()
                };
                put_truncated(din, &data, alloc_len)?;
            }
            Command::Inquiry { page, alloc_len } => {
                let data = match page {
                    None => inquiry::standard(),
                    Some(p) => inquiry::vpd(p, &self.info)?,
                };
                put_truncated(din, &data, alloc_len)?;
            }
            // Answered by the target (it knows every LUN); see `Target`.
            Command::ReportLuns { .. } => return Err(Sense::INVALID_OPCODE.into()),
            Command::ReadCapacity10 => {
                let last = self.info.capacity.saturating_sub(1);
                let mut b = [0u8; 8];
                b[0..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
                b[4..8].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
                put_truncated(din, &b, 8)?;
            }
            Command::ReadCapacity16 { alloc_len } => {
                let mut b = [0u8; 32];
                b[0..8].copy_from_slice(&self.info.capacity.saturating_sub(1).to_be_bytes());
                b[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
                // LBPME: logical block provisioning (UNMAP) is enabled.
                b[14] = 0x80;
                put_truncated(din, &b, alloc_len)?;
            }
            Command::Read { lba, blocks, .. } => {
                let len = u64::from(blocks) << BLOCK_SHIFT;
                din.put_from_image(&*self.image, lba << BLOCK_SHIFT, len)
                    .map_err(|e| self.io_error("read", lba, e, Sense::UNRECOVERED_READ_ERROR))?;
                Metrics::add(&self.metrics.bytes_read, len);
            }
            Command::Write { lba, blocks, fua } => {
                let len = u64::from(blocks) << BLOCK_SHIFT;
                dout.to_image(&*self.image, lba << BLOCK_SHIFT, len)
                    .map_err(|e| self.io_error("write", lba, e, Sense::WRITE_ERROR))?;
                Metrics::add(&self.metrics.bytes_written, len);
                if fua || !self.wce.load(Ordering::Relaxed) {
                    self.flush()?;
                }
            }
            Command::SynchronizeCache { .. } => self.flush()?,
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                alloc_len,
                ..
            } => {
                let req = SenseRequest {
                    ten,
                    dbd,
                    llbaa,
                    pc,
                    page,
                };
                let data = mode::mode_sense(&req, &self.info, self.mode_state())?;
                put_truncated(din, &data, alloc_len)?;
            }
            Command::ModeSelect { ten, param_len } => {
                let data = self.get_out(dout, param_len as usize)?;
                let new = mode::mode_select(ten, &data, self.mode_state())?;
                let was = self.wce.swap(new.wce, Ordering::Relaxed);
                if was && !new.wce {
                    // Leaving write-back: what was cached must be durable now.
                    self.flush()?;
                }
            }
            Command::StartStopUnit { start, no_flush } => {
                if !start && !no_flush {
                    self.flush()?;
                }
            }
            Command::Unmap { param_len } => {
                let data = self.get_out(dout, param_len as usize)?;
                for r in cdb::parse_unmap_list(&data, self.info.capacity)? {
                    if r.blocks == 0 {
                        continue;
                    }
                    self.image
                        .discard(r.lba << BLOCK_SHIFT, u64::from(r.blocks) << BLOCK_SHIFT)
                        .map_err(|e| self.io_error("unmap", r.lba, e.into(), Sense::WRITE_ERROR))?;
                    Metrics::add(&self.metrics.unmapped_blocks, u64::from(r.blocks));
                }
            }
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                let mut block = vec![0u8; BLOCK_SIZE as usize];
                if !ndob {
                    dout.get(0, &mut block)
                        .map_err(|e| self.io_error("write same", lba, e, Sense::WRITE_ERROR))?;
                }
                self.write_same(lba, blocks, &block, unmap)?;
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                if bytchk {
                    self.verify(lba, blocks, dout)?;
                }
            }
        }
        Ok(din.written())
    }

    fn flush(&self) -> Result<(), Sense> {
        self.image
            .flush()
            .map_err(|e| self.io_error("flush", 0, e.into(), Sense::WRITE_ERROR))
    }

    /// Read the first `len` bytes of data-out.
    fn get_out(&self, dout: &dyn DataOut, len: usize) -> Result<Vec<u8>, Sense> {
        let mut v = vec![0u8; len];
        dout.get(0, &mut v)
            .map_err(|e| self.io_error("parameter list", 0, e, Sense::INTERNAL_TARGET_FAILURE))?;
        Ok(v)
    }

    fn write_same(&self, lba: u64, blocks: u32, block: &[u8], unmap: bool) -> Result<(), Sense> {
        let offset = lba << BLOCK_SHIFT;
        let len = u64::from(blocks) << BLOCK_SHIFT;
        let err = |e: ImageError| self.io_error("write same", lba, e.into(), Sense::WRITE_ERROR);
        if block.iter().all(|&b| b == 0) {
            // Zeros: let the image zero (or, with UNMAP, deallocate) the range
            // in one call; either way reads return zeros afterwards.
            self.image.write_zeroes(offset, len, unmap).map_err(err)?;
            if unmap {
                Metrics::add(&self.metrics.unmapped_blocks, u64::from(blocks));
            }
        } else {
            let per_chunk = (CHUNK / block.len()).min(blocks as usize);
            let chunk = block.repeat(per_chunk);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                self.image
                    .write_at(&chunk[..n], offset + done)
                    .map_err(err)?;
                done += n as u64;
            }
            Metrics::add(&self.metrics.bytes_written, len);
        }
        if !self.wce.load(Ordering::Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    fn verify(&self, lba: u64, blocks: u32, dout: &dyn DataOut) -> Result<(), Sense> {
        let offset = lba << BLOCK_SHIFT;
        let len = u64::from(blocks) << BLOCK_SHIFT;
        let mut disk = vec![0u8; CHUNK.min(len as usize)];
        let mut host = vec![0u8; disk.len()];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(disk.len() as u64) as usize;
            self.image
                .read_at(&mut disk[..n], offset + done)
                .map_err(|e| {
                    self.io_error("verify", lba, e.into(), Sense::UNRECOVERED_READ_ERROR)
                })?;
            dout.get(done, &mut host[..n])
                .map_err(|e| self.io_error("verify", lba, e, Sense::INTERNAL_TARGET_FAILURE))?;
            if disk[..n] != host[..n] {
                return Err(Sense::MISCOMPARE_DURING_VERIFY);
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Log an I/O failure once and turn it into sense data: guest memory
    /// trouble is the device's own failure, image errors are medium errors.
    fn io_error(&self, what: &str, lba: u64, e: DataError, medium: Sense) -> Sense {
        Metrics::add(&self.metrics.io_errors, 1);
        match e {
            DataError::GuestMemory(_) => {
                warn!("LUN {}: {what} at LBA {lba}: {e}", self.info.lun);
                Sense::INTERNAL_TARGET_FAILURE
            }
            DataError::Image(ImageError::ReadOnly) => Sense::WRITE_PROTECTED,
            DataError::Image(ImageError::OutOfRange { .. }) => Sense::LBA_OUT_OF_RANGE,
            DataError::Image(ref ie) => {
                warn!("LUN {}: {what} at LBA {lba}: {ie}", self.info.lun);
                medium
            }
        }
    }
}

/// Put `data` truncated to the allocation length (the buffer truncates further).
fn put_truncated(din: &mut dyn DataIn, data: &[u8], alloc_len: u32) -> Result<(), Sense> {
    let n = data.len().min(alloc_len as usize);
    din.put(&data[..n])
        .map(|_| ())
        .map_err(|_| Sense::INTERNAL_TARGET_FAILURE)
}

/// The LUN number in a virtio-scsi LUN field, if it addresses target 0
/// with a single-level LUN we can number.
pub fn decode_lun(lun: &[u8; 8]) -> Option<u16> {
    if lun[0] != 1 || lun[1] != 0 || lun[4..].iter().any(|&b| b != 0) {
        return None;
    }
    match lun[2] >> 6 {
        // Peripheral device addressing, bus 0.
        0b00 if lun[2] == 0 => Some(u16::from(lun[3])),
        // Flat space addressing.
        0b01 => Some(u16::from_be_bytes([lun[2] & 0x3F, lun[3]])),
        _ => None,
    }
}

/// A LUN as REPORT LUNS lists it: peripheral addressing below 256, flat
/// addressing above (as QEMU does; Linux handles both).
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0..2].copy_from_slice(&(0x4000 | (lun & 0x3FFF)).to_be_bytes());
    }
    b
}

/// The LUN field of an event about `lun` on target 0: bytes 2-3 as REPORT
/// LUNS lists the unit ([`encode_lun`]: peripheral below 256). Linux's
/// virtio_scsi takes `lun[2] << 8 | lun[3]` of an event as the LUN number
/// it adds or removes, the number its REPORT LUNS scan gave the unit; flat
/// addressing here would make LUN 1 its LUN 16385 (QEMU encodes events
/// the same way, for this reason).
pub fn event_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = 1;
    b[2..4].copy_from_slice(&encode_lun(lun)[0..2]);
    b
}

/// The virtio-scsi LUN field for `lun` on target 0 (flat addressing, as
/// Linux's virtio_scsi builds it).
pub fn virtio_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = 1;
    b[2..4].copy_from_slice(&(0x4000 | (lun & 0x3FFF)).to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb::parse;
    use std::path::PathBuf;

    /// Data-in into a vector of fixed capacity.
    struct VecIn {
        buf: Vec<u8>,
        cap: usize,
    }

    impl VecIn {
        fn new(cap: usize) -> Self {
            VecIn {
                buf: Vec::new(),
                cap,
            }
        }
    }

    impl DataIn for VecIn {
        fn len(&self) -> u64 {
            self.cap as u64
        }
        fn written(&self) -> u64 {
            self.buf.len() as u64
        }
        fn put(&mut self, data: &[u8]) -> Result<u64, DataError> {
            let n = data.len().min(self.cap - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            Ok(n as u64)
        }
        fn put_from_image(
            &mut self,
            image: &dyn DiskImage,
            offset: u64,
            len: u64,
        ) -> Result<(), DataError> {
            let mut b = vec![0u8; len as usize];
            image.read_at(&mut b, offset)?;
            self.buf.extend_from_slice(&b);
            Ok(())
        }
    }

    struct VecOut(Vec<u8>);

    impl DataOut for VecOut {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn get(&self, offset: u64, buf: &mut [u8]) -> Result<(), DataError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.0[o..o + buf.len()]);
            Ok(())
        }
        fn to_image(&self, image: &dyn DiskImage, offset: u64, len: u64) -> Result<(), DataError> {
            image.write_at(&self.0[..len as usize], offset)?;
            Ok(())
        }
    }

    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_raw(tag: &str, size: u64, fill: u8) -> TempFile {
        let p =
            std::env::temp_dir().join(format!("tern-scsi-lun-{}-{tag}.raw", std::process::id()));
        std::fs::write(&p, vec![fill; size as usize]).unwrap();
        TempFile(p)
    }

    fn lun_on(f: &TempFile, ro: bool) -> Lun {
        let img = tern_image::open(&f.0, tern_image::Format::Raw, ro, false).unwrap();
        Lun::new(2, Arc::from(img), ro, "sn".into(), Arc::new(Metrics::new()))
    }

    fn run(lun: &Lun, cdb: &[u8], out: Vec<u8>, cap: usize) -> (Result<u64, Failure>, Vec<u8>) {
        let mut c = [0u8; 32];
        c[..cdb.len()].copy_from_slice(cdb);
        let cmd = parse(&c).expect("valid CDB");
        let mut din = VecIn::new(cap);
        let r = lun.execute(&cmd, &VecOut(out), &mut din);
        (r, din.buf)
    }

    fn check(r: Result<u64, Failure>) -> Sense {
        match r {
            Err(Failure::Check(s)) => s,
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = vec![op, 0];
        c.extend_from_slice(&lba.to_be_bytes());
        c.push(0);
        c.extend_from_slice(&blocks.to_be_bytes());
        c.push(0);
        c
    }

    fn allocated(p: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn write_read_round_trip() {
        let f = temp_raw("rw", 1 << 20, 0);
        let lun = lun_on(&f, false);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let (r, _) = run(&lun, &rw10(0x2A, 8, 8), data.clone(), 0);
        assert_eq!(r, Ok(0));
        let file = std::fs::read(&f.0).unwrap();
        assert_eq!(&file[4096..8192], &data[..]);
        let (r, got) = run(&lun, &rw10(0x28, 8, 8), vec![], 4096);
        assert_eq!(r, Ok(4096));
        assert_eq!(got, data);
        // READ(6) of the same blocks.
        let (r, got) = run(&lun, &[0x08, 0, 0, 8, 8, 0], vec![], 4096);
        assert_eq!((r, got), (Ok(4096), data));
    }

    #[test]
    fn errors() {
        let f = temp_raw("err", 1 << 20, 0);
        let lun = lun_on(&f, false);
        // 2048 blocks: the last one is readable, one past is not.
        assert_eq!(run(&lun, &rw10(0x28, 2047, 1), vec![], 512).0, Ok(512));
        let s = check(run(&lun, &rw10(0x28, 2047, 2), vec![], 1024).0);
        assert_eq!(s, Sense::LBA_OUT_OF_RANGE);
        // Buffers smaller than the transfer.
        assert_eq!(
            run(&lun, &rw10(0x28, 0, 2), vec![], 512).0,
            Err(Failure::Overrun)
        );
        assert_eq!(
            run(&lun, &rw10(0x2A, 0, 2), vec![0; 512], 0).0,
            Err(Failure::Overrun)
        );
        // VPD page we do not have.
        let s = check(run(&lun, &[0x12, 1, 0x89, 0, 255, 0], vec![], 255).0);
        assert_eq!(s, Sense::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn read_only_unit() {
        let f = temp_raw("ro", 1 << 20, 0xAB);
        let lun = lun_on(&f, true);
        let s = check(run(&lun, &rw10(0x2A, 0, 1), vec![0; 512], 0).0);
        assert_eq!(s, Sense::WRITE_PROTECTED);
        assert_eq!((s.key, s.asc, s.ascq), (0x7, 0x27, 0x00));
        let s = check(run(&lun, &[0x41, 0x08, 0, 0, 0, 0, 0, 0, 1, 0], vec![0; 512], 0).0);
        assert_eq!(s, Sense::WRITE_PROTECTED);
        assert!(std::fs::read(&f.0).unwrap().iter().all(|&b| b == 0xAB));
        // MODE SENSE shows WP.
        let (r, b) = run(&lun, &[0x1A, 0x08, 0x08, 0, 255, 0], vec![], 255);
        assert!(r.is_ok());
        assert_eq!(b[2] & 0x80, 0x80);
        // Reads still work.
        let (r, b) = run(&lun, &rw10(0x28, 1, 1), vec![], 512);
        assert_eq!(r, Ok(512));
        assert!(b.iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn unmap_punches_holes() {
        let size = 8 << 20;
        let f = temp_raw("unmap", size, 0x5A);
        let lun = lun_on(&f, false);
        let before = allocated(&f.0);
        assert!(before >= size, "file fully allocated: {before}");
        // Unmap 4 MiB at 1 MiB.
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&2048u64.to_be_bytes());
        list.extend_from_slice(&8192u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let (r, _) = run(&lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], list, 0);
        assert_eq!(r, Ok(0));
        let after = allocated(&f.0);
        assert!(after + (4 << 20) <= before, "allocated {before} -> {after}");
        let file = std::fs::read(&f.0).unwrap();
        assert!(file[1 << 20..5 << 20].iter().all(|&b| b == 0));
        assert!(file[..1 << 20].iter().all(|&b| b == 0x5A));
        assert!(file[5 << 20..].iter().all(|&b| b == 0x5A));
        // A range past the end is refused before anything is unmapped.
        let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
        list.extend_from_slice(&16380u64.to_be_bytes());
        list.extend_from_slice(&8u32.to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        let s = check(run(&lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], list, 0).0);
        assert_eq!(s, Sense::LBA_OUT_OF_RANGE);
    }

    #[test]
    fn write_same() {
        let f = temp_raw("ws", 4 << 20, 0x11);
        let lun = lun_on(&f, false);
        // A pattern block repeated over 16 blocks.
        let block: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        let (r, _) = run(&lun, &[0x41, 0, 0, 0, 0, 4, 0, 0, 16, 0], block.clone(), 0);
        assert_eq!(r, Ok(0));
        let file = std::fs::read(&f.0).unwrap();
        for b in 4..20 {
            assert_eq!(&file[b * 512..(b + 1) * 512], &block[..]);
        }
        assert_eq!(file[20 * 512], 0x11);
        // WRITE SAME(16) with UNMAP and zeros: the 2 MiB range becomes a hole.
        let before = allocated(&f.0);
        let mut c = vec![0x93, 0x08];
        c.extend_from_slice(&2048u64.to_be_bytes());
        c.extend_from_slice(&4096u32.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        let (r, _) = run(&lun, &c, vec![0; 512], 0);
        assert_eq!(r, Ok(0));
        assert!(allocated(&f.0) + (2 << 20) <= before);
        let file = std::fs::read(&f.0).unwrap();
        assert!(file[1 << 20..3 << 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn verify_and_sync() {
        let f = temp_raw("verify", 1 << 20, 0x22);
        let lun = lun_on(&f, false);
        assert_eq!(
            run(&lun, &[0x2F, 0, 0, 0, 0, 0, 0, 0, 4, 0], vec![], 0).0,
            Ok(0)
        );
        let s = check(run(&lun, &[0x2F, 0, 0, 0, 8, 0, 0, 0, 4, 0], vec![], 0).0);
        assert_eq!(s, Sense::LBA_OUT_OF_RANGE);
        // BYTCHK=1: compare.
        let (r, _) = run(
            &lun,
            &[0x2F, 0x02, 0, 0, 0, 1, 0, 0, 2, 0],
            vec![0x22; 1024],
            0,
        );
        assert_eq!(r, Ok(0));
        let mut data = vec![0x22; 1024];
        data[700] = 0;
        let s = check(run(&lun, &[0x2F, 0x02, 0, 0, 0, 1, 0, 0, 2, 0], data, 0).0);
        assert_eq!(s, Sense::MISCOMPARE_DURING_VERIFY);
        assert_eq!(
            run(&lun, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![], 0).0,
            Ok(0)
        );
        let mut c = [0u8; 16];
        c[0] = 0x91;
        assert_eq!(run(&lun, &c, vec![], 0).0, Ok(0));
        assert_eq!(run(&lun, &[0x1B, 0, 0, 0, 0, 0], vec![], 0).0, Ok(0));
        assert_eq!(run(&lun, &[0x00, 0, 0, 0, 0, 0], vec![], 0).0, Ok(0));
    }

    #[test]
    fn capacity_inquiry_sense() {
        let f = temp_raw("cap", 3 << 20, 0);
        let lun = lun_on(&f, false);
        let (r, b) = run(&lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], vec![], 8);
        assert_eq!(r, Ok(8));
        assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), 6143);
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 512);
        let mut c = [0u8; 16];
        c[0] = 0x9E;
        c[1] = 0x10;
        c[13] = 32;
        let (r, b) = run(&lun, &c, vec![], 64);
        assert_eq!(r, Ok(32));
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), 6143);
        assert_eq!(b[14] & 0x80, 0x80, "LBPME");
        // Allocation length truncates, and so does a small buffer.
        let (r, b) = run(&lun, &[0x12, 0, 0, 0, 5, 0], vec![], 255);
        assert_eq!((r, b.len()), (Ok(5), 5));
        let (r, b) = run(&lun, &[0x12, 0, 0, 0, 255, 0], vec![], 10);
        assert_eq!((r, b.len()), (Ok(10), 10));
        let (r, b) = run(&lun, &[0x03, 0, 0, 0, 252, 0], vec![], 252);
        assert_eq!(r, Ok(18));
        assert_eq!((b[0], b[2]), (0x70, 0));
        let (_, b) = run(&lun, &[0x03, 1, 0, 0, 252, 0], vec![], 252);
        assert_eq!(b[0], 0x72);
    }

    #[test]
    fn mode_select_switches_write_cache() {
        let f = temp_raw("ms", 1 << 20, 0);
        let lun = lun_on(&f, false);
        assert!(lun.mode_state().wce);
        let (_, mut page) = run(&lun, &[0x1A, 0x08, 0x08, 0, 255, 0], vec![], 255);
        page[0] = 0;
        page[4 + 2] &= !0x04;
        let n = page.len() as u8;
        let (r, _) = run(&lun, &[0x15, 0x10, 0, 0, n, 0], page, 0);
        assert_eq!(r, Ok(0));
        assert!(!lun.mode_state().wce);
        let (_, b) = run(&lun, &[0x1A, 0x08, 0x08, 0, 255, 0], vec![], 255);
        assert_eq!(b[4 + 2] & 0x04, 0);
        lun.reset();
        assert!(lun.mode_state().wce);
    }

    #[test]
    fn lun_addressing() {
        assert_eq!(decode_lun(&virtio_lun(0)), Some(0));
        assert_eq!(decode_lun(&virtio_lun(300)), Some(300));
        assert_eq!(decode_lun(&virtio_lun(16383)), Some(16383));
        assert_eq!(decode_lun(&[1, 0, 0, 7, 0, 0, 0, 0]), Some(7));
        assert_eq!(decode_lun(&[1, 1, 0x40, 0, 0, 0, 0, 0]), None, "target 1");
        assert_eq!(decode_lun(&[0, 0, 0x40, 0, 0, 0, 0, 0]), None);
        assert_eq!(
            decode_lun(&[1, 0, 0x80, 0, 0, 0, 0, 0]),
            None,
            "logical unit addressing"
        );
        assert_eq!(
            decode_lun(&[1, 0, 0x40, 0, 0, 1, 0, 0]),
            None,
            "second level"
        );
        assert_eq!(encode_lun(5), [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(event_lun(5), [1, 0, 0, 5, 0, 0, 0, 0]);
        assert_eq!(event_lun(300), [1, 0, 0x41, 0x2C, 0, 0, 0, 0]);
        assert_eq!(decode_lun(&event_lun(5)), Some(5));
        assert_eq!(decode_lun(&event_lun(300)), Some(300));
        assert_eq!(encode_lun(300), [0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn report_luns_lists_all() {
        let m = Arc::new(Metrics::new());
        let f = temp_raw("rl", 1 << 20, 0);
        let img: Arc<dyn DiskImage> =
            Arc::from(tern_image::open(&f.0, tern_image::Format::Raw, true, false).unwrap());
        let t = Target::new(
            (0..300u16)
                .map(|i| Arc::new(Lun::new(i, img.clone(), true, String::new(), m.clone())))
                .collect(),
        );
        let b = t.report_luns(0);
        assert_eq!(u32::from_be_bytes(b[0..4].try_into().unwrap()), 300 * 8);
        assert_eq!(&b[8..16], &encode_lun(0));
        assert_eq!(&b[8 + 299 * 8..], &encode_lun(299));
        assert_eq!(t.report_luns(1).len(), 8);
        assert!(t.lookup(&virtio_lun(299)).is_some());
        assert!(t.lookup(&virtio_lun(300)).is_none());
    }
}
