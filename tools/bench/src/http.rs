//! A minimal HTTP/1.1 keep-alive client over a Unix socket, for timing
//! tern's API: requests are pre-built bytes, each response is parsed with
//! httparse and exactly Content-Length body bytes are read.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A request, built once and sent many times.
#[derive(Clone)]
pub struct Request {
    /// `GET /`, for messages.
    pub what: String,
    pub bytes: Vec<u8>,
    /// The status a successful answer has.
    pub expect: u16,
}

impl Request {
    pub fn new(method: &str, path: &str, body: Option<&str>, expect: u16) -> Request {
        let mut s =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            s.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            s.push_str("\r\n");
        }
        Request {
            what: format!("{method} {path}"),
            bytes: s.into_bytes(),
            expect,
        }
    }
}

/// One keep-alive connection.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// A complete response.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Conn {
    /// Read and write timeout (a 4 GiB snapshot to disk takes longer than
    /// the default 10 s).
    pub fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(d))?;
        self.stream.set_write_timeout(Some(d))
    }

    pub fn connect(path: &Path) -> std::io::Result<Conn> {
        let stream = UnixStream::connect(path)?;
        // A hung server becomes an error, not a hung benchmark.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends `req` and reads its whole response; any status other than
    /// `req.expect` is an error carrying the body (tern's fault_message).
    pub fn call(&mut self, req: &Request) -> Result<Response, String> {
        let r = self.send(req)?;
        if r.status != req.expect {
            return Err(format!(
                "{}: HTTP {} (expected {}): {}",
                req.what,
                r.status,
                req.expect,
                String::from_utf8_lossy(&r.body).trim()
            ));
        }
        Ok(r)
    }

    /// Sends `req` and reads its whole response, whatever the status.
    pub fn send(&mut self, req: &Request) -> Result<Response, String> {
        self.stream
            .write_all(&req.bytes)
            .map_err(|e| format!("{}: write failed: {e}", req.what))?;
        self.read_response(&req.what)
    }

    fn read_response(&mut self, what: &str) -> Result<Response, String> {
        loop {
            if !self.buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(head_len)) => {
                        let status = resp.code.unwrap_or(0);
                        let mut len: Option<usize> = None;
                        let mut close = false;
                        for h in resp.headers.iter() {
                            if h.name.eq_ignore_ascii_case("content-length") {
                                let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                                len =
                                    Some(v.parse().map_err(|_| {
                                        format!("{what}: bad Content-Length '{v}'")
                                    })?);
                            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                                return Err(format!(
                                    "{what}: response uses Transfer-Encoding: {} (expected Content-Length)",
                                    String::from_utf8_lossy(h.value)
                                ));
                            } else if h.name.eq_ignore_ascii_case("connection")
                                && h.value.eq_ignore_ascii_case(b"close")
                            {
                                close = true;
                            }
                        }
                        let len = match len {
                            Some(l) => l,
                            None if status == 204 || status == 304 || status < 200 => 0,
                            None => {
                                return Err(format!(
                                    "{what}: HTTP {status} response without Content-Length"
                                ))
                            }
                        };
                        let total = head_len + len;
                        while self.buf.len() < total {
                            self.fill(what)?;
                        }
                        let body = self.buf[head_len..total].to_vec();
                        self.buf.drain(..total);
                        if close {
                            return Err(format!(
                                "{what}: tern answered HTTP {status} with Connection: close on a keep-alive connection"
                            ));
                        }
                        return Ok(Response { status, body });
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => {
                        return Err(format!(
                            "{what}: unparsable response ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                        ))
                    }
                }
            }
            self.fill(what)?;
        }
    }

    fn fill(&mut self, what: &str) -> Result<(), String> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "{what}: tern closed the connection{}",
                        if self.buf.is_empty() {
                            " without an answer"
                        } else {
                            " in the middle of an answer"
                        }
                    ))
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("{what}: no answer within 10 s"))
                }
                Err(e) => return Err(format!("{what}: read failed: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn keep_alive_split_and_pipelined_responses() {
        let dir = std::env::temp_dir().join(format!("tern-bench-http-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4096];
            // First request: answer in two pieces.
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"ngth: 5\r\n\r\nhel").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"lo").unwrap();
            // Second: a 204 then a 400.
            let _ = s.read(&mut b).unwrap();
            s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            let _ = s.read(&mut b).unwrap();
            s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 21\r\n\r\n{\"fault_message\":\"x\"}",
            )
            .unwrap();
        });
        let mut c = Conn::connect(&path).unwrap();
        let get = Request::new("GET", "/", None, 200);
        let r = c.call(&get).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let put = Request::new("PUT", "/machine-config", Some("{}"), 204);
        assert!(c.call(&put).unwrap().body.is_empty());
        let e = c.call(&put).err().unwrap();
        assert!(e.contains("HTTP 400"), "{e}");
        srv.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
