//! `PUT /snapshot/create` and `PUT /snapshot/load`, with Firecracker's
//! bodies (plus tern's drive overrides for clones).

use std::path::PathBuf;

use serde::Deserialize;

use crate::api::{parse_body, ApiError};
use crate::snapshot::SnapshotKind;

/// A snapshot to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSnapshot {
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Where the state goes.
    pub snapshot_path: PathBuf,
    /// Where the memory goes.
    pub mem_file_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    snapshot_type: SnapshotKind,
    snapshot_path: PathBuf,
    mem_file_path: PathBuf,
    /// Firecracker's field; tern has one state format.
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<String>,
}

/// Parses `PUT /snapshot/create`.
pub fn parse_create(body: &[u8]) -> Result<CreateSnapshot, ApiError> {
    let b: CreateBody = parse_body("snapshot/create", body)?;
    if b.snapshot_path.as_os_str().is_empty() || b.mem_file_path.as_os_str().is_empty() {
        return Err(ApiError::bad_request(
            "snapshot/create: snapshot_path and mem_file_path must not be empty",
        ));
    }
    if b.snapshot_path == b.mem_file_path {
        return Err(ApiError::bad_request(
            "snapshot/create: snapshot_path and mem_file_path must differ",
        ));
    }
    Ok(CreateSnapshot {
        kind: b.snapshot_type,
        snapshot_path: b.snapshot_path,
        mem_file_path: b.mem_file_path,
    })
}

/// The memory backend of a load (only files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: BackendType,
    backend_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum BackendType {
    File,
    Uffd,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DriveOverride {
    drive_id: String,
    path_on_host: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkOverride {
    iface_id: String,
    host_dev_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    /// Firecracker's older field, same as a File backend.
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default, alias = "enable_diff_snapshots")]
    track_dirty_pages: bool,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
}

/// A snapshot to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_path: PathBuf,
    /// Run at once.
    pub resume_vm: bool,
    /// Track dirty pages for later diffs.
    pub track_dirty_pages: bool,
    /// (drive id, new path) pairs.
    pub drive_overrides: Vec<(String, PathBuf)>,
    /// (interface id, new tap) pairs.
    pub network_overrides: Vec<(String, String)>,
}

/// Parses `PUT /snapshot/load`.
pub fn parse_load(body: &[u8]) -> Result<LoadSnapshot, ApiError> {
    let b: LoadBody = parse_body("snapshot/load", body)?;
    let mem_path = match (b.mem_backend, b.mem_file_path) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "snapshot/load: give mem_backend or mem_file_path, not both",
            ))
        }
        (Some(m), None) => {
            if m.backend_type == BackendType::Uffd {
                return Err(ApiError::bad_request(
                    "snapshot/load: mem_backend Uffd is not supported; use File (tern maps the file lazily itself)",
                ));
            }
            m.backend_path
        }
        (None, Some(p)) => p,
        (None, None) => {
            return Err(ApiError::bad_request(
                "snapshot/load: mem_backend is required",
            ))
        }
    };
    Ok(LoadSnapshot {
        snapshot_path: b.snapshot_path,
        mem_path,
        resume_vm: b.resume_vm,
        track_dirty_pages: b.track_dirty_pages,
        drive_overrides: b
            .drive_overrides
            .into_iter()
            .map(|d| (d.drive_id, d.path_on_host))
            .collect(),
        network_overrides: b
            .network_overrides
            .into_iter()
            .map(|n| (n.iface_id, n.host_dev_name))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_create() {
        let c =
            parse_create(br#"{"snapshot_type":"Diff","snapshot_path":"/s","mem_file_path":"/m"}"#)
                .unwrap();
        assert_eq!(c.kind, SnapshotKind::Diff);
        let c = parse_create(br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#).unwrap();
        assert_eq!(c.kind, SnapshotKind::Full);
        assert!(parse_create(br#"{"snapshot_path":"/s"}"#).is_err());
        assert!(parse_create(br#"{"snapshot_path":"/s","mem_file_path":"/s"}"#).is_err());
        assert!(parse_create(
            br#"{"snapshot_type":"Half","snapshot_path":"/s","mem_file_path":"/m"}"#
        )
        .is_err());
    }

    #[test]
    fn parses_load() {
        let l = parse_load(
            br#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true,
                "drive_overrides":[{"drive_id":"d0","path_on_host":"/o"}]}"#,
        )
        .unwrap();
        assert_eq!(l.mem_path, PathBuf::from("/m"));
        assert!(l.resume_vm && !l.track_dirty_pages);
        assert_eq!(l.drive_overrides, vec![("d0".into(), PathBuf::from("/o"))]);
        assert!(parse_load(br#"{"snapshot_path":"/s"}"#).is_err());
        assert!(parse_load(
            br#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"}}"#
        )
        .is_err());
        assert_eq!(
            parse_load(br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#)
                .unwrap()
                .mem_path,
            PathBuf::from("/m")
        );
    }
}
