//! The VMM thread's side of the API: requests are answered by the pre-boot
//! controller until `InstanceStart`, and by the runtime controller after.
//! Which requests each accepts is the "allowed only before boot" rule.

use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::api::request::actions::ActionType;
use crate::api::request::vm::VmState;
use crate::api::server::{ApiCounters, ApiInbox};
use crate::api::{ApiError, ApiRequest, ApiResponse};
use crate::config::VmConfig;
use crate::exit::{exit_channel, ExitReason, ExitReceiver, ExitSender};
use crate::vmm::{Vmm, VmmError};

/// The VM and everything the API can ask about it.
pub struct Controller {
    id: String,
    /// The configuration being built before boot.
    pending: VmConfig,
    vmm: Option<Vmm>,
    exit_tx: ExitSender,
    exits: ExitReceiver,
    inbox: Option<ApiInbox>,
    api_counters: Option<Arc<ApiCounters>>,
    created: Instant,
    finished: Option<ExitReason>,
}

fn json(value: impl serde::Serialize) -> Result<ApiResponse, ApiError> {
    serde_json::to_value(value)
        .map(ApiResponse::Json)
        .map_err(|e| ApiError::internal(format!("cannot encode the answer: {e}")))
}

impl Controller {
    /// A controller for the VM `config` describes (booted later with
    /// [`Controller::start`]), answering API requests from `inbox` if any.
    pub fn new(
        id: String,
        config: VmConfig,
        api: Option<(ApiInbox, Arc<ApiCounters>)>,
    ) -> std::io::Result<Self> {
        let (exit_tx, exits) = exit_channel()?;
        let (inbox, api_counters) = match api {
            Some((i, c)) => (Some(i), Some(c)),
            None => (None, None),
        };
        Ok(Self {
            id,
            pending: config,
            vmm: None,
            exit_tx,
            exits,
            inbox,
            api_counters,
            created: Instant::now(),
            finished: None,
        })
    }

    /// Boots the configured VM (`InstanceStart`).
    pub fn start(&mut self) -> Result<(), VmmError> {
        let vmm = Vmm::boot(&self.pending, &self.exit_tx)?;
        self.vmm = Some(vmm);
        // The guest runs: from here on this thread handles its exits.
        tern_seccomp::enter_or_exit("vmm");
        Ok(())
    }

    /// Why the VM ended, once it has.
    pub fn finished(&self) -> Option<&ExitReason> {
        self.finished.as_ref()
    }

    fn state_name(&self) -> &'static str {
        match &self.vmm {
            None => "Not started",
            Some(v) if v.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        // Requests that mean the same before and after boot.
        match &request {
            ApiRequest::GetInfo => {
                return json(serde_json::json!({
                    "id": self.id,
                    "state": self.state_name(),
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "tern",
                }))
            }
            ApiRequest::GetMachineConfig => return json(&self.config().machine_config),
            ApiRequest::GetVmConfig => return json(self.config()),
            ApiRequest::PutLogger(l) => {
                crate::logger::configure(l.level.map(|l| l.filter()), l.log_path.as_deref())
                    .map_err(|e| ApiError::bad_request(format!("logger: {e}")))?;
                return Ok(ApiResponse::NoContent);
            }
            ApiRequest::GetMetrics => return json(self.metrics()),
            _ => {}
        }
        match self.vmm.as_mut() {
            None => self.handle_preboot(request),
            Some(vmm) => handle_runtime(vmm, request),
        }
    }

    fn config(&self) -> &VmConfig {
        self.vmm.as_ref().map(Vmm::config).unwrap_or(&self.pending)
    }

    fn metrics(&self) -> serde_json::Value {
        let api = self.api_counters.as_ref().map(|c| c.snapshot());
        let (boot_ms, exits) = match &self.vmm {
            Some(v) => (
                Some(v.boot_duration().as_secs_f64() * 1e3),
                Some(v.exit_counts()),
            ),
            None => (None, None),
        };
        serde_json::json!({
            "boot_time_ms": boot_ms,
            "uptime_ms": self.created.elapsed().as_secs_f64() * 1e3,
            "vcpu_exits": exits,
            "api_requests": api,
        })
    }

