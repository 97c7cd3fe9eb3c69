//! Command line (`--lun FILE[,format=raw|qcow2][,ro=on][,serial=S][,lun=N]`) and
//! the virtio-scsi device configuration space (`struct virtio_scsi_config`,
//! virtio 1.2 §5.6.4), serialised little-endian for `VHOST_USER_GET_CONFIG`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use log::LevelFilter;
use tern_image::Format;

use crate::inquiry::MAX_TRANSFER_BLOCKS;
use crate::lun::MAX_LUNS;

/// Largest virtqueue the backend accepts (`VHOST_USER_SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Data segments per command (`seg_max`): the chain also needs a request
/// header and a response descriptor.
pub const SEG_MAX: u32 = MAX_QUEUE_SIZE as u32 - 2;
/// Commands per LUN the driver should keep in flight (`cmd_per_lun`), as QEMU.
pub const CMD_PER_LUN: u32 = 128;
/// `sizeof(struct virtio_scsi_event)`.
pub const EVENT_INFO_SIZE: u32 = 16;
/// Default (and largest accepted) sense size.
pub const SENSE_SIZE: u32 = 96;
/// Default CDB size.
pub const CDB_SIZE: u32 = 32;
/// Size of `struct virtio_scsi_config`.
pub const CONFIG_SPACE_SIZE: usize = 36;
/// Offset of the driver-writable `sense_size` field.
pub const SENSE_SIZE_OFFSET: u32 = 20;
/// Offset of the driver-writable `cdb_size` field.
pub const CDB_SIZE_OFFSET: u32 = 24;
/// Largest CDB size a driver may configure.
pub const MAX_CDB_SIZE: u32 = 256;
/// Most request queues: `queues_per_thread` masks are 64-bit and two bits
/// go to the control and event queues.
pub const MAX_REQUEST_QUEUES: u16 = 62;

/// What can be wrong with a `--lun` value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LunSpecError {
    /// No file name before the options.
    #[error("missing file name")]
    NoFile,
    /// An option that is not `key=value`.
    #[error("option {0:?} is not key=value")]
    NotKeyValue(String),
    /// An unknown option key.
    #[error("unknown option {0:?} (format, ro, serial, direct, lun)")]
    UnknownKey(String),
    /// A bad `format=` value.
    #[error("format {0:?}: expected raw or qcow2")]
    BadFormat(String),
    /// A bad `ro=` value.
    #[error("ro={0:?}: expected on or off")]
    BadBool(String),
    /// A serial longer than SPC allows in VPD page 0x80 (here: 240 bytes) or not printable ASCII.
    #[error("serial {0:?}: at most 240 printable ASCII characters")]
    BadSerial(String),
    /// A bad `lun=` value.
    #[error("lun={0:?}: expected a number below {MAX_LUNS}")]
    BadLun(String),
}

/// One `--lun` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunSpec {
    /// Image file or block device.
    pub path: PathBuf,
    /// Image format; probed from the file when absent.
    pub format: Option<Format>,
    /// Expose the LUN write-protected.
    pub read_only: bool,
    /// Unit serial number; defaults to `tern-lun<N>` (N = LUN number).
    pub serial: Option<String>,
    /// Open the image with O_DIRECT (`direct=on`): no host page cache.
    pub direct: bool,
    /// The LUN number (`lun=N`); default: the lowest one no other `--lun`
    /// takes. Numbers may leave holes (a controller whose LUNs were hot
    /// removed keeps the numbers of the others when it is rebuilt).
    pub number: Option<u16>,
}

/// Whether `serial` can be a unit serial number: SPC's VPD page 0x80 holds
/// printable ASCII, and we keep it to 240 bytes.
pub fn valid_serial(serial: &str) -> bool {
    serial.len() <= 240 && serial.bytes().all(|b| (0x20..0x7F).contains(&b))
}

impl FromStr for LunSpec {
    type Err = LunSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or(LunSpecError::NoFile)?;
        let mut spec = LunSpec {
            path: PathBuf::from(path),
            format: None,
            read_only: false,
            serial: None,
            direct: false,
            number: None,
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| LunSpecError::NotKeyValue(opt.to_string()))?;
            match k {
                "format" => {
                    spec.format = Some(
                        v.parse::<Format>()
                            .map_err(|_| LunSpecError::BadFormat(v.to_string()))?,
                    )
                }
                "ro" | "readonly" => spec.read_only = parse_bool(v)?,
                "direct" => spec.direct = parse_bool(v)?,
                "lun" => {
                    spec.number = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|n| usize::from(*n) < MAX_LUNS)
                            .ok_or_else(|| LunSpecError::BadLun(v.to_string()))?,
                    )
                }
                "serial" => {
                    if !valid_serial(v) {
                        return Err(LunSpecError::BadSerial(v.to_string()));
                    }
                    spec.serial = Some(v.to_string());
                }
                _ => return Err(LunSpecError::UnknownKey(k.to_string())),
            }
        }
        Ok(spec)
    }
}

