//! The HTTP API: a route table that turns (method, path, body) into a typed
//! [`ApiRequest`], a server thread that speaks HTTP on a Unix socket, and the
//! answers the VMM thread gives back. `api-spec/tern.yaml` is the contract.
//!
//! The API thread never touches the VM: it hands each request to the VMM
//! thread and waits for the answer.

pub mod request;
pub mod routes;
pub mod server;

use crate::config::{BootSource, DriveConfig, MachineConfig, NetConfig};
use request::actions::ActionType;
use request::logger::LoggerConfig;
use request::machine_config::MachineConfigUpdate;
use request::vm::VmState;

/// A parsed request, ready for the VMM thread.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`
    GetInfo,
    /// `GET /machine-config`
    GetMachineConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`
    PutDrive(DriveConfig),
    /// `PUT /network-interfaces/{id}`
    PutNetworkInterface(NetConfig),
    /// `PUT /actions`
    Action(ActionType),
    /// `PATCH /vm`
    PatchVm(VmState),
    /// `GET /vm/config`
    GetVmConfig,
    /// `GET /devices`
    GetDevices,
    /// `PUT /logger`
    PutLogger(LoggerConfig),
    /// `GET /metrics`
    GetMetrics,
    /// `PUT /snapshot/create`
    CreateSnapshot(request::snapshot::CreateSnapshot),
    /// `PUT /snapshot/load`
    LoadSnapshot(request::snapshot::LoadSnapshot),
    /// `PUT /migration/send`
    MigrationSend(crate::migration::SendParams),
    /// `PUT /migration/receive` (the URL to listen on, memory ahead or not)
    MigrationReceive(request::migration::ReceiveRequest),
    /// `GET /migration`
    GetMigration,
    /// `DELETE /migration` or `PUT /migration/cancel`
    CancelMigration,
    /// `PUT /dirty-rate`
    PutDirtyRate(crate::migration::dirty_rate::DirtyRateRequest),
    /// `GET /dirty-rate`
    GetDirtyRate,
    /// `DELETE /drives/{id}` (hot unplug after boot)
    DeleteDrive(String),
    /// `DELETE /network-interfaces/{id}` (hot unplug after boot)
    DeleteNetworkInterface(String),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204 No Content.
    NoContent,
    /// 200 with a JSON body.
    Json(serde_json::Value),
}

/// A refused request: an HTTP status and the `fault_message` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status code (400, 404, 405, 413, 500).
    pub status: u16,
    /// What is wrong, naming the field or the state at fault.
    pub message: String,
    /// For 405: the methods the path allows.
    pub allow: Option<String>,
}

impl ApiError {
    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            allow: None,
        }
    }

    /// 404 Not Found.
    pub fn not_found(path: &str) -> Self {
        Self {
            status: 404,
            message: format!("no such resource: {path}"),
            allow: None,
        }
    }

    /// 500 Internal Server Error (a VMM-side failure, e.g. a KVM ioctl).
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            allow: None,
        }
    }

    /// The JSON body: `{"fault_message": "..."}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "fault_message": self.message }).to_string()
    }
}

/// Parses a JSON body into `T`, with serde's message (which names the
/// field, its line and column) as the fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{what}: the request needs a JSON body"
        )));
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    // serde's derived structs also accept a JSON array of the fields in
    // order; the API takes objects only.
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "{what}: the body must be a JSON object"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}
