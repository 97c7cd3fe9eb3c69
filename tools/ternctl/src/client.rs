//! HTTP/1.1 over a Unix socket: one request, one answer, then the connection
//! is closed. Responses are parsed with `httparse`; bodies are framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or the end of the stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use httparse::Status;

/// The largest answer (headers and body) ternctl accepts.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The most headers (or chunked trailers) a response may carry.
const MAX_HEADERS: usize = 64;

/// The HTTP methods the tern API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`: read a resource.
    Get,
    /// `PUT`: create or replace a resource, or trigger an action.
    Put,
    /// `PATCH`: update part of a resource.
    Patch,
    /// `DELETE`: remove a resource.
    Delete,
}

impl Method {
    /// The method's name as it appears on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One API request: a method, a path starting with `/`, and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The HTTP method.
    pub method: Method,
    /// The request target, e.g. `/vm/config`.
    pub path: String,
    /// The JSON body, already validated, if the request has one.
    pub body: Option<String>,
}

impl Request {
    /// A request without a body.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Request {
            method,
            path: path.into(),
            body: None,
        }
    }

    /// A request with a JSON body.
    pub fn with_body(method: Method, path: impl Into<String>, body: impl Into<String>) -> Self {
        Request {
            method,
            path: path.into(),
            body: Some(body.into()),
        }
    }

    /// The request as it goes on the wire. A body gets `Content-Type:
    /// application/json` and `Content-Length`; every request asks the server
    /// to close the connection after answering.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
            self.method, self.path
        );
        if let Some(body) = &self.body {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(body) = &self.body {
            bytes.extend_from_slice(body.as_bytes());
        }
        bytes
    }
}

/// A complete answer from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The reason phrase from the status line (may be empty).
    pub reason: String,
    /// The body, with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `fault_message` string of a JSON error body, if there is one.
    pub fn fault_message(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        value.get("fault_message")?.as_str().map(str::to_owned)
    }
}

/// What can go wrong between ternctl and the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `connect(2)` on the socket failed.
    #[error("cannot connect to {}: {}{}", .path.display(), os_reason(.source), connect_hint(.source, .path))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Connecting, sending or waiting for the answer took longer than the timeout.
    #[error("no answer from {} within {:?} (timed out while {stage})", .path.display(), .timeout)]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that ran out.
        timeout: Duration,
        /// What ternctl was doing: connecting, sending or reading.
        stage: &'static str,
    },
    /// Writing the request failed.
    #[error("cannot send the request to {}: {}", .path.display(), os_reason(.source))]
    Send {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the answer failed.
    #[error("cannot read the answer from {}: {}", .path.display(), os_reason(.source))]
    Receive {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The bytes that came back are not a valid HTTP/1.x response.
    #[error("malformed response from {}: {detail}", .path.display())]
    Malformed {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

/// An OS error's text without Rust's ` (os error N)` suffix.
fn os_reason(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_owned(),
        _ => text,
    }
}

/// A hint for the usual reasons a connect fails.
fn connect_hint(err: &io::Error, path: &Path) -> String {
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            format!(" (is tern running with --api-sock {}?)", path.display())
        }
        io::ErrorKind::PermissionDenied => {
            " (the API socket is mode 0600: run ternctl as the user that runs tern)".to_owned()
        }
        _ => String::new(),
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilEof,
}

/// Parses a (possibly partial) response held in `buf`.
///
/// `eof` tells whether the server has closed the connection, i.e. no more
/// bytes will come. Returns `Ok(None)` when more bytes are needed, and an
/// error text when the bytes cannot be a valid response (or the stream ended
/// before one was complete). Interim 1xx responses are skipped.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, String> {
    let mut start = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(&buf[start..]) {
            Ok(Status::Complete(len)) => len,
            Ok(Status::Partial) if !eof => return Ok(None),
            Ok(Status::Partial) if buf.len() == start => {
                return Err("the connection was closed without an answer".to_owned())
            }
            Ok(Status::Partial) => {
                return Err(format!(
                    "the connection was closed in the middle of the status line or headers \
                     ({} bytes: {})",
                    buf.len() - start,
                    preview(&buf[start..])
                ))
            }
            Err(err) => {
                return Err(format!(
                    "bad status line or headers ({err}): {}",
                    preview(&buf[start..])
                ))
            }
        };
        let status = parsed.code.unwrap_or(0);
        let reason = parsed.reason.unwrap_or("").to_owned();
        let body_start = start + head_len;
        if status == 101 {
            return Err("unexpected 101 Switching Protocols".to_owned());
        }
        if (100..200).contains(&status) {
            // An interim answer (e.g. 100 Continue): the real one follows.
            start = body_start;
            continue;
        }
        let rest = &buf[body_start..];
        if status == 204 || status == 304 {
            return Ok(Some(Response {
                status,
                reason,
                body: Vec::new(),
            }));
        }
        let body = match framing(parsed.headers)? {
            Framing::Length(len) if rest.len() >= len => Some(rest[..len].to_vec()),
            Framing::Length(len) if eof => {
                return Err(format!(
                    "the connection was closed after {} of {len} body bytes",
                    rest.len()
                ))
            }
            Framing::Length(_) => None,
            Framing::UntilEof => eof.then(|| rest.to_vec()),
            Framing::Chunked => {
                // A complete chunked body ends with CRLF CRLF; don't decode
                // the whole body again after every read before that.
                let body = if eof || rest.ends_with(b"\r\n\r\n") {
                    decode_chunked(rest)?
                } else {
                    None
                };
                if body.is_none() && eof {
                    return Err(
                        "the connection was closed in the middle of a chunked body".to_owned()
                    );
                }
                body
            }
        };
        return Ok(body.map(|body| Response {
            status,
            reason,
            body,
        }));
    }
}

