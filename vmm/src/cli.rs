//! The `tern` command line. Flags map onto the same [`VmConfig`] as the
//! config file; a flag given together with `--config-file` overrides the
//! file's value.

use std::path::PathBuf;

use crate::config::{BootSource, ConfigError, SerialOutput, VmConfig};
use crate::kvm::cpuid::CpuTemplate;

/// Usage text for `--help`.
pub const USAGE: &str = "\
usage: tern --kernel PATH [--initrd PATH] [--cmdline STR] [--cpus N] [--memory MIB]
            [--serial stdout|file:PATH|none] [--cpu-template host|baseline|pvm]
            [--drive SPEC]... [--net SPEC]... [--config-file PATH]
            [--api-sock PATH] [--id ID] [--seccomp-level 0|1|2]
       tern --api-sock PATH [--id ID] [--seccomp-level 0|1|2]
       tern --restore STATE,MEM [--serial WHERE] [--api-sock PATH] [--id ID]
       tern --merge-memory BASE,DIFF[,DIFF...]
       tern --migrate-from unix:PATH|tcp:HOST:PORT [--serial WHERE] [--api-sock PATH]

Boots a microVM on an emulated q35 machine and runs it until the guest powers
off, resets or writes to the debug-exit port (0x501: status (V << 1) | 1).
With --api-sock, serves the HTTP API on that Unix socket; without a kernel it
waits for configuration and InstanceStart there.

  --kernel PATH         ELF (PVH note or 64-bit entry) or bzImage kernel
  --initrd PATH         initramfs
  --cmdline STR         kernel command line
  --cpus N              vCPUs (default 1)
  --memory MIB          guest RAM in MiB (default 128)
  --serial WHERE        serial console: stdout (default), file:PATH or none
  --cpu-template NAME   host (default on hardware KVM), baseline, or pvm
                        (default on kvm_pvm hosts)
  --config-file PATH    JSON with machine-config, boot-source, serial sections
  --drive SPEC          a disk (repeatable):
                        path=FILE[,format=raw|qcow2][,ro=on][,id=ID][,queues=N]
                        [,serial=S][,root=on][,cache=direct]
                        [,interface=virtio-blk|virtio-scsi], or socket=PATH
                        (an external vhost-user backend) instead of path=;
                        virtio-scsi drives are the LUNs, in order, of one
                        virtio-scsi controller (one tern-scsi)
  --net SPEC            a virtio-net NIC (repeatable): tap=NAME[,mac=MAC]
                        [,queues=N][,mtu=N][,id=ID], or socket=PATH (an
                        external vhost-user-net backend) instead of tap=
  --restore STATE,MEM   bring a VM back from a snapshot's state and memory
                        files and run it (as PUT /snapshot/load with
                        resume_vm)
  --migrate-from URL    wait for a live migration on URL (unix:PATH or
                        tcp:HOST:PORT) and run the VM it brings (as PUT
                        /migration/receive)
  --merge-memory BASE,DIFF...
                        lay diff snapshots' memory files (oldest first) over
                        a full one, in place, and exit
  --api-sock PATH       serve the HTTP API on this Unix socket (mode 0600)
  --id ID               the VM's id in the API (default tern-<pid>)
  --seccomp-level N     seccomp filters on every thread and managed backend:
                        0 off, 1 syscalls only, 2 with arguments (default)
  --help, --version
";

/// Errors on the command line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An unknown flag.
    #[error("unknown option '{0}' (see --help)")]
    Unknown(String),
    /// A flag without its value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value '{value}' for {flag}: {why}")]
    BadValue {
        /// The flag.
        flag: String,
        /// The value.
        value: String,
        /// Why.
        why: String,
    },
    /// The config file is bad.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Print usage.
    Help,
    /// Print the version.
    Version,
    /// Run a VM (boot it now if a kernel is configured).
    Run(Box<RunOptions>),
    /// Merge diff memory files into a base memory file.
    MergeMemory {
        /// The full memory file, rewritten in place.
        base: PathBuf,
        /// Diff memory files, oldest first.
        diffs: Vec<PathBuf>,
    },
}

