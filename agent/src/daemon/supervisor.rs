//! The daemon's brain: holds the desired state and the VMs, reconciles (observe → plan →
//! execute), applies the restart policy, answers control requests.
//!
//! Each VM is reconciled on its own, under its own lock (observe → plan → execute, its steps in
//! order); VMs never wait for each other, except that a VM taking a disk image another VM holds
//! waits for that VM's removals (`handover`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::FutureExt;
use tokio::sync::mpsc;

use super::cluster;
use super::config_file;
use super::cordon::Cordons;
use super::handover::{self, Handover};
use super::migration::{MigrationError, MigrationSettings, MoveOptions, Moves};
use super::operator::{OperatorIntent, OperatorIntents};
use super::restart::RestartTracker;
use super::saves;
use super::vm::{Exit, Progress, Shell, VmEvent, VmSlot};
use crate::action::{Action, Plan};
use crate::chainfire::{HandleRecord, SessionHandle, VmKey};
use crate::control::document::DesiredDocument;
use crate::control::protocol::{
    ApplyReport, ErrorKind, Request, Response, StepOutcome, StepReport, StopHow, StopReport,
};
use crate::cordon::{ClusterKnows, CordonChange, PUBLISH_WAIT};
use crate::events::{self, What};
use crate::metrics::{AgentMetrics, ReloadResult};
use crate::observed::ObservedHost;
use crate::plan::{plan, RunIntent, RunIntents};
use crate::qemu::lifecycle::StopOutcome;
use crate::save::{self, ShutdownStep};
use crate::spec::{DesiredState, OnHostShutdown, RestartPolicy, VmSpec};
use crate::status::{ConfigStatus, HostStatus, Stranger, VmState, VmStatus};

/// How long `status` waits for a VM busy with something else before showing its last snapshot.
const STATUS_WAIT: Duration = Duration::from_millis(500);
/// How long a snapshot read from QEMU serves `status` while nothing is done to the VM (what
/// only QEMU or the guest change, a pause on an I/O error say, shows this much later at most).
const STATUS_FRESH_FOR: Duration = Duration::from_secs(1);
/// How long a reconcile waits for a VM busy with something else (a soft reset, say).
const RECONCILE_WAIT: Duration = Duration::from_secs(120);
/// How long `plan` waits for a busy VM (it runs inside activation scripts with a timeout).
const PLAN_WAIT: Duration = Duration::from_secs(10);

/// Work for the daemon's event loop that does not come from a VM.
#[derive(Debug)]
pub enum Trigger {
    /// Something changed in the config file's directory: reload if the file's content changed.
    ConfigTouched,
    /// SIGHUP: reload unconditionally.
    Reload,
    /// A restart backoff expired.
    Reconcile,
}

pub struct Daemon {
    pub config_path: PathBuf,
    pub shell: Shell,
    triggers: mpsc::UnboundedSender<Trigger>,
    /// The last valid desired state; None while there never was one (then no VM is touched).
    desired: Mutex<Option<DesiredState>>,
    config_text: Mutex<Option<String>>,
    config_error: Mutex<Option<String>>,
    vms: Mutex<BTreeMap<String, Arc<VmSlot>>>,
    strangers: Mutex<Vec<Stranger>>,
    pub(super) operator: Mutex<OperatorIntents>,
    /// Held while operator decisions are written (see `record_operator`).
    operator_writes: tokio::sync::Mutex<()>,
    restarts: Mutex<BTreeMap<String, RestartTracker>>,
    /// Config loads one at a time; reconciles themselves run per VM.
    config_lock: tokio::sync::Mutex<()>,
    /// The ChainFire session, with `--chainfire`.
    pub(super) chainfire: Mutex<Option<SessionHandle>>,
    pub(super) host_id: String,
    /// This host's migration channel, and the moves in flight here.
    pub(super) migration: MigrationSettings,
    pub(super) moves: Mutex<Moves>,
    /// HA VMs killed because this host lost its lease: their exit is no failure to restart.
    fenced: Mutex<BTreeSet<String>>,
    /// Set by `shutdown-host`: from then on every VM stays down.
    host_stopping: std::sync::atomic::AtomicBool,
    /// `plasmavmc evacuate`/`cordon` until `uncordon`: no HA VM comes here.
    pub(super) cordons: Mutex<Cordons>,
    /// Reconcile durations and reload results, for `/metrics`.
    pub metrics: Arc<AgentMetrics>,
    /// The last evacuation (`evacuate`), as `status` shows it (kept in `evacuation.json`).
    pub(super) evacuation: Mutex<Option<crate::evacuation::Evacuation>>,
    /// Whether this agent runs the evacuation's moves now.
    pub(super) evacuating: std::sync::atomic::AtomicBool,
    /// True once the moves the previous agent left are settled (`interrupted`): no evacuation
    /// starts before.
    pub(super) moves_settled: tokio::sync::watch::Sender<bool>,
    /// Wakes placement (`ha.preferredHosts`) when the desired state changed.
    pub(super) placement_wake: tokio::sync::Notify,
    /// How the first apply after this agent started went (`plasmavmc first-apply`).
    pub(super) first_apply: super::first_apply::FirstApplyOutcome,
}

pub(super) type Refusal = (ErrorKind, String);

impl Daemon {
    pub fn new(
        config_path: PathBuf,
        shell: Shell,
        operator: OperatorIntents,
        triggers: mpsc::UnboundedSender<Trigger>,
        chainfire: Option<(String, SessionHandle)>,
        cordons: Cordons,
        migration: MigrationSettings,
    ) -> Self {
        let (host_id, chainfire) = match chainfire {
            Some((host_id, session)) => (host_id, Some(session)),
            None => (String::new(), None),
        };
        Self {
            config_path,
            shell,
            triggers,
            desired: Mutex::new(None),
            config_text: Mutex::new(None),
            config_error: Mutex::new(None),
            vms: Mutex::new(BTreeMap::new()),
            strangers: Mutex::new(Vec::new()),
            operator: Mutex::new(operator),
            operator_writes: Default::default(),
            restarts: Mutex::new(BTreeMap::new()),
            config_lock: tokio::sync::Mutex::new(()),
            chainfire: Mutex::new(chainfire),
            host_id,
            migration,
            moves: Mutex::new(Moves::default()),
            fenced: Mutex::new(BTreeSet::new()),
            host_stopping: Default::default(),
            evacuation: Mutex::new(cordons.saved_evacuation()),
            evacuating: Default::default(),
            moves_settled: tokio::sync::watch::Sender::new(false),
            cordons: Mutex::new(cordons),
            metrics: Default::default(),
            placement_wake: tokio::sync::Notify::new(),
            first_apply: Default::default(),
        }
    }

