//! `--resource-limit`: rlimits set before the exec.

/// A resource the jailer limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `fsize`: the largest file it may write, in bytes (RLIMIT_FSIZE).
    FileSize,
    /// `no-file`: how many descriptors it may have open (RLIMIT_NOFILE).
    OpenFiles,
}

/// A limit the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("cannot set resource limit {name}={value}: {err}")]
pub struct RlimitError {
    name: &'static str,
    value: u64,
    err: std::io::Error,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::FileSize => "fsize",
            Resource::OpenFiles => "no-file",
        }
    }

    fn id(self) -> libc::__rlimit_resource_t {
        match self {
            Resource::FileSize => libc::RLIMIT_FSIZE,
            Resource::OpenFiles => libc::RLIMIT_NOFILE,
        }
    }
}

/// Sets each limit, soft and hard.
pub fn apply(limits: &[(Resource, u64)]) -> Result<(), RlimitError> {
    for &(resource, value) in limits {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the valid rlimit structure.
        if unsafe { libc::setrlimit(resource.id(), &lim) } != 0 {
            return Err(RlimitError {
                name: resource.name(),
                value,
                err: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}
