//! Live migration, the daemon's side (the decisions are `crate::migration`'s).
//!
//! Source ([`Daemon::migrate_vm`]), holding the VM's reconcile lock throughout so nothing else
//! touches it: checks, records the request in ChainFire (under its lease), waits for the
//! target's answer, migrates with `pause-before-switchover`; at `pre-switchover` (guest paused)
//! lets QEMU send the rest (its QEMU stays paused, resumable) while the target confirms and the
//! HA lock moves to it in one conditional transaction; then quits its QEMU. Any fault before the
//! lock moved: cancel, resume, keep the lock.
//!
//! Target ([`follow_requests`] → `receive`), holding the VM's reconcile lock until done so no
//! reconcile boots the VM beside the incoming QEMU: launches QEMU with the source's running
//! configuration, paused, `-incoming defer`, fenced under its own lease; answers with its
//! address; resumes only once the stream is complete *and* this host holds the lock; discards
//! the incoming QEMU when the source withdraws (its request vanishes with its lease).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::arrivals::{end_images, forget_images, put_back_images, set_aside_images};
use super::supervisor::Daemon;
use super::vm::VmSlot;
use crate::chainfire::moves::{MoveStore, Switch};
use crate::chainfire::{keys, ClusterView, VmKey};
use crate::migration::arrival::Arrival;
use crate::migration::downtime::{self, SwitchoverClock};
use crate::migration::interrupted::images_after_discard;
use crate::migration::ports::PortRange;
use crate::migration::record::{self, Recovery, TargetStep};
use crate::migration::{
    compat, Answer, IncomingRecord, MigrationOutcome, MigrationProgress, MigrationRecord, Mode,
    Phase, RunningConfig,
};
use crate::qemu::migrate as qemu_migrate;
use crate::qemu::Qmp;
use crate::status::VmState;

/// How often a move asks QEMU how far it is while waiting for something else.
const POLL: Duration = Duration::from_millis(10);
/// How often a move refreshes its progress when QEMU reports no change of status (a `MIGRATION`
/// event wakes it at once: the switchover is never waited for by polling).
const PROGRESS: Duration = Duration::from_millis(100);
/// How often the source asks the store again when the lock transaction's outcome is unknown.
const POLL_STORE: Duration = Duration::from_millis(500);
/// How long the target may take to answer (it launches a paused QEMU).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// A move whose memory transfer makes no progress for this long is given up (stay on the
/// source).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the target waits, its stream complete, to see the lock it was given.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// How long the paused source waits for the target to confirm the switchover: this much
/// downtime at most when the target's agent died during the move.
const CONFIRM_WAIT: Duration = Duration::from_secs(3);
/// How long the source waits to learn that the target runs (for the downtime figure).
const RESUMED_WAIT: Duration = Duration::from_secs(30);

/// This host's migration channel (`--migration-address`, `--migration-ports`,
/// `--migration-tls-dir`).
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    /// Published: where sources connect.
    pub address: String,
    /// Where incoming QEMUs listen (`--migration-listen`; default: `address`), for a host whose
    /// published address is another's (NAT, a proxy).
    pub listen: Option<String>,
    pub ports: PortRange,
    pub tls_dir: Option<PathBuf>,
}

/// How one move goes.
#[derive(Debug, Clone, Copy)]
pub struct MoveOptions {
    pub mode: Mode,
    /// A cap on the stream, bytes per second (None: as fast as the link goes).
    pub bandwidth: Option<u64>,
}

/// Moves in flight on this host.
#[derive(Default)]
pub struct Moves {
    /// Outgoing moves by VM: send `true` to cancel.
    outgoing: std::collections::BTreeMap<String, watch::Sender<bool>>,
    /// VMs arriving here (they count as wanted, so the lock they get is kept), watched by an
    /// evacuation about to start.
    incoming: watch::Sender<BTreeSet<String>>,
    /// VMs whose lock this host is handing to a target: not fenced by the agent when the lock
    /// leaves (their QEMU is paused at the switchover and quits once the stream is out; the
    /// fence guard still kills it if the lease is lost).
    pub handing_over: BTreeSet<String>,
    /// Ports incoming QEMUs listen on now.
    ports: BTreeSet<u16>,
    /// Requests this host answered (by id), so each is answered once.
    answered: BTreeSet<String>,
}

impl Moves {
    /// Whether this agent moves `vm` away now.
    pub fn is_outgoing(&self, vm: &str) -> bool {
        self.outgoing.contains_key(vm)
    }

    /// The VMs this agent moves away now.
    pub fn outgoing_vms(&self) -> BTreeSet<String> {
        self.outgoing.keys().cloned().collect()
    }

    /// The VMs arriving here now.
    pub fn incoming_vms(&self) -> BTreeSet<String> {
        self.incoming.borrow().clone()
    }

    /// The VMs arriving here, as they change.
    pub fn watch_incoming(&self) -> watch::Receiver<BTreeSet<String>> {
        self.incoming.subscribe()
    }

    /// `vm` arrives here from now on (`arriving = false`: no longer).
    fn set_incoming(&self, vm: &str, arriving: bool) {
        self.incoming.send_if_modified(|incoming| {
            if arriving {
                incoming.insert(vm.to_owned())
            } else {
                incoming.remove(vm)
            }
        });
    }

    /// Claims request `id` for this agent to answer or settle; false if it was claimed already.
    pub fn claim(&mut self, id: &str) -> bool {
        self.answered.insert(id.to_owned())
    }
}

/// Why a move did not happen; the VM runs where it ran.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Refused before anything started (exit 2 from the CLI).
    #[error("{0}")]
    Refused(String),
    /// Tried and abandoned: the VM runs on the source as before (exit 1).
    #[error("{0}")]
    Abandoned(String),
    /// Failed after the lock moved: the target owns the VM (HA boots it there if the stream did
    /// not complete).
    #[error("{0}")]
    AfterSwitchover(String),
}

