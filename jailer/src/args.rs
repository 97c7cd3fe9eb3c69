//! The `tern-jailer` command line.

use std::path::PathBuf;

use crate::cgroup::CgroupVersion;
use crate::rlimit::Resource;

/// Usage text for `--help`.
pub const USAGE: &str = "\
usage: tern-jailer --id ID --exec-file PATH --uid UID --gid GID
                   [--chroot-base-dir DIR] [--netns PATH] [--cgroup-version 1|2]
                   [--cgroup FILE=VALUE]... [--resource-limit NAME=VALUE]...
                   [--copy FILE]... [--bind SRC[:DST]]...
                   [--daemonize] [--new-pid-ns] [-- ARGS...]

Confines PATH (tern or a backend) and execs it with ARGS in
<DIR>/<exec name>/<ID>/root (DIR defaults to /srv/jailer): a new mount
namespace pivoted into that directory, with only /dev/kvm, /dev/net/tun,
/dev/urandom and /dev/null, the network namespace PATH, cgroups, rlimits, every inherited
fd but 0, 1 and 2 closed, and uid/gid UID/GID with no capabilities.

  --id ID                 the jail's id: 1 to 64 letters, digits or '-'
  --exec-file PATH        the executable, copied into the jail as /<name>
  --uid UID, --gid GID    the ids it runs as
  --chroot-base-dir DIR   where jails are made (default /srv/jailer)
  --netns PATH            a network namespace to join (e.g. /run/netns/NAME)
  --cgroup-version 1|2    the cgroup hierarchy for --cgroup (default 1)
  --cgroup FILE=VALUE     write VALUE to FILE (e.g. pids.max=64) of the
                          jail's cgroup <current>/<exec name>/<ID>
  --resource-limit N=V    fsize (bytes) or no-file (descriptors)
  --copy FILE             copy another executable in next to it (e.g. the
                          managed backends tern-blk and tern-net)
  --bind SRC[:DST]        bind-mount SRC (a file or directory) at DST inside
                          the jail (default: SRC's own path)
  --daemonize             detach: new session, stdio on /dev/null
  --new-pid-ns            run it as pid 1 of a new PID namespace; its pid in
                          the host's namespace is written to /<exec name>.pid
";

/// Where jails are made unless `--chroot-base-dir` says otherwise.
pub const DEFAULT_BASE: &str = "/srv/jailer";

/// A bad command line.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// An unknown option.
    #[error("unknown option '{0}' (see --help)")]
    Unknown(String),
    /// An option without its value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A required option is missing.
    #[error("missing required option {0}")]
    Missing(&'static str),
    /// The id has characters other than letters, digits and '-', or is too long.
    #[error("invalid id '{0}': use 1 to 64 letters, digits or '-'")]
    BadId(String),
    /// A number that does not parse.
    #[error("invalid value '{value}' for {flag}: not a number")]
    BadNumber {
        /// The option.
        flag: &'static str,
        /// The value.
        value: String,
    },
    /// A `--cgroup` that is not FILE=VALUE with FILE `<controller>.<knob>`.
    #[error(
        "invalid --cgroup '{0}': use FILE=VALUE, FILE as <controller>.<name> (e.g. pids.max=64)"
    )]
    BadCgroup(String),
    /// A `--resource-limit` that is not fsize=N or no-file=N.
    #[error("invalid --resource-limit '{0}': use fsize=BYTES or no-file=COUNT")]
    BadRlimit(String),
    /// A `--cgroup-version` other than 1 or 2.
    #[error("invalid --cgroup-version '{0}': use 1 or 2")]
    BadCgroupVersion(String),
    /// A `--bind` whose destination is not absolute.
    #[error("invalid --bind '{0}': use SRC[:DST] with absolute paths")]
    BadBind(String),
}

