//! The VM configuration: one model for the command line, the
//! `--config-file` JSON and (later) the HTTP API, whose bodies these
//! sections are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kvm::cpuid::CpuTemplate;
use crate::memory::{MAX_MEM_MIB, MIN_MEM_MIB};

/// Most vCPUs a VM may have: the MADT describes them with xAPIC entries
/// (IDs below 255) and the guest kit's kernel has NR_CPUS=64, but tern
/// itself supports up to this many.
pub const MAX_VCPUS: u32 = 254;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {err}")]
    Read {
        /// The path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The config file is not valid JSON for this model.
    #[error("invalid config file {path}: {err}")]
    Parse {
        /// The path.
        path: PathBuf,
        /// What serde said, with line and column.
        err: serde_json::Error,
    },
    /// A value out of range or missing.
    #[error("{0}")]
    Invalid(String),
}

/// `machine-config`: the vCPUs and memory (Firecracker's body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading (two threads per core). Only `false` is
    /// supported so far.
    #[serde(default)]
    pub smt: bool,
    /// CPU template; the host's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Track dirty pages (for diff snapshots and migration).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Back guest RAM with huge pages.
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// Page size backing guest RAM (Firecracker's values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    #[default]
    None,
    /// 2 MiB pages from hugetlbfs (the host must have them reserved).
    #[serde(rename = "2M")]
    Huge2M,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// `boot-source`: what to boot (Firecracker's body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image: ELF (PVH or 64-bit entry) or bzImage.
    pub kernel_image_path: PathBuf,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Image format of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriveFormat {
    /// A plain image.
    #[default]
    Raw,
    /// qcow2 v3 (with an optional backing file).
    Qcow2,
}

/// Host page cache use of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DriveCache {
    /// Through the host page cache; the guest's flushes reach the disk.
    #[default]
    Writeback,
    /// O_DIRECT: around the host page cache.
    Direct,
}

/// The virtio device a drive reaches the guest through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DriveInterface {
    /// A virtio-blk function of its own, served by its own tern-blk.
    #[default]
    #[serde(rename = "virtio-blk")]
    VirtioBlk,
    /// A LUN of the VM's one virtio-scsi controller, served by one tern-scsi
    /// for all the VM's virtio-scsi drives (LUNs numbered in config order).
    #[serde(rename = "virtio-scsi")]
    VirtioScsi,
}

impl DriveInterface {
    /// The name in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DriveInterface::VirtioBlk => "virtio-blk",
            DriveInterface::VirtioScsi => "virtio-scsi",
        }
    }
}

/// Most LUNs of the virtio-scsi controller (virtio-scsi drives of a VM).
pub const MAX_SCSI_LUNS: usize = 256;

/// `drives`: a disk served by a vhost-user backend: a virtio-blk function
/// (a managed tern-blk for `path_on_host`, or an external backend at
/// `socket`), or a LUN of the virtio-scsi controller (`interface`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique id (the `{id}` of `PUT /drives/{id}`).
    pub drive_id: String,
    /// Image file (tern starts tern-blk for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// The guest's root disk: it gets the first slot and, unless the command
    /// line names a root already, `root=/dev/vda`.
    #[serde(default)]
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// Image format.
    #[serde(default)]
    pub format: DriveFormat,
    /// Queues (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// An external backend's vhost-user socket (instead of `path_on_host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Host cache mode.
    #[serde(default)]
    pub cache: DriveCache,
    /// Serial number the guest reads (GET_ID, or the SCSI unit serial
    /// number VPD page); default: the drive id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// virtio-blk (default) or a LUN of the virtio-scsi controller.
    #[serde(default)]
    pub interface: DriveInterface,
    /// The PCI slot on bus 0 (1-30); default: the next free one. tern
    /// records the slot each device got, so a snapshot or a migration puts
    /// it back at the same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
    /// A virtio-scsi drive's LUN number on the controller (0-255); default:
    /// the lowest free one. tern records the LUN each drive got, so a
    /// snapshot or a migration (which restarts tern-scsi) keeps it even
    /// after other LUNs were hot removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<u16>,
}

/// `network-interfaces`: a virtio-net NIC served by a vhost-user backend: a
/// managed tern-net on the tap `host_dev_name`, or an external backend at
/// `socket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique id (the `{id}` of `PUT /network-interfaces/{id}`).
    pub iface_id: String,
    /// The tap device (tern starts tern-net on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_dev_name: Option<String>,
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Queue pairs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// An external backend's vhost-user socket (instead of `host_dev_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The PCI slot on bus 0 (1-30); default: the next free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
}