/// Works out the body framing from the headers (RFC 9112 section 6.3).
fn framing(headers: &[httparse::Header<'_>]) -> Result<Framing, String> {
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for header in headers {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| format!("header {} is not valid UTF-8", header.name))?
            .trim();
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if last.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if !last.eq_ignore_ascii_case("identity") {
                return Err(format!("unsupported Transfer-Encoding: {value}"));
            }
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let len: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length: {value:?}"))?;
            if len > MAX_RESPONSE_BYTES {
                return Err(format!(
                    "Content-Length {len} is over the {MAX_RESPONSE_BYTES}-byte limit"
                ));
            }
            if length.is_some_and(|seen| seen != len) {
                return Err("conflicting Content-Length headers".to_owned());
            }
            length = Some(len);
        }
    }
    Ok(if chunked {
        Framing::Chunked
    } else {
        length.map_or(Framing::UntilEof, Framing::Length)
    })
}

/// Decodes a chunked body. `Ok(None)` means more bytes are needed.
fn decode_chunked(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let (consumed, size) = match httparse::parse_chunk_size(data) {
            Ok(Status::Complete(found)) => found,
            Ok(Status::Partial) => return Ok(None),
            Err(_) => return Err(format!("bad chunk size line: {}", preview(data))),
        };
        data = &data[consumed..];
        if size == 0 {
            let mut trailers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            return match httparse::parse_headers(data, &mut trailers) {
                Ok(Status::Complete(_)) => Ok(Some(body)),
                Ok(Status::Partial) => Ok(None),
                Err(err) => Err(format!("bad trailer after the last chunk ({err})")),
            };
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|size| *size <= MAX_RESPONSE_BYTES)
            .ok_or_else(|| format!("chunk of {size} bytes is over the limit"))?;
        if data.len() < size + 2 {
            return Ok(None);
        }
        if &data[size..size + 2] != b"\r\n" {
            return Err("a chunk is not followed by CRLF".to_owned());
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The first bytes of `data`, printable on one line.
fn preview(data: &[u8]) -> String {
    const LIMIT: usize = 60;
    let text: String = String::from_utf8_lossy(&data[..data.len().min(LIMIT)])
        .chars()
        .flat_map(char::escape_debug)
        .collect();
    if data.len() > LIMIT {
        format!("\"{text}\"...")
    } else {
        format!("\"{text}\"")
    }
}

/// A client for one tern API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the socket at `socket`; `timeout` bounds the whole
    /// exchange (connect, send and read).
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Client {
            socket: socket.into(),
            timeout,
        }
    }

    /// Sends `request` on a new connection and reads the whole answer,
    /// whatever its status.
    pub fn send(&self, request: &Request) -> Result<Response, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = self.connect()?;

        let left = self.time_left(deadline, "sending the request")?;
        stream
            .set_write_timeout(Some(left))
            .map_err(|source| self.send_error(source))?;
        if let Err(err) = stream.write_all(&request.to_bytes()) {
            if is_timeout(&err) {
                return Err(self.timeout_error("sending the request"));
            }
            // The server may have answered (e.g. 413) and closed early:
            // prefer its answer to the write error.
            return match self.read_response(&mut stream, deadline) {
                Ok(response) => Ok(response),
                Err(_) => Err(self.send_error(err)),
            };
        }
        self.read_response(&mut stream, deadline)
    }

    /// Connects, giving up after the timeout (connect(2) on a Unix socket
    /// blocks while the server's backlog is full).
    fn connect(&self) -> Result<UnixStream, ClientError> {
        let (tx, rx) = mpsc::channel();
        let path = self.socket.clone();
        thread::Builder::new()
            .name("ternctl-connect".to_owned())
            .spawn(move || {
                let _ = tx.send(UnixStream::connect(&path));
            })
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(ClientError::Connect {
                path: self.socket.clone(),
                source,
            }),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.timeout_error("connecting")),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Connect {
                path: self.socket.clone(),
                source: io::Error::other("the connecting thread ended without a result"),
            }),
        }
    }

    /// Reads until a complete response has arrived.
    fn read_response(
        &self,
        stream: &mut UnixStream,
        deadline: Instant,
    ) -> Result<Response, ClientError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = self.time_left(deadline, "reading the answer")?;
            stream
                .set_read_timeout(Some(left))
                .map_err(|source| self.receive_error(source))?;
            let read = match stream.read(&mut chunk) {
                Ok(read) => read,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if is_timeout(&err) => {
                    return Err(self.timeout_error("reading the answer"))
                }
                // A reset after a complete-looking stream: treat as the end.
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => 0,
                Err(err) => return Err(self.receive_error(err)),
            };
            buf.extend_from_slice(&chunk[..read]);
            if buf.len() > MAX_RESPONSE_BYTES {
                return Err(self.malformed(format!(
                    "the answer is over the {MAX_RESPONSE_BYTES}-byte limit"
                )));
            }
            let eof = read == 0;
            match parse_response(&buf, eof) {
                Ok(Some(response)) => return Ok(response),
                Ok(None) if !eof => {}
                Ok(None) => return Err(self.malformed("incomplete answer".to_owned())),
                Err(detail) => return Err(self.malformed(detail)),
            }
        }
    }

    fn time_left(&self, deadline: Instant, stage: &'static str) -> Result<Duration, ClientError> {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(|| self.timeout_error(stage))
    }

    fn timeout_error(&self, stage: &'static str) -> ClientError {
        ClientError::Timeout {
            path: self.socket.clone(),
            timeout: self.timeout,
            stage,
        }
    }

    fn send_error(&self, source: io::Error) -> ClientError {
        ClientError::Send {
            path: self.socket.clone(),
            source,
        }
    }

    fn receive_error(&self, source: io::Error) -> ClientError {
        ClientError::Receive {
            path: self.socket.clone(),
            source,
        }
    }

    fn malformed(&self, detail: String) -> ClientError {
        ClientError::Malformed {
            path: self.socket.clone(),
            detail,
        }
    }
}

