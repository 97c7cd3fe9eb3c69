//! The VMM thread's side of the API: requests are answered by the pre-boot
//! controller until `InstanceStart`, and by the runtime controller after.
//! Which requests each accepts is the "allowed only before boot" rule.

use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::api::request::actions::ActionType;
use crate::api::request::snapshot::LoadSnapshot;
use crate::api::request::vm::VmState;
use crate::api::server::{ApiCounters, ApiInbox};
use crate::api::{ApiError, ApiRequest, ApiResponse};
use crate::config::VmConfig;
use crate::exit::{exit_channel, ExitReason, ExitReceiver, ExitSender};
use crate::migration::dirty_rate::DirtyRate;
use crate::migration::{Listener, MigrationError, Outcome, SharedMigration};
use crate::snapshot::{RestoreOptions, RestoreSource};
use crate::vmm::{Vmm, VmmError};

/// A migration running on its own thread; the VM is with it meanwhile
/// (a source's) or comes from it (a destination's).
enum Job {
    /// Sending the VM away.
    Sending(std::sync::mpsc::Receiver<(Vmm, Result<Outcome, MigrationError>)>),
    /// Waiting for and taking in a VM.
    Receiving(
        std::sync::mpsc::Receiver<Result<Vmm, MigrationError>>,
        Arc<Listener>,
    ),
}

/// The VM and everything the API can ask about it.
pub struct Controller {
    id: String,
    /// The configuration being built before boot.
    pending: VmConfig,
    vmm: Option<Vmm>,
    /// A migration in progress.
    job: Option<Job>,
    /// The last migration's progress, for `GET /migration`.
    migration: Option<SharedMigration>,
    /// Signalled by migration threads and timers when the VMM thread has
    /// something to collect.
    jobs_evt: vmm_sys_util::eventfd::EventFd,
    dirty_rate: DirtyRate,
    /// The eject eventfd being watched, once there is a VM.
    eject_watch: Option<std::os::fd::RawFd>,
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
            job: None,
            migration: None,
            jobs_evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
            dirty_rate: DirtyRate::default(),
            eject_watch: None,
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

    /// Brings a VM back from a snapshot and runs it (`--restore`).
    pub fn restore(
        &mut self,
        state: &std::path::Path,
        mem: &std::path::Path,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        let req = LoadSnapshot {
            snapshot_path: state.to_owned(),
            mem_path: mem.to_owned(),
            resume_vm: true,
            track_dirty_pages: self.pending.machine_config.track_dirty_pages,
            drive_overrides: Vec::new(),
            network_overrides: Vec::new(),
        };
        self.load(&req)
    }

