//! The vhost-user frontend and virtio-blk driver used by these tests lives in
//! `tools/vhost-driver` (crate `tern-vhost-driver`, shared with
//! `tern-bench blk`); this module re-exports it and binds it to the
//! `tern-blk` binary built for the tests.

#![allow(dead_code, unused_imports)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

pub use tern_vhost_driver::{
    allocated_bytes, blk, discard_segment, guest_memory, layout, page_dirty, pattern, rd,
    region_sizes, wr, BlkFrontend as TestFrontend, Desc, QueueDriver, Used, VirtQueue,
};

/// A fresh scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    tern_vhost_driver::scratch_dir_in(&base, name)
}

/// A running `tern-blk` (the binary under test).
pub struct Backend(tern_vhost_driver::Backend);

impl Backend {
    /// Path of the binary under test.
    pub fn binary() -> &'static str {
        env!("CARGO_BIN_EXE_tern-blk")
    }

    /// Start `tern-blk --socket SOCKET ARGS...` and wait for its socket.
    pub fn spawn(socket: &Path, args: &[&str]) -> Backend {
        Backend(tern_vhost_driver::Backend::spawn(
            Path::new(Self::binary()),
            socket,
            args,
        ))
    }
}

impl Deref for Backend {
    type Target = tern_vhost_driver::Backend;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Backend {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Run `tern-blk` with `args` to completion, capturing stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    tern_vhost_driver::run_to_exit(Path::new(Backend::binary()), args)
}
