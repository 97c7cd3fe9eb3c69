//! tern: a microVM monitor on KVM with an emulated q35 machine.
//!
//! The library holds everything; `main.rs` only parses the command line and
//! turns the VM's end into the process's exit status.

#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod controller;
pub mod devices;
pub mod exit;
pub mod hotplug;
pub mod kvm;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod scsi_luns;
pub mod snapshot;
pub mod spare_thread;
pub mod terminal;
pub mod vhost_user;
pub mod vmm;