/// `--aio` engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AioArg {
    /// Linux io_uring: many commands per request queue in flight.
    #[value(name = "io_uring", alias = "io-uring")]
    IoUring,
    /// One blocking read/write at a time per request queue.
    Sync,
}

fn parse_bool(v: &str) -> Result<bool, LunSpecError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(LunSpecError::BadBool(v.to_string())),
    }
}

/// vhost-user virtio-scsi backend for tern: one controller, target 0, with
/// one LUN per `--lun`, numbered from 0 in the order given.
#[derive(Debug, Parser)]
#[command(name = "tern-scsi", version, about)]
pub struct Args {
    /// Path of the vhost-user Unix socket to listen on (created; removed on exit).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// A LUN: FILE[,format=raw|qcow2][,ro=on][,serial=S][,direct=on]. Repeat
    /// for more LUNs. `direct=on` opens the image with O_DIRECT (no host
    /// page cache).
    #[arg(long = "lun", value_name = "SPEC", required = true)]
    pub luns: Vec<LunSpec>,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=MAX_REQUEST_QUEUES as i64))]
    pub queues: u16,
    /// I/O engine for READ/WRITE of raw LUNs (qcow2 LUNs and every other
    /// command are synchronous); io_uring falls back to sync when the
    /// kernel refuses it.
    #[arg(long, value_enum, default_value = "io_uring", value_name = "ENGINE")]
    pub aio: AioArg,
    /// After the frontend disconnects, wait for the next one instead of exiting.
    #[arg(long)]
    pub keep_listening: bool,
    /// A Unix socket (created; removed on exit) on which LUNs are added and
    /// removed while the controller runs: newline-delimited JSON, see
    /// `tern_scsi::hotplug`.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: LevelFilter,
    /// seccomp filters: 0 off, 1 syscalls only, 2 syscalls and arguments.
    #[arg(long, default_value = "2", value_name = "LEVEL")]
    pub seccomp_level: tern_seccomp::Level,
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?} (off, error, warn, info, debug, trace)"))
}

/// The values of the device configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiConfig {
    /// Request queues (the control and event queues are not counted).
    pub num_queues: u32,
    /// Data segments per command.
    pub seg_max: u32,
    /// Largest transfer per command in 512-byte sectors.
    pub max_sectors: u32,
    /// Commands per LUN the driver may queue.
    pub cmd_per_lun: u32,
    /// Bytes of an event buffer the driver should post.
    pub event_info_size: u32,
    /// Sense bytes in a command response (driver-writable).
    pub sense_size: u32,
    /// CDB bytes in a command request (driver-writable).
    pub cdb_size: u32,
    /// Highest channel: 0.
    pub max_channel: u16,
    /// Highest target: 0.
    pub max_target: u16,
    /// Highest LUN the driver should scan.
    pub max_lun: u32,
}

impl ScsiConfig {
    /// The configuration of a controller with `num_queues` request queues.
    pub fn new(num_queues: u16) -> Self {
        ScsiConfig {
            num_queues: u32::from(num_queues),
            seg_max: SEG_MAX,
            max_sectors: MAX_TRANSFER_BLOCKS,
            cmd_per_lun: CMD_PER_LUN,
            event_info_size: EVENT_INFO_SIZE,
            sense_size: SENSE_SIZE,
            cdb_size: CDB_SIZE,
            max_channel: 0,
            max_target: 0,
            max_lun: MAX_LUNS as u32 - 1,
        }
    }