/// Most queue pairs a NIC may have.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

impl NetConfig {
    /// Checks the NIC on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| {
            Err(ConfigError::Invalid(format!(
                "network interface {}: {why}",
                self.iface_id
            )))
        };
        if self.iface_id.is_empty()
            || self.iface_id.len() > 64
            || !self
                .iface_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("iface_id must be 1-64 characters of [A-Za-z0-9_-]".into());
        }
        if self
            .socket
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return bad("socket must not be empty".into());
        }
        match (&self.host_dev_name, &self.socket) {
            (Some(_), Some(_)) => {
                return bad("give either host_dev_name or socket, not both".into())
            }
            (None, None) => {
                return bad(
                    "needs host_dev_name (a tap; managed backend) or socket (external backend)"
                        .into(),
                )
            }
            (Some(t), None) if t.is_empty() || t.len() > 15 || t.contains('/') => {
                return bad(format!("host_dev_name {t:?} is not a valid interface name"))
            }
            _ => {}
        }
        if let Some(m) = &self.guest_mac {
            match parse_mac(m) {
                None => return bad(format!("guest_mac {m:?} is not aa:bb:cc:dd:ee:ff")),
                Some(mac) if mac[0] & 1 == 1 => {
                    return bad(format!("guest_mac {m} is a multicast address"))
                }
                _ => {}
            }
        }
        if let Some(q) = self.num_queues {
            if q == 0 || q > MAX_NET_QUEUE_PAIRS {
                return bad(format!(
                    "num_queues {q} is out of range (1 to {MAX_NET_QUEUE_PAIRS})"
                ));
            }
        }
        if let Some(m) = self.mtu {
            if !(68..=65535).contains(&m) {
                return bad(format!("mtu {m} is out of range (68 to 65535)"));
            }
        }
        Ok(())
    }

    /// The MAC to give the guest: the configured one, or a locally
    /// administered one derived from the id.
    pub fn mac(&self) -> [u8; 6] {
        if let Some(mac) = self.guest_mac.as_deref().and_then(parse_mac) {
            return mac;
        }
        let h = self.iface_id.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let b = h.to_be_bytes();
        [0x02, 0x74, b[0], b[1], b[2], b[3]]
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Most queues a drive may have.
pub const MAX_DRIVE_QUEUES: u16 = 64;

impl DriveConfig {
    /// Checks the drive on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| {
            Err(ConfigError::Invalid(format!(
                "drive {}: {why}",
                self.drive_id
            )))
        };
        if self.drive_id.is_empty()
            || self.drive_id.len() > 64
            || !self
                .drive_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("drive_id must be 1-64 characters of [A-Za-z0-9_-]".into());
        }
        if self
            .path_on_host
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
            || self
                .socket
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
        {
            return bad("path_on_host and socket must not be empty".into());
        }
        match (&self.path_on_host, &self.socket) {
            (Some(_), Some(_)) => return bad("give either path_on_host or socket, not both".into()),
            (None, None) => {
                return bad(
                    "needs path_on_host (managed backend) or socket (external backend)".into(),
                )
            }
            _ => {}
        }
        if let Some(q) = self.num_queues {
            if q == 0 || q > MAX_DRIVE_QUEUES {
                return bad(format!(
                    "num_queues {q} is out of range (1 to {MAX_DRIVE_QUEUES})"
                ));
            }
        }
        if self.serial.as_ref().is_some_and(|s| s.len() > 20) {
            return bad("serial is longer than 20 bytes".into());
        }
        if let Some(lun) = self.lun {
            if self.interface != DriveInterface::VirtioScsi {
                return bad("lun is only for virtio-scsi drives".into());
            }
            if usize::from(lun) >= MAX_SCSI_LUNS {
                return bad(format!(
                    "lun {lun} is out of range (0 to {})",
                    MAX_SCSI_LUNS - 1
                ));
            }
        }
        if self.interface == DriveInterface::VirtioScsi {
            if self.is_root_device {
                return bad(
                    "a virtio-scsi drive cannot be the root device (use virtio-blk, or name root= in boot_args)"
                        .into(),
                );
            }
            if self.cache == DriveCache::Direct {
                return bad("cache Direct is not supported on virtio-scsi drives".into());
            }
            if self
                .serial
                .as_ref()
                .is_some_and(|s| !s.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            {
                return bad(
                    "serial of a virtio-scsi drive must be printable ASCII without spaces or commas"
                        .into(),
                );
            }
            if self
                .path_on_host
                .as_ref()
                .is_some_and(|p| p.to_string_lossy().contains(','))
            {
                return bad("path_on_host of a virtio-scsi drive must not contain a comma".into());
            }
        }
        Ok(())
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "mode", content = "path")]
pub enum SerialOutput {
    /// tern's standard output (input from standard input).
    #[default]
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

impl std::str::FromStr for SerialOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(SerialOutput::Stdout),
            "none" => Ok(SerialOutput::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
                _ => Err(format!(
                    "invalid serial output '{s}' (stdout, file:PATH or none)"
                )),
            },
        }
    }
}