/// What to run.
#[derive(Debug)]
pub struct RunOptions {
    /// The configuration so far (complete when `boot_now`).
    pub config: VmConfig,
    /// Boot at once (a kernel was given), rather than wait for the API.
    pub boot_now: bool,
    /// Serve the API here.
    pub api_sock: Option<PathBuf>,
    /// The VM's id.
    pub id: Option<String>,
    /// A snapshot to restore and run: (state file, memory file).
    pub restore: Option<(PathBuf, PathBuf)>,
    /// Wait for an incoming migration on this URL.
    pub migrate_from: Option<String>,
    /// How strict the seccomp filters are (docs/security.md).
    pub seccomp_level: tern_seccomp::Level,
}

fn parse_num<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, CliError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| CliError::BadValue {
        flag: flag.into(),
        value: value.into(),
        why: e.to_string(),
    })
}

/// Parses a `--net` value: comma-separated `key=value` pairs.
fn parse_net(spec: &str, index: usize) -> Result<crate::config::NetConfig, String> {
    let mut n = crate::config::NetConfig {
        iface_id: format!("net{index}"),
        host_dev_name: None,
        guest_mac: None,
        num_queues: None,
        mtu: None,
        socket: None,
        pci_slot: None,
    };
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value"))?;
        match k {
            "tap" => n.host_dev_name = Some(v.into()),
            "socket" => n.socket = Some(v.into()),
            "id" => n.iface_id = v.into(),
            "mac" => n.guest_mac = Some(v.into()),
            "queues" => {
                n.num_queues = Some(
                    v.parse()
                        .map_err(|_| format!("queues={v} is not a number"))?,
                )
            }
            "mtu" => n.mtu = Some(v.parse().map_err(|_| format!("mtu={v} is not a number"))?),
            "slot" => {
                n.pci_slot = Some(v.parse().map_err(|_| format!("slot={v} is not a number"))?)
            }
            _ => return Err(format!("unknown key `{k}`")),
        }
    }
    n.validate().map_err(|e| e.to_string())?;
    Ok(n)
}

/// Parses a `--drive` value: comma-separated `key=value` pairs.
fn parse_drive(spec: &str, index: usize) -> Result<crate::config::DriveConfig, String> {
    use crate::config::{DriveCache, DriveConfig, DriveFormat, DriveInterface};
    let mut d = DriveConfig {
        drive_id: format!("drive{index}"),
        path_on_host: None,
        is_root_device: false,
        is_read_only: false,
        format: DriveFormat::Raw,
        num_queues: None,
        socket: None,
        cache: DriveCache::Writeback,
        serial: None,
        interface: DriveInterface::VirtioBlk,
        pci_slot: None,
        lun: None,
    };
    let on = |k: &str, v: &str| match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{k}={v}: use on or off")),
    };
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value"))?;
        match k {
            "path" => d.path_on_host = Some(v.into()),
            "socket" => d.socket = Some(v.into()),
            "id" => d.drive_id = v.into(),
            "format" => {
                d.format = match v {
                    "raw" => DriveFormat::Raw,
                    "qcow2" => DriveFormat::Qcow2,
                    _ => return Err(format!("format={v}: use raw or qcow2")),
                }
            }
            "ro" | "readonly" => d.is_read_only = on(k, v)?,
            "root" => d.is_root_device = on(k, v)?,
            "queues" => {
                d.num_queues = Some(
                    v.parse()
                        .map_err(|_| format!("queues={v} is not a number"))?,
                )
            }
            "serial" => d.serial = Some(v.into()),
            "slot" => {
                d.pci_slot = Some(v.parse().map_err(|_| format!("slot={v} is not a number"))?)
            }
            "cache" => {
                d.cache = match v {
                    "writeback" => DriveCache::Writeback,
                    "direct" => DriveCache::Direct,
                    _ => return Err(format!("cache={v}: use writeback or direct")),
                }
            }
            "interface" => {
                d.interface = match v {
                    "virtio-blk" => DriveInterface::VirtioBlk,
                    "virtio-scsi" => DriveInterface::VirtioScsi,
                    _ => return Err(format!("interface={v}: use virtio-blk or virtio-scsi")),
                }
            }
            _ => return Err(format!("unknown key `{k}`")),
        }
    }
    d.validate().map_err(|e| e.to_string())?;
    Ok(d)
}

