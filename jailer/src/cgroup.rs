//! `--cgroup FILE=VALUE`: the jail's cgroup, made below the jailer's own
//! (so it inherits every limit the jailer is under) as
//! `<current>/<exec name>/<id>`, in the v1 hierarchy of each file's
//! controller or in the v2 (unified) hierarchy.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The cgroup hierarchy the files are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (`/sys/fs/cgroup/pids`, ...).
    V1,
    /// The unified hierarchy (a `cgroup2` mount).
    V2,
}

/// Why the cgroups could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No hierarchy is mounted for the controller.
    #[error(
        "cgroup {file}: no cgroup v{version} hierarchy with the {controller} controller is mounted"
    )]
    NoHierarchy {
        /// The file asked for.
        file: String,
        /// Its controller.
        controller: String,
        /// 1 or 2.
        version: u8,
    },
    /// /proc/self/cgroup or /proc/mounts cannot be read.
    #[error("cannot read {path}: {err}")]
    Proc {
        /// The file.
        path: &'static str,
        /// OS error.
        err: std::io::Error,
    },
    /// The cgroup directory cannot be made.
    #[error("cannot create cgroup {path}: {err}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The controller cannot be enabled for the jail's cgroup (v2).
    #[error("cannot enable the {controller} controller in {path}: {err}")]
    Enable {
        /// The controller.
        controller: String,
        /// The cgroup.subtree_control file.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// The kernel refused the value (or the file does not exist).
    #[error("cgroup {file}={value}: {err}")]
    BadValue {
        /// The file.
        file: String,
        /// The value.
        value: String,
        /// OS error.
        err: std::io::Error,
    },
    /// The process cannot be moved into the cgroup.
    #[error("cannot join cgroup {path}: {err}")]
    Join {
        /// The directory.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
}

/// One cgroup directory of the jail.
#[derive(Debug)]
struct Group {
    /// The jail's cgroup.
    dir: PathBuf,
    /// The jailer's own cgroup in that hierarchy (to move back to on failure).
    parent: PathBuf,
}

/// The jail's cgroups, made and written but not yet joined.
#[derive(Debug, Default)]
pub struct Cgroups {
    groups: Vec<Group>,
    /// Directories this run created, outermost first.
    created: Vec<PathBuf>,
    joined: bool,
}

/// A mount of /proc/mounts: mount point, fs type, options.
fn mounts() -> Result<Vec<(PathBuf, String, Vec<String>)>, CgroupError> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(|err| CgroupError::Proc {
        path: "/proc/mounts",
        err,
    })?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| {
                (
                    PathBuf::from(f[1]),
                    f[2].to_string(),
                    f[3].split(',').map(String::from).collect(),
                )
            })
        })
        .collect())
}

/// The jailer's cgroup path for `controller` (v1) or the unified one.
fn current(version: CgroupVersion, controller: &str) -> Result<String, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|err| CgroupError::Proc {
        path: "/proc/self/cgroup",
        err,
    })?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let hit = match version {
            CgroupVersion::V2 => id == "0" && ctrls.is_empty(),
            CgroupVersion::V1 => ctrls.split(',').any(|c| c == controller),
        };
        if hit {
            return Ok(path.to_string());
        }
    }
    Ok("/".to_string())
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

impl Cgroups {
    /// Makes `<current>/<exec_name>/<id>` in each hierarchy `files` need and
    /// writes the values. Nothing is left behind on error.
    pub fn setup(
        version: CgroupVersion,
        files: &[(String, String)],
        exec_name: &str,
        id: &str,
    ) -> Result<Self, CgroupError> {
        let mut this = Cgroups::default();
        match this.setup_inner(version, files, exec_name, id) {
            Ok(()) => Ok(this),
            Err(e) => {
                this.remove();
                Err(e)
            }
        }
    }

