//! `PUT /network-interfaces/{iface_id}`: a NIC (Firecracker's body:
//! `iface_id`, `host_dev_name`, `guest_mac`; plus `num_queues`, `mtu`, and
//! `socket` for an external vhost-user backend).

use crate::api::{parse_body, ApiError};
use crate::config::NetConfig;

/// Parses the body; the id in the path and in the body must agree (the
/// body may leave it out).
pub fn parse(id: &str, body: &[u8]) -> Result<NetConfig, ApiError> {
    let mut value: serde_json::Value = parse_body("network-interfaces", body)?;
    if let Some(obj) = value.as_object_mut() {
        match obj.get("iface_id") {
            None => {
                obj.insert("iface_id".into(), id.into());
            }
            Some(v) if v.as_str() == Some(id) => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "network-interfaces: iface_id {v} in the body does not match {id} in the path"
                )))
            }
        }
    }
    let net: NetConfig = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("network-interfaces: {e}")))?;
    net.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_macs_and_backends() {
        let n = parse(
            "eth0",
            br#"{"host_dev_name":"tap0","guest_mac":"02:00:00:00:00:01"}"#,
        )
        .unwrap();
        assert_eq!(n.iface_id, "eth0");
        assert!(
            parse("eth0", br#"{"iface_id":"eth1","host_dev_name":"tap0"}"#)
                .unwrap_err()
                .message
                .contains("does not match")
        );
        assert!(
            parse("eth0", br#"{"host_dev_name":"tap0","guest_mac":"zz"}"#)
                .unwrap_err()
                .message
                .contains("guest_mac")
        );
        assert!(parse(
            "eth0",
            br#"{"host_dev_name":"tap0","guest_mac":"01:00:00:00:00:01"}"#
        )
        .unwrap_err()
        .message
        .contains("multicast"));
        assert!(parse("eth0", br#"{}"#)
            .unwrap_err()
            .message
            .contains("host_dev_name"));
        assert!(parse("eth0", br#"{"socket":"/s","num_queues":0}"#)
            .unwrap_err()
            .message
            .contains("num_queues"));
        assert!(parse("eth0", br#"{"host_dev_name":"a/b"}"#)
            .unwrap_err()
            .message
            .contains("not a valid interface name"));
    }
}