/// Parses `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            _ => {}
        }
        let Some(name) = arg.strip_prefix("--") else {
            return Err(CliError::Unknown(arg));
        };
        let (flag, value) = match name.split_once('=') {
            Some((f, v)) => (format!("--{f}"), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::MissingValue(arg.clone()))?;
                (arg.clone(), v)
            }
        };
        pairs.push((flag, value));
    }
    if let Some((_, v)) = pairs.iter().find(|(f, _)| f == "--merge-memory") {
        let files: Vec<PathBuf> = v
            .split(',')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if pairs.len() != 1 || files.len() < 2 {
            return Err(CliError::BadValue {
                flag: "--merge-memory".into(),
                value: v.clone(),
                why: "expected BASE,DIFF[,DIFF...] and no other option".into(),
            });
        }
        return Ok(Command::MergeMemory {
            base: files[0].clone(),
            diffs: files[1..].to_vec(),
        });
    }

    let mut config = match pairs.iter().find(|(f, _)| f == "--config-file") {
        Some((_, path)) => VmConfig::from_file(&PathBuf::from(path))?,
        None => VmConfig::default(),
    };
    let mut api_sock: Option<PathBuf> = None;
    let mut id: Option<String> = None;
    let mut kernel: Option<PathBuf> = None;
    let mut initrd: Option<PathBuf> = None;
    let mut cmdline: Option<String> = None;
    let mut restore: Option<(PathBuf, PathBuf)> = None;
    let mut migrate_from: Option<String> = None;
    let mut seccomp_level = tern_seccomp::Level::default();
    for (flag, value) in pairs {
        match flag.as_str() {
            "--config-file" => {}
            "--migrate-from" => migrate_from = Some(value),
            "--restore" => match value.split_once(',') {
                Some((state, mem)) if !state.is_empty() && !mem.is_empty() => {
                    restore = Some((state.into(), mem.into()))
                }
                _ => {
                    return Err(CliError::BadValue {
                        flag: flag.clone(),
                        value: value.clone(),
                        why: "expected STATE_FILE,MEMORY_FILE".into(),
                    })
                }
            },
            "--api-sock" => api_sock = Some(value.into()),
            "--net" => {
                let index = config.network_interfaces.len();
                let net = parse_net(&value, index).map_err(|why| CliError::BadValue {
                    flag: flag.clone(),
                    value: value.clone(),
                    why,
                })?;
                config.upsert_net(net);
            }
            "--drive" => {
                let index = config.drives.len();
                let drive = parse_drive(&value, index).map_err(|why| CliError::BadValue {
                    flag: flag.clone(),
                    value: value.clone(),
                    why,
                })?;
                config.upsert_drive(drive);
            }
            "--id" => id = Some(value),
            "--seccomp-level" => seccomp_level = parse_num(&flag, &value)?,
            "--kernel" => kernel = Some(value.into()),
            "--initrd" => initrd = Some(value.into()),
            "--cmdline" => cmdline = Some(value),
            "--cpus" => config.machine_config.vcpu_count = parse_num(&flag, &value)?,
            "--memory" => config.machine_config.mem_size_mib = parse_num(&flag, &value)?,
            "--serial" => config.serial = parse_num::<SerialOutput>(&flag, &value)?,
            "--cpu-template" => {
                config.machine_config.cpu_template = Some(parse_num::<CpuTemplate>(&flag, &value)?)
            }
            _ => return Err(CliError::Unknown(flag)),
        }
    }
    if kernel.is_some() || initrd.is_some() || cmdline.is_some() {
        let boot = config.boot_source.get_or_insert_with(|| BootSource {
            kernel_image_path: PathBuf::new(),
            initrd_path: None,
            boot_args: None,
        });
        if let Some(k) = kernel {
            boot.kernel_image_path = k;
        }
        if initrd.is_some() {
            boot.initrd_path = initrd;
        }
        if cmdline.is_some() {
            boot.boot_args = cmdline;
        }
        if boot.kernel_image_path.as_os_str().is_empty() {
            return Err(CliError::MissingValue("--kernel".into()));
        }
    }
    if migrate_from.is_some() && (restore.is_some() || config.boot_source.is_some()) {
        return Err(CliError::BadValue {
            flag: "--migrate-from".into(),
            value: String::new(),
            why: "an incoming VM brings its own configuration; drop --kernel/--restore".into(),
        });
    }
    if restore.is_some() && config.boot_source.is_some() {
        return Err(CliError::BadValue {
            flag: "--restore".into(),
            value: String::new(),
            why: "a restored VM has its own kernel; drop --kernel/--initrd/--cmdline/boot-source"
                .into(),
        });
    }
    let boot_now = config.boot_source.is_some();
    if restore.is_some() || migrate_from.is_some() {
        // The snapshot or the source carries the configuration.
    } else if boot_now || api_sock.is_none() {
        config.validate()?;
    } else {
        config.machine_config.validate()?;
    }
    Ok(Command::Run(Box::new(RunOptions {
        config,
        boot_now,
        api_sock,
        id,
        restore,
        migrate_from,
        seccomp_level,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_fill_the_config() {
        let Command::Run(o) = parse(args(
            "--kernel /k --cpus 4 --memory=512 --cmdline x --serial none",
        ))
        .unwrap() else {
            panic!("not a run");
        };
        let RunOptions {
            config: c,
            boot_now,
            ..
        } = *o;
        assert!(boot_now);
        assert_eq!(c.machine_config.vcpu_count, 4);
        assert_eq!(c.machine_config.mem_size_mib, 512);
        assert_eq!(c.serial, SerialOutput::None);
        let b = c.boot_source.unwrap();
        assert_eq!(b.kernel_image_path, PathBuf::from("/k"));
        assert_eq!(b.boot_args.as_deref(), Some("x"));
    }

    #[test]
    fn errors_are_specific() {
        assert!(matches!(
            parse(args("--bogus 1")),
            Err(CliError::Unknown(_))
        ));
        assert!(matches!(
            parse(args("--kernel")),
            Err(CliError::MissingValue(_))
        ));
        assert!(matches!(
            parse(args("--kernel /k --cpus x")),
            Err(CliError::BadValue { .. })
        ));
        assert!(matches!(parse(args("--cpus 2")), Err(CliError::Config(_))));
        let Ok(Command::Run(o)) = parse(args("--api-sock /tmp/s --cpus 2")) else {
            panic!()
        };
        assert!(!o.boot_now && o.api_sock.is_some());
        assert!(matches!(
            parse(args("--kernel /k --cpu-template fast")),
            Err(CliError::BadValue { .. })
        ));
    }

    #[test]
    fn restore_and_merge_memory() {
        let Command::Run(o) = parse(args("--restore /s,/m --api-sock /a")).unwrap() else {
            panic!("expected run");
        };
        assert_eq!(o.restore, Some((PathBuf::from("/s"), PathBuf::from("/m"))));
        assert!(!o.boot_now);
        assert!(parse(args("--restore /s")).is_err());
        assert!(parse(args("--restore /s,/m --kernel /k")).is_err());
        match parse(args("--merge-memory /b,/d1,/d2")).unwrap() {
            Command::MergeMemory { base, diffs } => {
                assert_eq!(base, PathBuf::from("/b"));
                assert_eq!(diffs.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(args("--merge-memory /b")).is_err());
        assert!(parse(args("--merge-memory /b,/d --cpus 2")).is_err());
    }

    #[test]
    fn scsi_drives_on_the_command_line() {
        let Command::Run(o) = parse(args(
            "--kernel /k --drive path=/a,interface=virtio-scsi,ro=on --drive path=/b \
             --drive socket=/s,interface=virtio-blk",
        ))
        .unwrap() else {
            panic!("not a run");
        };
        use crate::config::DriveInterface;
        let kinds: Vec<_> = o.config.drives.iter().map(|d| d.interface).collect();
        assert_eq!(
            kinds,
            [
                DriveInterface::VirtioScsi,
                DriveInterface::VirtioBlk,
                DriveInterface::VirtioBlk
            ]
        );
        assert!(o.config.drives[0].is_read_only);
        let Err(CliError::BadValue { why, .. }) =
            parse(args("--kernel /k --drive path=/a,interface=ide"))
        else {
            panic!("interface=ide accepted");
        };
        assert!(why.contains("virtio-scsi"), "{why}");
        let e = parse(args(
            "--kernel /k --drive path=/a,interface=virtio-scsi --drive socket=/s,interface=virtio-scsi",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("same backend"), "{e}");
    }
}