/// What to confine and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerArgs {
    /// The jail's id.
    pub id: String,
    /// The executable to confine.
    pub exec_file: PathBuf,
    /// The uid it runs as.
    pub uid: u32,
    /// The gid it runs as.
    pub gid: u32,
    /// Where jails are made.
    pub chroot_base: PathBuf,
    /// A network namespace to join.
    pub netns: Option<PathBuf>,
    /// The cgroup hierarchy of `cgroups`.
    pub cgroup_version: CgroupVersion,
    /// Cgroup files and their values.
    pub cgroups: Vec<(String, String)>,
    /// Resource limits.
    pub rlimits: Vec<(Resource, u64)>,
    /// Other executables to copy in.
    pub copies: Vec<PathBuf>,
    /// Bind mounts: host path, path inside the jail.
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// Detach from the terminal and session.
    pub daemonize: bool,
    /// Run in a new PID namespace.
    pub new_pid_ns: bool,
    /// Arguments for the executable.
    pub exec_args: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Print the usage.
    Help,
    /// Confine and exec.
    Jail(Box<JailerArgs>),
}

/// Whether `id` is a valid jail id.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn number(flag: &'static str, value: &str) -> Result<u32, ArgsError> {
    value.parse().map_err(|_| ArgsError::BadNumber {
        flag,
        value: value.to_string(),
    })
}

fn cgroup_spec(spec: &str) -> Result<(String, String), ArgsError> {
    let bad = || ArgsError::BadCgroup(spec.to_string());
    let (file, value) = spec.split_once('=').ok_or_else(bad)?;
    let (controller, knob) = file.split_once('.').ok_or_else(bad)?;
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    if !word(controller) || !word(knob) || value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok((file.to_string(), value.to_string()))
}

fn rlimit_spec(spec: &str) -> Result<(Resource, u64), ArgsError> {
    let bad = || ArgsError::BadRlimit(spec.to_string());
    let (name, value) = spec.split_once('=').ok_or_else(bad)?;
    let resource = match name {
        "fsize" => Resource::FileSize,
        "no-file" => Resource::OpenFiles,
        _ => return Err(bad()),
    };
    Ok((resource, value.parse().map_err(|_| bad())?))
}

fn bind_spec(spec: &str) -> Result<(PathBuf, PathBuf), ArgsError> {
    let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
    let (src, dst) = (PathBuf::from(src), PathBuf::from(dst));
    if !src.is_absolute() || !dst.is_absolute() || dst.components().any(|c| c.as_os_str() == "..") {
        return Err(ArgsError::BadBind(spec.to_string()));
    }
    Ok((src, dst))
}

