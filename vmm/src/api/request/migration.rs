//! `PUT /migration/send`, `PUT /migration/receive`, `PUT /dirty-rate`.

use serde::Deserialize;

use crate::api::{parse_body, ApiError};
use crate::migration::dirty_rate::DirtyRateRequest;
use crate::migration::SendParams;

/// Parses `PUT /migration/send`.
pub fn parse_send(body: &[u8]) -> Result<SendParams, ApiError> {
    let p: SendParams = parse_body("migration/send", body)?;
    p.url
        .parse::<crate::migration::MigrationUrl>()
        .map_err(|e| ApiError::bad_request(format!("migration/send: {e}")))?;
    if p.downtime_limit_ms == 0 {
        return Err(ApiError::bad_request(
            "migration/send: downtime_limit_ms must be at least 1",
        ));
    }
    Ok(p)
}

/// `PUT /migration/receive`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Where to listen: `unix:PATH` or `tcp:HOST:PORT`.
    pub url: String,
    /// Allocate the memory of the pre-boot machine-config now, before the
    /// source connects (as QEMU's `-mem-prealloc` on a destination).
    #[serde(default)]
    pub prealloc: bool,
}

/// Parses `PUT /migration/receive`: the URL to listen on, and whether to
/// allocate the guest's memory ahead.
pub fn parse_receive(body: &[u8]) -> Result<ReceiveRequest, ApiError> {
    let b: ReceiveRequest = parse_body("migration/receive", body)?;
    b.url
        .parse::<crate::migration::MigrationUrl>()
        .map_err(|e| ApiError::bad_request(format!("migration/receive: {e}")))?;
    Ok(b)
}

/// Parses `PUT /dirty-rate`.
pub fn parse_dirty_rate(body: &[u8]) -> Result<DirtyRateRequest, ApiError> {
    parse_body("dirty-rate", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bodies() {
        let p = parse_send(br#"{"url":"unix:/tmp/m","downtime_limit_ms":50,"keep_source":true}"#)
            .unwrap();
        assert_eq!(p.downtime_limit_ms, 50);
        assert!(p.keep_source && !p.local && p.auto_converge);
        assert_eq!(p.max_iterations, 30);
        assert!(parse_send(br#"{"url":"ftp://x"}"#).is_err());
        assert!(parse_send(br#"{"url":"unix:/m","downtime_limit_ms":0}"#).is_err());
        assert!(parse_send(br#"{"url":"unix:/m","bogus":1}"#).is_err());
        let r = parse_receive(br#"{"url":"tcp:0.0.0.0:7000"}"#).unwrap();
        assert_eq!((r.url.as_str(), r.prealloc), ("tcp:0.0.0.0:7000", false));
        let r = parse_receive(br#"{"url":"unix:/m","prealloc":true}"#).unwrap();
        assert!(r.prealloc);
        assert!(parse_receive(br#"{"url":"unix:/m","prealloc":1}"#).is_err());
        assert!(parse_receive(br#"{"url":"tcp:x"}"#).is_err());
        assert_eq!(
            parse_dirty_rate(br#"{"calc_period_s":3}"#)
                .unwrap()
                .calc_period_s,
            3
        );
        assert!(parse_dirty_rate(br#"{"calc_period_s":-1}"#).is_err());
    }
}