/// The whole VM configuration, as in `--config-file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Kernel, initrd, command line.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Serial console output.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Disks, in the order given (a root device goes first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    /// NICs, in the order given.
    #[serde(
        rename = "network-interfaces",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_interfaces: Vec<NetConfig>,
}

impl VmConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_owned(),
            err,
        })?;
        serde_json::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            err,
        })
    }

    /// Checks ranges and required parts before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.machine_config.validate()?;
        self.validate_drives()?;
        if self.boot_source.is_none() {
            return Err(ConfigError::Invalid(
                "no kernel given (--kernel or boot-source)".into(),
            ));
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks every drive and NIC: unique ids and taps, at most one root
    /// device, room on the bus.
    pub fn validate_drives(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for d in &self.drives {
            d.validate()?;
            if !ids.insert(d.drive_id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "drive id {} is used twice",
                    d.drive_id
                )));
            }
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(ConfigError::Invalid(
                "only one drive can be the root device".into(),
            ));
        }
        let mut ids = std::collections::HashSet::new();
        let mut taps = std::collections::HashSet::new();
        for n in &self.network_interfaces {
            n.validate()?;
            if !ids.insert(n.iface_id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "network interface id {} is used twice",
                    n.iface_id
                )));
            }
            if let Some(t) = &n.host_dev_name {
                if !taps.insert(t.as_str()) {
                    return Err(ConfigError::Invalid(format!(
                        "tap {t} is given to two network interfaces"
                    )));
                }
            }
        }
        use crate::machine::layout::{PCI_FIRST_DEVICE_SLOT, PCI_LAST_DEVICE_SLOT};
        let mut pinned = std::collections::HashSet::new();
        let pins = self
            .drives
            .iter()
            .map(|d| (d.drive_id.as_str(), d.pci_slot))
            .chain(
                self.network_interfaces
                    .iter()
                    .map(|n| (n.iface_id.as_str(), n.pci_slot)),
            );
        for (id, slot) in pins {
            let Some(slot) = slot else { continue };
            if !(PCI_FIRST_DEVICE_SLOT..=PCI_LAST_DEVICE_SLOT).contains(&slot) {
                return Err(ConfigError::Invalid(format!(
                    "{id}: pci_slot {slot} is outside {PCI_FIRST_DEVICE_SLOT}-{PCI_LAST_DEVICE_SLOT}"
                )));
            }
            if !pinned.insert(slot) {
                return Err(ConfigError::Invalid(format!(
                    "{id}: pci_slot {slot} is given to two devices"
                )));
            }
        }
        let slots = usize::from(PCI_LAST_DEVICE_SLOT - PCI_FIRST_DEVICE_SLOT + 1);
        self.validate_scsi()?;
        let blk = self
            .drives
            .iter()
            .filter(|d| d.interface == DriveInterface::VirtioBlk)
            .count();
        let scsi = usize::from(!self.scsi_drives().is_empty());
        let devices = blk + scsi + self.network_interfaces.len();
        if devices > slots {
            return Err(ConfigError::Invalid(format!(
                "{devices} devices do not fit in the {slots} PCI slots"
            )));
        }
        Ok(())
    }

    /// The virtio-scsi drives, in config order: the LUNs of the controller.
    pub fn scsi_drives(&self) -> Vec<&DriveConfig> {
        self.drives
            .iter()
            .filter(|d| d.interface == DriveInterface::VirtioScsi)
            .collect()
    }

    /// The virtio-scsi drives together: one backend serves them all, so
    /// they name the same external socket or none does, and agree on the
    /// controller's request queues.
    fn validate_scsi(&self) -> Result<(), ConfigError> {
        let scsi = self.scsi_drives();
        let Some(first) = scsi.first() else {
            return Ok(());
        };
        if scsi.len() > MAX_SCSI_LUNS {
            return Err(ConfigError::Invalid(format!(
                "{} virtio-scsi drives: the controller has at most {MAX_SCSI_LUNS} LUNs",
                scsi.len()
            )));
        }
        for d in &scsi {
            if d.socket != first.socket {
                let name = |d: &DriveConfig| match &d.socket {
                    Some(s) => format!("socket {}", s.display()),
                    None => "a managed backend (path_on_host)".to_string(),
                };
                return Err(ConfigError::Invalid(format!(
                    "virtio-scsi drives {} and {} are LUNs of one controller and must have the same backend, \
                     but {} has {} and {} has {}",
                    first.drive_id,
                    d.drive_id,
                    first.drive_id,
                    name(first),
                    d.drive_id,
                    name(d)
                )));
            }
        }
        let mut luns = std::collections::HashMap::new();
        for d in &scsi {
            if let Some(lun) = d.lun {
                if let Some(other) = luns.insert(lun, &d.drive_id) {
                    return Err(ConfigError::Invalid(format!(
                        "virtio-scsi drives {other} and {} both ask for LUN {lun}",
                        d.drive_id
                    )));
                }
            }
        }
        let mut queues = scsi.iter().filter_map(|d| d.num_queues.map(|q| (d, q)));
        if let Some((qd, q)) = queues.next() {
            if let Some((od, o)) = queues.find(|(_, o)| *o != q) {
                return Err(ConfigError::Invalid(format!(
                    "virtio-scsi drives {} and {} ask for {q} and {o} queues, but they share one controller",
                    qd.drive_id, od.drive_id
                )));
            }
        }
        Ok(())
    }

    /// Request queues of the virtio-scsi controller: what its drives ask
    /// (they agree), else `None` (1 for a managed backend, the backend's
    /// own count for an external one).
    pub fn scsi_queues(&self) -> Option<u16> {
        self.scsi_drives().iter().find_map(|d| d.num_queues)
    }

    /// Adds or replaces the NIC with this id.
    pub fn upsert_net(&mut self, net: NetConfig) {
        match self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == net.iface_id)
        {
            Some(n) => *n = net,
            None => self.network_interfaces.push(net),
        }
    }

    /// Adds or replaces the drive with this id.
    pub fn upsert_drive(&mut self, drive: DriveConfig) {
        match self
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(d) => *d = drive,
            None => self.drives.push(drive),
        }
    }
}