/// Whether an I/O error is a socket timeout (`EAGAIN` after SO_RCVTIMEO/SO_SNDTIMEO).
fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> Response {
        parse_response(bytes, false)
            .expect("valid response")
            .expect("complete response")
    }

    #[test]
    fn get_request_has_no_body_headers() {
        let text = String::from_utf8(Request::new(Method::Get, "/vm/config").to_bytes()).unwrap();
        assert_eq!(
            text,
            "GET /vm/config HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Connection: close\r\n\r\n"
        );
    }

    #[test]
    fn put_request_carries_json_body_with_length() {
        let body = r#"{"action_type":"InstanceStart"}"#;
        let bytes = Request::with_body(Method::Put, "/actions", body).to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("PUT /actions HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(text.contains("\r\nContent-Type: application/json\r\n"));
        assert!(text.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with(&format!("\r\n\r\n{body}")));
    }

    #[test]
    fn content_length_counts_bytes_not_chars() {
        let text = String::from_utf8(Request::with_body(Method::Patch, "/vm", "\"é\"").to_bytes())
            .unwrap();
        assert!(text.contains("Content-Length: 4\r\n"));
    }

    #[test]
    fn parses_200_with_body() {
        let response = complete(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"id\":\"vm0\"}\n",
        );
        assert_eq!(response.status, 200);
        assert_eq!(response.reason, "OK");
        assert_eq!(response.body, b"{\"id\":\"vm0\"}\n");
        assert!(response.is_success());
    }

    #[test]
    fn waits_for_the_rest_of_a_content_length_body() {
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\":";
        assert_eq!(parse_response(partial, false), Ok(None));
        let err = parse_response(partial, true).unwrap_err();
        assert!(err.contains("after 5 of 10 body bytes"), "{err}");
    }

    #[test]
    fn waits_for_the_rest_of_the_headers() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(None)
        );
        assert_eq!(parse_response(b"", false), Ok(None));
    }

    #[test]
    fn parses_204_without_body() {
        let response = complete(b"HTTP/1.1 204 No Content\r\nServer: tern\r\n\r\n");
        assert_eq!(response.status, 204);
        assert!(response.body.is_empty());
    }

    #[test]
    fn parses_400_with_fault_message() {
        let body = br#"{"fault_message":"vcpu_count: must be between 1 and 254"}"#;
        let mut bytes = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        let response = complete(&bytes);
        assert_eq!(response.status, 400);
        assert_eq!(response.reason, "Bad Request");
        assert!(!response.is_success());
        assert_eq!(
            response.fault_message().as_deref(),
            Some("vcpu_count: must be between 1 and 254")
        );
    }

    #[test]
    fn fault_message_absent_for_other_bodies() {
        let response = Response {
            status: 500,
            reason: String::new(),
            body: b"oops".to_vec(),
        };
        assert_eq!(response.fault_message(), None);
        let response = Response {
            status: 500,
            reason: String::new(),
            body: b"{\"x\":1}".to_vec(),
        };
        assert_eq!(response.fault_message(), None);
    }

    #[test]
    fn body_without_length_runs_to_eof() {
        let bytes = b"HTTP/1.1 200 OK\r\n\r\n[1,2]";
        assert_eq!(parse_response(bytes, false), Ok(None));
        assert_eq!(parse_response(bytes, true).unwrap().unwrap().body, b"[1,2]");
    }

    #[test]
    fn decodes_chunked_body() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\n";
        let response = complete(bytes);
        assert_eq!(response.body, b"{\"a\":1}");
    }

    #[test]
    fn decodes_chunked_body_with_trailer() {
        let bytes =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(complete(bytes).body, b"[]");
    }

    #[test]
    fn chunked_body_incomplete_then_eof_is_an_error() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a";
        assert_eq!(parse_response(bytes, false), Ok(None));
        assert!(parse_response(bytes, true).unwrap_err().contains("chunked"));
    }

    #[test]
    fn bad_chunk_size_is_an_error() {
        let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n";
        assert!(parse_response(bytes, true)
            .unwrap_err()
            .contains("chunk size"));
    }

    #[test]
    fn chunked_wins_over_content_length() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n";
        assert_eq!(complete(bytes).body, b"x");
    }

    #[test]
    fn skips_100_continue() {
        let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(complete(bytes).status, 204);
    }

    #[test]
    fn garbage_is_malformed() {
        let err = parse_response(b"hello there\r\n\r\n", false).unwrap_err();
        assert!(err.starts_with("bad status line or headers"), "{err}");
        assert!(err.contains("hello there"), "{err}");
    }

    #[test]
    fn empty_stream_is_no_answer() {
        let err = parse_response(b"", true).unwrap_err();
        assert_eq!(err, "the connection was closed without an answer");
    }

    #[test]
    fn bad_or_conflicting_content_length_is_malformed() {
        let err =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).unwrap_err();
        assert!(err.contains("Content-Length"), "{err}");
        let err = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            false,
        )
        .unwrap_err();
        assert!(err.contains("conflicting"), "{err}");
    }

    #[test]
    fn unsupported_transfer_encoding_is_malformed() {
        let err = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", true)
            .unwrap_err();
        assert!(err.contains("Transfer-Encoding"), "{err}");
    }

    #[test]
    fn connect_error_message_names_the_socket_and_hints() {
        let err = ClientError::Connect {
            path: PathBuf::from("/tmp/x.sock"),
            source: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            err.to_string(),
            "cannot connect to /tmp/x.sock: No such file or directory \
             (is tern running with --api-sock /tmp/x.sock?)"
        );
        let err = ClientError::Connect {
            path: PathBuf::from("/tmp/x.sock"),
            source: io::Error::from_raw_os_error(111),
        };
        assert!(err
            .to_string()
            .starts_with("cannot connect to /tmp/x.sock: Connection refused ("));
        let err = ClientError::Connect {
            path: PathBuf::from("/tmp/x.sock"),
            source: io::Error::from_raw_os_error(13),
        };
        assert!(err
            .to_string()
            .starts_with("cannot connect to /tmp/x.sock: Permission denied ("));
    }

    #[test]
    fn timeout_and_malformed_messages() {
        let err = ClientError::Timeout {
            path: PathBuf::from("/s"),
            timeout: Duration::from_secs(10),
            stage: "reading the answer",
        };
        assert_eq!(
            err.to_string(),
            "no answer from /s within 10s (timed out while reading the answer)"
        );
        let err = ClientError::Malformed {
            path: PathBuf::from("/s"),
            detail: "x".into(),
        };
        assert_eq!(err.to_string(), "malformed response from /s: x");
    }

    #[test]
    fn os_reason_strips_the_errno_suffix() {
        assert_eq!(
            os_reason(&io::Error::from_raw_os_error(2)),
            "No such file or directory"
        );
        assert_eq!(os_reason(&io::Error::other("plain")), "plain");
    }
}
