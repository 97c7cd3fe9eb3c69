//! `PUT /logger`: log level and destination.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::api::{parse_body, ApiError};

/// Log level names as Firecracker spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// The default.
    Info,
    /// More.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The body of `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// New level; unchanged when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// A file to append log lines to instead of stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
}

/// Parses the body of `PUT /logger`.
pub fn parse(body: &[u8]) -> Result<LoggerConfig, ApiError> {
    parse_body("logger", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels() {
        let c = parse(br#"{"level":"Debug","log_path":"/tmp/x"}"#).unwrap();
        assert_eq!(c.level, Some(LogLevel::Debug));
        assert!(parse(br#"{"level":"Loud"}"#)
            .unwrap_err()
            .message
            .contains("Loud"));
        assert!(parse(br#"{"path":"/tmp/x"}"#)
            .unwrap_err()
            .message
            .contains("`path`"));
    }
}