impl MachineConfig {
    /// Checks the ranges: vCPUs, memory, SMT.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "vcpu_count {} is out of range (1 to {MAX_VCPUS})",
                m.vcpu_count
            )));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m.mem_size_mib) {
            return Err(ConfigError::Invalid(format!(
                "mem_size_mib {} is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB})",
                m.mem_size_mib
            )));
        }
        if m.smt {
            return Err(ConfigError::Invalid(
                "smt: true is not supported yet".into(),
            ));
        }
        if m.huge_pages == HugePages::Huge2M && !m.mem_size_mib.is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!(
                "mem_size_mib {} is not a multiple of the 2 MiB huge page size",
                m.mem_size_mib
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_shaped_sections() {
        let json = r#"{
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "pvm"},
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "serial": {"mode": "file", "path": "/tmp/s"}
        }"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.machine_config.vcpu_count, 2);
        assert_eq!(c.machine_config.cpu_template, Some(CpuTemplate::Pvm));
        assert_eq!(c.serial, SerialOutput::File("/tmp/s".into()));
        c.validate().unwrap();
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(
            serde_json::from_str::<VmConfig>(r#"{"machine-config": {"vcpu_count": 1}}"#).is_err()
        );
        assert!(serde_json::from_str::<VmConfig>(r#"{"bogus": 1}"#).is_err());
        let mut c = VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: "/k".into(),
                initrd_path: None,
                boot_args: None,
            }),
            ..Default::default()
        };
        c.machine_config.mem_size_mib = 8;
        assert!(c.validate().is_err());
        c.machine_config.mem_size_mib = 64;
        c.machine_config.vcpu_count = 0;
        assert!(c.validate().is_err());
        assert!("file:".parse::<SerialOutput>().is_err());
    }

    fn scsi_drive(id: &str, socket: Option<&str>) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: socket.is_none().then(|| "/img".into()),
            is_root_device: false,
            is_read_only: false,
            format: DriveFormat::Raw,
            num_queues: None,
            socket: socket.map(Into::into),
            cache: DriveCache::Writeback,
            serial: None,
            interface: DriveInterface::VirtioScsi,
            pci_slot: None,
            lun: None,
        }
    }

    #[test]
    fn scsi_drives_share_one_backend() {
        let json = r#"{"drives": [
            {"drive_id": "a", "path_on_host": "/a", "interface": "virtio-scsi"},
            {"drive_id": "b", "path_on_host": "/b"},
            {"drive_id": "c", "path_on_host": "/c", "interface": "virtio-scsi", "num_queues": 2}
        ]}"#;
        let mut c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.drives[1].interface, DriveInterface::VirtioBlk);
        c.validate_drives().unwrap();
        let ids: Vec<&str> = c
            .scsi_drives()
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(c.scsi_queues(), Some(2));
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""interface":"virtio-scsi""#), "{text}");
        assert!(text.contains(r#""interface":"virtio-blk""#), "{text}");

        // Queue counts must agree; sockets must be the same (or all absent).
        c.upsert_drive(DriveConfig {
            num_queues: Some(3),
            ..scsi_drive("d", None)
        });
        let e = c.validate_drives().unwrap_err().to_string();
        assert!(e.contains("2 and 3 queues"), "{e}");
        c.drives.pop();
        c.upsert_drive(scsi_drive("e", Some("/s")));
        let e = c.validate_drives().unwrap_err().to_string();
        assert!(e.contains("same backend") && e.contains("socket /s"), "{e}");
        let ext = VmConfig {
            drives: vec![scsi_drive("x", Some("/s")), scsi_drive("y", Some("/s"))],
            ..Default::default()
        };
        ext.validate_drives().unwrap();
        let other = VmConfig {
            drives: vec![scsi_drive("x", Some("/s")), scsi_drive("y", Some("/t"))],
            ..Default::default()
        };
        assert!(other.validate_drives().is_err());

        // Per drive: no root, no O_DIRECT, a serial and path tern-scsi can take.
        for bad in [
            DriveConfig {
                is_root_device: true,
                ..scsi_drive("r", None)
            },
            DriveConfig {
                cache: DriveCache::Direct,
                ..scsi_drive("r", None)
            },
            DriveConfig {
                serial: Some("a,b".into()),
                ..scsi_drive("r", None)
            },
            DriveConfig {
                path_on_host: Some("/a,b".into()),
                ..scsi_drive("r", None)
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<DriveConfig>(
            r#"{"drive_id": "a", "path_on_host": "/a", "interface": "scsi"}"#
        )
        .is_err());

        // Up to 256 LUNs; they take one PCI slot.
        let many = VmConfig {
            drives: (0..MAX_SCSI_LUNS)
                .map(|i| scsi_drive(&format!("l{i}"), None))
                .collect(),
            ..Default::default()
        };
        many.validate_drives().unwrap();
        let mut too_many = many.clone();
        too_many.drives.push(scsi_drive("over", None));
        assert!(too_many
            .validate_drives()
            .unwrap_err()
            .to_string()
            .contains("at most 256 LUNs"));
    }

    #[test]
    fn lun_numbers_are_checked() {
        let with = |id: &str, lun: Option<u16>| DriveConfig {
            lun,
            ..scsi_drive(id, None)
        };
        let ok = VmConfig {
            drives: vec![with("a", Some(3)), with("b", None), with("c", Some(0))],
            ..Default::default()
        };
        ok.validate_drives().unwrap();
        let twice = VmConfig {
            drives: vec![with("a", Some(3)), with("b", Some(3))],
            ..Default::default()
        };
        let e = twice.validate_drives().unwrap_err().to_string();
        assert!(e.contains("a and b both ask for LUN 3"), "{e}");
        let e = with("a", Some(256)).validate().unwrap_err().to_string();
        assert!(e.contains("lun 256 is out of range (0 to 255)"), "{e}");
        let blk = DriveConfig {
            interface: DriveInterface::VirtioBlk,
            ..with("a", Some(1))
        };
        let e = blk.validate().unwrap_err().to_string();
        assert!(e.contains("lun is only for virtio-scsi drives"), "{e}");
    }
}
