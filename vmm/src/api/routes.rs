//! The route table: `(method, path)` to a typed [`ApiRequest`]. [`ROUTES`]
//! lists every pair the server answers; a test checks it against
//! `api-spec/tern.yaml`.

use super::request::{
    actions, boot_source, drives, logger, machine_config, migration, network_interfaces, snapshot,
    vm,
};
use super::{ApiError, ApiRequest};

/// Every (method, path) the server routes.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("DELETE", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("DELETE", "/network-interfaces/{iface_id}"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("GET", "/devices"),
    ("PUT", "/logger"),
    ("GET", "/metrics"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/migration/send"),
    ("PUT", "/migration/receive"),
    ("GET", "/migration"),
    ("DELETE", "/migration"),
    ("PUT", "/migration/cancel"),
    ("PUT", "/dirty-rate"),
    ("GET", "/dirty-rate"),
];

/// The path without query string or a trailing slash.
fn normalise(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or("");
    match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    }
}

/// Turns a request into an [`ApiRequest`], or the error to answer with.
pub fn parse(method: &str, url: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = normalise(url);
    Ok(match (method, path) {
        ("GET", "/") => ApiRequest::GetInfo,
        ("GET", "/machine-config") => ApiRequest::GetMachineConfig,
        ("PUT", "/machine-config") => {
            ApiRequest::PutMachineConfig(machine_config::parse_put(body)?)
        }
        ("PATCH", "/machine-config") => {
            ApiRequest::PatchMachineConfig(machine_config::parse_patch(body)?)
        }
        ("PUT", "/boot-source") => ApiRequest::PutBootSource(boot_source::parse(body)?),
        ("PUT", "/actions") => ApiRequest::Action(actions::parse(body)?),
        ("PATCH", "/vm") => ApiRequest::PatchVm(vm::parse(body)?),
        ("GET", "/vm/config") => ApiRequest::GetVmConfig,
        ("GET", "/devices") => ApiRequest::GetDevices,
        ("PUT", "/logger") => ApiRequest::PutLogger(logger::parse(body)?),
        ("GET", "/metrics") => ApiRequest::GetMetrics,
        ("PUT", "/snapshot/create") => ApiRequest::CreateSnapshot(snapshot::parse_create(body)?),
        ("PUT", "/snapshot/load") => ApiRequest::LoadSnapshot(snapshot::parse_load(body)?),
        ("PUT", "/migration/send") => ApiRequest::MigrationSend(migration::parse_send(body)?),
        ("PUT", "/migration/receive") => {
            ApiRequest::MigrationReceive(migration::parse_receive(body)?)
        }
        ("GET", "/migration") => ApiRequest::GetMigration,
        ("DELETE", "/migration") | ("PUT", "/migration/cancel") => ApiRequest::CancelMigration,
        ("PUT", "/dirty-rate") => ApiRequest::PutDirtyRate(migration::parse_dirty_rate(body)?),
        ("GET", "/dirty-rate") => ApiRequest::GetDirtyRate,
        ("PUT", p) if param(p, "/drives/").is_some() => {
            let id = param(p, "/drives/").unwrap_or_default();
            ApiRequest::PutDrive(drives::parse(id, body)?)
        }
        ("DELETE", p) if param(p, "/drives/").is_some() => {
            ApiRequest::DeleteDrive(param(p, "/drives/").unwrap_or_default().to_string())
        }
        ("DELETE", p) if param(p, "/network-interfaces/").is_some() => {
            ApiRequest::DeleteNetworkInterface(
                param(p, "/network-interfaces/")
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        ("PUT", p) if param(p, "/network-interfaces/").is_some() => {
            let id = param(p, "/network-interfaces/").unwrap_or_default();
            ApiRequest::PutNetworkInterface(network_interfaces::parse(id, body)?)
        }
        _ => return Err(unrouted(method, path)),
    })
}

/// The one path parameter after `prefix` (`/drives/d0` -> `d0`).
fn param<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Whether `path` is an instance of the route `template`.
fn matches(template: &str, path: &str) -> bool {
    match template.split_once('{') {
        Some((prefix, _)) => param(path, prefix).is_some(),
        None => template == path,
    }
}

/// 405 with the allowed methods when the path exists, else 404.
fn unrouted(method: &str, path: &str) -> ApiError {
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, p)| matches(p, path))
        .map(|(m, _)| *m)
        .collect();
    if allowed.is_empty() {
        return ApiError::not_found(path);
    }
    let allow = allowed.join(", ");
    ApiError {
        status: 405,
        message: format!("method {method} is not allowed on {path} (allowed: {allow})"),
        allow: Some(allow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body each route accepts, so the table and the match agree.
    fn sample_body(method: &str, path: &str) -> &'static [u8] {
        match (method, path) {
            ("PUT", "/machine-config") => br#"{"vcpu_count":1,"mem_size_mib":64}"#,
            ("PATCH", "/machine-config") => br#"{"vcpu_count":2}"#,
            ("PUT", "/boot-source") => br#"{"kernel_image_path":"/proc/self/exe"}"#,
            ("PUT", "/actions") => br#"{"action_type":"InstanceStart"}"#,
            ("PATCH", "/vm") => br#"{"state":"Paused"}"#,
            ("PUT", "/logger") => br#"{"level":"Info"}"#,
            ("PUT", "/drives/{drive_id}") => br#"{"socket":"/s"}"#,
            ("PUT", "/network-interfaces/{iface_id}") => br#"{"socket":"/s"}"#,
            ("PUT", "/snapshot/create") => br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            ("PUT", "/snapshot/load") => br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            ("PUT", "/migration/send") | ("PUT", "/migration/receive") => {
                br#"{"url":"unix:/tmp/m.sock"}"#
            }
            ("PUT", "/dirty-rate") => br#"{"calc_period_s":1}"#,
            _ => b"",
        }
    }

    #[test]
    fn every_listed_route_is_routed() {
        for (m, p) in ROUTES {
            let concrete = p.replace("{drive_id}", "d0").replace("{iface_id}", "eth0");
            assert!(parse(m, &concrete, sample_body(m, p)).is_ok(), "{m} {p}");
        }
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(parse("GET", "/nope", b"").unwrap_err().status, 404);
        let e = parse("DELETE", "/machine-config", b"").unwrap_err();
        assert_eq!(e.status, 405);
        assert_eq!(e.allow.as_deref(), Some("GET, PUT, PATCH"));
        assert_eq!(parse("POST", "/", b"").unwrap_err().status, 405);
        assert_eq!(
            parse("GET", "/machine-config/?x=1", b"").unwrap(),
            ApiRequest::GetMachineConfig
        );
    }
}
