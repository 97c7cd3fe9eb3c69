//! What each ternctl command sends, and how an answer becomes output or an error.

use std::fs;
use std::io::{self, Read};

use crate::client::{ClientError, Method, Request, Response};
use crate::{Command, DeviceAction};

/// Why a command failed. [`CliError::exit_code`] gives the process exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The VMM answered with a 4xx or 5xx status.
    #[error("{}", api_error_line(*.status, .reason, .message))]
    Api {
        /// The status code.
        status: u16,
        /// The reason phrase.
        reason: String,
        /// The `fault_message`, or the raw body when there is none (may be empty).
        message: String,
    },
    /// The socket could not be reached or did not answer properly.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The body given on the command line is not JSON.
    #[error("invalid JSON body{origin}: {source}")]
    BadJson {
        /// Where the body came from (` in FILE`, ` on stdin`, or empty).
        origin: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The body file or stdin could not be read.
    #[error("cannot read the body from {what}: {source}")]
    BodyRead {
        /// `FILE` or `stdin`.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// The endpoint cannot go on a request line.
    #[error("invalid endpoint {0:?}: use a path such as /vm/config (printable ASCII, no spaces)")]
    BadEndpoint(String),
    /// Writing the output failed (e.g. stdout closed).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl CliError {
    /// 1 when the VMM refused the request, 2 for everything else (no answer,
    /// a malformed answer, or a local error).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } => 1,
            _ => 2,
        }
    }
}

/// `STATUS reason: message`, on one line.
fn api_error_line(status: u16, reason: &str, message: &str) -> String {
    let mut line = status.to_string();
    if !reason.is_empty() {
        line.push(' ');
        line.push_str(reason);
    }
    let message = one_line(message);
    if !message.is_empty() {
        line.push_str(": ");
        line.push_str(&message);
    }
    line
}

/// Collapses whitespace and control characters so a message stays on one line.
fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Turns an endpoint given with or without a leading `/` into a request path.
pub fn endpoint_path(endpoint: &str) -> Result<String, CliError> {
    if endpoint.is_empty() || !endpoint.chars().all(|c| c.is_ascii_graphic()) {
        return Err(CliError::BadEndpoint(endpoint.to_owned()));
    }
    Ok(if endpoint.starts_with('/') {
        endpoint.to_owned()
    } else {
        format!("/{endpoint}")
    })
}

/// Reads a body argument: inline JSON, `@FILE`, or `-` for stdin; checks that
/// it is JSON and returns the text to send.
pub fn load_body(arg: &str, stdin: impl Read) -> Result<String, CliError> {
    let (text, origin) = if arg == "-" {
        let mut text = String::new();
        let mut stdin = stdin;
        stdin
            .read_to_string(&mut text)
            .map_err(|source| CliError::BodyRead {
                what: "stdin".to_owned(),
                source,
            })?;
        (text, " on stdin".to_owned())
    } else if let Some(file) = arg.strip_prefix('@') {
        let text = fs::read_to_string(file).map_err(|source| CliError::BodyRead {
            what: file.to_owned(),
            source,
        })?;
        (text, format!(" in {file}"))
    } else {
        (arg.to_owned(), String::new())
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|source| CliError::BadJson { origin, source })?;
    Ok(text.trim().to_owned())
}

