//! Request bodies, one module per resource, each with its parsing tests.

pub mod actions;
pub mod boot_source;
pub mod drives;
pub mod logger;
pub mod machine_config;
pub mod migration;
pub mod network_interfaces;
pub mod snapshot;
pub mod vm;
