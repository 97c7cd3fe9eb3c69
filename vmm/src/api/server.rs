//! The API server: HTTP/1.1 (hyper) on a Unix socket, on a single-threaded
//! tokio runtime in the API thread. Every connection is its own task, so
//! any number of clients (keep-alive or not, fast or stalled) are served at
//! once. Each request is parsed by the route table and handed to the VMM
//! thread through a channel plus an eventfd; its task awaits the answer.
//! A slow or vanished client only ever holds its own task, never the VMM
//! thread or the vCPUs.

use std::convert::Infallible;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
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
    /// The API thread or its runtime could not start.
    #[error("cannot start the API server: {0}")]
    Start(std::io::Error),
    /// eventfd creation failed.
    #[error("cannot create the API eventfd: {0}")]
    EventFd(std::io::Error),
}

/// One request on its way to the VMM thread, with the way back.
pub struct Envelope {
    /// The request.
    pub request: ApiRequest,
    /// Where the answer goes (sending never blocks the VMM thread).
    pub reply: oneshot::Sender<Result<ApiResponse, ApiError>>,
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

/// What every connection task needs.
struct Context {
    tx: Sender<Envelope>,
    notify: EventFd,
    counters: Arc<ApiCounters>,
}

/// Starts serving `listener` (bound at `path`); returns the server handle
/// and the VMM thread's inbox.
pub fn start(listener: UnixListener, path: &Path) -> Result<(ApiServer, ApiInbox), ServerError> {
    listener.set_nonblocking(true).map_err(ServerError::Start)?;
    let event = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let notify = event.try_clone().map_err(ServerError::EventFd)?;
    let (tx, rx) = channel::<Envelope>();
    let counters = Arc::new(ApiCounters::default());
    let ctx = Arc::new(Context {
        tx,
        notify,
        counters: counters.clone(),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServerError::Start)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            tern_seccomp::enter_or_exit("api");
            runtime.block_on(serve(listener, ctx))
        })
        .map_err(ServerError::Start)?;
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

async fn serve(listener: UnixListener, ctx: Arc<Context>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("API: cannot serve the socket: {e}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait, keep serving.
                log::warn!("API: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, ctx.clone()));
            // half_close: a client may shut its write side once the request
            // is sent and still expects the answer.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("API: connection ended: {e}");
            }
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    ctx: Arc<Context>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_owned();
    let url = request.uri().path().to_owned();
    let answer = match read_body(request).await {
        Ok(body) => match routes::parse(&method, &url, &body) {
            Ok(req) => dispatch(req, &ctx).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let status = match &answer {
        Ok(ApiResponse::NoContent) => 204,
        Ok(ApiResponse::Json(_)) => 200,
        Err(e) => e.status,
    };
    ctx.counters.count(status);
    log::debug!("API {method} {url} -> {status}");
    Ok(response(answer))
}

fn response(answer: Result<ApiResponse, ApiError>) -> Response<Full<Bytes>> {
    let json = HeaderValue::from_static("application/json");
    let (status, body, allow) = match answer {
        Ok(ApiResponse::NoContent) => (StatusCode::NO_CONTENT, None, None),
        Ok(ApiResponse::Json(v)) => (StatusCode::OK, Some(v.to_string()), None),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Some(e.body()),
            e.allow.clone(),
        ),
    };
    let mut r = Response::new(Full::new(body.clone().map(Bytes::from).unwrap_or_default()));
    *r.status_mut() = status;
    if body.is_some() {
        r.headers_mut().insert(CONTENT_TYPE, json);
    }
    if let Some(v) = allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || ApiError {
        status: 413,
        message: format!("request body too large (at most {MAX_BODY} bytes)"),
        allow: None,
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

async fn dispatch(request: ApiRequest, ctx: &Context) -> Result<ApiResponse, ApiError> {
    let (reply, answer) = oneshot::channel();
    ctx.tx
        .send(Envelope { request, reply })
        .map_err(|_| ApiError::internal("the VMM thread is gone"))?;
    ctx.notify
        .write(1)
        .map_err(|e| ApiError::internal(format!("cannot wake the VMM thread: {e}")))?;
    answer
        .await
        .unwrap_or_else(|_| Err(ApiError::internal("the VMM thread dropped the request")))
}
