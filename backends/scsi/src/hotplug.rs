//! LUN hot add and remove while the controller runs, on request of the
//! frontend's owner (tern) over a control socket (`--control PATH`):
//! vhost-user has no message for changing a device's contents, so this is
//! a side channel, a Unix socket speaking newline-delimited JSON, one
//! answer line per request line:
//!
//! ```text
//! {"op":"add_lun","lun":1,"path":"/img/b.raw","format":"raw","ro":false,"serial":"b"}
//! {"op":"remove_lun","lun":1}
//! {"op":"list"}
//! -> {"ok":true}  |  {"ok":true,"luns":[{"lun":0,"seen":true}]}  |  {"error":"..."}
//! ```
//!
//! `format`, `ro`, `serial` and `direct` are optional, as in `--lun`. After
//! a change the device raises VIRTIO_SCSI_T_TRANSPORT_RESET for the LUN on
//! the event queue (reason RESCAN for an add, REMOVED for a remove), which
//! is how Linux's virtio_scsi learns to scan or drop a unit. `seen` says
//! whether the driver has sent the unit a command since it was added.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::Deserialize;
use serde_json::{json, Value};
use tern_image::Format;

use crate::backend::ScsiBackend;
use crate::config::{valid_serial, LunSpec};
use crate::lun::{event_lun, Lun};
use crate::target::{Target, TargetError};

/// Longest request line read; a longer one is refused and the connection closed.
const MAX_LINE: usize = 64 * 1024;

/// Why a control request failed (the text goes back as `{"error": ...}`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The line is not a request we know.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Adding or removing the unit was refused.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The image could not be opened.
    #[error("LUN {lun}: {reason}")]
    Open {
        /// The LUN asked for.
        lun: u16,
        /// What went wrong.
        reason: String,
    },
}

/// One request.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Add a unit at LUN `lun` over the image at `path`.
    AddLun {
        /// LUN number.
        lun: u16,
        /// Image file or block device.
        path: PathBuf,
        /// `raw` or `qcow2`; probed when absent.
        #[serde(default)]
        format: Option<String>,
        /// Write-protected.
        #[serde(default)]
        ro: bool,
        /// Unit serial number; default `tern-lun<N>`.
        #[serde(default)]
        serial: Option<String>,
        /// O_DIRECT.
        #[serde(default)]
        direct: bool,
    },
    /// Remove the unit at LUN `lun`.
    RemoveLun {
        /// LUN number.
        lun: u16,
    },
    /// The units present and whether the driver has addressed each.
    List,
}

/// Opens a unit for LUN n from its spec (the same checks as at startup).
pub type Opener = dyn Fn(u16, &LunSpec) -> Result<Lun, String> + Send + Sync;

/// The device of the frontend connected now, if any: events go to it.
#[derive(Default)]
pub struct Frontend(Mutex<Option<Arc<ScsiBackend>>>);

impl Frontend {
    /// The connection's device (`None` when it ends).
    pub fn set(&self, backend: Option<Arc<ScsiBackend>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = backend;
    }

    fn get(&self) -> Option<Arc<ScsiBackend>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The control side of a controller: its target, the connected frontend's
/// device and how to open images.
pub struct Control {
    target: Arc<Target>,
    frontend: Arc<Frontend>,
    open: Box<Opener>,
}

impl Control {
    /// Control over `target`, raising events on `frontend`'s device.
    pub fn new(target: Arc<Target>, frontend: Arc<Frontend>, open: Box<Opener>) -> Self {
        Control {
            target,
            frontend,
            open,
        }
    }

    /// Answers one request line.
    pub fn handle_line(&self, line: &str) -> Value {
        let result = serde_json::from_str::<Request>(line)
            .map_err(|e| ControlError::BadRequest(e.to_string()))
            .and_then(|r| self.handle(r));
        match result {
            Ok(v) => v,
            Err(e) => {
                warn!("control: {e}");
                json!({ "error": e.to_string() })
            }
        }
    }