    /// Before `InstanceStart`: configuration is open, the VM cannot be
    /// paused or sent keys.
    fn handle_preboot(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        match request {
            ApiRequest::PutMachineConfig(m) => self.pending.machine_config = m,
            ApiRequest::PatchMachineConfig(u) => {
                // The merged result must be valid, not just the patch.
                let merged = u.apply(&self.pending.machine_config);
                merged
                    .validate()
                    .map_err(|e| ApiError::bad_request(format!("machine-config: {e}")))?;
                self.pending.machine_config = merged;
            }
            ApiRequest::PutBootSource(b) => self.pending.boot_source = Some(b),
            ApiRequest::PutNetworkInterface(n) => {
                let mut next = self.pending.clone();
                next.upsert_net(n);
                next.validate_drives()
                    .map_err(|e| ApiError::bad_request(format!("network-interfaces: {e}")))?;
                self.pending = next;
            }
            ApiRequest::PutDrive(d) => {
                let mut next = self.pending.clone();
                next.upsert_drive(d);
                next.validate_drives()
                    .map_err(|e| ApiError::bad_request(format!("drives: {e}")))?;
                self.pending = next;
            }
            ApiRequest::GetDevices => return json(Vec::<serde_json::Value>::new()),
            ApiRequest::Action(ActionType::InstanceStart) => {
                if self.pending.boot_source.is_none() {
                    return Err(ApiError::bad_request(
                        "InstanceStart: no boot source configured (PUT /boot-source first)",
                    ));
                }
                self.start()
                    .map_err(|e| ApiError::bad_request(format!("InstanceStart: {e}")))?;
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                return Err(ApiError::bad_request(
                    "SendCtrlAltDel: the VM is not started",
                ))
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                log::info!("metrics: {}", self.metrics())
            }
            ApiRequest::PatchVm(_) => {
                return Err(ApiError::bad_request(
                    "vm: the VM is not started, it cannot be paused or resumed",
                ))
            }
            common => return Err(misrouted(&common)),
        }
        Ok(ApiResponse::NoContent)
    }

    fn on_exit_event(&mut self) {
        let _ = self.exits.event.read();
        if self.finished.is_some() {
            return;
        }
        if let Ok(reason) = self.exits.reasons.try_recv() {
            if let Some(v) = &self.vmm {
                v.flush_serial();
            }
            self.finished = Some(reason);
        }
    }

    fn on_api_event(&mut self) {
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        let _ = inbox.event.read();
        let pending: Vec<_> = inbox.requests.try_iter().collect();
        for envelope in pending {
            let answer = self.handle(envelope.request);
            // The client may have gone; the VM does not care.
            let _ = envelope.reply.send(answer);
        }
    }
}

/// Requests that mean the same before and after boot are answered by
/// [`Controller::handle`] and never reach the two controllers.
fn misrouted(request: &ApiRequest) -> ApiError {
    ApiError::internal(format!("request {request:?} reached the wrong controller"))
}

/// After `InstanceStart`: the machine is fixed; pause, resume and keys work.
fn handle_runtime(vmm: &mut Vmm, request: ApiRequest) -> Result<ApiResponse, ApiError> {
    match request {
        ApiRequest::PutMachineConfig(_) | ApiRequest::PatchMachineConfig(_) => {
            return Err(ApiError::bad_request(
                "machine-config cannot be changed after the VM started",
            ))
        }
        ApiRequest::PutBootSource(_) => {
            return Err(ApiError::bad_request(
                "boot-source cannot be changed after the VM started",
            ))
        }
        ApiRequest::PutDrive(d) => {
            return Err(ApiError::bad_request(format!(
                "drives: {} cannot be added or changed after the VM started (hot plug is not supported yet)",
                d.drive_id
            )))
        }
        ApiRequest::PutNetworkInterface(n) => {
            return Err(ApiError::bad_request(format!(
                "network-interfaces: {} cannot be added or changed after the VM started (hot plug is not supported yet)",
                n.iface_id
            )))
        }
        ApiRequest::Action(ActionType::InstanceStart) => {
            return Err(ApiError::bad_request(
                "InstanceStart: the VM is already started",
            ))
        }
        ApiRequest::Action(ActionType::SendCtrlAltDel) => vmm.send_ctrl_alt_del(),
        ApiRequest::Action(ActionType::FlushMetrics) => {
            log::info!("vCPU exits: {}", vmm.exit_counts())
        }
        ApiRequest::PatchVm(VmState::Paused) => vmm
            .pause()
            .map_err(|e| ApiError::internal(format!("vm: cannot pause: {e}")))?,
        ApiRequest::PatchVm(VmState::Resumed) => vmm.resume(),
        ApiRequest::GetDevices => return json(vmm.devices()),
        common => return Err(misrouted(&common)),
    }
    Ok(ApiResponse::NoContent)
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.exits.event.as_raw_fd() {
            self.on_exit_event();
        } else if self
            .inbox
            .as_ref()
            .is_some_and(|i| i.event.as_raw_fd() == events.fd())
        {
            self.on_api_event();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.exits.event, EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
        if let Some(inbox) = &self.inbox {
            if let Err(e) = ops.add(Events::new(&inbox.event, EventSet::IN)) {
                log::error!("cannot watch the API eventfd: {e:?}");
            }
        }
    }
}