    /// HA VMs this host may run now, as the session says (None when standalone).
    pub fn may_run(&self) -> Option<tokio::sync::watch::Receiver<BTreeSet<VmKey>>> {
        self.chainfire.lock().unwrap().as_ref().map(|s| s.may_run())
    }

    /// Self-fencing: kills (SIGKILL, no powerdown wait) every running HA VM this host may no
    /// longer run, before its lease can expire in the store and another host starts it.
    pub fn fence_now(&self) {
        if let Some(desired) = self.desired.lock().unwrap().clone() {
            self.fence(&desired);
        }
    }

    fn fence(&self, desired: &DesiredState) {
        let Some(may_run) = self.may_run() else {
            return;
        };
        let may_run = may_run.borrow().clone();
        let handing_over = self.moves.lock().unwrap().handing_over.clone();
        for (name, spec) in desired.vms.iter().filter(|(_, spec)| spec.ha.enable) {
            if handing_over.contains(name) {
                continue; // paused at the switchover, quits once the stream is out
            }
            let key = VmKey::new(&spec.org_id, &spec.project_id, name);
            let Some(slot) = self.slot(name) else {
                continue;
            };
            let Some(pid) = slot.status().pid else {
                continue;
            };
            if may_run.contains(&key) {
                continue;
            }
            tracing::error!(vm = %name, pid, "{}: killing QEMU now", cluster::FENCED);
            self.fenced.lock().unwrap().insert(name.clone());
            slot.update_status(|s| s.last_error = Some(cluster::FENCED.into()));
            self.shell.journal.vm(
                name,
                What::Fenced {
                    reason: format!("{} (QEMU pid {pid} killed)", cluster::FENCED),
                },
            );
            if let Err(e) = crate::qemu::lifecycle::kill(pid) {
                tracing::error!(vm = %name, pid, "fencing failed: {e:#}");
            }
        }
    }

    fn cluster_status(&self) -> Result<Response, Refusal> {
        let session = self.chainfire.lock().unwrap();
        let Some(session) = session.as_ref() else {
            return Err((
                ErrorKind::BadRequest,
                "this agent runs standalone (no --chainfire)".into(),
            ));
        };
        let view = session.cluster().borrow().clone();
        Ok(Response::Cluster {
            table: view.render(),
            view: cluster::view_json(&view),
        })
    }

    /// Hands this host's full picture to the ChainFire session (it writes real changes only).
    pub(super) fn publish(&self) {
        if self.chainfire.lock().unwrap().is_none() {
            return;
        }
        let Some(desired) = self.desired.lock().unwrap().clone() else {
            return;
        };
        let statuses = self
            .slots()
            .iter()
            .map(|slot| (slot.name.clone(), slot.status()))
            .collect();
        let run_dir = &self.shell.run_dir;
        let wanted = self.wants_to_run(&desired);
        let arriving = self.moves.lock().unwrap().incoming_vms();
        let picture = cluster::local_picture(
            &self.host_id,
            &desired,
            &statuses,
            (&wanted, &arriving),
            |vm, pid| HandleRecord {
                host: self.host_id.clone(),
                pid,
                qmp_socket: run_dir.vm(vm).qmp_socket().display().to_string(),
                started_at: cluster::process_started_at(pid).unwrap_or_default(),
            },
        );
        if let Some(session) = self.chainfire.lock().unwrap().as_ref() {
            session.sync(picture);
        }
    }

    pub fn trigger(&self, trigger: Trigger) {
        let _ = self.triggers.send(trigger);
    }

    /// Re-reads the config file (fresh, through any symlinks). Invalid or unreadable:
    /// remembered as the config's error, and the previous desired state stays in force.
    pub async fn load_config(&self) -> Result<(), String> {
        let (text, desired) = config_file::load(&self.config_path).await;
        *self.config_text.lock().unwrap() = text;
        let desired = match desired {
            Ok(desired) => desired,
            Err(e) => {
                let message = format!("{e}\nnothing was changed");
                tracing::error!("config refused: {message}");
                *self.config_error.lock().unwrap() = Some(message.clone());
                return Err(message);
            }
        };
        *self.config_error.lock().unwrap() = None;
        self.forget_starts_of_undeclared(&desired);
        let mut current = self.desired.lock().unwrap();
        let mut restarts = self.restarts.lock().unwrap();
        for (name, spec) in &desired.vms {
            // A new spec deserves a fresh try, whatever happened to the old one.
            if current.as_ref().and_then(|d| d.vms.get(name)) != Some(spec) {
                restarts.entry(name.clone()).or_default().forgive();
            }
        }
        let mut vms = self.vms.lock().unwrap();
        for name in desired.vms.keys() {
            vms.entry(name.clone())
                .or_insert_with(|| VmSlot::new(name, true));
        }
        for (name, slot) in vms.iter() {
            let declared = desired.vms.contains_key(name);
            slot.update_status(|s| s.declared = declared);
        }
        tracing::info!(path = %self.config_path.display(), vms = desired.vms.len(), "config loaded");
        if self.chainfire.lock().unwrap().is_none() {
            for (name, _) in desired.vms.iter().filter(|(_, spec)| spec.ha.enable) {
                tracing::warn!(vm = %name, "ha.enable without --chainfire: runs here with no cluster lock");
            }
        }
        *current = Some(desired);
        self.placement_wake.notify_one();
        Ok(())
    }

    fn forget_starts_of_undeclared(&self, desired: &DesiredState) {
        let declared = |vm: &str| desired.vms.contains_key(vm);
        match self
            .operator
            .lock()
            .unwrap()
            .forget_starts_of_undeclared(declared)
        {
            Ok(forgotten) => {
                for vm in forgotten {
                    tracing::info!(vm = %vm, "no longer declared: its operator start is forgotten (autostart decides if it is declared again)");
                }
            }
            // Tried again at the next load, while the VM is still undeclared.
            Err(e) => tracing::error!("forgetting operator starts of undeclared VMs: {e:#}"),
        }
    }

    /// Whether the config file's content differs from what was last loaded.
    pub async fn config_changed_on_disk(&self) -> bool {
        config_file::read(&self.config_path).await.ok() != *self.config_text.lock().unwrap()
    }