    /// Carries out one request.
    pub fn handle(&self, req: Request) -> Result<Value, ControlError> {
        match req {
            Request::AddLun {
                lun,
                path,
                format,
                ro,
                serial,
                direct,
            } => {
                let format = match format.as_deref() {
                    None => None,
                    Some(f) => Some(f.parse::<Format>().map_err(|_| {
                        ControlError::BadRequest(format!("format {f:?}: expected raw or qcow2"))
                    })?),
                };
                if let Some(s) = &serial {
                    if !valid_serial(s) {
                        return Err(ControlError::BadRequest(format!(
                            "serial {s:?}: at most 240 printable ASCII characters"
                        )));
                    }
                }
                // Refuse a taken number before opening anything.
                if self.target.numbers().contains(&lun) {
                    return Err(TargetError::Taken(lun).into());
                }
                let spec = LunSpec {
                    path,
                    format,
                    read_only: ro,
                    serial,
                    direct,
                    number: Some(lun),
                };
                let unit =
                    (self.open)(lun, &spec).map_err(|reason| ControlError::Open { lun, reason })?;
                self.target.add(lun, Arc::new(unit))?;
                let told = self.notify(lun, false);
                info!(
                    "LUN {lun} added ({}); {}",
                    spec.path.display(),
                    if told {
                        "rescan event raised"
                    } else {
                        "no event (no frontend, or the driver did not negotiate hot plug)"
                    }
                );
                Ok(json!({ "ok": true }))
            }
            Request::RemoveLun { lun } => {
                self.target.remove(lun)?;
                let told = self.notify(lun, true);
                info!(
                    "LUN {lun} removed; {}",
                    if told {
                        "removal event raised"
                    } else {
                        "no event"
                    }
                );
                Ok(json!({ "ok": true }))
            }
            Request::List => {
                let luns: Vec<Value> = self
                    .target
                    .entries()
                    .into_iter()
                    .map(|(n, l)| json!({ "lun": n, "seen": l.was_seen() }))
                    .collect();
                Ok(json!({ "ok": true, "luns": luns }))
            }
        }
    }

    fn notify(&self, lun: u16, removed: bool) -> bool {
        self.frontend
            .get()
            .is_some_and(|b| b.raise_transport_reset(event_lun(lun), removed))
    }

    /// Serves connections on `listener`, one at a time, until the process
    /// ends.
    pub fn serve(self, listener: UnixListener) {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    if let Err(e) = self.serve_one(stream) {
                        warn!("control connection: {e}");
                    }
                }
                Err(e) => warn!("control socket: {e}"),
            }
        }
    }

    fn serve_one(&self, stream: UnixStream) -> std::io::Result<()> {
        let mut out = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            let n = Read::by_ref(&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut line)?;
            if n == 0 {
                return Ok(());
            }
            if n > MAX_LINE {
                let e = json!({ "error": format!("request longer than {MAX_LINE} bytes") });
                writeln!(out, "{e}")?;
                return Ok(());
            }
            let answer = self.handle_line(line.trim());
            writeln!(out, "{answer}")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn control() -> (Control, Arc<Target>) {
        let target = Arc::new(Target::new(Vec::new()));
        let m = Arc::new(Metrics::new());
        let open: Box<Opener> = Box::new(move |n, spec| {
            let img = tern_image::open(&spec.path, Format::Raw, spec.read_only, false)
                .map_err(|e| e.to_string())?;
            Ok(Lun::new(
                n,
                Arc::from(img),
                spec.read_only,
                String::new(),
                m.clone(),
            ))
        });
        (Control::new(target.clone(), Arc::default(), open), target)
    }

    #[test]
    fn add_list_remove_and_refusals() {
        let dir = std::env::temp_dir().join(format!("tern-scsi-hp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (c, t) = control();
        let add =
            |n: u16| c.handle_line(&json!({"op": "add_lun", "lun": n, "path": img}).to_string());
        assert_eq!(add(0), json!({"ok": true}));
        assert_eq!(add(3), json!({"ok": true}));
        assert_eq!(t.numbers(), [0, 3]);
        assert_eq!(add(3)["error"], "LUN 3 exists");
        assert!(add(20000)["error"]
            .as_str()
            .unwrap()
            .contains("out of range"));
        let missing = c.handle_line(r#"{"op":"add_lun","lun":5,"path":"/nonexistent/x"}"#);
        assert!(
            missing["error"].as_str().unwrap().starts_with("LUN 5: "),
            "{missing}"
        );
        assert_eq!(
            c.handle_line(r#"{"op":"list"}"#),
            json!({"ok": true, "luns": [{"lun": 0, "seen": false}, {"lun": 3, "seen": false}]})
        );
        t.lookup(&crate::lun::virtio_lun(3)).unwrap().mark_seen();
        assert_eq!(c.handle_line(r#"{"op":"list"}"#)["luns"][1]["seen"], true);
        assert_eq!(
            c.handle_line(r#"{"op":"remove_lun","lun":3}"#),
            json!({"ok": true})
        );
        assert_eq!(
            c.handle_line(r#"{"op":"remove_lun","lun":3}"#)["error"],
            "LUN 3 does not exist"
        );
        assert_eq!(t.numbers(), [0]);
        // REPORT LUNS follows.
        assert_eq!(t.report_luns(0).len(), 16);
        assert!(c.handle_line("{").get("error").is_some());
        assert!(c.handle_line(r#"{"op":"eject"}"#).get("error").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
