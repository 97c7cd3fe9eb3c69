//! `PUT /actions`: InstanceStart, SendCtrlAltDel, FlushMetrics.

use serde::Deserialize;

use crate::api::{parse_body, ApiError};

/// The action to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write the metrics to the log now.
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    action_type: ActionType,
}

/// Parses the body of `PUT /actions`.
pub fn parse(body: &[u8]) -> Result<ActionType, ApiError> {
    parse_body::<Body>("actions", body).map(|b| b.action_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_actions_and_refuses_others() {
        assert_eq!(
            parse(br#"{"action_type":"InstanceStart"}"#).unwrap(),
            ActionType::InstanceStart
        );
        assert_eq!(
            parse(br#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ActionType::SendCtrlAltDel
        );
        assert_eq!(
            parse(br#"{"action_type":"FlushMetrics"}"#).unwrap(),
            ActionType::FlushMetrics
        );
        let e = parse(br#"{"action_type":"Reboot"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("Reboot"), "{e}");
        assert!(parse(br#"{"action_type":"InstanceStart","x":1}"#)
            .unwrap_err()
            .message
            .contains("`x`"));
        assert!(parse(b"")
            .unwrap_err()
            .message
            .contains("needs a JSON body"));
    }
}
