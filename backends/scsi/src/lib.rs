//! `tern-scsi`: a vhost-user virtio-scsi backend serving one controller
//! (target 0) with raw and qcow2 disk images as its LUNs.
//!
//! Layers, each in its own module:
//! - [`cdb`] parses a CDB into a [`cdb::Command`] (pure), [`sense`] builds
//!   sense data, [`inquiry`] and [`mode`] build INQUIRY / VPD / mode data;
//! - [`lun`] executes commands against an image ([`lun::Lun`]) and knows
//!   the target's LUNs ([`target::Target`]), which [`hotplug`] changes at
//!   run time on tern's request;
//! - [`request`] and [`guest`] turn descriptor chains into requests and
//!   guest buffers; [`command`], [`control`] and [`event`] serve the
//!   request, control and event queues;
//! - [`backend`] is the `vhost-user-backend` device, [`config`] the command
//!   line and configuration space, [`metrics`] the counters.

pub mod backend;
pub mod cdb;
pub mod command;
pub mod config;
pub mod control;
pub mod event;
pub mod fuzz;
pub mod guest;
pub mod hotplug;
pub mod inquiry;
pub mod lun;
pub mod metrics;
pub mod mode;
pub mod request;
pub mod sense;
pub mod target;