    pub fn insert_adopted(&self, slot: Arc<VmSlot>) {
        let declared = self
            .desired
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|d| d.vms.contains_key(&slot.name));
        slot.update_status(|s| s.declared = declared);
        self.vms.lock().unwrap().insert(slot.name.clone(), slot);
    }

    /// Why VM `name`'s QEMU is gone, learnt after the fact (at startup).
    pub fn explain_gone(&self, name: &str, reason: String) {
        tracing::warn!(vm = %name, "{reason}");
        if let Some(slot) = self.slot(name) {
            slot.update_status(|s| s.last_error = Some(reason));
        }
    }

    pub fn add_stranger(&self, stranger: Stranger) {
        tracing::warn!(vm = %stranger.name, pid = ?stranger.pid, "stranger, left untouched: {}", stranger.reason);
        self.strangers.lock().unwrap().push(stranger);
    }

    /// Observe → plan → execute, every VM on its own (see `reconcile_vm`). With `reload`, the
    /// config file is re-read first; an invalid one is refused and nothing is touched. Without a
    /// valid config ever, nothing is touched.
    pub async fn reconcile(&self, reload: bool) -> Result<ApplyReport, Refusal> {
        self.reconcile_vms(reload, None).await
    }

    /// `reconcile`, limited to VM `only` when given (an operator command waits for its own VM,
    /// not for every other one).
    async fn reconcile_vms(
        &self,
        reload: bool,
        only: Option<&str>,
    ) -> Result<ApplyReport, Refusal> {
        let started = Instant::now();
        let result = self.reconcile_vms_untimed(reload, only).await;
        self.metrics
            .observe_reconcile(started.elapsed().as_secs_f64());
        if reload {
            self.metrics.count_reload(match &result {
                Err(_) => ReloadResult::Invalid,
                Ok(report) if report.steps.iter().all(|s| s.outcome == StepOutcome::Done) => {
                    ReloadResult::Applied
                }
                Ok(_) => ReloadResult::Incomplete,
            });
        }
        result
    }

    async fn reconcile_vms_untimed(
        &self,
        reload: bool,
        only: Option<&str>,
    ) -> Result<ApplyReport, Refusal> {
        let desired = {
            let _one_load_at_a_time = self.config_lock.lock().await;
            if reload {
                self.load_config()
                    .await
                    .map_err(|e| (ErrorKind::InvalidConfig, e))?;
            }
            let Some(desired) = self.desired.lock().unwrap().clone() else {
                let error = self
                    .config_error
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or_default();
                return Err((
                    ErrorKind::InvalidConfig,
                    format!("no valid config yet; VMs are left as they are\n{error}"),
                ));
            };
            desired
        };
        let mut slots = self.slots();
        slots.retain(|slot| only.map_or(true, |vm| slot.name == vm));
        let held = slots
            .iter()
            .map(|slot| (slot.name.clone(), slot.held_images()))
            .collect();
        let names: Vec<String> = slots.iter().map(|slot| slot.name.clone()).collect();
        let handover = Handover::new(&names, handover::givers(&held, &desired));
        let (desired, handover) = (&desired, &handover);
        let per_vm = slots.iter().map(|slot| async move {
            let reconciled =
                std::panic::AssertUnwindSafe(self.reconcile_vm(slot, desired, handover));
            match reconciled.catch_unwind().await {
                Ok(report) => report,
                Err(panic) => {
                    vm_panicked(slot, "reconciling", panic);
                    ApplyReport::default()
                }
            }
        });
        let mut report = ApplyReport::default();
        for vm_report in join_all(per_vm).await {
            report.steps.extend(vm_report.steps);
            report.pending.extend(vm_report.pending);
            report.refused.extend(vm_report.refused);
        }
        self.forget_undeclared_stopped(desired);
        self.publish_supervision(desired);
        // A start that raced with a lost lease is caught here.
        self.fence(desired);
        self.publish();
        Ok(report)
    }

    /// One VM: observe → plan → execute, holding the VM's own reconcile lock so two reconciles
    /// never act on the same VM at once, while other VMs go on (a guest slow to power down holds
    /// up only its own VM).
    ///
    /// Images moving between VMs: see `handover`. This VM's releasing steps (removals, a stop)
    /// run first; then it waits for the VMs holding images it takes.
    async fn reconcile_vm(
        &self,
        slot: &VmSlot,
        desired: &DesiredState,
        handover: &Handover,
    ) -> ApplyReport {
        let released = handover.releasing(&slot.name);
        let _this_vm = slot.reconciling.lock().await;
        let name = &slot.name;
        let (observed, unobservable) = match slot.observe(&self.shell, RECONCILE_WAIT).await {
            Ok(observed) => (observed, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        // After observing: an exit that made the VM vanish has recorded its hold by then.
        let intents = self.intents(desired);
        let vm_desired = DesiredState {
            version: desired.version,
            vms: desired
                .vms
                .get(name)
                .map(|spec| (name.clone(), spec.clone()))
                .into_iter()
                .collect(),
        };
        let vm_observed = ObservedHost {
            vms: observed.map(|vm| (name.clone(), vm)).into_iter().collect(),
        };
        let plan = plan(&vm_desired, &vm_observed, &intents);
        slot.remember_declared(desired.vms.get(name));
        let mut pending_changed = false;
        slot.update_status(|s| {
            pending_changed = s.pending != plan.pending;
            s.pending = plan.pending.clone();
            s.refused = plan.refused.clone();
        });
        if pending_changed {
            let pending = events::pending_lines(&plan.pending);
            self.shell
                .journal
                .vm(name, What::PendingChanged { pending });
        }

        let actions: Vec<Action> = plan.steps.into_iter().map(|step| step.action).collect();
        let outcomes = match &unobservable {
            Some(error) => actions
                .iter()
                .map(|_| StepOutcome::Skipped {
                    reason: format!("could not read the VM from QEMU: {error}"),
                })
                .collect(),
            None if actions.is_empty() => Vec::new(),
            None => {
                let (releasing, taking) =
                    actions.split_at(actions.iter().take_while(|action| releases(action)).count());
                let mut progress = Progress::default();
                let mut outcomes = slot.execute(&self.shell, releasing, &mut progress).await;
                released.done();
                handover.wait_for_givers(name).await;
                outcomes.extend(slot.execute(&self.shell, taking, &mut progress).await);
                outcomes
            }
        };
        if applied_in_full(&actions, &outcomes) {
            slot.update_status(|s| s.last_error = None);
        }
        let mut report = ApplyReport {
            steps: Vec::with_capacity(actions.len()),
            pending: plan.pending,
            refused: plan.refused,
        };
        for (action, outcome) in actions.into_iter().zip(outcomes) {
            self.after_step(name, desired, &action, &outcome);
            report.steps.push(StepReport {
                vm: name.clone(),
                action,
                outcome,
            });
        }
        report
    }

    /// What the daemon executes for a control request.
    pub async fn handle(self: &Arc<Self>, request: Request) -> Response {
        let result = match request {
            Request::Status => {
                return Response::Status {
                    status: self.status().await,
                }
            }
            Request::Reload => self
                .reconcile(true)
                .await
                .map(|report| Response::Applied { report }),
            Request::Plan { desired } => self
                .plan_only(desired)
                .await
                .map(|plan| Response::Planned { plan }),
            Request::Start { vm } => self.operator(&vm, OperatorIntent::Started).await,
            Request::Stop {
                vm,
                timeout_ms,
                force,
            } => {
                let timeout = timeout_ms.map_or(self.shell.stop_timeout, Duration::from_millis);
                self.operator_stop(&vm, timeout, force).await
            }
            Request::Reset { vm, soft } => match self.slot(&vm) {
                Some(slot) => slot
                    .reset(&self.shell, soft)
                    .await
                    .map(|message| Response::Done { message })
                    .map_err(|e| (ErrorKind::Failed, format!("reset {vm}: {e:#}"))),
                None => Err((ErrorKind::BadRequest, format!("no VM named {vm}"))),
            },
            Request::ClusterStatus => self.cluster_status(),
            // The control server hands console and events connections to the attach handler.
            Request::Console { .. } | Request::Events => Err((
                ErrorKind::BadRequest,
                "a console or events request needs its own connection".into(),
            )),
            Request::Save { vm } => self.save(&vm).await,
            Request::Migrate {
                vm,
                to,
                offline,
                cancel,
                bandwidth_mib,
            } => {
                let mode = MoveOptions {
                    mode: if offline {
                        crate::migration::Mode::Offline
                    } else {
                        crate::migration::Mode::Live
                    },
                    bandwidth: bandwidth_mib.map(|mib| mib << 20),
                };
                self.migrate_request(&vm, to, mode, cancel).await
            }
            Request::ShutdownHost { timeout_seconds } => {
                self.shutdown_host(Duration::from_secs(timeout_seconds))
                    .await
            }
            Request::Cordon => self
                .cordon("cordon")
                .await
                .map(|change| Response::Cordon { change }),
            Request::Uncordon => self.uncordon().await,
            Request::Evacuate => self.evacuate().await,
            Request::FirstApply { wait_ms } => Ok(Response::FirstApply {
                first_apply: self.first_apply.wait(Duration::from_millis(wait_ms)).await,
            }),
        };
        result.unwrap_or_else(|(kind, message)| Response::Error { kind, message })
    }

    /// A VM's event, from its QMP connection.
    pub async fn on_vm_event(&self, event: VmEvent) {
        let vm = event.vm().to_owned();
        let handled = std::panic::AssertUnwindSafe(self.handle_vm_event(event)).catch_unwind();
        if let Err(panic) = handled.await {
            if let Some(slot) = self.slot(&vm) {
                vm_panicked(&slot, "handling its QEMU's event", panic);
            }
        }
        self.publish();
    }

    async fn handle_vm_event(&self, event: VmEvent) {
        match event {
            VmEvent::Exited {
                vm,
                generation,
                clean,
            } => {
                let Some(slot) = self.slot(&vm) else { return };
                let decide = |exit: &Exit| {
                    if let Some(by_guard) = &exit.fenced {
                        tracing::error!(vm = %vm, "{by_guard}");
                        slot.update_status(|s| s.last_error = Some(by_guard.clone()));
                    } else if self.fenced.lock().unwrap().contains(&vm) {
                        slot.update_status(|s| s.last_error = Some(cluster::FENCED.into()));
                    } else {
                        tracing::warn!(vm = %vm, "{}", exit.reason);
                        self.apply_restart_policy(&vm, exit);
                    }
                };
                if slot
                    .on_exit(&self.shell, generation, clean, decide)
                    .await
                    .is_some()
                {
                    self.reconcile_logged(false).await;
                }
            }
            VmEvent::DeviceDeleted { vm } => {
                tracing::debug!(vm = %vm, "the guest released a device; finishing its removal");
                self.reconcile_logged(false).await
            }
            VmEvent::UnplugRefused { vm, device } => {
                let error = format!("the guest refused to release {device}");
                tracing::warn!(vm = %vm, "{error}");
                if let Some(slot) = self.slot(&vm) {
                    slot.update_status(|s| s.last_error = Some(error));
                }
            }
            VmEvent::GuestPanicked { vm } => {
                tracing::warn!(vm = %vm, "guest panicked");
                if let Some(slot) = self.slot(&vm) {
                    slot.update_status(|s| s.last_error = Some("guest panicked".into()));
                }
            }
        }
    }

    pub async fn reconcile_logged(&self, reload: bool) {
        match self.reconcile(reload).await {
            Ok(report) => {
                for step in report
                    .steps
                    .iter()
                    .filter(|s| s.outcome != StepOutcome::Done)
                {
                    tracing::warn!(vm = %step.vm, action = ?step.action, outcome = ?step.outcome, "step not done");
                }
            }
            Err((_, message)) => tracing::error!("reconcile refused: {message}"),
        }
    }

    async fn status(self: &Arc<Self>) -> HostStatus {
        // Hold reasons move with the cluster (who holds an HA lock) between reconciles.
        if let Some(desired) = self.desired.lock().unwrap().clone() {
            self.publish_supervision(&desired);
        }
        let slots = self.slots();
        join_all(slots.iter().map(|slot| self.refresh_for_status(slot))).await;
        HostStatus {
            vms: slots
                .iter()
                .map(|slot| {
                    let mut status = self.with_saves(&slot.name, slot.status());
                    status.migration_copies = self.copy_note(&slot.name);
                    (slot.name.clone(), status)
                })
                .collect(),
            strangers: self.strangers.lock().unwrap().clone(),
            config: ConfigStatus {
                path: self.config_path.display().to_string(),
                error: self.config_error.lock().unwrap().clone(),
            },
            cordon: self.cordons.lock().unwrap().get().cloned(),
            evacuation: self.evacuation.lock().unwrap().clone(),
        }
    }

    /// Refreshes `slot`'s snapshot from QEMU unless it is fresh (`STATUS_FRESH_FOR`, nothing
    /// done to the VM since), waiting at most `STATUS_WAIT`: a VM that does not answer in time
    /// (or is known not to) shows its last snapshot while the refresh goes on in the background,
    /// so one silent QEMU never slows the status of the others. Requests asking at once share
    /// one refresh.
    async fn refresh_for_status(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let deadline = tokio::time::Instant::now() + STATUS_WAIT;
        // Twice at most: a refresh already running when this request came may have read the VM
        // before the change this request wants to see.
        for _ in 0..2 {
            if slot.is_fresh(STATUS_FRESH_FOR) {
                return;
            }
            let mut ended = slot.refreshes();
            if let Some(claim) = slot.claim_refresh() {
                let (daemon, vm) = (Arc::clone(self), Arc::clone(slot));
                tokio::spawn(async move {
                    let _claim = claim;
                    let _ = vm.observe(&daemon.shell, STATUS_WAIT).await;
                });
            }
            // Nobody waits for a refresh beyond `STATUS_WAIT` after it began: a QEMU that does
            // not answer costs the first requests that long at most, later ones nothing.
            let until = slot.refresh_claimed_at().map_or(deadline, |claimed| {
                deadline.min(tokio::time::Instant::from_std(claimed + STATUS_WAIT))
            });
            if slot.status().state == VmState::Unresponsive
                || tokio::time::timeout_at(until, ended.changed())
                    .await
                    .is_err()
            {
                return;
            }
        }
    }

    /// `plasmavmc stop`: keep the VM down (a declared one, across agent restarts) and stop it
    /// now; see `VmSlot::stop_now`.
    async fn operator_stop(
        &self,
        vm: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<Response, Refusal> {
        let Some(slot) = self.slot(vm) else {
            return Err((ErrorKind::BadRequest, format!("no VM named {vm}")));
        };
        if slot.status().declared {
            self.record_operator(vm, Some(OperatorIntent::Stopped))
                .await
                .map_err(|e| {
                    (
                        ErrorKind::Failed,
                        format!("{vm}: could not record the operator's decision, so nothing was done: {e:#}"),
                    )
                })?;
        }
        let started = Instant::now();
        let stopped = {
            let _this_vm = slot.reconciling.lock().await;
            slot.stop_now(&self.shell, timeout, force).await
        };
        let outcome = stopped.map_err(|e| (ErrorKind::Failed, format!("stop {vm}: {e:#}")))?;
        if let Err((_, e)) = self.reconcile_vms(false, Some(vm)).await {
            tracing::warn!(vm, "after the stop: {e}");
        }
        let how = match outcome {
            StopOutcome::PoweredDown => StopHow::ShutDown,
            StopOutcome::Quit => StopHow::Quit,
            StopOutcome::Killed => StopHow::Killed,
            StopOutcome::AlreadyGone => StopHow::AlreadyStopped,
        };
        Ok(Response::Stopped {
            stop: StopReport {
                vm: vm.to_owned(),
                how,
                force_quit: matches!(how, StopHow::Quit | StopHow::Killed),
                forced: force,
                timeout_seconds: if force { 0.0 } else { timeout.as_secs_f64() },
                seconds: started.elapsed().as_secs_f64(),
            },
        })
    }

    /// `plasmavmc migrate`: a move (or, `cancel`, the end of one in flight).
    async fn migrate_request(
        self: &Arc<Self>,
        vm: &str,
        to: Option<String>,
        options: MoveOptions,
        cancel: bool,
    ) -> Result<Response, Refusal> {
        if cancel {
            return self
                .cancel_migration(vm)
                .map(|()| Response::Done {
                    message: format!("{vm}: cancelling the move; the VM stays here"),
                })
                .map_err(|e| (ErrorKind::Failed, e));
        }
        let Some(to) = to else {
            return Err((ErrorKind::BadRequest, "migrate needs --to HOST".into()));
        };
        let (progress, _) = tokio::sync::watch::channel(Default::default());
        match self.migrate_vm(vm, &to, options, progress).await {
            Ok(outcome) => Ok(Response::Migrated { outcome }),
            // Nothing started: exit 2, as for any request refused before touching anything.
            Err(e @ MigrationError::Refused(_)) => {
                Err((ErrorKind::BadRequest, format!("{vm} not moved: {e}")))
            }
            Err(e) => Err((ErrorKind::Failed, format!("{vm}: {e}"))),
        }
    }

    /// Which disks a move of HA VM `vm` would copy (None: not HA, or every disk shared).
    fn copy_note(&self, vm: &str) -> Option<String> {
        let spec = self.declared(vm).ok().filter(|spec| spec.ha.enable)?;
        crate::migration::running::copy_note(&spec)
    }

    /// A VM's status with its managed saves, as they are on disk now.
    fn with_saves(&self, name: &str, mut status: VmStatus) -> VmStatus {
        let saved = &self.shell.saved;
        let committed = saved.committed(name);
        if status.pid.is_none() && committed.is_dir() {
            status.state = VmState::Saved;
            status.saved = Some(committed.display().to_string());
        }
        status.unrestorable_saves = saves::unrestorable(saved, name);
        status
    }

    /// `plasmavmc save`: keeps the VM down (across agent restarts and reboots) until
    /// `plasmavmc start`, then saves it; the start restores it.
    async fn save(&self, vm: &str) -> Result<Response, Refusal> {
        let spec = self.declared(vm)?;
        if let Some(why) = save::ha_blocker(vm, &spec) {
            return Err((ErrorKind::BadRequest, why));
        }
        let Some(slot) = self.slot(vm) else {
            return Err((ErrorKind::BadRequest, format!("VM {vm} is not running")));
        };
        // Under the VM's reconcile lock, with the hold recorded first: no reconcile can see
        // the VM gone and restore it right away.
        let _this_vm = slot.reconciling.lock().await;
        let previous = self.operator.lock().unwrap().get(vm);
        self.record_operator(vm, Some(OperatorIntent::Saved))
            .await
            .map_err(|e| (ErrorKind::Failed, format!("{e:#}")))?;
        match slot.save(&self.shell).await {
            Ok(message) => {
                tracing::info!(vm = %vm, "{message}");
                Ok(Response::Done { message })
            }
            Err(e) => {
                if let Err(undo) = self.record_operator(vm, previous).await {
                    tracing::error!(vm = %vm, "{undo:#}");
                }
                Err((ErrorKind::Failed, format!("save {vm}: {e:#}")))
            }
        }
    }

    /// The host is going down (`plasmavmc shutdown-host`, run by the NixOS module before
    /// systemd stops the QEMU scopes): every running VM is powered down or saved as its
    /// `onHostShutdown` says, all at once; from now on no VM starts.
    async fn shutdown_host(self: &Arc<Self>, timeout: Duration) -> Result<Response, Refusal> {
        self.host_stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let desired = self
            .desired
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(DesiredState {
                version: crate::spec::SCHEMA_VERSION,
                vms: BTreeMap::new(),
            });
        let deadline = Instant::now() + timeout;
        let running: Vec<Arc<VmSlot>> = self
            .slots()
            .into_iter()
            .filter(|slot| slot.status().pid.is_some())
            .collect();
        tracing::info!(
            vms = running.len(),
            ?timeout,
            "host shutdown: taking every VM down"
        );
        let each = running.iter().map(|slot| {
            let spec = desired.vms.get(&slot.name);
            self.shut_down_vm(slot, spec, deadline)
        });
        let lines = join_all(each).await;
        let message = if lines.is_empty() {
            "host shutdown: no VM was running".to_owned()
        } else {
            lines.join("\n")
        };
        Ok(Response::Done { message })
    }

    /// One VM's part of a host shutdown: a line saying what happened to it.
    async fn shut_down_vm(
        self: &Arc<Self>,
        slot: &VmSlot,
        spec: Option<&VmSpec>,
        deadline: Instant,
    ) -> String {
        let name = &slot.name;
        let policy = spec.map_or(OnHostShutdown::Powerdown, |s| s.on_host_shutdown);
        let ha = spec.is_some_and(|s| s.ha.enable);
        let (mut step, note) = save::shutdown_step(policy, ha);
        let mut said = Vec::new();
        if let Some(note) = note {
            tracing::warn!(vm = %name, "{note}");
            said.push(note.to_owned());
        }
        // Before taking the VM's reconcile lock: the move takes it.
        if step == ShutdownStep::Migrate {
            match self.move_away(name).await {
                Ok(moved) => return moved,
                Err(why) => {
                    tracing::error!(vm = %name, "host shutdown: not moved ({why}); powering down instead");
                    said.push(format!("not moved ({why}); powering down instead"));
                    step = ShutdownStep::Powerdown;
                }
            }
        }
        let _this_vm = slot.reconciling.lock().await;
        if let Some(why) = spec
            .filter(|_| step == ShutdownStep::Save)
            .and_then(|spec| save::ha_blocker(name, spec))
        {
            said.push(format!("{why}; powering down instead"));
            step = ShutdownStep::Powerdown;
        }
        if step == ShutdownStep::Save {
            match slot.save(&self.shell).await {
                Ok(message) => {
                    tracing::info!(vm = %name, "{message}");
                    said.push(message);
                    return said.join("; ");
                }
                Err(e) => {
                    tracing::error!(vm = %name, "host shutdown: save failed, powering down instead: {e:#}");
                    said.push(format!("save failed ({e:#}); powering down instead"));
                }
            }
        }
        let timeout = self
            .shell
            .stop_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let outcome = match slot
            .stop_within(&self.shell, "the host is shutting down", timeout)
            .await
        {
            Ok(()) => format!("{name}: stopped"),
            Err(e) => format!("{name}: stop FAILED: {e:#}"),
        };
        said.push(outcome);
        said.join("; ")
    }

    async fn plan_only(&self, desired: Option<DesiredDocument>) -> Result<Plan, Refusal> {
        let desired = match desired {
            Some(document) => match config_file::validate(document.text().to_owned()).await {
                Ok(Ok(desired)) => desired,
                Ok(Err(errors)) => {
                    return Err((
                        ErrorKind::InvalidConfig,
                        format!(
                            "invalid desired state in the plan request:
{errors}"
                        ),
                    ))
                }
                Err(e) => {
                    return Err((
                        ErrorKind::Failed,
                        format!("checking the plan request's disk paths: {e}"),
                    ))
                }
            },
            None => config_file::load(&self.config_path)
                .await
                .1
                .map_err(|e| (ErrorKind::InvalidConfig, e.to_string()))?,
        };
        let (observed, unobservable) = observe_all(&self.shell, &self.slots(), PLAN_WAIT).await;
        if let Some((vm, error)) = unobservable.iter().next() {
            return Err((
                ErrorKind::Failed,
                format!("cannot read VM {vm} from QEMU: {error}"),
            ));
        }
        let mut plan = plan(&desired, &observed, &self.intents(&desired));
        plan.note_migration_copies(&desired);
        Ok(plan)
    }

    /// The declared spec of `vm`, or the refusal naming the config file.
    /// VM `vm` as declared now (None: not declared, or no valid config yet).
    pub(super) fn declared_spec(&self, vm: &str) -> Option<VmSpec> {
        self.desired.lock().unwrap().as_ref()?.vms.get(vm).cloned()
    }

    /// With `--chainfire`: whether the session is connected, and its lease.
    pub(super) fn chainfire_health(
        &self,
    ) -> Option<(bool, Option<crate::chainfire::fence::LeaseStatus>)> {
        let session = self.chainfire.lock().unwrap();
        let session = session.as_ref()?;
        Some((session.is_connected(), session.lease_status()))
    }

    pub(super) fn declared(&self, vm: &str) -> Result<VmSpec, Refusal> {
        self.desired
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|d| d.vms.get(vm).cloned())
            .ok_or_else(|| {
                (
                    ErrorKind::BadRequest,
                    format!("VM {vm} is not declared in {}", self.config_path.display()),
                )
            })
    }

    async fn operator(&self, vm: &str, intent: OperatorIntent) -> Result<Response, Refusal> {
        self.declared(vm)?;
        self.record_operator(vm, Some(intent)).await.map_err(|e| {
            (
                ErrorKind::Failed,
                format!(
                    "{vm}: could not record the operator's decision, so nothing was done: {e:#}"
                ),
            )
        })?;
        if intent == OperatorIntent::Started {
            self.restarts
                .lock()
                .unwrap()
                .entry(vm.to_owned())
                .or_default()
                .forgive();
        }
        let report = self.reconcile_vms(false, Some(vm)).await?;
        Ok(Response::Applied { report })
    }

    /// Makes `intent` (`None`: none) the operator's decision for `vm`, in force only once
    /// written. The write runs off the async runtime, one at a time, without the decisions' lock:
    /// a hung state filesystem holds up this request alone, never `status` or the other VMs.
    pub(super) async fn record_operator(
        &self,
        vm: &str,
        intent: Option<OperatorIntent>,
    ) -> anyhow::Result<()> {
        let _one_writer = self.operator_writes.lock().await;
        let change = self.operator.lock().unwrap().change(vm, intent);
        let change = tokio::task::spawn_blocking(move || change.write().map(|()| change)).await??;
        self.operator.lock().unwrap().commit(change);
        Ok(())
    }

    /// Run intents: operator stop, then the HA lock (with `--chainfire`), then restart-policy
    /// hold, then operator start; else autostart.
    fn intents(&self, desired: &DesiredState) -> RunIntents {
        let ha_gate = self
            .chainfire
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| (s.may_run().borrow().clone(), s.cluster().borrow().clone()));
        let cordoned = self.is_cordoned();
        let operator = self.operator.lock().unwrap();
        let restarts = self.restarts.lock().unwrap();
        let now = Instant::now();
        let mut intents = RunIntents::new();
        for (name, spec) in &desired.vms {
            let ha_hold =
                ha_gate
                    .as_ref()
                    .filter(|_| spec.ha.enable)
                    .and_then(|(may_run, view)| {
                        let key = VmKey::new(&spec.org_id, &spec.project_id, name);
                        cluster::ha_hold(&self.host_id, &key, may_run, view)
                    });
            let held = restarts.get(name).and_then(|t| t.held_down(now));
            // A cordoned host starts no HA VM (one that runs here stays until it is moved).
            let ha_hold = match cordoned && spec.ha.enable && !self.runs_here(name) {
                true => Some(format!("HA: {CORDONED}")),
                false => ha_hold,
            };
            if self.host_stopping.load(std::sync::atomic::Ordering::SeqCst) {
                intents.insert(
                    name.clone(),
                    RunIntent::StayDown {
                        reason: "the host is shutting down".into(),
                    },
                );
                continue;
            }
            let intent = match (operator.get(name), ha_hold, held) {
                (Some(OperatorIntent::Stopped), _, _) => RunIntent::StayDown {
                    reason: format!("stopped by operator (plasmavmc start {name} to run it)"),
                },
                (Some(OperatorIntent::Saved), _, _) => RunIntent::StayDown {
                    reason: format!("saved by operator (plasmavmc start {name} restores it)"),
                },
                (_, Some(reason), _) => RunIntent::StayDown { reason },
                (_, None, Some(reason)) => RunIntent::StayDown {
                    reason: reason.to_owned(),
                },
                (Some(OperatorIntent::Started), None, None) => RunIntent::Run,
                (None, None, None) => continue,
            };
            intents.insert(name.clone(), intent);
        }
        intents
    }

    /// VMs this host would run now if their HA lock allowed: nothing else keeps them down.
    /// An HA VM competes for its lock only while it is in here (or runs here).
    fn wants_to_run(&self, desired: &DesiredState) -> BTreeSet<String> {
        let operator = self.operator.lock().unwrap();
        let restarts = self.restarts.lock().unwrap();
        let now = Instant::now();
        if self.host_stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return BTreeSet::new();
        }
        let incoming = self.moves.lock().unwrap().incoming_vms();
        desired
            .vms
            .iter()
            .filter(|(name, spec)| {
                if incoming.contains(*name) {
                    return true; // arriving here: keeps the lock it is given
                }
                let by_operator = match operator.get(name) {
                    Some(OperatorIntent::Stopped | OperatorIntent::Saved) => false,
                    Some(OperatorIntent::Started) => true,
                    None => spec.autostart,
                };
                by_operator && !restarts.get(*name).is_some_and(|t| t.steps_back(now))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn after_step(&self, vm: &str, desired: &DesiredState, action: &Action, outcome: &StepOutcome) {
        if !matches!(action, Action::StartVm { .. } | Action::RestartVm { .. }) {
            return;
        }
        let mut restarts = self.restarts.lock().unwrap();
        let tracker = restarts.entry(vm.to_owned()).or_default();
        match outcome {
            StepOutcome::Done => {
                self.fenced.lock().unwrap().remove(vm);
                if tracker.on_started() {
                    let reason = format!("by its restart policy (restart {})", tracker.restarts);
                    self.shell.journal.vm(vm, What::Restarted { reason });
                }
            }
            StepOutcome::Failed { error } => {
                let policy = desired
                    .vms
                    .get(vm)
                    .map_or(RestartPolicy::Never, |s| s.restart_policy);
                if let Some(delay) = tracker.on_start_failed(policy, error, Instant::now()) {
                    self.reconcile_after(delay);
                }
            }
            _ => {}
        }
    }

    fn apply_restart_policy(&self, vm: &str, exit: &Exit) {
        let policy = self
            .desired
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|d| d.vms.get(vm))
            .map_or(RestartPolicy::Never, |s| s.restart_policy);
        let delay = self
            .restarts
            .lock()
            .unwrap()
            .entry(vm.to_owned())
            .or_default()
            .on_exit(
                policy,
                exit.clean,
                exit.ran_for,
                exit.reason.clone(),
                Instant::now(),
            );
        if let Some(delay) = delay {
            self.reconcile_after(delay);
        }
    }

    fn reconcile_after(&self, delay: Duration) {
        let triggers = self.triggers.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = triggers.send(Trigger::Reconcile);
        });
    }

    /// Status fields owned by the supervisor: why a VM is held down, how often it restarted.
    fn publish_supervision(&self, desired: &DesiredState) {
        let intents = self.intents(desired);
        let restarts = self.restarts.lock().unwrap();
        for slot in self.slots() {
            let held = match intents.get(&slot.name) {
                Some(RunIntent::StayDown { reason }) => Some(reason.clone()),
                _ => None,
            };
            let count = restarts.get(&slot.name).map_or(0, |t| t.restarts);
            slot.update_status(|s| {
                s.held_down = held;
                s.restarts = count;
            });
        }
    }

    /// VMs no longer declared, once stopped, leave the status.
    fn forget_undeclared_stopped(&self, desired: &DesiredState) {
        self.vms
            .lock()
            .unwrap()
            .retain(|name, slot| desired.vms.contains_key(name) || slot.status().pid.is_some());
    }

    pub(super) fn host_id(&self) -> &str {
        &self.host_id
    }

    /// The last valid desired state, if there was one.
    pub(super) fn desired_state(&self) -> Option<DesiredState> {
        self.desired.lock().unwrap().clone()
    }

    /// The cluster as the ChainFire session sees it now (None when standalone).
    pub(super) fn cluster_view(&self) -> Option<crate::chainfire::ClusterView> {
        self.cluster_watch().map(|view| (**view.borrow()).clone())
    }

    /// The cluster view as it changes (None when standalone).
    pub(super) fn cluster_watch(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<Arc<crate::chainfire::ClusterView>>> {
        self.chainfire.lock().unwrap().as_ref().map(|s| s.cluster())
    }

    /// The cordon state the store holds for this host (None when standalone).
    pub(super) fn published_cordon(&self) -> Option<tokio::sync::watch::Receiver<Option<bool>>> {
        self.chainfire
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.published_cordon())
    }

    /// Whether this host is cordoned (`evacuate`, `cordon`; until `uncordon`).
    pub(super) fn is_cordoned(&self) -> bool {
        self.cordons.lock().unwrap().get().is_some()
    }

    /// Whether a QEMU of `vm` runs here now.
    pub(super) fn runs_here(&self, vm: &str) -> bool {
        self.slot(vm)
            .is_some_and(|slot| slot.status().pid.is_some())
    }

    /// `plasmavmc cordon` (and the first step of `evacuate`): persisted, then published. VMs
    /// running here stay; HA VMs stopped here let their lock go to another host. Answers once
    /// the store holds it, or after `PUBLISH_WAIT` saying the cluster does not know yet.
    pub(super) async fn cordon(&self, by: &str) -> Result<CordonChange, Refusal> {
        let since = {
            let mut cordons = self.cordons.lock().unwrap();
            let cordon = cordons.cordon(by).map_err(|e| {
                (
                    ErrorKind::Failed,
                    format!("could not record the cordon, so the host stays open: {e:#}"),
                )
            })?;
            cordon.since.clone()
        };
        tracing::warn!(since = %since, "host cordoned: {CORDONED}");
        let cluster = self.publish_cordon(true).await;
        let what = format!("host cordoned since {since}: {CORDONED}");
        Ok(CordonChange::new(true, &what, cluster))
    }

    /// Hands the cordon state to the session (before the picture and the reconcile that follow
    /// from it) and waits, up to `PUBLISH_WAIT`, until the store holds it: an answer that says
    /// "published" means every host reading the store sees it.
    async fn publish_cordon(&self, cordoned: bool) -> ClusterKnows {
        if let Some(session) = self.chainfire.lock().unwrap().as_ref() {
            session.set_cordoned(cordoned);
        }
        let published = self.published_cordon();
        self.publish();
        self.trigger(Trigger::Reconcile);
        let Some(mut published) = published else {
            return ClusterKnows::of(cordoned, true, None);
        };
        let wait = published.wait_for(|written| *written == Some(cordoned));
        let _ = tokio::time::timeout(PUBLISH_WAIT, wait).await;
        let written = *published.borrow();
        let knows = ClusterKnows::of(cordoned, false, written);
        if knows == ClusterKnows::NotYet {
            tracing::warn!(cordoned, "the cordon state is not in ChainFire yet (store unreachable?): it is written when the store is back");
        }
        knows
    }

    /// `plasmavmc uncordon`: the host takes HA VMs again (failover, migration, placement).
    async fn uncordon(&self) -> Result<Response, Refusal> {
        let previous = self.cordons.lock().unwrap().uncordon().map_err(|e| {
            (
                ErrorKind::Failed,
                format!("could not remove the cordon, so the host stays cordoned: {e:#}"),
            )
        })?;
        let what = match previous {
            Some(previous) => {
                tracing::info!(since = %previous.since, "host uncordoned: it takes HA VMs again");
                format!(
                    "host uncordoned (it was cordoned since {} by {}): it takes HA VMs again",
                    previous.since, previous.by
                )
            }
            None => "the host was not cordoned".to_owned(),
        };
        let cluster = self.publish_cordon(false).await;
        Ok(Response::Cordon {
            change: CordonChange::new(false, &what, cluster),
        })
    }

    pub(super) fn slots(&self) -> Vec<Arc<VmSlot>> {
        self.vms.lock().unwrap().values().cloned().collect()
    }

    pub(super) fn slot(&self, name: &str) -> Option<Arc<VmSlot>> {
        self.vms.lock().unwrap().get(name).cloned()
    }
}

