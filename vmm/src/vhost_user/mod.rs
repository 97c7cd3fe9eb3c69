//! The vhost-user frontend: tern's side of the devices whose queues a
//! separate backend process serves.

pub mod backend_process;
pub mod device;
pub mod dirty_log;
pub mod handle;
