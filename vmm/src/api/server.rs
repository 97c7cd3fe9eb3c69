//! The API server: HTTP/1.1 (tiny_http) on a Unix socket. Each request is
//! read on its own short-lived thread, parsed by the route table, and handed
//! to the VMM thread through a channel plus an eventfd; the thread waits for
//! the answer and writes it. A slow or vanished client only ever holds its
//! own thread, never the VMM thread or the vCPUs.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use tiny_http::{Header, Response, Server};
use vmm_sys_util::eventfd::EventFd;

use super::{routes, ApiError, ApiRequest, ApiResponse};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves this socket.
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot create API socket {path}: {err}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// OS error.
        err: std::io::Error,
    },
    /// tiny_http refused the listener.
    #[error("cannot start the API server: {0}")]
    Http(String),
    /// eventfd creation failed.
    #[error("cannot create the API eventfd: {0}")]
    EventFd(std::io::Error),
}

/// One request on its way to the VMM thread, with the way back.
pub struct Envelope {
    /// The request.
    pub request: ApiRequest,
    /// Where the answer goes.
    pub reply: Sender<Result<ApiResponse, ApiError>>,
}

/// The VMM thread's end: an eventfd to poll and the queue behind it.
pub struct ApiInbox {
    /// Readable when requests are queued.
    pub event: EventFd,
    /// The queued requests.
    pub requests: Receiver<Envelope>,
}

/// Request counters, shared with the VMM thread for `GET /metrics`.
#[derive(Default, Debug)]
pub struct ApiCounters {
    /// All requests answered.
    pub total: AtomicU64,
    /// Answered 2xx.
    pub ok: AtomicU64,
    /// Answered 4xx.
    pub client_errors: AtomicU64,
    /// Answered 5xx.
    pub server_errors: AtomicU64,
}

impl ApiCounters {
    fn count(&self, status: u16) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let c = match status {
            200..=299 => &self.ok,
            400..=499 => &self.client_errors,
            _ => &self.server_errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A JSON snapshot.
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total.load(Ordering::Relaxed),
            "ok": self.ok.load(Ordering::Relaxed),
            "client_errors": self.client_errors.load(Ordering::Relaxed),
            "server_errors": self.server_errors.load(Ordering::Relaxed),
        })
    }
}

/// Binds the socket: mode 0600, replacing a stale socket file left by a
/// dead process, refusing one a live process still serves.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    // The umask decides the socket file's mode at bind time, so there is no
    // window in which others may connect. Nothing else creates files while
    // the server starts, so changing the process umask briefly is safe.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(|err| ServerError::Bind {
        path: path.to_owned(),
        err,
    })
}

/// The running server; removes its socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Request counters.
    pub counters: Arc<ApiCounters>,
}

impl ApiServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file (also done on drop; call before
    /// `process::exit`, which skips destructors).
    pub fn remove_socket(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// Starts serving `listener` (bound at `path`); returns the server handle
/// and the VMM thread's inbox.
pub fn start(listener: UnixListener, path: &Path) -> Result<(ApiServer, ApiInbox), ServerError> {
    let server =
        Server::from_listener(listener, None).map_err(|e| ServerError::Http(e.to_string()))?;
    let event = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let notify = event.try_clone().map_err(ServerError::EventFd)?;
    let (tx, rx) = channel::<Envelope>();
    let counters = Arc::new(ApiCounters::default());
    let c = counters.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serve(server, tx, notify, c))
        .map_err(|e| ServerError::Http(e.to_string()))?;
    Ok((
        ApiServer {
            path: path.to_owned(),
            counters,
        },
        ApiInbox {
            event,
            requests: rx,
        },
    ))
}

fn serve(server: Server, tx: Sender<Envelope>, notify: EventFd, counters: Arc<ApiCounters>) {
    let notify = Arc::new(notify);
    for request in server.incoming_requests() {
        let tx = tx.clone();
        let notify = notify.clone();
        let counters = counters.clone();
        // One thread per request: a client that sends its body slowly only
        // delays itself.
        let spawned = std::thread::Builder::new()
            .name("api-request".into())
            .spawn(move || handle(request, &tx, &notify, &counters));
        if let Err(e) = spawned {
            log::error!("API: cannot start a request thread: {e}");
        }
    }
}

fn handle(
    mut request: tiny_http::Request,
    tx: &Sender<Envelope>,
    notify: &EventFd,
    counters: &ApiCounters,
) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let answer = read_body(&mut request)
        .and_then(|body| routes::parse(&method, &url, &body))
        .and_then(|req| dispatch(req, tx, notify));
    let status = match &answer {
        Ok(ApiResponse::NoContent) => 204,
        Ok(ApiResponse::Json(_)) => 200,
        Err(e) => e.status,
    };
    counters.count(status);
    log::debug!("API {method} {url} -> {status}");
    let json = Header::from_bytes("Content-Type", "application/json").ok();
    let result = match answer {
        Ok(ApiResponse::NoContent) => request.respond(Response::empty(204)),
        Ok(ApiResponse::Json(v)) => {
            let mut r = Response::from_string(v.to_string()).with_status_code(200);
            if let Some(h) = json {
                r = r.with_header(h);
            }
            request.respond(r)
        }
        Err(e) => {
            let mut r = Response::from_string(e.body()).with_status_code(e.status);
            if let Some(h) = json {
                r = r.with_header(h);
            }
            if let Some(allow) = e
                .allow
                .as_deref()
                .and_then(|a| Header::from_bytes("Allow", a).ok())
            {
                r = r.with_header(allow);
            }
            request.respond(r)
        }
    };
    if let Err(e) = result {
        log::debug!("API: client went away before the answer to {method} {url}: {e}");
    }
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError {
        status: 413,
        message: format!("request body too large (at most {MAX_BODY} bytes)"),
        allow: None,
    };
    if request.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn dispatch(
    request: ApiRequest,
    tx: &Sender<Envelope>,
    notify: &EventFd,
) -> Result<ApiResponse, ApiError> {
    let (reply, answer) = channel();
    tx.send(Envelope { request, reply })
        .map_err(|_| ApiError::internal("the VMM thread is gone"))?;
    notify
        .write(1)
        .map_err(|e| ApiError::internal(format!("cannot wake the VMM thread: {e}")))?;
    answer
        .recv()
        .unwrap_or_else(|_| Err(ApiError::internal("the VMM thread dropped the request")))
}
