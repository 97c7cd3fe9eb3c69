//! `PATCH /vm`: pause and resume.

use serde::Deserialize;

use crate::api::{parse_body, ApiError};

/// The state asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Stop every vCPU.
    Paused,
    /// Run them again.
    Resumed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    state: VmState,
}

/// Parses the body of `PATCH /vm`.
pub fn parse(body: &[u8]) -> Result<VmState, ApiError> {
    parse_body::<Body>("vm", body).map(|b| b.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_states() {
        assert_eq!(parse(br#"{"state":"Paused"}"#).unwrap(), VmState::Paused);
        assert_eq!(parse(br#"{"state":"Resumed"}"#).unwrap(), VmState::Resumed);
        assert!(parse(br#"{"state":"Stopped"}"#)
            .unwrap_err()
            .message
            .contains("Stopped"));
        assert!(parse(br#"{"state":1}"#).is_err());
    }
}
