//! `--seccomp-level N` and `--jailer`: run the measured tern confined
//! (its seccomp level, and/or under tern-jailer) against the same binary
//! unconfined (level 0, no jail) as the baseline, interleaved in one run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The uid/gid a jailed tern runs as.
const JAIL_UID: u32 = 12345;

/// How one tern binary is run.
#[derive(Clone, Debug, Default)]
pub struct Confinement {
    /// `--seccomp-level` for tern (None: tern's default).
    pub seccomp_level: Option<u8>,
    /// Run it under this tern-jailer.
    pub jailer: Option<PathBuf>,
    /// Files and directories the jailed tern needs at their host paths
    /// (the unikernel, the API socket's directory).
    pub binds: Vec<PathBuf>,
}

static CONFINED: Mutex<Vec<(PathBuf, Confinement)>> = Mutex::new(Vec::new());
static SEQ: AtomicU64 = AtomicU64::new(0);

fn registry() -> std::sync::MutexGuard<'static, Vec<(PathBuf, Confinement)>> {
    CONFINED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `tern` as `c` says from now on.
pub fn set(tern: &Path, c: Confinement) {
    let mut r = registry();
    r.retain(|(p, _)| p != tern);
    r.push((tern.to_path_buf(), c));
}

/// Adds a host path the jailed `tern` needs.
pub fn bind(tern: &Path, path: &Path) {
    if let Some((_, c)) = registry().iter_mut().find(|(p, _)| p == tern) {
        if c.jailer.is_some() && !c.binds.iter().any(|b| b == path) {
            c.binds.push(path.to_path_buf());
            if path.is_dir() {
                // The jailed uid creates the API socket there.
                let _ = Command::new("chown")
                    .arg(format!("{JAIL_UID}:{JAIL_UID}"))
                    .arg(path)
                    .status();
            }
        }
    }
}

/// A copy of `tern` under another path, to measure it unconfined (level 0,
/// no jail) as the baseline of the same binary.
pub fn unconfined_copy(tern: &Path) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("tern-bench-unconfined-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let copy = dir.join("tern");
    std::fs::copy(tern, &copy).map_err(|e| format!("cannot copy {}: {e}", tern.display()))?;
    set(
        &copy,
        Confinement {
            seccomp_level: Some(0),
            ..Confinement::default()
        },
    );
    Ok(copy)
}

/// The shared libraries a dynamically linked `bin` needs (none for the
/// static release build).
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(bin).output() else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// The command that runs `tern ARGS` as configured, and the jail directory
/// to remove after it ended.
pub fn command(tern: &Path, args: &[OsString]) -> (Command, Option<PathBuf>) {
    let c = registry()
        .iter()
        .find(|(p, _)| p == tern)
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    let mut tern_args: Vec<OsString> = args.to_vec();
    if let Some(level) = c.seccomp_level {
        tern_args.push("--seccomp-level".into());
        tern_args.push(level.to_string().into());
    }
    let Some(jailer) = &c.jailer else {
        let mut cmd = Command::new(tern);
        cmd.args(tern_args);
        return (cmd, None);
    };
    let base = std::env::temp_dir().join("tern-bench-jail");
    let id = format!(
        "bench-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut cmd = Command::new(jailer);
    cmd.args(["--id", &id])
        .args([
            "--uid",
            &JAIL_UID.to_string(),
            "--gid",
            &JAIL_UID.to_string(),
        ])
        .arg("--exec-file")
        .arg(tern)
        .arg("--chroot-base-dir")
        .arg(&base);
    for b in c.binds.iter().chain(libraries(tern).iter()) {
        let mut opt = OsString::from("--bind=");
        opt.push(b);
        cmd.arg(opt);
    }
    cmd.arg("--").args(tern_args);
    let name = tern.file_name().unwrap_or_default();
    (cmd, Some(base.join(name).join(id)))
}

/// Parses a `--seccomp-level` value.
pub fn parse_level(v: &str) -> Result<u8, String> {
    match v {
        "0" | "1" | "2" => Ok(v.parse().unwrap_or(2)),
        _ => Err(format!("--seccomp-level: '{v}' is not 0, 1 or 2")),
    }
}

/// Sets up `tern` to run as `c` (a `--jailer` given without a path means
/// `tern-jailer` next to tern); with no baseline given, the baseline
/// becomes an unconfined copy of `tern`.
pub fn apply(tern: &Path, c: &Confinement, baseline: &mut Option<PathBuf>) -> Result<(), String> {
    let mut c = c.clone();
    if c.jailer.as_ref().is_some_and(|j| j.as_os_str().is_empty()) {
        let j = tern.with_file_name("tern-jailer");
        if !j.is_file() {
            return Err(format!(
                "--jailer: {} not found (cargo build --release -p tern-jailer)",
                j.display()
            ));
        }
        c.jailer = Some(j);
    }
    set(tern, c);
    if baseline.is_none() {
        *baseline = Some(unconfined_copy(tern)?);
    }
    Ok(())
}