/// The request a command sends. `stdin` is read only for a `-` body.
pub fn request_for(command: &Command, stdin: impl Read) -> Result<Request, CliError> {
    let action = |action: &str| {
        Request::with_body(
            Method::Put,
            "/actions",
            format!(r#"{{"action_type":"{action}"}}"#),
        )
    };
    let vm_state =
        |state: &str| Request::with_body(Method::Patch, "/vm", format!(r#"{{"state":"{state}"}}"#));
    Ok(match command {
        Command::Info => Request::new(Method::Get, "/"),
        Command::Config => Request::new(Method::Get, "/vm/config"),
        Command::Devices => Request::new(Method::Get, "/devices"),
        Command::Metrics => Request::new(Method::Get, "/metrics"),
        Command::Pause => vm_state("Paused"),
        Command::Resume => vm_state("Resumed"),
        Command::Start => action("InstanceStart"),
        Command::CtrlAltDel => action("SendCtrlAltDel"),
        Command::Device { action } => {
            let collection = |kind: &str| match kind {
                "net" => "/network-interfaces",
                _ => "/drives",
            };
            match action {
                DeviceAction::List => Request::new(Method::Get, "/devices"),
                DeviceAction::Add { kind, id, body } => Request::with_body(
                    Method::Put,
                    endpoint_path(&format!("{}/{id}", collection(kind)))?,
                    load_body(body, stdin)?,
                ),
                DeviceAction::Remove { kind, id } => Request::new(
                    Method::Delete,
                    endpoint_path(&format!("{}/{id}", collection(kind)))?,
                ),
            }
        }
        Command::DirtyRate { period } => Request::with_body(
            Method::Put,
            "/dirty-rate",
            format!(r#"{{"calc_period_s":{period}}}"#),
        ),
        Command::Get { endpoint } => Request::new(Method::Get, endpoint_path(endpoint)?),
        Command::Put { endpoint, body } => Request::with_body(
            Method::Put,
            endpoint_path(endpoint)?,
            load_body(body, stdin)?,
        ),
        Command::Patch { endpoint, body } => Request::with_body(
            Method::Patch,
            endpoint_path(endpoint)?,
            load_body(body, stdin)?,
        ),
    })
}

/// After `PUT /dirty-rate`: waits out the period, then polls
/// `GET /dirty-rate` until the measurement is done and returns it.
pub fn wait_dirty_rate(client: &crate::client::Client, period: u64) -> Result<String, CliError> {
    std::thread::sleep(std::time::Duration::from_secs(period));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = client.send(&Request::new(Method::Get, "/dirty-rate"))?;
        let text = render(&r, false)?;
        let done = serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["calc_status"].as_u64())
            == Some(2);
        if done || std::time::Instant::now() > deadline {
            return Ok(text);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What to print on stdout for an answer: pretty JSON for a JSON body, the
/// raw text for any other body, nothing for an empty one (or `ok` when
/// `verbose`). A 4xx/5xx answer is a [`CliError::Api`].
pub fn render(response: &Response, verbose: bool) -> Result<String, CliError> {
    if !response.is_success() {
        let message = response
            .fault_message()
            .unwrap_or_else(|| String::from_utf8_lossy(&response.body).into_owned());
        return Err(CliError::Api {
            status: response.status,
            reason: response.reason.clone(),
            message,
        });
    }
    if response.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(if verbose {
            "ok\n".to_owned()
        } else {
            String::new()
        });
    }
    let mut text = match serde_json::from_slice::<serde_json::Value>(&response.body) {
        Ok(value) => serde_json::to_string_pretty(&value)
            .unwrap_or_else(|_| String::from_utf8_lossy(&response.body).into_owned()),
        Err(_) => String::from_utf8_lossy(&response.body).into_owned(),
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn no_stdin() -> &'static [u8] {
        b""
    }

    fn response(status: u16, reason: &str, body: &str) -> Response {
        Response {
            status,
            reason: reason.to_owned(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn fixed_commands_map_to_the_api() {
        let cases = [
            (Command::Info, Method::Get, "/", None),
            (Command::Config, Method::Get, "/vm/config", None),
            (Command::Devices, Method::Get, "/devices", None),
            (Command::Metrics, Method::Get, "/metrics", None),
            (
                Command::Pause,
                Method::Patch,
                "/vm",
                Some(r#"{"state":"Paused"}"#),
            ),
            (
                Command::Resume,
                Method::Patch,
                "/vm",
                Some(r#"{"state":"Resumed"}"#),
            ),
            (
                Command::Start,
                Method::Put,
                "/actions",
                Some(r#"{"action_type":"InstanceStart"}"#),
            ),
            (
                Command::CtrlAltDel,
                Method::Put,
                "/actions",
                Some(r#"{"action_type":"SendCtrlAltDel"}"#),
            ),
            (
                Command::Device {
                    action: DeviceAction::List,
                },
                Method::Get,
                "/devices",
                None,
            ),
            (
                Command::Device {
                    action: DeviceAction::Add {
                        kind: "net".into(),
                        id: "eth1".into(),
                        body: r#"{"host_dev_name":"tap1"}"#.into(),
                    },
                },
                Method::Put,
                "/network-interfaces/eth1",
                Some(r#"{"host_dev_name":"tap1"}"#),
            ),
            (
                Command::Device {
                    action: DeviceAction::Remove {
                        kind: "drive".into(),
                        id: "d1".into(),
                    },
                },
                Method::Delete,
                "/drives/d1",
                None,
            ),
        ];
        for (command, method, path, body) in cases {
            let request = request_for(&command, no_stdin()).unwrap();
            assert_eq!(request.method, method, "{command:?}");
            assert_eq!(request.path, path, "{command:?}");
            assert_eq!(request.body.as_deref(), body, "{command:?}");
        }
    }

    #[test]
    fn endpoint_gets_a_leading_slash() {
        assert_eq!(endpoint_path("machine-config").unwrap(), "/machine-config");
        assert_eq!(endpoint_path("/machine-config").unwrap(), "/machine-config");
        assert_eq!(endpoint_path("drives/rootfs").unwrap(), "/drives/rootfs");
    }

    #[test]
    fn endpoint_with_space_or_empty_is_rejected() {
        for bad in ["", "vm config", "vm\r\nX: y", "vé"] {
            let err = endpoint_path(bad).unwrap_err();
            assert!(matches!(err, CliError::BadEndpoint(_)), "{bad:?}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn put_with_inline_json() {
        let command = Command::Put {
            endpoint: "machine-config".into(),
            body: r#" {"vcpu_count": 2, "mem_size_mib": 256} "#.into(),
        };
        let request = request_for(&command, no_stdin()).unwrap();
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.path, "/machine-config");
        assert_eq!(
            request.body.as_deref(),
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#)
        );
    }

    #[test]
    fn patch_body_from_stdin() {
        let command = Command::Patch {
            endpoint: "/vm".into(),
            body: "-".into(),
        };
        let request = request_for(&command, &b"{\"state\":\"Paused\"}\n"[..]).unwrap();
        assert_eq!(request.method, Method::Patch);
        assert_eq!(request.body.as_deref(), Some(r#"{"state":"Paused"}"#));
    }

    #[test]
    fn body_from_file() {
        let path = std::env::temp_dir().join(format!("ternctl-body-{}.json", std::process::id()));
        fs::write(&path, "{\"level\": \"Debug\"}\n").unwrap();
        let body = load_body(&format!("@{}", path.display()), no_stdin()).unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(body, r#"{"level": "Debug"}"#);
    }

    #[test]
    fn missing_body_file_is_a_clear_error() {
        let err = load_body("@/nonexistent/ternctl.json", no_stdin()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .starts_with("cannot read the body from /nonexistent/ternctl.json: No such file"),
            "{err}"
        );
    }

    #[test]
    fn bad_json_is_a_local_error() {
        let err = load_body("{vcpu_count: 2}", no_stdin()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            "invalid JSON body: key must be a string at line 1 column 2"
        );
        let err = load_body("-", &b"{"[..]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid JSON body on stdin: "),
            "{err}"
        );
        let err = load_body("", no_stdin()).unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON body: "), "{err}");
    }

    #[test]
    fn render_pretty_prints_json() {
        let text = render(
            &response(200, "OK", r#"{"id":"vm0","state":"Running"}"#),
            false,
        )
        .unwrap();
        assert_eq!(text, "{\n  \"id\": \"vm0\",\n  \"state\": \"Running\"\n}\n");
    }

    #[test]
    fn render_passes_non_json_through() {
        assert_eq!(
            render(&response(200, "OK", "hello"), false).unwrap(),
            "hello\n"
        );
    }

    #[test]
    fn render_204_prints_nothing_or_ok() {
        assert_eq!(render(&response(204, "No Content", ""), false).unwrap(), "");
        assert_eq!(
            render(&response(204, "No Content", ""), true).unwrap(),
            "ok\n"
        );
    }

    #[test]
    fn render_error_uses_fault_message() {
        let err = render(
            &response(
                400,
                "Bad Request",
                r#"{"fault_message":"state: not allowed before boot"}"#,
            ),
            false,
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), 1);
        assert_eq!(
            err.to_string(),
            "400 Bad Request: state: not allowed before boot"
        );
    }

    #[test]
    fn render_error_without_fault_message_uses_the_raw_body() {
        let err = render(
            &response(500, "Internal Server Error", "boom\nat line 2"),
            false,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "500 Internal Server Error: boom at line 2");
        let err = render(&response(404, "Not Found", ""), false).unwrap_err();
        assert_eq!(err.to_string(), "404 Not Found");
        let err = render(&response(405, "", "{}"), false).unwrap_err();
        assert_eq!(err.to_string(), "405: {}");
    }

    #[test]
    fn client_errors_exit_2() {
        let err = CliError::from(ClientError::Malformed {
            path: PathBuf::from("/s"),
            detail: "x".into(),
        });
        assert_eq!(err.exit_code(), 2);
        assert_eq!(err.to_string(), "malformed response from /s: x");
    }
}