impl Daemon {
    /// Moves VM `vm` to host `to`, live (or, `Mode::Offline`, paused for the whole copy). Returns once
    /// the VM runs on `to`, or once the move was abandoned and the VM runs here as before.
    /// `progress` is kept up to date for callers that show it (the VM's status shows it too).
    pub async fn migrate_vm(
        self: &Arc<Self>,
        vm: &str,
        to: &str,
        options: MoveOptions,
        progress: watch::Sender<MigrationProgress>,
    ) -> Result<MigrationOutcome, MigrationError> {
        let started = Instant::now();
        let (session_config, lease, view, may_run) = {
            let session = self.chainfire.lock().unwrap();
            let Some(session) = session.as_ref() else {
                return Err(MigrationError::Refused(
                    "this agent runs standalone (no --chainfire): there is no cluster to move to"
                        .into(),
                ));
            };
            let view = session.cluster().borrow().clone();
            let may_run = session.may_run().borrow().clone();
            (session.config().clone(), session.lease_id(), view, may_run)
        };
        let spec = self
            .declared(vm)
            .map_err(|(_, message)| MigrationError::Refused(message))?;
        let key = VmKey::new(&spec.org_id, &spec.project_id, vm);
        let refuse = MigrationError::Refused;
        if to == self.host_id {
            return Err(refuse(format!("VM {vm} already runs on {to}")));
        }
        if !spec.ha.enable {
            return Err(refuse(format!(
                "VM {vm} is not an HA VM: only a VM declared with ha.enable on both hosts can move (its lock says which host runs it)"
            )));
        }
        let Some(slot) = self.slot(vm).filter(|s| s.status().pid.is_some()) else {
            return Err(refuse(format!("VM {vm} is not running on this host")));
        };
        let Some(lease) = lease.filter(|_| may_run.contains(&key)) else {
            return Err(refuse(format!(
                "this host does not hold VM {vm}'s HA lock under a trusted lease"
            )));
        };
        let Some(target) = view.hosts.get(to) else {
            return Err(refuse(format!(
                "host {to} is not live in ChainFire (no host record: unknown id, or its agent is down)"
            )));
        };
        if target.cordoned {
            return Err(refuse(format!(
                "host {to} is cordoned, as this host's view of ChainFire says: nothing is migrated to it (`plasmavmc uncordon` there opens it)"
            )));
        }
        compat::check(&spec, &session_config.host_facts, to, &target.facts).map_err(refuse)?;
        if let Some(other) = view.migrations.get(&key) {
            return Err(refuse(format!(
                "a move of VM {vm} is already in flight ({} -> {})",
                other.value.from, other.value.to
            )));
        }

        let (cancel_tx, cancel) = watch::channel(false);
        {
            let mut moves = self.moves.lock().unwrap();
            if moves.outgoing.contains_key(vm) {
                return Err(refuse(format!("VM {vm} is already being moved")));
            }
            moves.outgoing.insert(vm.to_owned(), cancel_tx);
        }
        let _this_vm = slot.reconciling.lock().await;
        let report = Reporter::new(&slot, progress, "out", to);
        let outcome = self
            .migrate_out(
                &slot,
                &key,
                to,
                options,
                lease,
                &session_config,
                cancel,
                &report,
            )
            .await;
        self.moves.lock().unwrap().outgoing.remove(vm);
        match &outcome {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vm = %vm, to = %to, "migration: {e}");
                slot.update_status(|s| {
                    s.migration = None;
                    if s.state == VmState::Migrating {
                        s.state = VmState::Running;
                    }
                    s.last_error = Some(format!("migration to {to}: {e}"));
                });
            }
        }
        self.publish();
        outcome.map(|mut outcome| {
            outcome.total_ms = started.elapsed().as_millis() as u64;
            outcome
        })
    }

    /// Cancels the move of `vm` in flight from this host (`plasmavmc migrate --cancel`).
    pub fn cancel_migration(&self, vm: &str) -> Result<(), String> {
        match self.moves.lock().unwrap().outgoing.get(vm) {
            Some(cancel) => {
                cancel.send_replace(true);
                Ok(())
            }
            None => Err(format!("no move of VM {vm} is in flight from this host")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn migrate_out(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        key: &VmKey,
        to: &str,
        options: MoveOptions,
        lease: i64,
        config: &crate::chainfire::ChainFireConfig,
        mut cancel: watch::Receiver<bool>,
        report: &Reporter,
    ) -> Result<MigrationOutcome, MigrationError> {
        let abandon = |what: &str, e: &dyn std::fmt::Display| {
            MigrationError::Abandoned(format!("{what}: {e}; the VM runs here as before"))
        };
        let declared = self
            .declared(&key.vm)
            .map_err(|(_, message)| MigrationError::Refused(message))?;
        let (running, qmp, pid) = slot
            .running_config(&declared)
            .await
            .map_err(|e| MigrationError::Refused(format!("{e:#}")))?;
        let store = MoveStore::connect(config)
            .await
            .map_err(|e| abandon("ChainFire unreachable", &format!("{e:#}")))?;
        let request = MigrationRecord {
            id: format!("{}-{}", self.host_id, unix_millis()),
            vm: key.vm.clone(),
            from: self.host_id.clone(),
            to: to.to_owned(),
            mode: options.mode,
            phase: Phase::Requested,
            running,
            requested_at: crate::chainfire::records::now(),
        };
        report.stage("waiting for the target", &request.running.disks_to_copy());
        store
            .request(&request, key, lease)
            .await
            .map_err(|e| MigrationError::Refused(format!("{e:#}")))?;
        let result = self
            .transfer(
                slot,
                &store,
                key,
                &request,
                options,
                lease,
                &qmp,
                pid,
                &mut cancel,
                report,
            )
            .await;
        // The request goes in every case; the target's answer with it (the target forgets it
        // either way once the request is gone).
        let _ = store.forget(keys::migration(key)).await;
        let _ = store.forget(keys::incoming(key)).await;
        result
    }

    /// From the request recorded to the end, one way or the other.
    #[allow(clippy::too_many_arguments)]
    async fn transfer(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        store: &MoveStore,
        key: &VmKey,
        request: &MigrationRecord,
        options: MoveOptions,
        lease: i64,
        qmp: &Arc<Qmp>,
        pid: u32,
        cancel: &mut watch::Receiver<bool>,
        report: &Reporter,
    ) -> Result<MigrationOutcome, MigrationError> {
        let to = request.to.as_str();
        let answer = self.await_answer(key, &request.id, cancel).await?;
        let Answer::Ready {
            address,
            port,
            nbd_port,
        } = answer.answer.clone()
        else {
            let why = match answer.answer {
                Answer::Refused { reason } => format!("{to} refused: {reason}"),
                Answer::Failed { reason } => format!("{to} could not prepare: {reason}"),
                other => format!("{to} answered out of turn ({other:?})"),
            };
            return Err(MigrationError::Abandoned(format!(
                "{why}; the VM runs here as before"
            )));
        };
        let tls = self.migration.tls_dir.as_deref();
        if let Some(dir) = tls {
            if let Err(e) = qemu_migrate::tls_credentials(qmp, dir, "client").await {
                return Err(MigrationError::Abandoned(format!(
                    "loading the TLS credentials in {}: {e}; the VM runs here as before",
                    dir.display()
                )));
            }
        }
        let copied = request.running.disks_to_copy();
        if !copied.is_empty() {
            report.stage("copying disks", &copied);
            let copy = match nbd_port {
                Some(nbd_port) => {
                    self.copy_disks(
                        key,
                        qmp,
                        (&address, nbd_port),
                        &copied,
                        &answer.id,
                        cancel,
                        report,
                    )
                    .await
                }
                None => Err(format!("{to} exports no disk to copy to")),
            };
            if let Err(why) = copy {
                let _ = qemu_migrate::disks::finish(qmp, &copied, true).await;
                return Err(MigrationError::Abandoned(format!(
                    "copying disks: {why}; the VM runs here as before"
                )));
            }
        }
        // QEMU's STOP, the start of the downtime (for an offline move, the pause just below),
        // and whether the stream broke, without asking QEMU at the switchover.
        let mut events = qmp.subscribe();
        let started = async {
            qemu_migrate::prepare_source(qmp, request.mode, options.bandwidth, tls.is_some())
                .await?;
            if request.mode == Mode::Offline {
                qmp.stop().await?;
            }
            qmp.migrate(&format!("tcp:{}", host_port(&address, port)))
                .await
        };
        if let Err(e) = started.await {
            let _ = qemu_migrate::disks::finish(qmp, &copied, true).await;
            self.recover(slot, qmp, key, record::recovery(false), to)
                .await;
            return Err(MigrationError::Abandoned(format!(
                "starting the migration: {e}; the VM runs here as before"
            )));
        }
        report.stage("transferring memory", &[]);
        let abandon = |why: String| async move {
            self.recover(slot, qmp, key, record::recovery(false), to)
                .await;
            let here = if self.may_run_now(key) {
                "the VM runs here as before"
            } else {
                "the guest stays paused here: this host no longer holds its lock under a trusted lease, fencing decides"
            };
            Err(MigrationError::Abandoned(format!("{why}; {here}")))
        };
        let paused_at = match self
            .until_paused(key, qmp, pid, &answer.id, cancel, report)
            .await
        {
            Ok(paused_at) => paused_at,
            Err(why) => {
                let _ = qemu_migrate::disks::finish(qmp, &copied, true).await;
                return abandon(why).await;
            }
        };
        let paused_wall = qemu_migrate::stopped_at(&mut events).unwrap_or_else(SystemTime::now);
        report.stage("switchover", &[]);
        // The guest is paused: the mirrors are in step; they end here (the target's copies are
        // whole) before the rest of the stream goes.
        if let Err(e) = qemu_migrate::disks::finish(qmp, &copied, false).await {
            return abandon(format!("ending the disk copies: {e}")).await;
        }
        // The rest goes while the target confirms and the lock moves, off the downtime's path:
        // the target resumes only with the stream complete *and* the lock, and this QEMU, paused
        // even once everything is sent, resumes here if the lock stays.
        if let Err(e) = qemu_migrate::continue_after_pause(qmp).await {
            return abandon(format!("sending the rest: {e}")).await;
        }
        let paused = MigrationRecord {
            phase: Phase::Paused,
            ..request.clone()
        };
        let confirmed = match store.update(&paused, key, lease).await {
            Ok(()) => self.await_confirmation(key, &answer.id).await,
            Err(e) => Err(format!("recording the pause: {e:#}")),
        };
        if let Err(why) = confirmed {
            return abandon(why).await;
        }
        let confirmed_at = Instant::now();
        // A stream that broke meanwhile never completes there: the lock stays.
        if let Some(broke) = qemu_migrate::broke(&mut events) {
            return abandon(format!("the migration {broke} at the switchover")).await;
        }
        self.moves
            .lock()
            .unwrap()
            .handing_over
            .insert(key.vm.clone());
        let lock_sent = SystemTime::now();
        let switched = self
            .switch_lock(store, key, &paused, lease, &answer.id)
            .await;
        let result = match switched {
            Ok(()) => {
                let times = Switchover {
                    paused: paused_at,
                    paused_wall,
                    confirmed: confirmed_at,
                    lock_sent,
                    locked: Instant::now(),
                };
                self.finish_out(slot, key, request, qmp, times, report)
                    .await
            }
            Err(why) => abandon(why).await,
        };
        self.moves.lock().unwrap().handing_over.remove(&key.vm);
        result
    }

    /// Mirrors `copied` to the target's NBD export until every copy is in step (then every
    /// guest write goes to both sides until the switchover).
    #[allow(clippy::too_many_arguments)]
    async fn copy_disks(
        &self,
        key: &VmKey,
        qmp: &Qmp,
        (address, nbd_port): (&str, u16),
        copied: &[String],
        answer_id: &str,
        cancel: &mut watch::Receiver<bool>,
        report: &Reporter,
    ) -> Result<(), String> {
        let tls = self.migration.tls_dir.is_some();
        qemu_migrate::disks::mirror(qmp, address, nbd_port, copied, tls)
            .await
            .map_err(|e| format!("starting the mirror: {e}"))?;
        let mut last_progress = (0, Instant::now());
        loop {
            if *cancel.borrow() {
                return Err("cancelled by the operator".into());
            }
            if !self.target_there(key, answer_id) {
                return Err("the target withdrew (its agent stopped, or its QEMU died)".into());
            }
            let (done, total, ready) = qemu_migrate::disks::progress(qmp, copied).await?;
            report.update(|p| {
                p.disk_transferred_bytes = done;
                p.disk_total_bytes = total;
            });
            if ready {
                return Ok(());
            }
            if done != last_progress.0 {
                last_progress = (done, Instant::now());
            } else if last_progress.1.elapsed() > STALL_TIMEOUT {
                return Err(format!("no progress for {}s", STALL_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(POLL * 10).await;
        }
    }

    /// Whether the target's answer to `answer_id` is still there (its agent and lease live).
    fn target_there(&self, key: &VmKey, answer_id: &str) -> bool {
        self.cluster().is_some_and(|c| {
            c.borrow()
                .incoming
                .get(key)
                .is_some_and(|a| a.value.id == answer_id)
        })
    }

    /// Waits for the target to confirm, at the switchover, that its agent lives and its QEMU
    /// receives.
    async fn await_confirmation(&self, key: &VmKey, id: &str) -> Result<(), String> {
        let mut cluster = self.cluster().ok_or("the ChainFire session is gone")?;
        let wait = async {
            loop {
                let state = cluster
                    .borrow_and_update()
                    .incoming
                    .get(key)
                    .filter(|a| a.value.id == id)
                    .map(|a| a.value.answer.clone());
                match state {
                    Some(Answer::Confirmed) => return Ok(()),
                    Some(Answer::Ready { .. }) => {}
                    _ => return Err("the target withdrew at the switchover".to_owned()),
                }
                if cluster.changed().await.is_err() {
                    return Err("the ChainFire session is gone".to_owned());
                }
            }
        };
        tokio::time::timeout(CONFIRM_WAIT, wait)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the target did not confirm the switchover within {} ms (its agent may be gone)",
                    CONFIRM_WAIT.as_millis()
                ))
            })
    }

    /// Waits for the target's answer to request `id`.
    async fn await_answer(
        &self,
        key: &VmKey,
        id: &str,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<IncomingRecord, MigrationError> {
        let Some(mut cluster) = self.cluster() else {
            return Err(MigrationError::Abandoned(
                "the ChainFire session is gone".into(),
            ));
        };
        let wait = async {
            loop {
                if let Some(answer) = cluster.borrow_and_update().incoming.get(key) {
                    if answer.value.id == id {
                        return Ok(answer.value.clone());
                    }
                }
                tokio::select! {
                    changed = cluster.changed() => if changed.is_err() {
                        return Err("the ChainFire session is gone".to_owned());
                    },
                    _ = cancel.changed() => return Err("cancelled".to_owned()),
                }
            }
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, wait).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(why)) => Err(MigrationError::Abandoned(format!(
                "{why} before the target answered; the VM runs here as before"
            ))),
            Err(_) => Err(MigrationError::Abandoned(format!(
                "the target did not answer within {}s (is its agent running, and new enough?); the VM runs here as before",
                ANSWER_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Watches the migration until QEMU pauses the guest at `pre-switchover` (its instant, on
    /// this host's clock). Err (why) on failure, cancel, a stall, the source QEMU's death, or
    /// the target's answer vanishing (its agent died).
    async fn until_paused(
        &self,
        key: &VmKey,
        qmp: &Qmp,
        pid: u32,
        answer_id: &str,
        cancel: &mut watch::Receiver<bool>,
        report: &Reporter,
    ) -> Result<Instant, String> {
        let mut last_progress = (0, Instant::now());
        let mut events = qmp.subscribe();
        loop {
            if *cancel.borrow() {
                return Err("cancelled by the operator".into());
            }
            if !crate::qemu::process::is_alive(pid) {
                return Err("the source QEMU died".into());
            }
            if !self.target_there(key, answer_id) {
                return Err("the target withdrew (its agent stopped, or its QEMU died)".into());
            }
            let status = qemu_migrate::status(qmp)
                .await
                .map_err(|e| format!("asking QEMU how the migration goes: {e}"))?;
            report.update(|p| status.fill(p));
            match status.status.as_deref() {
                Some("pre-switchover") => return Ok(Instant::now()),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(format!(
                        "the migration {s}: {}",
                        status.error.as_deref().unwrap_or("QEMU gave no reason")
                    ))
                }
                _ => {}
            }
            if status.transferred != last_progress.0 {
                last_progress = (status.transferred, Instant::now());
            } else if last_progress.1.elapsed() > STALL_TIMEOUT {
                return Err(format!("no progress for {}s", STALL_TIMEOUT.as_secs()));
            }
            qemu_migrate::next_change(&mut events, PROGRESS).await;
        }
    }

    /// The lock transaction; Ok once the lock is the target's. An unclear outcome (the store
    /// did not answer) is settled by reading the lock back: if it moved, the move goes on.
    async fn switch_lock(
        &self,
        store: &MoveStore,
        key: &VmKey,
        request: &MigrationRecord,
        lease: i64,
        answer_id: &str,
    ) -> Result<(), String> {
        match store.switch_lock(key, request, lease, answer_id).await {
            Ok(Switch::Moved) => return Ok(()),
            Ok(Switch::Refused(why)) => return Err(format!("the HA lock was not moved: {why}")),
            Err(e) => {
                tracing::warn!(vm = %key.vm, "the lock transaction's outcome is unknown ({e:#}); reading the lock back")
            }
        }
        // Unknown: first make a late commit of that transaction impossible (it compares the
        // request's revision, which this put changes), then read who holds the lock. The rest
        // of the stream is at the target already: until this is settled the guest stays paused
        // here; once this host's lease is no longer trusted, fencing decides.
        loop {
            let settled = async {
                store.update(request, key, lease).await?;
                store.lock_holder(key).await
            };
            match settled.await {
                Ok(Some(holder)) if holder.host == request.to => return Ok(()),
                Ok(_) => {
                    return Err(
                        "the HA lock was not moved (the store did not answer the transaction)"
                            .into(),
                    )
                }
                Err(_) if self.may_run_now(key) => tokio::time::sleep(POLL_STORE).await,
                Err(e) => {
                    return Err(format!(
                        "the store is unreachable at the switchover ({e:#})"
                    ))
                }
            }
        }
    }

    /// Whether this host may run VM `key` now (its lock, under a lease still trusted).
    fn may_run_now(&self, key: &VmKey) -> bool {
        self.chainfire
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.may_run().borrow().contains(key))
    }

    /// After the lock moved: wait until QEMU sent the rest, quit this QEMU, learn when the
    /// target ran the guest.
    async fn finish_out(
        &self,
        slot: &Arc<VmSlot>,
        key: &VmKey,
        request: &MigrationRecord,
        qmp: &Qmp,
        times: Switchover,
        report: &Reporter,
    ) -> Result<MigrationOutcome, MigrationError> {
        let to = request.to.as_str();
        tracing::info!(vm = %key.vm, to, "migration: the HA lock is {to}'s; the guest runs there once the rest is in");
        report.stage("completing", &[]);
        let mut events = qmp.subscribe();
        let completed = async {
            loop {
                let status = qemu_migrate::status(qmp).await?;
                report.update(|p| status.fill(p));
                match status.status.as_deref() {
                    Some("completed") => return Ok(status),
                    Some(s @ ("failed" | "cancelled")) => anyhow::bail!(
                        "the migration {s} after the switchover: {}",
                        status.error.as_deref().unwrap_or("QEMU gave no reason")
                    ),
                    _ => {
                        qemu_migrate::next_change(&mut events, PROGRESS).await;
                    }
                }
            }
        }
        .await;
        let completed_at = Instant::now();
        // Quit in every case: the lock is the target's, this QEMU never runs the guest again.
        // Meanwhile, learn when the target runs the guest (the quit takes no part in the downtime).
        let resumed = async {
            if completed.is_ok() {
                self.target_resumed(key, &request.id).await
            } else {
                None
            }
        };
        let (resumed, ()) = tokio::join!(
            resumed,
            self.recover(slot, qmp, key, record::recovery(true), to)
        );
        let status = completed.map_err(|e| {
            MigrationError::AfterSwitchover(format!(
                "{e:#}; the HA lock is {to}'s, which boots the VM afresh"
            ))
        })?;
        if resumed.is_none() {
            tracing::warn!(vm = %key.vm, to, "migration: {to} did not report the guest running within {}s", RESUMED_WAIT.as_secs());
        }
        let (heard_at, resumed_there) = resumed.unwrap_or((Instant::now(), None));
        let clock = SwitchoverClock {
            paused: times.paused_wall,
            lock_sent: times.lock_sent,
            heard_resumed: times.paused_wall + heard_at.saturating_duration_since(times.paused),
            resumed_there,
        };
        let downtime = clock.downtime();
        let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_millis() as u64;
        tracing::info!(
            vm = %key.vm,
            to,
            downtime_ms = downtime.as_millis() as u64,
            target_clock = if resumed_there.is_some() { "used" } else { "not reported" },
            confirm_ms = ms(times.paused, times.confirmed),
            lock_ms = ms(times.confirmed, times.locked),
            completed_ms = ms(times.paused, completed_at),
            heard_ms = ms(times.paused, heard_at),
            "migration: done (downtime: from QEMU's pause here to QEMU's resume there; \
             the rest of the stream went during the target's confirmation and the lock \
             transaction; times since the pause as this agent saw it)"
        );
        Ok(MigrationOutcome {
            vm: key.vm.clone(),
            from: request.from.clone(),
            to: to.to_owned(),
            mode: request.mode,
            downtime_ms: downtime.as_millis() as u64,
            total_ms: 0,
            transferred_bytes: status.transferred,
        })
    }

    /// When the source heard (within `RESUMED_WAIT`) that the target runs the guest, and since
    /// when the target says it does (its clock).
    async fn target_resumed(&self, key: &VmKey, id: &str) -> Option<(Instant, Option<SystemTime>)> {
        let mut cluster = self.cluster()?;
        let wait = async {
            loop {
                let resumed = cluster
                    .borrow_and_update()
                    .incoming
                    .get(key)
                    .filter(|a| a.value.id == id)
                    .and_then(|a| match a.value.answer {
                        Answer::Resumed { at } => Some(at.map(downtime::from_unix_micros)),
                        _ => None,
                    });
                if let Some(at) = resumed {
                    return (Instant::now(), at);
                }
                if cluster.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(RESUMED_WAIT, wait).await.ok()
    }

    /// Ends a move that did not complete here, as `migration::record::recovery` says: before
    /// the switchover, cancel and resume the guest (while this host still holds the lock);
    /// after it, quit this QEMU.
    async fn recover(&self, slot: &VmSlot, qmp: &Qmp, key: &VmKey, how: Recovery, to: &str) {
        if how == Recovery::QuitSource {
            slot.quit_migrated(&self.shell, to).await;
            return;
        }
        if let Err(e) = qemu_migrate::cancel(qmp).await {
            tracing::debug!(vm = %key.vm, "migrate_cancel: {e}");
        }
        // A `cont` while QEMU is still cancelling is refused: wait until it left the migration.
        for _ in 0..500 {
            match qemu_migrate::status(qmp).await {
                Ok(s)
                    if !matches!(
                        s.status.as_deref(),
                        Some("cancelled" | "failed" | "completed") | None
                    ) =>
                {
                    tokio::time::sleep(POLL).await
                }
                _ => break,
            }
        }
        if self.may_run_now(key) {
            if let Err(e) = qmp.cont().await {
                tracing::error!(vm = %key.vm, "the move was abandoned but the guest could not be resumed: {e}");
            }
        } else {
            tracing::error!(vm = %key.vm, "the move was abandoned and this host no longer holds the lock: the guest stays paused (fencing decides)");
        }
        slot.update_status(|s| {
            if s.state == VmState::Migrating {
                s.state = VmState::Running;
            }
            s.migration = None;
        });
    }

    fn cluster(&self) -> Option<watch::Receiver<Arc<ClusterView>>> {
        self.chainfire.lock().unwrap().as_ref().map(|s| s.cluster())
    }
}

/// Follows the cluster view and receives every move addressed to this host.
pub async fn follow_requests(daemon: Arc<Daemon>) {
    let Some(mut cluster) = daemon.cluster() else {
        return;
    };
    loop {
        let requests: Vec<(VmKey, MigrationRecord)> = cluster
            .borrow_and_update()
            .migrations
            .iter()
            .filter(|(_, m)| m.value.to == daemon.host_id && m.value.phase == Phase::Requested)
            .map(|(key, m)| (key.clone(), m.value.clone()))
            .collect();
        for (key, request) in requests {
            if !daemon.moves.lock().unwrap().claim(&request.id) {
                continue;
            }
            let daemon = Arc::clone(&daemon);
            tokio::spawn(async move { daemon.receive(key, request).await });
        }
        if cluster.changed().await.is_err() {
            return;
        }
    }
}

impl Daemon {
    /// The target's side of one move.
    async fn receive(self: Arc<Self>, key: VmKey, request: MigrationRecord) {
        let vm = key.vm.clone();
        tracing::info!(vm = %vm, from = %request.from, id = %request.id, "migration: incoming request");
        let Some((config, lease)) = self
            .chainfire
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| (s.config().clone(), s.lease_id()))
        else {
            return;
        };
        let Some(lease) = lease else { return };
        let store = match MoveStore::connect(&config).await {
            Ok(store) => store,
            Err(e) => {
                tracing::warn!(vm = %vm, "migration: cannot answer, ChainFire unreachable: {e:#}");
                return;
            }
        };
        let answer = |answer: Answer| IncomingRecord {
            id: request.id.clone(),
            host: self.host_id.clone(),
            lease,
            answer,
        };
        let (slot, running) = match self.accept(&key, &request) {
            Ok(accepted) => accepted,
            Err(reason) => {
                tracing::warn!(vm = %vm, from = %request.from, "migration refused: {reason}");
                let _ = store
                    .answer(&key, &answer(Answer::Refused { reason }), lease)
                    .await;
                return;
            }
        };
        let copied = running.disks_to_copy();
        // Kept before anything is set aside, until the move ends: an agent back after its lease
        // ended learns from it which images are the move's and how far it got.
        let arrival = Arrival::new(&vm, &request.id, &request.from, &running, |path, _| {
            std::fs::symlink_metadata(path).is_ok()
        });
        let set_aside = match self.shell.arrivals.save(&arrival).await {
            Ok(()) => set_aside_images(&arrival),
            Err(e) => Err(format!("keeping the move's record in the state dir: {e:#}")),
        };
        if let Err(reason) = set_aside {
            self.shell.arrivals.remove(&vm);
            let _ = store
                .answer(&key, &answer(Answer::Failed { reason }), lease)
                .await;
            return;
        }
        self.moves.lock().unwrap().set_incoming(&vm, true);
        // Published before the lock can come: a cordon meanwhile keeps it for the arriving VM.
        self.publish();
        let this_vm = slot.reconciling.lock().await;
        let report = Reporter::new(
            &slot,
            watch::channel(Default::default()).0,
            "in",
            &request.from,
        );
        report.stage("receiving", &[]);
        let prepared = self.prepare_incoming(&slot, &running, lease).await;
        let (pid, qmp, port, nbd_port) = match prepared {
            Ok(prepared) => prepared,
            Err(reason) => {
                tracing::warn!(vm = %vm, "migration: preparing failed: {reason}");
                put_back_images(&arrival);
                self.shell.arrivals.remove(&vm);
                let _ = store
                    .answer(&key, &answer(Answer::Failed { reason }), lease)
                    .await;
                self.moves.lock().unwrap().set_incoming(&vm, false);
                slot.update_status(|s| s.migration = None);
                return;
            }
        };
        let ready = Answer::Ready {
            address: self.migration.address.clone(),
            port,
            nbd_port,
        };
        let confirmed = answer(Answer::Confirmed);
        let outcome = match store.answer(&key, &answer(ready), lease).await {
            Ok(()) => {
                self.await_stream(&key, &qmp, pid, &store, (&confirmed, &arrival))
                    .await
            }
            Err(e) => TargetStep::Discard(format!("answering the source failed: {e:#}")),
        };
        {
            let mut moves = self.moves.lock().unwrap();
            moves.ports.remove(&port);
            nbd_port.map(|p| moves.ports.remove(&p));
        }
        match outcome {
            TargetStep::Resume => {
                let mut run_state = qmp.subscribe();
                let resumed = qmp.cont().await;
                // Said at once, with QEMU's instant: the source ends the downtime there.
                let at = qemu_migrate::resumed_at(&mut run_state).map(downtime::to_unix_micros);
                let _ = store
                    .answer(&key, &answer(Answer::Resumed { at }), lease)
                    .await;
                // Off the downtime's path: the source's disk mirrors ended before the switchover,
                // nothing writes through the exports any more.
                qemu_migrate::disks::unexport(&qmp, &copied).await;
                forget_images(&arrival);
                self.shell.arrivals.remove(&vm);
                slot.adopt_incoming(&self.shell, qmp, pid, running.boot_spec.clone())
                    .await;
                match resumed {
                    Ok(()) => {
                        tracing::info!(vm = %vm, from = %request.from, pid, "migration: arrived; the guest runs here")
                    }
                    Err(e) => {
                        tracing::error!(vm = %vm, pid, "migration: arrived but the guest could not be resumed: {e}")
                    }
                }
                self.keep_running_here(&vm, &running).await;
            }
            TargetStep::Discard(mut why) => {
                if !crate::qemu::process::is_alive(pid) {
                    let tail = crate::qemu::process::qemu_log_tail(&self.shell.run_dir.vm(&vm));
                    why = format!("{why} (QEMU said: {tail})");
                }
                tracing::warn!(vm = %vm, from = %request.from, "migration: discarding the incoming QEMU: {why}");
                slot.discard_incoming(&self.shell, pid, &running).await;
                let _ = store.forget(keys::incoming(&key)).await;
                // Read once the answer is withdrawn: the lock can no longer move here.
                let reached = self.reached(&store, &key, &request.id).await;
                end_images(&vm, images_after_discard(reached), &arrival);
                self.shell.arrivals.remove(&vm);
            }
            TargetStep::Wait | TargetStep::Confirm => {
                unreachable!("await_stream ends in a decision")
            }
        }
        self.moves.lock().unwrap().set_incoming(&vm, false);
        drop(this_vm);
        self.publish();
        self.trigger(super::supervisor::Trigger::Reconcile);
    }

    /// Whether this host takes VM `key` (declared here as HA, not running here), and the running
    /// configuration adapted to this host.
    fn accept(
        &self,
        key: &VmKey,
        request: &MigrationRecord,
    ) -> Result<(Arc<VmSlot>, RunningConfig), String> {
        let vm = &key.vm;
        if let Some(cordon) = self.cordons.lock().unwrap().get() {
            return Err(format!(
                "{} is cordoned (by {} since {}): it takes no VM until `plasmavmc uncordon`",
                self.host_id, cordon.by, cordon.since
            ));
        }
        let spec = self.declared(vm).map_err(|_| {
            format!(
                "VM {vm} is not declared on {}: declare it there (with ha.enable) first",
                self.host_id
            )
        })?;
        if !spec.ha.enable {
            return Err(format!(
                "VM {vm} is declared on {} without ha.enable",
                self.host_id
            ));
        }
        if VmKey::new(&spec.org_id, &spec.project_id, vm) != *key {
            return Err(format!(
                "VM {vm} belongs to another org/project on {}",
                self.host_id
            ));
        }
        let slot = self
            .slot(vm)
            .ok_or_else(|| format!("VM {vm} has no slot on {}", self.host_id))?;
        if let Some(pid) = slot.status().pid {
            return Err(format!(
                "VM {vm} already has a QEMU on {} (pid {pid})",
                self.host_id
            ));
        }
        if let Some(why) = request.running.shared_disagreement(&spec) {
            return Err(why);
        }
        Ok((slot, request.running.for_target(&spec)))
    }

    /// Launches the incoming QEMU and makes it listen on a free port of the range; with disks
    /// to copy, exports them over NBD on another.
    async fn prepare_incoming(
        &self,
        slot: &VmSlot,
        running: &RunningConfig,
        lease: i64,
    ) -> Result<(u32, Qmp, u16, Option<u16>), String> {
        let (pid, qmp) = slot
            .launch_incoming(
                &self.shell,
                running,
                Some(lease).filter(|_| self.shell.fencing.is_some()),
            )
            .await
            .map_err(|e| format!("{e:#}"))?;
        let listen = self
            .migration
            .listen
            .as_ref()
            .unwrap_or(&self.migration.address);
        let copied = running.disks_to_copy();
        let tls = self.migration.tls_dir.is_some();
        let listening = async {
            qemu_migrate::prepare_target(&qmp, self.migration.tls_dir.as_deref())
                .await
                .map_err(|e| format!("{e}"))?;
            qemu_migrate::plug_cpus(&qmp, &running.layout.hotplugged_cpus)
                .await
                .map_err(|e| format!("plugging the vCPUs the source plugged live: {e}"))?;
            let port = self
                .claim_port("the migration stream", |port| {
                    let uri = format!("tcp:{}", host_port(listen, port));
                    let qmp = &qmp;
                    async move { qmp.migrate_incoming(&uri).await.map_err(|e| e.to_string()) }
                })
                .await?;
            if copied.is_empty() {
                return Ok((port, None));
            }
            let nbd_port = self
                .claim_port("the disk copies (NBD)", |nbd_port| {
                    let (qmp, copied) = (&qmp, &copied);
                    async move {
                        qemu_migrate::disks::export(qmp, listen, nbd_port, copied, tls)
                            .await
                            .map_err(|e| e.to_string())
                    }
                })
                .await;
            match nbd_port {
                Ok(nbd_port) => Ok((port, Some(nbd_port))),
                Err(e) => {
                    self.moves.lock().unwrap().ports.remove(&port);
                    Err(e)
                }
            }
        };
        match listening.await {
            Ok((port, nbd_port)) => Ok((pid, qmp, port, nbd_port)),
            Err(e) => {
                slot.discard_incoming(&self.shell, pid, running).await;
                Err(e)
            }
        }
    }

    /// The first free port of the range that `listen` can take (a port another program holds
    /// fails there, and the next is tried).
    async fn claim_port<F, Fut>(&self, what: &str, listen: F) -> Result<u16, String>
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let in_use = self.moves.lock().unwrap().ports.clone();
        let mut last = format!("no port of {} is free", self.migration.ports);
        for port in self.migration.ports.candidates(&in_use).into_iter().take(8) {
            match listen(port).await {
                Ok(()) => {
                    self.moves.lock().unwrap().ports.insert(port);
                    return Ok(port);
                }
                Err(e) => last = format!("listening for {what} on port {port}: {e}"),
            }
        }
        Err(last)
    }

    /// Waits until the incoming QEMU may resume or must go (`record::target_step`), confirming
    /// the switchover with `confirmed` when the source pauses (once `arrival` says so in the
    /// state dir: the lock can move here only after the confirmation).
    async fn await_stream(
        &self,
        key: &VmKey,
        qmp: &Qmp,
        pid: u32,
        store: &MoveStore,
        (confirmed, arrival): (&IncomingRecord, &Arrival),
    ) -> TargetStep {
        let Some(mut cluster) = self.cluster() else {
            return TargetStep::Discard("the ChainFire session is gone".into());
        };
        let mut may_run = self.may_run();
        let mut events = qmp.subscribe();
        // Asked now, then followed by QEMU's events: at the end of the stream QEMU loads the
        // devices' state and its monitor answers nothing until done, while the confirmation
        // must not wait.
        let ask = || async {
            qemu_migrate::status(qmp)
                .await
                .ok()
                .map(|status| status.status.unwrap_or_else(|| "none".into()))
        };
        let mut status = ask().await;
        let mut completed_at: Option<Instant> = None;
        let mut has_confirmed = false;
        loop {
            let request = cluster
                .borrow_and_update()
                .migrations
                .get(key)
                .filter(|m| m.value.id == confirmed.id)
                .map(|m| m.value.phase);
            let holds_lock = may_run
                .as_mut()
                .is_some_and(|m| m.borrow_and_update().contains(key));
            let incoming = status
                .clone()
                .filter(|_| crate::qemu::process::is_alive(pid));
            if incoming.as_deref() == Some("completed") {
                let since = *completed_at.get_or_insert_with(Instant::now);
                if !holds_lock && since.elapsed() > LOCK_WAIT {
                    return TargetStep::Discard(format!(
                        "the stream is in but this host was not given the lock within {}s",
                        LOCK_WAIT.as_secs()
                    ));
                }
            }
            match record::target_step(request, holds_lock, incoming.as_deref(), has_confirmed) {
                TargetStep::Wait => {}
                TargetStep::Confirm => {
                    if let Err(e) = self.shell.arrivals.confirm(&arrival.vm).await {
                        return TargetStep::Discard(format!(
                            "recording the confirmation in the state dir: {e:#}"
                        ));
                    }
                    if let Err(e) = store.answer(key, confirmed, confirmed.lease).await {
                        return TargetStep::Discard(format!("confirming the switchover: {e:#}"));
                    }
                    has_confirmed = true;
                    continue;
                }
                decided => return decided,
            }
            // The lock (may_run), the request (the cluster view) and the stream (QEMU's events)
            // each wake this at once.
            let lock_moves = async {
                let changed = match may_run.as_mut() {
                    Some(m) => m.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = cluster.changed() => {}
                _ = lock_moves => {}
                change = qemu_migrate::next_change(&mut events, PROGRESS) => match change {
                    qemu_migrate::Change::Status(now) => status = Some(now),
                    qemu_migrate::Change::Missed => status = ask().await,
                    qemu_migrate::Change::Closed | qemu_migrate::Change::Quiet => {}
                }
            }
        }
    }

    /// A VM that arrived runs here as it ran there: one not started by `autostart` gets an
    /// operator start (else the next reconcile would stop it).
    pub(super) async fn keep_running_here(&self, vm: &str, running: &RunningConfig) {
        let autostart = self
            .declared(vm)
            .map_or(running.boot_spec.autostart, |s| s.autostart);
        if !autostart {
            let started = Some(super::operator::OperatorIntent::Started);
            if let Err(e) = self.record_operator(vm, started).await {
                tracing::error!(vm = %vm, "migration: recording the arrived VM as started: {e:#}");
            }
        }
    }
}

/// When the source reached each step of the switchover (its guest paused at the first), by
/// this agent's monotonic clock, and the wall-clock instants of the downtime's bounds.
struct Switchover {
    /// When this agent saw the pause.
    paused: Instant,
    /// QEMU's pause (its `STOP`).
    paused_wall: SystemTime,
    confirmed: Instant,
    lock_sent: SystemTime,
    locked: Instant,
}

/// Keeps the VM's status and the caller's progress channel in step.
struct Reporter {
    slot: Arc<VmSlot>,
    progress: watch::Sender<MigrationProgress>,
}

impl Reporter {
    fn new(
        slot: &Arc<VmSlot>,
        progress: watch::Sender<MigrationProgress>,
        direction: &str,
        peer: &str,
    ) -> Self {
        progress.send_modify(|p| {
            p.direction = direction.to_owned();
            p.peer = peer.to_owned();
        });
        let reporter = Reporter {
            slot: Arc::clone(slot),
            progress,
        };
        reporter.sync();
        reporter
    }

    fn stage(&self, stage: &str, copied: &[String]) {
        self.update(|p| {
            p.stage = stage.to_owned();
            if !copied.is_empty() {
                p.copied_disks = copied.to_vec();
            }
        });
    }

    fn update(&self, f: impl FnOnce(&mut MigrationProgress)) {
        self.progress.send_modify(f);
        self.sync();
    }

    fn sync(&self) {
        let now = self.progress.borrow().clone();
        self.slot.update_status(|s| {
            s.state = VmState::Migrating;
            s.migration = Some(now);
        });
    }
}

/// `address:port`, bracketing an IPv6 address.
fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
