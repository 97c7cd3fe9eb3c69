//! `PUT /drives/{drive_id}`: a disk (Firecracker's body, plus `format`,
//! `num_queues`, `socket` for an external vhost-user backend, `cache`,
//! `serial`, and `interface`: virtio-blk or a LUN of the virtio-scsi
//! controller). Rules across drives (one backend for all virtio-scsi
//! drives) are checked when the drive joins the VM's configuration.

use crate::api::{parse_body, ApiError};
use crate::config::DriveConfig;

/// Parses the body of `PUT /drives/{id}`; the id in the path and in the body
/// must agree (the body may leave it out).
pub fn parse(id: &str, body: &[u8]) -> Result<DriveConfig, ApiError> {
    let mut value: serde_json::Value = parse_body("drives", body)?;
    if let Some(obj) = value.as_object_mut() {
        match obj.get("drive_id") {
            None => {
                obj.insert("drive_id".into(), id.into());
            }
            Some(v) if v.as_str() == Some(id) => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "drives: drive_id {v} in the body does not match {id} in the path"
                )))
            }
        }
    }
    let drive: DriveConfig =
        serde_json::from_value(value).map_err(|e| ApiError::bad_request(format!("drives: {e}")))?;
    drive
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(p) = &drive.path_on_host {
        let meta = std::fs::metadata(p).map_err(|e| {
            ApiError::bad_request(format!("drives: path_on_host {}: {e}", p.display()))
        })?;
        if !meta.is_file() {
            return Err(ApiError::bad_request(format!(
                "drives: path_on_host {}: not a regular file",
                p.display()
            )));
        }
    }
    Ok(drive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_files_and_backends() {
        let d = parse(
            "d0",
            br#"{"path_on_host":"/proc/self/exe","is_read_only":true,"format":"qcow2"}"#,
        )
        .unwrap();
        assert_eq!(d.drive_id, "d0");
        assert!(parse(
            "d0",
            br#"{"drive_id":"d1","path_on_host":"/proc/self/exe"}"#
        )
        .unwrap_err()
        .message
        .contains("does not match"));
        assert!(parse("d0", br#"{"path_on_host":"/nope"}"#)
            .unwrap_err()
            .message
            .contains("/nope"));
        assert!(
            parse("d0", br#"{"socket":"/s","path_on_host":"/proc/self/exe"}"#)
                .unwrap_err()
                .message
                .contains("not both")
        );
        assert!(parse("d0", br#"{}"#)
            .unwrap_err()
            .message
            .contains("path_on_host"));
        assert!(parse("bad id", br#"{"socket":"/s"}"#)
            .unwrap_err()
            .message
            .contains("drive_id"));
        assert!(parse("d0", br#"{"socket":"/s","num_queues":0}"#)
            .unwrap_err()
            .message
            .contains("num_queues"));
        assert!(parse("d0", br#"{"socket":"/s","format":"vmdk"}"#)
            .unwrap_err()
            .message
            .contains("vmdk"));
        let d = parse("d0", br#"{"socket":"/s","interface":"virtio-scsi"}"#).unwrap();
        assert_eq!(d.interface, crate::config::DriveInterface::VirtioScsi);
        assert!(parse("d0", br#"{"socket":"/s","interface":"ide"}"#)
            .unwrap_err()
            .message
            .contains("ide"));
        assert!(parse(
            "d0",
            br#"{"socket":"/s","interface":"virtio-scsi","is_root_device":true}"#
        )
        .unwrap_err()
        .message
        .contains("root device"));
    }
}
