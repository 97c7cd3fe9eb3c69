//! Runs the real `ternctl` binary against one-shot Unix socket listeners that
//! answer with canned bytes. This checks ternctl's own handling (request
//! bytes, output, messages, exit codes); the tern server is tested elsewhere.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the one-shot server does once it has read the request.
enum Reply {
    /// Write these byte pieces, pausing briefly between them, then close.
    Pieces(Vec<Vec<u8>>),
    /// Wait this long without answering, then close.
    Silence(Duration),
}

/// A listener that serves exactly one connection on its own thread and
/// hands back the request bytes it received.
struct OneShot {
    path: PathBuf,
    handle: JoinHandle<Vec<u8>>,
}

impl OneShot {
    fn start(name: &str, reply: Reply) -> OneShot {
        let path = socket_path(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind test socket");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let handle = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(err)
                        if err.kind() == ErrorKind::WouldBlock && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(err) => panic!("no connection: {err}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let request = read_request(&mut stream);
            match reply {
                Reply::Pieces(pieces) => {
                    for piece in pieces {
                        // The client may already have given up on a bad answer.
                        if stream.write_all(&piece).is_err() {
                            break;
                        }
                        let _ = stream.flush();
                        thread::sleep(Duration::from_millis(30));
                    }
                }
                Reply::Silence(wait) => thread::sleep(wait),
            }
            request
        });
        OneShot { path, handle }
    }

    /// The request the server received.
    fn request(self) -> String {
        let bytes = self.handle.join().expect("server thread");
        let _ = std::fs::remove_file(&self.path);
        String::from_utf8(bytes).expect("request is UTF-8")
    }
}

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ternctl-it-{}-{name}.sock", std::process::id()))
}

