//! The snapshot state file: a fixed header (magic, format version, body
//! length, CRC-32 of the body) and a JSON body. Written to a temporary
//! name, synced, then renamed over the target, so a crash or a full disk
//! never leaves a half-written file where an earlier snapshot was.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"TERNSNAP";
/// The state format this tern writes and reads. Bump on any change to the
/// body's meaning; older files are refused, not guessed at.
pub const FORMAT_VERSION: u32 = 1;
/// magic, version, reserved, body length, CRC-32.
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
/// A state body larger than this is not a tern snapshot (vCPU state is a
/// few KiB per vCPU).
const MAX_BODY: u64 = 64 << 20;

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened, read or written.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: std::io::Error,
    },
    /// Not a tern snapshot.
    #[error("{0}: not a tern snapshot state file (bad magic)")]
    Magic(PathBuf),
    /// Written by another format version.
    #[error("{path}: snapshot format version {found}, this tern reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter than its header says.
    #[error(
        "{path}: truncated: the header promises {expected} bytes of state, the file has {found}"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes promised.
        expected: u64,
        /// Bytes there.
        found: u64,
    },
    /// The body's checksum does not match.
    #[error("{path}: corrupted: state checksum {found:#010x}, header says {expected:#010x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Header's CRC.
        expected: u32,
        /// Computed CRC.
        found: u32,
    },
    /// The body is not valid state.
    #[error("{path}: invalid state: {err}")]
    Body {
        /// The file.
        path: PathBuf,
        /// What serde said.
        err: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |err| FileError::Io {
        path: path.to_owned(),
        err,
    }
}

/// The temporary name `path` is written under before the rename.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tern-tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Removes `<target>.tern-tmp-<pid>` files whose tern process is gone.
fn remove_stale_temps(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.tern-tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A file being written under a temporary name; [`AtomicFile::commit`]
/// syncs and renames it into place, dropping it uncommitted removes it.
pub struct AtomicFile {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicFile {
    /// Creates the temporary file for `target`, first removing temporary
    /// files for the same target left by a tern that died mid-write.
    pub fn create(target: &Path) -> Result<Self, FileError> {
        remove_stale_temps(target);
        let temp = temp_path(target);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(io(&temp))?;
        Ok(Self {
            file,
            temp,
            target: target.to_owned(),
            committed: false,
        })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary path (for error messages).
    pub fn temp(&self) -> &Path {
        &self.temp
    }

    /// Syncs the data (the rename comes later, with [`Self::rename`]).
    pub fn sync(&self) -> Result<(), FileError> {
        self.file.sync_all().map_err(io(&self.temp))
    }

    /// Renames the synced file over its target and syncs the directory.
    pub fn rename(mut self) -> Result<(), FileError> {
        std::fs::rename(&self.temp, &self.target).map_err(io(&self.target))?;
        self.committed = true;
        if let Some(dir) = self.target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Best effort: some file systems cannot sync a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Encodes `state` with its header.
pub fn encode<T: serde::Serialize>(state: &T) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(state)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes `state` to a temporary file next to `path`, synced; the caller
/// renames it into place when the whole snapshot is on disk.
pub fn write_state<T: serde::Serialize>(path: &Path, state: &T) -> Result<AtomicFile, FileError> {
    let bytes = encode(state).map_err(|err| FileError::Body {
        path: path.to_owned(),
        err,
    })?;
    let f = AtomicFile::create(path)?;
    (&f.file).write_all(&bytes).map_err(io(f.temp()))?;
    f.sync()?;
    Ok(f)
}

/// Checks the header and checksum of `bytes` (the whole file) and decodes
/// the body.
pub fn decode<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, FileError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(FileError::Magic(path.to_owned()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(FileError::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    let crc = word(24);
    let body = &bytes[HEADER_LEN..];
    if len > MAX_BODY || body.len() as u64 != len {
        return Err(FileError::Truncated {
            path: path.to_owned(),
            expected: len,
            found: body.len() as u64,
        });
    }
    let found = crc32fast::hash(body);
    if found != crc {
        return Err(FileError::Checksum {
            path: path.to_owned(),
            expected: crc,
            found,
        });
    }
    serde_json::from_slice(body).map_err(|err| FileError::Body {
        path: path.to_owned(),
        err,
    })
}

/// Reads and checks a state file.
pub fn read_state<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let mut f = File::open(path).map_err(io(path))?;
    let size = f.metadata().map_err(io(path))?.len();
    if size > MAX_BODY + HEADER_LEN as u64 {
        return Err(FileError::Magic(path.to_owned()));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.read_to_end(&mut bytes).map_err(io(path))?;
    decode(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let p = Path::new("/x");
        let state = serde_json::json!({"a": [1, 2, 3], "b": "c"});
        let bytes = encode(&state).unwrap();
        let back: serde_json::Value = decode(p, &bytes).unwrap();
        assert_eq!(back, state);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert!(matches!(
            decode::<serde_json::Value>(p, &flipped),
            Err(FileError::Checksum { .. })
        ));
        assert!(matches!(
            decode::<serde_json::Value>(p, &bytes[..bytes.len() - 1]),
            Err(FileError::Truncated { .. })
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            decode::<serde_json::Value>(p, &v2),
            Err(FileError::Version { found: 2, .. })
        ));
        assert!(matches!(
            decode::<serde_json::Value>(p, b"hello"),
            Err(FileError::Magic(_))
        ));
    }

    #[test]
    fn uncommitted_temp_is_removed_and_target_kept() {
        let dir = std::env::temp_dir().join(format!("tern-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("state");
        std::fs::write(&target, b"old").unwrap();
        let f = write_state(&target, &1u32).unwrap();
        let temp = f.temp().to_owned();
        assert!(temp.exists());
        drop(f);
        assert!(!temp.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        write_state(&target, &7u32).unwrap().rename().unwrap();
        assert_eq!(read_state::<u32>(&target).unwrap(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