    /// The configuration space as the driver sees it (little-endian).
    pub fn to_bytes(self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.num_queues.to_le_bytes());
        put(4, &self.seg_max.to_le_bytes());
        put(8, &self.max_sectors.to_le_bytes());
        put(12, &self.cmd_per_lun.to_le_bytes());
        put(16, &self.event_info_size.to_le_bytes());
        put(20, &self.sense_size.to_le_bytes());
        put(24, &self.cdb_size.to_le_bytes());
        put(28, &self.max_channel.to_le_bytes());
        put(30, &self.max_target.to_le_bytes());
        put(32, &self.max_lun.to_le_bytes());
        b
    }

    /// `size` bytes from `offset`; bytes past the structure read as zero,
    /// an overflowing range gives an empty vector (a vhost-user failure).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        let bytes = self.to_bytes();
        (offset..end)
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    /// Apply a driver write: only whole `sense_size` and `cdb_size` fields
    /// may be written, with sane values.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        let value = <[u8; 4]>::try_from(data)
            .map(u32::from_le_bytes)
            .map_err(|_| format!("config write of {} bytes at {offset}", data.len()))?;
        match offset {
            SENSE_SIZE_OFFSET if value <= SENSE_SIZE => self.sense_size = value,
            CDB_SIZE_OFFSET if (6..=MAX_CDB_SIZE).contains(&value) => self.cdb_size = value,
            _ => return Err(format!("config write of {value} at {offset} refused")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_specs() {
        let s: LunSpec = "/tmp/a.img".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/tmp/a.img"));
        assert_eq!((s.format, s.read_only, s.serial), (None, false, None));
        let s: LunSpec = "b.qcow2,format=qcow2,ro=on,serial=SN-1".parse().unwrap();
        assert_eq!(s.format, Some(Format::Qcow2));
        assert!(s.read_only);
        assert_eq!(s.serial.as_deref(), Some("SN-1"));
        assert!(!s.direct);
        let s: LunSpec = "d.raw,lun=7".parse().unwrap();
        assert_eq!(s.number, Some(7));
        assert!(matches!(
            "d.raw,lun=16384".parse::<LunSpec>(),
            Err(LunSpecError::BadLun(_))
        ));
        let s: LunSpec = "c.raw,direct=on".parse().unwrap();
        assert!(s.direct && !s.read_only);
        assert!(matches!(
            "a,direct=maybe".parse::<LunSpec>(),
            Err(LunSpecError::BadBool(_))
        ));
        assert_eq!("".parse::<LunSpec>(), Err(LunSpecError::NoFile));
        assert_eq!(",ro=on".parse::<LunSpec>(), Err(LunSpecError::NoFile));
        assert!(matches!(
            "a,ro".parse::<LunSpec>(),
            Err(LunSpecError::NotKeyValue(_))
        ));
        assert!(matches!(
            "a,ro=maybe".parse::<LunSpec>(),
            Err(LunSpecError::BadBool(_))
        ));
        assert!(matches!(
            "a,format=vmdk".parse::<LunSpec>(),
            Err(LunSpecError::BadFormat(_))
        ));
        assert!(matches!(
            "a,cache=none".parse::<LunSpec>(),
            Err(LunSpecError::UnknownKey(_))
        ));
        assert!(matches!(
            "a,serial=\u{e9}".parse::<LunSpec>(),
            Err(LunSpecError::BadSerial(_))
        ));
    }

    #[test]
    fn args() {
        let a = Args::try_parse_from([
            "tern-scsi",
            "--socket",
            "/s",
            "--lun",
            "a",
            "--lun",
            "b,ro=on",
            "--queues",
            "4",
        ])
        .unwrap();
        assert_eq!(a.luns.len(), 2);
        assert!(a.luns[1].read_only);
        assert_eq!(a.queues, 4);
        assert!(Args::try_parse_from(["tern-scsi", "--socket", "/s"]).is_err());
        assert!(Args::try_parse_from([
            "tern-scsi",
            "--socket",
            "/s",
            "--lun",
            "a",
            "--queues",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn config_space() {
        let c = ScsiConfig::new(4);
        let b = c.to_bytes();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 4);
        assert_eq!(u32_at(4), 254);
        assert_eq!(u32_at(8), 0xFFFF);
        assert_eq!(u32_at(12), 128);
        assert_eq!(u32_at(16), 16);
        assert_eq!(u32_at(20), 96);
        assert_eq!(u32_at(24), 32);
        assert_eq!(&b[28..32], &[0, 0, 0, 0]);
        assert_eq!(u32_at(32), 16383);
        assert_eq!(c.read(32, 8), vec![0xFF, 0x3F, 0, 0, 0, 0, 0, 0]);
        assert!(c.read(u32::MAX, 2).is_empty());
    }

    #[test]
    fn config_writes() {
        let mut c = ScsiConfig::new(1);
        c.write(SENSE_SIZE_OFFSET, &64u32.to_le_bytes()).unwrap();
        c.write(CDB_SIZE_OFFSET, &16u32.to_le_bytes()).unwrap();
        assert_eq!((c.sense_size, c.cdb_size), (64, 16));
        assert!(c.write(SENSE_SIZE_OFFSET, &97u32.to_le_bytes()).is_err());
        assert!(c.write(CDB_SIZE_OFFSET, &2u32.to_le_bytes()).is_err());
        assert!(c.write(0, &8u32.to_le_bytes()).is_err());
        assert!(c.write(SENSE_SIZE_OFFSET, &[1, 0]).is_err());
    }
}