/// Reads the headers and a Content-Length body.
fn read_request(stream: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = request.parse(&buf) {
            let length = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| {
                    std::str::from_utf8(h.value)
                        .unwrap()
                        .parse::<usize>()
                        .unwrap()
                })
                .unwrap_or(0);
            if buf.len() >= head + length {
                return buf;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn ternctl(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ternctl"));
    command
        .args(args)
        .env_remove("TERN_API_SOCK")
        .stdin(Stdio::null());
    command
}

fn run(args: &[&str]) -> Output {
    ternctl(args).output().expect("run ternctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn canned(bytes: &[u8]) -> Reply {
    Reply::Pieces(vec![bytes.to_vec()])
}

#[test]
fn missing_socket_is_a_clear_error() {
    let path = socket_path("missing");
    let _ = std::fs::remove_file(&path);
    let sock = path.to_str().unwrap();
    let out = run(&["--sock", sock, "info"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        format!(
            "ternctl: cannot connect to {sock}: No such file or directory \
             (is tern running with --api-sock {sock}?)\n"
        )
    );
}

#[test]
fn stale_socket_file_is_connection_refused() {
    let path = socket_path("stale");
    let _ = std::fs::remove_file(&path);
    drop(UnixListener::bind(&path).unwrap());
    let sock = path.to_str().unwrap();
    let out = run(&["--sock", sock, "info"]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with(&format!(
            "ternctl: cannot connect to {sock}: Connection refused ("
        )),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn info_prints_pretty_json() {
    let body = r#"{"id":"vm0","state":"Running","vmm_version":"0.1.0","app_name":"tern"}"#;
    let server = OneShot::start(
        "info",
        canned(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        ),
    );
    let out = run(&["--sock", server.path.to_str().unwrap(), "info"]);
    let request = server.request();
    assert!(request.starts_with("GET / HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("\r\nHost: localhost\r\n"), "{request}");
    assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "{\n  \"app_name\": \"tern\",\n  \"id\": \"vm0\",\n  \"state\": \"Running\",\n  \"vmm_version\": \"0.1.0\"\n}\n"
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn body_arriving_in_pieces_and_chunked() {
    let server = OneShot::start(
        "chunked",
        Reply::Pieces(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            b"5\r\n[{\"id\r\n".to_vec(),
            b"8\r\n\":\"com1\"\r\n2\r\n}]\r\n0\r\n\r\n".to_vec(),
        ]),
    );
    let out = run(&["--sock", server.path.to_str().unwrap(), "devices"]);
    assert!(server.request().starts_with("GET /devices HTTP/1.1\r\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "[\n  {\n    \"id\": \"com1\"\n  }\n]\n");
}

#[test]
fn pause_sends_patch_and_204_prints_nothing() {
    let server = OneShot::start("pause", canned(b"HTTP/1.1 204 No Content\r\n\r\n"));
    let out = run(&["--sock", server.path.to_str().unwrap(), "pause"]);
    let request = server.request();
    assert!(request.starts_with("PATCH /vm HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains("\r\nContent-Type: application/json\r\n"),
        "{request}"
    );
    assert!(request.contains("\r\nContent-Length: 18\r\n"), "{request}");
    assert!(
        request.ends_with("\r\n\r\n{\"state\":\"Paused\"}"),
        "{request}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert!(out.stderr.is_empty());
}

#[test]
fn verbose_204_prints_ok_and_sock_comes_from_env() {
    let server = OneShot::start(
        "start",
        canned(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
    );
    let out = ternctl(&["start", "--verbose"])
        .env("TERN_API_SOCK", &server.path)
        .output()
        .unwrap();
    let request = server.request();
    assert!(
        request.starts_with("PUT /actions HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.ends_with("{\"action_type\":\"InstanceStart\"}"),
        "{request}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ok\n");
}

#[test]
fn error_status_prints_fault_message_and_exits_1() {
    let body = r#"{"fault_message":"vcpu_count: must be between 1 and 254, got 0"}"#;
    let server = OneShot::start(
        "fault",
        canned(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        ),
    );
    let out = run(&[
        "--sock",
        server.path.to_str().unwrap(),
        "put",
        "machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
    ]);
    let request = server.request();
    assert!(
        request.starts_with("PUT /machine-config HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.ends_with(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#),
        "{request}"
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "ternctl: 400 Bad Request: vcpu_count: must be between 1 and 254, got 0\n"
    );
}

#[test]
fn error_status_without_fault_message_prints_raw_body() {
    let server = OneShot::start(
        "raw",
        canned(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route\n"),
    );
    let out = run(&["--sock", server.path.to_str().unwrap(), "get", "nowhere"]);
    assert!(server.request().starts_with("GET /nowhere HTTP/1.1\r\n"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "ternctl: 404 Not Found: no route\n");
}

#[test]
fn patch_body_from_stdin() {
    let server = OneShot::start("stdin", canned(b"HTTP/1.1 204 No Content\r\n\r\n"));
    let mut child = ternctl(&["--sock", server.path.to_str().unwrap(), "patch", "/vm", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"state\": \"Resumed\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let request = server.request();
    assert!(request.starts_with("PATCH /vm HTTP/1.1\r\n"), "{request}");
    assert!(
        request.ends_with("\r\n\r\n{\"state\": \"Resumed\"}"),
        "{request}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn garbage_response_is_malformed_exit_2() {
    let server = OneShot::start("garbage", canned(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"));
    let sock = server.path.to_str().unwrap().to_owned();
    let out = run(&["--sock", &sock, "config"]);
    assert!(server.request().starts_with("GET /vm/config HTTP/1.1\r\n"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "ternctl: malformed response from {sock}: bad status line"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn truncated_body_is_malformed_exit_2() {
    let server = OneShot::start(
        "short",
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"id\""),
    );
    let out = run(&["--sock", server.path.to_str().unwrap(), "metrics"]);
    assert!(server.request().starts_with("GET /metrics HTTP/1.1\r\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("closed after 5 of 50 body bytes"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn closed_without_answer_exit_2() {
    let server = OneShot::start("closed", Reply::Pieces(Vec::new()));
    let out = run(&["--sock", server.path.to_str().unwrap(), "info"]);
    server.request();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).ends_with("the connection was closed without an answer\n"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn silent_server_times_out() {
    let server = OneShot::start("silent", Reply::Silence(Duration::from_secs(3)));
    let sock = server.path.to_str().unwrap().to_owned();
    let started = Instant::now();
    let out = run(&["--sock", &sock, "--timeout", "1", "info"]);
    let took = started.elapsed();
    server.request();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!("ternctl: no answer from {sock} within 1s (timed out while reading the answer)\n")
    );
    assert!(took < Duration::from_millis(2900), "took {took:?}");
}

#[test]
fn bad_json_is_rejected_before_connecting() {
    // No server at this path: the error must be about the JSON.
    let out = run(&[
        "--sock",
        "/nonexistent/tern.sock",
        "put",
        "boot-source",
        "{kernel_image_path:",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "ternctl: invalid JSON body: key must be a string at line 1 column 2\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = run(&["--sock", "/tmp/x.sock", "reboot"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unrecognized subcommand 'reboot'"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["info"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("TERN_API_SOCK"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("Usage: ternctl"));
}