    fn load(&mut self, req: &LoadSnapshot) -> Result<(), crate::snapshot::SnapshotError> {
        let src = RestoreSource {
            state_path: req.snapshot_path.clone(),
            mem_path: req.mem_path.clone(),
        };
        let opts = RestoreOptions {
            resume: req.resume_vm,
            track_dirty_pages: req.track_dirty_pages,
            serial: Some(self.pending.serial.clone()),
            drive_overrides: req.drive_overrides.clone(),
            network_overrides: req.network_overrides.clone(),
        };
        self.vmm = Some(Vmm::restore(&src, &opts, &self.exit_tx)?);
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
            None if matches!(self.job, Some(Job::Sending(_))) => "Migrating",
            // A failed receive says so in its status a moment before its
            // thread hands the job back: no VM either way.
            None if matches!(self.job, Some(Job::Receiving(..)))
                && !self
                    .migration
                    .as_ref()
                    .is_some_and(|m| matches!(m.status().status, "failed" | "cancelled")) =>
            {
                "Receiving"
            }
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
            ApiRequest::GetMigration => {
                return json(
                    self.migration
                        .as_ref()
                        .map(|m| m.status())
                        .unwrap_or_default(),
                )
            }
            ApiRequest::CancelMigration => {
                return match (&self.job, &self.migration) {
                    (Some(job), Some(m)) => {
                        m.cancel();
                        if let Job::Receiving(_, listener) = job {
                            listener.interrupt();
                        }
                        Ok(ApiResponse::NoContent)
                    }
                    _ => Err(ApiError::bad_request("migration: no migration is running")),
                }
            }
            ApiRequest::GetDirtyRate => return json(self.dirty_rate.status()),
            _ => {}
        }
        if self.job.is_some() {
            return Err(ApiError::bad_request(format!(
                "the VM is migrating ({}); GET /migration for progress, DELETE /migration to cancel",
                self.state_name()
            )));
        }
        match request {
            ApiRequest::MigrationSend(p) => return self.start_send(p),
            ApiRequest::MigrationReceive(r) => return self.start_receive(&r.url, r.prealloc),
            ApiRequest::PutDirtyRate(r) => {
                let Some(vmm) = self.vmm.as_mut() else {
                    return Err(ApiError::bad_request("dirty-rate: the VM is not started"));
                };
                let due = self
                    .dirty_rate
                    .start(vmm, r.calc_period_s)
                    .map_err(|e| ApiError::bad_request(format!("dirty-rate: {e}")))?;
                self.wake_after(due);
                return Ok(ApiResponse::NoContent);
            }
            _ => {}
        }
        match self.vmm.as_mut() {
            None => self.handle_preboot(request),
            Some(vmm) => handle_runtime(vmm, request),
        }
    }

    /// Signals the jobs eventfd after `delay` (a dirty-rate period's end).
    fn wake_after(&self, delay: std::time::Duration) {
        if let Ok(evt) = self.jobs_evt.try_clone() {
            let _ = std::thread::Builder::new()
                .name("dirty-rate".into())
                .spawn(move || {
                    std::thread::sleep(delay + std::time::Duration::from_millis(5));
                    let _ = evt.write(1);
                });
        }
    }

    /// `PUT /migration/send`: hands the VM to a migration thread.
    fn start_send(
        &mut self,
        params: crate::migration::SendParams,
    ) -> Result<ApiResponse, ApiError> {
        let Some(vmm) = self.vmm.take() else {
            return Err(ApiError::bad_request(
                "migration/send: the VM is not started",
            ));
        };
        self.dirty_rate.abandon();
        let shared: SharedMigration = Arc::default();
        shared.update(|s| {
            s.role = "source";
            s.status = "setup";
        });
        let (s, evt) = (shared.clone(), self.jobs_evt.try_clone());
        let evt = match evt {
            Ok(e) => e,
            Err(e) => {
                self.vmm = Some(vmm);
                return Err(ApiError::internal(format!("migration/send: {e}")));
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("migration-send".into())
            .spawn(move || {
                let _ = tx.send(crate::migration::send(vmm, &params, &s));
                let _ = evt.write(1);
            });
        match spawned {
            Ok(_) => {
                self.job = Some(Job::Sending(rx));
                self.migration = Some(shared);
                Ok(ApiResponse::NoContent)
            }
            Err(e) => Err(ApiError::internal(format!(
                "migration/send: cannot start the migration thread: {e}"
            ))),
        }
    }

    /// `PUT /migration/receive` (and `--migrate-from`): listens, then takes
    /// the VM on a migration thread. With `prealloc` the memory that the
    /// pre-boot machine-config describes is allocated before the answer.
    pub fn start_receive(&mut self, url: &str, prealloc: bool) -> Result<ApiResponse, ApiError> {
        if self.vmm.is_some() {
            return Err(ApiError::bad_request(
                "migration/receive: this tern already runs a VM",
            ));
        }
        let listener = Arc::new(
            Listener::bind(url)
                .map_err(|e| ApiError::bad_request(format!("migration/receive: {e}")))?,
        );
        let prepared = if prealloc {
            let m = &self.pending.machine_config;
            Some(
                crate::migration::PreparedRam::allocate(
                    m.mem_size_mib,
                    m.huge_pages == crate::config::HugePages::Huge2M,
                )
                .map_err(|e| ApiError::bad_request(format!("migration/receive: {e}")))?,
            )
        } else {
            None
        };
        let shared: SharedMigration = Arc::default();
        // Reported at once: GET /migration right after this answer must
        // already show the destination waiting.
        shared.update(|s| {
            s.role = "destination";
            s.status = "setup";
        });
        let evt = self
            .jobs_evt
            .try_clone()
            .map_err(|e| ApiError::internal(format!("migration/receive: {e}")))?;
        let (s, l, serial, exit) = (
            shared.clone(),
            listener.clone(),
            self.pending.serial.clone(),
            self.exit_tx.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("migration-recv".into())
            .spawn(move || {
                let _ = tx.send(crate::migration::receive(&l, prepared, serial, &exit, &s));
                let _ = evt.write(1);
            })
            .map_err(|e| ApiError::internal(format!("migration/receive: {e}")))?;
        self.job = Some(Job::Receiving(rx, listener));
        self.migration = Some(shared);
        Ok(ApiResponse::NoContent)
    }

    /// Watches the VM's hot plug eject eventfd once there is a VM (booted,
    /// restored or received after the loop started, so from `process`).
    fn watch_ejects(&mut self, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let Some(v) = &self.vmm else { return };
        let fd = v.machine.eject_evt.as_raw_fd();
        if self.eject_watch == Some(fd) {
            return;
        }
        if let Some(old) = self.eject_watch.take() {
            let _ = ops.remove(Events::new_raw(old, EventSet::IN));
        }
        match ops.add(Events::new_raw(fd, EventSet::IN)) {
            Ok(()) => self.eject_watch = Some(fd),
            Err(e) => log::error!("cannot watch the hot plug eject eventfd: {e:?}"),
        }
    }

    /// Collects what migration threads and timers finished.
    fn on_jobs_event(&mut self) {
        let _ = self.jobs_evt.read();
        if let Some(vmm) = self.vmm.as_mut() {
            self.dirty_rate.poll(vmm);
        }
        match &self.job {
            Some(Job::Sending(rx)) => match rx.try_recv() {
                Ok((vmm, Ok(Outcome::Moved))) => {
                    vmm.flush_serial();
                    let downtime = self
                        .migration
                        .as_ref()
                        .and_then(|m| m.status().downtime_ms)
                        .unwrap_or(0.0);
                    self.finished = Some(ExitReason::Migrated(format!(
                        "another tern ({downtime:.2} ms downtime)"
                    )));
                    // Kept until the process exits.
                    self.vmm = Some(vmm);
                    self.job = None;
                }
                Ok((vmm, _)) => {
                    self.vmm = Some(vmm);
                    self.job = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    log::error!("the migration thread died; the VM is lost");
                    self.job = None;
                }
            },
            Some(Job::Receiving(rx, _)) => match rx.try_recv() {
                Ok(r) => {
                    if let Ok(vmm) = r {
                        self.vmm = Some(vmm);
                        // As after a boot: this thread now serves a guest.
                        tern_seccomp::enter_or_exit("vmm");
                    }
                    self.job = None;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    log::error!("the incoming migration thread died");
                    self.job = None;
                }
            },
            None => {}
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
            ApiRequest::DeleteDrive(id) => {
                let before = self.pending.drives.len();
                self.pending.drives.retain(|d| d.drive_id != id);
                if self.pending.drives.len() == before {
                    return Err(ApiError::bad_request(format!("drives: no drive {id}")));
                }
            }
            ApiRequest::DeleteNetworkInterface(id) => {
                let before = self.pending.network_interfaces.len();
                self.pending.network_interfaces.retain(|n| n.iface_id != id);
                if self.pending.network_interfaces.len() == before {
                    return Err(ApiError::bad_request(format!(
                        "network-interfaces: no network interface {id}"
                    )));
                }
            }
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
            ApiRequest::CreateSnapshot(_) => {
                return Err(ApiError::bad_request(
                    "snapshot/create: the VM is not started",
                ))
            }
            ApiRequest::LoadSnapshot(req) => self
                .load(&req)
                .map_err(|e| ApiError::bad_request(format!("snapshot/load: {e}")))?,
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
            let id = d.drive_id.clone();
            vmm.hotplug_drive(d)
                .map_err(|e| ApiError::bad_request(format!("drives: {id}: {e}")))?
        }
        ApiRequest::PutNetworkInterface(n) => {
            let id = n.iface_id.clone();
            vmm.hotplug_net(n)
                .map_err(|e| ApiError::bad_request(format!("network-interfaces: {id}: {e}")))?
        }
        ApiRequest::DeleteDrive(id) | ApiRequest::DeleteNetworkInterface(id) => vmm
            .request_unplug(&id)
            .map_err(|e| ApiError::bad_request(format!("{id}: {e}")))?,
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
        ApiRequest::CreateSnapshot(c) => {
            vmm.snapshot(c.kind, &c.snapshot_path, &c.mem_file_path)
                .map_err(|e| ApiError::bad_request(format!("snapshot/create: {e}")))?;
        }
        ApiRequest::LoadSnapshot(_) => {
            return Err(ApiError::bad_request(
                "snapshot/load: this tern already runs a VM; load a snapshot into a fresh tern",
            ))
        }
        common => return Err(misrouted(&common)),
    }
    Ok(ApiResponse::NoContent)
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.exits.event.as_raw_fd() {
            self.on_exit_event();
        } else if self.eject_watch == Some(events.fd()) {
            if let Some(v) = self.vmm.as_mut() {
                let _ = v.machine.eject_evt.read();
                v.complete_ejects();
            }
        } else if events.fd() == self.jobs_evt.as_raw_fd() {
            self.on_jobs_event();
        } else if self
            .inbox
            .as_ref()
            .is_some_and(|i| i.event.as_raw_fd() == events.fd())
        {
            self.on_api_event();
        }
        self.watch_ejects(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.watch_ejects(ops);
        if let Err(e) = ops.add(Events::new(&self.exits.event, EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.jobs_evt, EventSet::IN)) {
            log::error!("cannot watch the migration eventfd: {e:?}");
        }
        if let Some(inbox) = &self.inbox {
            if let Err(e) = ops.add(Events::new(&inbox.event, EventSet::IN)) {
                log::error!("cannot watch the API eventfd: {e:?}");
            }
        }
    }
}