/// Parses `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ArgsError> {
    let mut it = args.into_iter();
    let (mut id, mut exec_file, mut uid, mut gid) = (None, None, None, None);
    let mut a = JailerArgs {
        id: String::new(),
        exec_file: PathBuf::new(),
        uid: 0,
        gid: 0,
        chroot_base: PathBuf::from(DEFAULT_BASE),
        netns: None,
        cgroup_version: CgroupVersion::V1,
        cgroups: Vec::new(),
        rlimits: Vec::new(),
        copies: Vec::new(),
        binds: Vec::new(),
        daemonize: false,
        new_pid_ns: false,
        exec_args: Vec::new(),
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--" => {
                a.exec_args = it.by_ref().collect();
                break;
            }
            "--daemonize" => {
                a.daemonize = true;
                continue;
            }
            "--new-pid-ns" => {
                a.new_pid_ns = true;
                continue;
            }
            _ => {}
        }
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), v.to_string()),
            _ => {
                let v = it
                    .next()
                    .ok_or_else(|| ArgsError::MissingValue(arg.clone()))?;
                (arg.clone(), v)
            }
        };
        match flag.as_str() {
            "--id" => id = Some(value),
            "--exec-file" => exec_file = Some(PathBuf::from(value)),
            "--uid" => uid = Some(number("--uid", &value)?),
            "--gid" => gid = Some(number("--gid", &value)?),
            "--chroot-base-dir" => a.chroot_base = PathBuf::from(value),
            "--netns" => a.netns = Some(PathBuf::from(value)),
            "--cgroup-version" => {
                a.cgroup_version = match value.as_str() {
                    "1" => CgroupVersion::V1,
                    "2" => CgroupVersion::V2,
                    _ => return Err(ArgsError::BadCgroupVersion(value)),
                }
            }
            "--cgroup" => a.cgroups.push(cgroup_spec(&value)?),
            "--resource-limit" => a.rlimits.push(rlimit_spec(&value)?),
            "--copy" => a.copies.push(PathBuf::from(value)),
            "--bind" => a.binds.push(bind_spec(&value)?),
            _ => return Err(ArgsError::Unknown(flag)),
        }
    }
    a.id = id.ok_or(ArgsError::Missing("--id"))?;
    if !valid_id(&a.id) {
        return Err(ArgsError::BadId(a.id));
    }
    a.exec_file = exec_file.ok_or(ArgsError::Missing("--exec-file"))?;
    a.uid = uid.ok_or(ArgsError::Missing("--uid"))?;
    a.gid = gid.ok_or(ArgsError::Missing("--gid"))?;
    Ok(Command::Jail(Box::new(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_full_command_line() {
        let Command::Jail(a) = parse(args(
            "--id vm-1 --exec-file /bin/tern --uid 123 --gid=456 --netns /run/netns/x \
             --cgroup pids.max=10 --cgroup-version 2 --resource-limit no-file=64 \
             --copy /bin/tern-blk --bind /a/img:/img --bind /data --daemonize --new-pid-ns -- --api-sock /s",
        ))
        .unwrap() else {
            panic!("not a jail")
        };
        assert_eq!(a.id, "vm-1");
        assert_eq!((a.uid, a.gid), (123, 456));
        assert_eq!(a.chroot_base, PathBuf::from(DEFAULT_BASE));
        assert_eq!(a.cgroup_version, CgroupVersion::V2);
        assert_eq!(a.cgroups, vec![("pids.max".into(), "10".into())]);
        assert_eq!(a.rlimits, vec![(Resource::OpenFiles, 64)]);
        assert_eq!(a.binds[0], (PathBuf::from("/a/img"), PathBuf::from("/img")));
        assert_eq!(a.binds[1], (PathBuf::from("/data"), PathBuf::from("/data")));
        assert!(a.daemonize && a.new_pid_ns);
        assert_eq!(a.exec_args, vec!["--api-sock", "/s"]);
    }

    #[test]
    fn bad_values_are_named() {
        let base = "--exec-file /x --uid 1 --gid 1";
        for (extra, want) in [
            ("--id a_b", "invalid id 'a_b'"),
            ("", "missing required option --id"),
            ("--id a --cgroup pids", "invalid --cgroup 'pids'"),
            ("--id a --cgroup max=1", "invalid --cgroup 'max=1'"),
            (
                "--id a --resource-limit cpu=1",
                "invalid --resource-limit 'cpu=1'",
            ),
            ("--id a --cgroup-version 3", "invalid --cgroup-version '3'"),
            ("--id a --bind rel", "invalid --bind 'rel'"),
            ("--id a --bogus 1", "unknown option '--bogus'"),
        ] {
            let e = parse(args(&format!("{base} {extra}"))).unwrap_err();
            assert!(e.to_string().starts_with(want), "{extra}: {e}");
        }
        let long = "a".repeat(65);
        assert!(matches!(
            parse(args(&format!("{base} --id {long}"))),
            Err(ArgsError::BadId(_))
        ));
        assert!(valid_id(&"a".repeat(64)));
        assert!(matches!(
            parse(args("--id a --exec-file /x --uid x --gid 1")),
            Err(ArgsError::BadNumber { .. })
        ));
    }
}