    fn setup_inner(
        &mut self,
        version: CgroupVersion,
        files: &[(String, String)],
        exec_name: &str,
        id: &str,
    ) -> Result<(), CgroupError> {
        if files.is_empty() {
            return Ok(());
        }
        let mounts = mounts()?;
        for (file, value) in files {
            let controller = file.split('.').next().unwrap_or_default().to_string();
            let mount = mounts.iter().find(|(_, fs, opts)| match version {
                CgroupVersion::V1 => fs == "cgroup" && opts.contains(&controller),
                CgroupVersion::V2 => fs == "cgroup2",
            });
            let Some((mount, _, _)) = mount else {
                return Err(CgroupError::NoHierarchy {
                    file: file.clone(),
                    controller,
                    version: if version == CgroupVersion::V1 { 1 } else { 2 },
                });
            };
            let parent = mount.join(current(version, &controller)?.trim_start_matches('/'));
            let dir = parent.join(exec_name).join(id);
            if !self.groups.iter().any(|g| g.dir == dir) {
                self.make(&parent, &dir, version, &controller)?;
                self.groups.push(Group {
                    dir: dir.clone(),
                    parent,
                });
            } else if version == CgroupVersion::V2 {
                self.enable_v2(&dir, &controller)?;
            }
            write_file(&dir.join(file), value).map_err(|err| CgroupError::BadValue {
                file: file.clone(),
                value: value.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Creates `dir` and its missing parents below `parent`.
    fn make(
        &mut self,
        parent: &Path,
        dir: &Path,
        version: CgroupVersion,
        controller: &str,
    ) -> Result<(), CgroupError> {
        let mut path = parent.to_path_buf();
        let rel: Vec<_> = dir
            .strip_prefix(parent)
            .map(|r| r.components().collect())
            .unwrap_or_default();
        for c in rel {
            path.push(c);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    self.created.push(path.clone());
                    if controller == "cpuset" && version == CgroupVersion::V1 {
                        inherit_cpuset(&path);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(CgroupError::Create { path, err }),
            }
        }
        if version == CgroupVersion::V2 {
            self.enable_v2(dir, controller)?;
        }
        Ok(())
    }

    /// Enables `controller` in every cgroup.subtree_control from the
    /// hierarchy's root down to `dir`'s parent.
    fn enable_v2(&self, dir: &Path, controller: &str) -> Result<(), CgroupError> {
        // cgroup.* files are the core interface, not a controller's.
        if controller == "cgroup" {
            return Ok(());
        }
        let ancestors: Vec<&Path> = dir.ancestors().skip(1).collect();
        for a in ancestors.into_iter().rev() {
            let control = a.join("cgroup.subtree_control");
            if !control.exists() {
                continue;
            }
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if enabled.split_whitespace().any(|c| c == controller) {
                continue;
            }
            write_file(&control, &format!("+{controller}")).map_err(|err| CgroupError::Enable {
                controller: controller.to_string(),
                path: control.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Moves this process into every jail cgroup.
    pub fn join(&mut self) -> Result<(), CgroupError> {
        let pid = std::process::id().to_string();
        for g in &self.groups {
            self.joined = true;
            write_file(&g.dir.join("cgroup.procs"), &pid).map_err(|err| CgroupError::Join {
                path: g.dir.clone(),
                err,
            })?;
        }
        Ok(())
    }

    /// Undoes [`Cgroups::setup`] (and [`Cgroups::join`]): moves the process
    /// back to its own cgroups and removes the directories it made.
    pub fn remove(&mut self) {
        if self.joined {
            let pid = std::process::id().to_string();
            for g in &self.groups {
                let _ = write_file(&g.parent.join("cgroup.procs"), &pid);
            }
        }
        for dir in self.created.drain(..).rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A new v1 cpuset cgroup has no CPUs or memory nodes until given its
/// parent's.
fn inherit_cpuset(dir: &Path) {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        if let Some(parent) = dir.parent() {
            if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                let _ = write_file(&dir.join(f), v.trim());
            }
        }
    }
}