/// What a cordon means, in every message that mentions one.
const CORDONED: &str = "this host is cordoned: no HA VM is failed over, migrated or started \
    here (running VMs stay until moved; `plasmavmc uncordon` opens it)";

/// Steps that let go of something another VM may take next (they come first in a VM's plan).
fn releases(action: &Action) -> bool {
    matches!(
        action,
        Action::StopVm { .. }
            | Action::RemoveDisk { .. }
            | Action::RemoveNic { .. }
            | Action::RemoveOrphanBlockNode { .. }
            | Action::RemoveOrphanNetdev { .. }
    )
}

/// A VM's reconcile that counts as a success, which clears its last error: a start or a live
/// change went through and every step of it did. (A stop alone does not: why the VM failed
/// before it was stopped is still worth reading.)
fn applied_in_full(actions: &[Action], outcomes: &[StepOutcome]) -> bool {
    actions
        .iter()
        .any(|action| !matches!(action, Action::StopVm { .. }))
        && outcomes.iter().all(|outcome| *outcome == StepOutcome::Done)
}

/// Every VM as QEMU reports it; VMs that could not be read are listed with the error (the
/// planner must not see them as absent, or it would start a second QEMU beside a live one).
async fn observe_all(
    shell: &super::vm::Shell,
    slots: &[Arc<VmSlot>],
    wait: Duration,
) -> (ObservedHost, BTreeMap<String, String>) {
    let results = join_all(slots.iter().map(|slot| slot.observe(shell, wait))).await;
    let mut observed = ObservedHost::default();
    let mut unobservable = BTreeMap::new();
    for (slot, result) in slots.iter().zip(results) {
        match result {
            Ok(Some(vm)) => {
                observed.vms.insert(slot.name.clone(), vm);
            }
            Ok(None) => {}
            Err(e) => {
                unobservable.insert(slot.name.clone(), format!("{e:#}"));
            }
        }
    }
    (observed, unobservable)
}

/// A panic while working on one VM (a bug): logged, the VM marked, the agent and the other VMs
/// go on.
fn vm_panicked(slot: &VmSlot, doing: &str, panic: Box<dyn std::any::Any + Send>) {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    let error = format!("agent bug while {doing}: {message} (please report it)");
    tracing::error!(vm = %slot.name, "{error}");
    slot.update_status(|s| s.last_error = Some(error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_or_a_live_apply_done_in_full_is_a_success_a_stop_is_not() {
        let remove = Action::RemoveNic { id: "eth0".into() };
        let stop = Action::StopVm {
            reason: "operator".into(),
        };
        let done = StepOutcome::Done;
        let failed = StepOutcome::Failed {
            error: "boom".into(),
        };
        let both = [remove.clone(), remove.clone()];
        assert!(applied_in_full(&both, &[done.clone(), done.clone()]));
        assert!(!applied_in_full(
            &[remove.clone(), remove],
            &[done.clone(), failed]
        ));
        assert!(!applied_in_full(&[stop], &[done]));
        assert!(!applied_in_full(&[], &[]));
    }
}
