//! One VM as the daemon holds it: its QEMU connection (if any) and a status snapshot.
//!
//! Everything that talks to a VM's QEMU goes through its runtime lock, so operations on one VM
//! are serialized while VMs stay independent. The status snapshot is separate and never held
//! across an await: `status` answers even while a VM is busy shutting down.
//!
//! The snapshot remembers when it was last read from QEMU (`read_at`); anything the agent does to
//! the VM (every other user of the runtime lock, see `change`) forgets that, so a `status` asked
//! after a change always reads QEMU again, while `status` asked many times a second reads it at
//! most once per `fresh_for` (200 clients asking at once cost one QMP round per VM, not 200).
//!
//! A QEMU of this VM that the agent cannot manage (it does not answer on QMP, its pidfile or boot
//! spec is wrong, see `identity`) is held as `untouchable`: shown `unresponsive` with why, never
//! started beside, looked at again on every observe (adopted once it can be, forgotten once it is
//! gone), and killed only by `plasmavmc stop --force`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::saves;
use crate::action::Action;
use crate::chainfire::{HaGate, VmKey};
use crate::control::protocol::StepOutcome;
use crate::events::What;
use crate::migration::{running, RunningConfig};
use crate::observed::ObservedVm;
use crate::paths::{RunDir, SavedDir};
use crate::qemu::lifecycle::{self, ResetOutcome, StopOutcome};
use crate::qemu::live::{apply_live, LiveError, LiveOutcome};
use crate::qemu::process::{AlreadyRuns, Found};
use crate::qemu::{
    cgroup, confine, images, observe, process, Confinement, Guard, QemuEvent, Qmp, RunningQemu,
};
use crate::save::{self, SavedRecord};
use crate::spec::{DiskSpec, VmSpec};
use crate::status::{Device, DiskStatus, VmState, VmStatus};
use crate::{devices, ids};

/// How long a freshly launched QEMU may take to answer on QMP (TCG on a loaded host is slow).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
const ADOPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SIGKILLed QEMU may take to be gone.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// What every VM needs from the daemon: where things are, how long to wait, whom to tell.
pub struct Shell {
    pub run_dir: RunDir,
    /// Where managed saves live (`<state-dir>/saved`).
    pub saved: SavedDir,
    pub qemu: PathBuf,
    pub stop_timeout: Duration,
    pub unplug_timeout: Duration,
    /// As whom and in which cgroup every QEMU runs.
    pub confinement: Confinement,
    pub events: mpsc::UnboundedSender<VmEvent>,
    /// With `--chainfire`: HA VMs start under a fence guard.
    pub fencing: Option<Fencing>,
    /// What happens, for `plasmavmc events`.
    pub journal: super::journal::Journal,
    /// The moves arriving here, kept in the state dir.
    pub arrivals: super::arrivals::Arrivals,
}

/// How HA VMs are launched under a fence guard: this binary, the lease trust file, and which
/// lease each VM's lock is bound to now.
pub struct Fencing {
    pub guard_exe: PathBuf,
    pub trust_file: PathBuf,
    pub gate: HaGate,
}

impl Fencing {
    /// The guard for VM `name` starting now; an error if this host may not run it (it lost the
    /// lock or the lease between the plan and the start).
    fn guard(&self, name: &str, spec: &VmSpec) -> Result<Guard> {
        let key = VmKey::new(&spec.org_id, &spec.project_id, name);
        let lease = self
            .gate
            .lease_for(&key)
            .context("HA: this host no longer holds the VM's lock under a trusted lease")?;
        Ok(self.guard_under(lease))
    }

    /// The guard of a QEMU bound to `lease` before it holds the VM's lock: a migration
    /// target's incoming QEMU, which never resumes the guest without the lock.
    fn guard_under(&self, lease: i64) -> Guard {
        Guard {
            exe: self.guard_exe.clone(),
            trust_file: self.trust_file.clone(),
            lease,
        }
    }
}

/// What a VM's QEMU tells the daemon without being asked.
#[derive(Debug)]
pub enum VmEvent {
    /// The QMP connection `generation` closed; `clean` if QEMU announced a shutdown first.
    Exited {
        vm: String,
        generation: u64,
        clean: bool,
    },
    /// A device went away (an unplug the guest finished late): time to clean up after it.
    DeviceDeleted {
        vm: String,
    },
    UnplugRefused {
        vm: String,
        device: String,
    },
    GuestPanicked {
        vm: String,
    },
}

impl VmEvent {
    pub fn vm(&self) -> &str {
        match self {
            VmEvent::Exited { vm, .. }
            | VmEvent::DeviceDeleted { vm }
            | VmEvent::UnplugRefused { vm, .. }
            | VmEvent::GuestPanicked { vm } => vm,
        }
    }
}

pub struct VmSlot {
    pub name: String,
    /// Held across one reconcile of this VM (observe → plan → execute); owned by a task that
    /// settles a move left unfinished by the previous agent until it is settled.
    pub reconciling: Arc<tokio::sync::Mutex<()>>,
    runtime: tokio::sync::Mutex<Runtime>,
    status: Mutex<VmStatus>,
    /// The disk images its QEMU had attached when last seen (see `handover`).
    images: Mutex<BTreeSet<PathBuf>>,
    /// A status refresh runs (at most one at a time, so a silent QEMU never piles them up).
    refreshing: AtomicBool,
    /// When the refresh running now (if any) was claimed.
    refresh_claimed_at: Mutex<Option<Instant>>,
    /// Counts the status refreshes that ended, for requests waiting on one.
    refreshes: watch::Sender<u64>,
    /// When the snapshot was last read from QEMU with nothing done to the VM since (None: never,
    /// or something was done).
    read_at: Mutex<Option<Instant>>,
    /// The disks as last declared (kept while still plugged after their declaration went), so a
    /// disk removed from the declaration is known to have said `deleteOnRemove`. Lost with the
    /// agent: then images are kept, never deleted by mistake.
    declared_disks: Mutex<BTreeMap<String, DiskSpec>>,
    /// QMP counters, the QEMU to sample and its last sample (`/metrics`).
    pub metrics: super::metrics::SlotMetrics,
}

#[derive(Default)]
struct Runtime {
    conn: Option<Conn>,
    /// A process of this VM the agent does not manage (see the module doc).
    untouchable: Option<AlreadyRuns>,
    generation: u64,
    /// Devices the guest was asked to release that it still holds (by QEMU device id).
    unplugging: BTreeSet<String>,
}

struct Conn {
    qmp: Arc<Qmp>,
    pid: u32,
    boot_spec: VmSpec,
    started: Instant,
    watcher: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// What `VmSlot::restore` did.
enum Restore {
    Restored,
    NoSave,
    /// There was a save, set aside as unrestorable: why, for the status.
    SetAside(String),
}

/// A QEMU that went away, as `VmSlot::on_exit` found it.
pub struct Exit {
    pub ran_for: Duration,
    pub clean: bool,
    pub reason: String,
    /// Why its fence guard killed it, if it did.
    pub fenced: Option<String>,
}

impl VmSlot {
    pub fn new(name: &str, declared: bool) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            reconciling: Default::default(),
            runtime: Default::default(),
            status: Mutex::new(VmStatus::stopped(declared)),
            images: Default::default(),
            refreshing: AtomicBool::new(false),
            refresh_claimed_at: Mutex::new(None),
            refreshes: watch::channel(0).0,
            read_at: Mutex::new(None),
            declared_disks: Default::default(),
            metrics: Default::default(),
        })
    }

    /// The disk images its QEMU had attached when last seen.
    pub fn held_images(&self) -> BTreeSet<PathBuf> {
        self.images.lock().expect("images lock").clone()
    }

    fn set_images<'a>(&self, paths: impl IntoIterator<Item = &'a PathBuf>) {
        *self.images.lock().expect("images lock") = paths.into_iter().cloned().collect();
    }

    /// Remembers the disks of the declaration just planned against (see `declared_disks`).
    pub fn remember_declared(&self, spec: Option<&VmSpec>) {
        let mut declared = self.declared_disks.lock().expect("declared disks lock");
        declared.extend(spec.iter().flat_map(|spec| spec.disks.clone()));
    }

    /// The snapshot, with the uptime as of now.
    pub fn status(&self) -> VmStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut VmStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A slot for a process of this VM the agent cannot take over (found at startup).
    pub async fn hold_untouchable(&self, already: AlreadyRuns) {
        let mut rt = self.change().await;
        self.set_untouchable(&mut rt, already);
    }

    fn set_untouchable(&self, rt: &mut Runtime, already: AlreadyRuns) {
        tracing::warn!(vm = %self.name, pid = already.pid, "unresponsive, left alone: {}", already.reason);
        self.update_status(|s| {
            s.state = VmState::Unresponsive;
            s.pid = Some(already.pid);
            s.state_reason = Some(format!(
                "{}; nothing is started beside it (`plasmavmc stop --force {}` kills it)",
                already.reason, self.name
            ));
        });
        rt.untouchable = Some(already);
    }

    /// The right to run the one status refresh of this VM (None: one already runs, so a silent
    /// QEMU never piles them up).
    pub fn claim_refresh(self: &Arc<Self>) -> Option<RefreshClaim> {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return None;
        }
        *self
            .refresh_claimed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        Some(RefreshClaim(Arc::clone(self)))
    }

    /// When the status refresh running now was claimed (None: none runs).
    pub fn refresh_claimed_at(&self) -> Option<Instant> {
        *self
            .refresh_claimed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the snapshot was read from QEMU less than `fresh_for` ago and nothing was done to
    /// the VM since.
    pub fn is_fresh(&self, fresh_for: Duration) -> bool {
        self.read_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < fresh_for)
    }

    /// Tells when the status refreshes running now (or claimed after this call) end.
    pub fn refreshes(&self) -> watch::Receiver<u64> {
        self.refreshes.subscribe()
    }

    fn set_read_at(&self, at: Option<Instant>) {
        *self.read_at.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    /// The runtime lock, for doing something to the VM: the snapshot is no longer fresh.
    async fn change(&self) -> tokio::sync::MutexGuard<'_, Runtime> {
        let rt = self.runtime.lock().await;
        self.set_read_at(None);
        rt
    }

    /// Takes over a QEMU found running (identity already checked): reconnects QMP, nothing else.
    pub async fn adopt(&self, shell: &Shell, running: RunningQemu) -> Result<()> {
        let qmp = self.connect_to(shell, running.pid).await?;
        let started = Instant::now() - process_uptime(running.pid).unwrap_or_default();
        let mut rt = self.change().await;
        self.connect(&mut rt, shell, qmp, running.pid, running.boot_spec, started);
        self.started(shell, running.pid, "adopted");
        Ok(())
    }

    /// An untouchable QEMU, looked at again: gone (forgotten: the VM may start), adoptable now
    /// (adopted), or still untouchable (`Err`, with why).
    async fn look_again(&self, rt: &mut Runtime, shell: &Shell) -> Result<()> {
        let vm_dir = shell.run_dir.vm(&self.name);
        let (name, dir) = (self.name.clone(), vm_dir.clone());
        let found = tokio::task::spawn_blocking(move || process::find(&name, &dir))
            .await
            .context("scanning for the VM's processes")?;
        let already = match found {
            Found::Absent => {
                tracing::info!(vm = %self.name, "the unresponsive QEMU is gone");
                rt.untouchable = None;
                let _ = process::clear_runtime_files(&self.name, &vm_dir);
                self.update_status(|s| {
                    let declared = s.declared;
                    *s = VmStatus {
                        last_error: s.last_error.take(),
                        restarts: s.restarts,
                        ..VmStatus::stopped(declared)
                    };
                });
                return Ok(());
            }
            Found::Running(running) => {
                let pid = running.pid;
                match self.connect_to(shell, running.pid).await {
                    Ok(qmp) => {
                        tracing::info!(vm = %self.name, pid, "adopted the QEMU that was unresponsive");
                        rt.untouchable = None;
                        let started = Instant::now() - process_uptime(pid).unwrap_or_default();
                        self.connect(rt, shell, qmp, pid, running.boot_spec, started);
                        self.started(shell, pid, "adopted");
                        return Ok(());
                    }
                    Err(e) => AlreadyRuns {
                        pid,
                        reason: format!("{e:#}"),
                    },
                }
            }
            Found::Untouchable(already) => already,
        };
        let error = already.to_string();
        if rt.untouchable.as_ref() != Some(&already) {
            self.set_untouchable(rt, already);
        }
        bail!("unresponsive: {error}")
    }

    /// A QMP connection to this VM's QEMU `pid`, which runs already.
    async fn connect_to(&self, shell: &Shell, pid: u32) -> Result<Qmp> {
        let socket = shell.run_dir.vm(&self.name).qmp_socket();
        Qmp::connect(&socket, ADOPT_TIMEOUT)
            .await
            .with_context(|| silence(pid, Instant::now() - ADOPT_TIMEOUT))
    }

    /// Reads the VM back from QEMU (None: no QEMU) and refreshes the status snapshot with the
    /// devices QEMU reports. Waits at most `wait` for a busy VM (then: `Err`). `Err` too while a
    /// QEMU of this VM exists that cannot be read: the planner must not take it for absent.
    pub async fn observe(&self, shell: &Shell, wait: Duration) -> Result<Option<ObservedVm>> {
        let mut rt = tokio::time::timeout(wait, self.runtime.lock())
            .await
            .context("busy with another operation")?;
        let reading_since = Instant::now();
        if rt.untouchable.is_some() {
            self.look_again(&mut rt, shell).await?;
        }
        let Some(conn) = &rt.conn else {
            self.set_read_at(Some(reading_since));
            return Ok(None);
        };
        let read = async {
            let mut observed =
                observe::observe(&conn.qmp, conn.pid, conn.boot_spec.clone()).await?;
            observed.limits = cgroup::read_limits(&self.name, conn.pid);
            Ok::<_, anyhow::Error>((observed, observe::peripherals(&conn.qmp).await?))
        };
        let (mut observed, peripherals) = match read.await {
            Ok(read) => read,
            Err(e) => {
                if let Some(since) = conn.qmp.silent_since() {
                    let reason = silence(conn.pid, since);
                    self.update_status(|s| {
                        s.state = VmState::Unresponsive;
                        s.state_reason = Some(reason.clone());
                    });
                    bail!("unresponsive: {reason}");
                }
                return Err(e);
            }
        };
        {
            let mut declared = self.declared_disks.lock().expect("declared disks lock");
            declared.retain(|id, _| observed.disks.contains_key(id));
            for (id, disk) in &mut observed.disks {
                disk.delete_on_remove = declared
                    .get(id)
                    .is_some_and(|d| d.delete_on_remove && d.path == disk.path);
            }
        }
        let (pid, started) = (conn.pid, conn.started);
        for released in crate::events::released_late(&mut rt.unplugging, |device| {
            peripherals.contains_key(device)
        }) {
            tracing::info!(vm = %self.name, ?released, "the guest released a device late");
            shell.journal.vm(&self.name, released);
        }
        observed.unplugging = rt.unplugging.clone();
        self.set_images(observed.disks.values().map(|disk| &disk.path));
        self.update_status(|s| {
            s.state = if s.migration.is_some() {
                VmState::Migrating // a move in flight says so until it ends
            } else if observed.paused {
                VmState::Paused
            } else {
                VmState::Running
            };
            s.state_reason = None;
            s.pid = Some(pid);
            s.uptime_seconds = Some(started.elapsed().as_secs());
            s.devices = peripherals
                .iter()
                .filter(|(_, kind)| Device::is_listed(kind))
                .map(|(id, kind)| Device::from_qom(id, kind))
                .collect();
            s.unplugging = observed.unplugging.iter().cloned().collect();
            s.disks = observed
                .disks
                .iter()
                .map(|(id, disk)| {
                    let status = DiskStatus {
                        path: disk.path.display().to_string(),
                        size_mib: disk.size_bytes.div_ceil(devices::MIB),
                    };
                    (id.clone(), status)
                })
                .collect();
        });
        self.set_read_at(Some(reading_since));
        Ok(Some(observed))
    }

    /// Executes this VM's steps in order. A removal that fails or waits for the guest blocks the
    /// add of the same id after it (a replacement); a failed start/stop ends the sequence.
    /// Consecutive disk and NIC removals run together, so guests that ignore their unplugs cost
    /// one unplug timeout, not one per device. `progress` carries what earlier steps of the same plan decided (a plan may be executed
    /// in parts).
    pub async fn execute(
        &self,
        shell: &Shell,
        actions: &[Action],
        progress: &mut Progress,
    ) -> Vec<StepOutcome> {
        let mut rt = self.change().await;
        panic_if_injected(&self.name);
        let mut outcomes = Vec::with_capacity(actions.len());
        for batch in removal_batches(actions) {
            if batch.len() > 1 && batch.iter().all(|action| progress.skip(action).is_none()) {
                let results = self.remove_devices(&mut rt, shell, batch).await;
                for (action, result) in batch.iter().zip(results) {
                    let outcome = self.settle(progress, action, result);
                    self.journal_step(shell, action, &outcome);
                    outcomes.push(outcome);
                }
                continue;
            }
            for action in batch {
                if let Some(reason) = progress.skip(action) {
                    outcomes.push(StepOutcome::Skipped { reason });
                    continue;
                }
                let result = self.execute_one(&mut rt, shell, action).await;
                let outcome = self.settle(progress, action, result);
                self.journal_step(shell, action, &outcome);
                outcomes.push(outcome);
            }
        }
        outcomes
    }

    /// The event a step made, if any (starts and stops make theirs where they happen).
    fn journal_step(&self, shell: &Shell, action: &Action, outcome: &StepOutcome) {
        let what = match (outcome, action) {
            (StepOutcome::Done, _) => crate::events::of_step(action, false),
            (StepOutcome::Unplugging { .. }, _) => crate::events::of_step(action, true),
            (StepOutcome::Failed { error }, Action::StartVm { .. } | Action::RestartVm { .. }) => {
                Some(What::Failed {
                    reason: format!("start failed: {error}"),
                })
            }
            _ => None,
        };
        if let Some(what) = what {
            shell.journal.vm(&self.name, what);
        }
    }

    /// Says a QEMU of this VM runs now.
    fn started(&self, shell: &Shell, pid: u32, how: &str) {
        let how = how.to_owned();
        shell.journal.vm(&self.name, What::Started { pid, how });
    }

    /// A step's result as reported, and what it means for the steps after it.
    fn settle(
        &self,
        progress: &mut Progress,
        action: &Action,
        result: Result<StepOutcome>,
    ) -> StepOutcome {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(vm = %self.name, ?action, "step failed: {error}");
                self.update_status(|s| s.last_error = Some(error.clone()));
                StepOutcome::Failed { error }
            }
        };
        match (&outcome, action) {
            (StepOutcome::Done, _) => {}
            (_, Action::StartVm { .. } | Action::StopVm { .. } | Action::RestartVm { .. }) => {
                progress.halted = Some("an earlier lifecycle step failed".into())
            }
            _ => progress.blocked.extend(device_of(action)),
        }
        outcome
    }

    /// Disk and NIC removals at once: every `device_del` goes out, then the guests' answers are
    /// awaited together.
    async fn remove_devices(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        removals: &[Action],
    ) -> Vec<Result<StepOutcome>> {
        let Some(conn) = rt.conn.as_ref() else {
            return removals
                .iter()
                .map(|_| Err(anyhow::anyhow!("VM is not running")))
                .collect();
        };
        let (qmp, boot_spec) = (conn.qmp.clone(), conn.boot_spec.clone());
        let results = join_all(removals.iter().map(|action| {
            let run_as = shell.confinement.run_as.as_ref();
            apply_live(
                &qmp,
                &self.name,
                &boot_spec,
                action,
                shell.unplug_timeout,
                run_as,
            )
        }))
        .await;
        removals
            .iter()
            .zip(results)
            .map(|(action, result)| record_live(rt, action, result))
            .collect()
    }

    async fn execute_one(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        action: &Action,
    ) -> Result<StepOutcome> {
        match action {
            Action::StartVm { spec } => self.start(rt, shell, spec).await?,
            Action::StopVm { reason } => self.stop(rt, shell, reason).await?,
            Action::RestartVm { spec, reason } => {
                self.stop(rt, shell, reason).await?;
                self.start(rt, shell, spec).await?;
            }
            Action::SetLimits { to, .. } => {
                let conn = rt.conn.as_ref().context("VM is not running")?;
                cgroup::set_limits(&self.name, conn.pid, to)?;
            }
            live => {
                let conn = rt.conn.as_ref().context("VM is not running")?;
                if let Action::AddDisk { id, disk } = live {
                    let run_as = shell.confinement.run_as.as_ref();
                    images::prepare(&images::qemu_img(&shell.qemu), id, disk, run_as).await?;
                }
                let result = apply_live(
                    &conn.qmp,
                    &self.name,
                    &conn.boot_spec,
                    live,
                    shell.unplug_timeout,
                    shell.confinement.run_as.as_ref(),
                )
                .await;
                return record_live(rt, live, result);
            }
        }
        Ok(StepOutcome::Done)
    }

    /// Starts the VM: restored from its managed save when it has one that fits `spec`, booted
    /// fresh otherwise.
    async fn start(&self, rt: &mut Runtime, shell: &Shell, spec: &VmSpec) -> Result<()> {
        if let Some(conn) = &rt.conn {
            bail!("already running as pid {}", conn.pid);
        }
        if let Some(already) = &rt.untouchable {
            bail!("not started: {already}");
        }
        let set_aside = match self.restore(rt, shell, spec).await? {
            Restore::Restored => return Ok(()),
            Restore::NoSave => None,
            Restore::SetAside(why) => Some(why),
        };
        let (pid, qmp) = self.launch(rt, shell, spec, &[]).await?;
        self.connect(rt, shell, qmp, pid, spec.clone(), Instant::now());
        self.started(shell, pid, "booted");
        // A save set aside stays the VM's last error: the operator has something to look at.
        self.update_status(|s| {
            s.last_error = set_aside;
            s.state_reason = None;
        });
        Ok(())
    }

    /// Launches QEMU for `spec` (plus `extra` arguments) and connects to its QMP. On failure
    /// nothing is left behind: a QEMU launched for nothing is killed (and waited for) before
    /// anything can retry, its taps, cgroup and runtime files go, and the status says `failed`.
    /// A QEMU of this VM found already running is left alone and makes the VM untouchable.
    async fn launch(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        spec: &VmSpec,
        extra: &[&str],
    ) -> Result<(u32, Qmp)> {
        self.launch_running(rt, shell, &RunningConfig::booting(spec), extra, None)
            .await
    }

    /// `launch` of a running configuration (a migration target's, with `incoming_lease`: the
    /// lease its fence guard watches before it holds the VM's lock).
    async fn launch_running(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        running: &RunningConfig,
        extra: &[&str],
        incoming_lease: Option<i64>,
    ) -> Result<(u32, Qmp)> {
        let spec = &running.spec;
        self.update_status(|s| s.state = VmState::Starting);
        let vm_dir = shell.run_dir.vm(&self.name);
        let mut launched_pid = None;
        let launched = async {
            let guard = match (&shell.fencing, incoming_lease) {
                (Some(fencing), Some(lease)) => Some(fencing.guard_under(lease)),
                (Some(fencing), None) if spec.ha.enable => Some(fencing.guard(&self.name, spec)?),
                _ => None,
            };
            let confinement = &shell.confinement;
            images::prepare_all(
                &images::qemu_img(&shell.qemu),
                spec,
                confinement.run_as.as_ref(),
            )
            .await
            .with_context(|| format!("preparing the disks of VM {}", self.name))?;
            lifecycle::prepare_host_devices(&self.name, spec, confinement.run_as.as_ref())?;
            let launcher = process::Launcher {
                name: &self.name,
                vm_dir: &vm_dir,
                qemu: &shell.qemu,
                guard: guard.as_ref(),
                confinement,
            };
            let pid = launcher.launch_running(running, extra)?;
            launched_pid = Some(pid);
            let qmp = process::qmp_after_launch(pid, &vm_dir, LAUNCH_TIMEOUT).await?;
            Ok::<_, anyhow::Error>((pid, qmp))
        }
        .await;
        let e = match launched {
            Ok(launched) => return Ok(launched),
            Err(e) => e,
        };
        if let Some(already) = e.downcast_ref::<AlreadyRuns>() {
            // Not ours to clean up after: its taps, pidfile and socket stay as they are.
            self.set_untouchable(rt, already.clone());
            return Err(e.context(format!("VM {} not started", self.name)));
        }
        if let Some(pid) = launched_pid {
            if !self.kill_launched(rt, pid, &e).await {
                return Err(e.context(format!("starting VM {}", self.name)));
            }
        }
        self.launch_failed(shell, spec);
        Err(e.context(format!("starting VM {}", self.name)))
    }

    /// Kills a QEMU launched for nothing: gone for sure before anything retries. False (and the
    /// VM untouchable) when it does not die.
    async fn kill_launched(&self, rt: &mut Runtime, pid: u32, why: &anyhow::Error) -> bool {
        let _ = lifecycle::kill(pid);
        if process::wait_for_exit(pid, EXIT_WAIT).await {
            return true;
        }
        self.set_untouchable(
            rt,
            AlreadyRuns {
                pid,
                reason: format!("it failed to start ({why:#}) and did not die on SIGKILL"),
            },
        );
        false
    }

    /// Cleans up after a QEMU that never became usable (it is gone already).
    fn launch_failed(&self, shell: &Shell, spec: &VmSpec) {
        let _ = lifecycle::release_host_devices(&self.name, spec);
        if let Some(cgroups) = &shell.confinement.cgroups {
            cgroups.remove(&self.name);
        }
        let _ = process::clear_runtime_files(&self.name, &shell.run_dir.vm(&self.name));
        self.update_status(|s| {
            *s = VmStatus {
                state: VmState::Failed,
                ..VmStatus::stopped(s.declared)
            }
        });
    }

    /// Restores the VM from its managed save, if it has one that fits `declared`. A save that
    /// cannot be restored is set aside (kept, logged, shown in `status`): the caller boots fresh.
    async fn restore(&self, rt: &mut Runtime, shell: &Shell, declared: &VmSpec) -> Result<Restore> {
        let (state, record) = match saves::committed(&shell.saved, &self.name) {
            Ok(None) => return Ok(Restore::NoSave),
            Ok(Some(save)) => save,
            Err(e) => return Ok(self.set_save_aside(shell, &format!("{e:#}"))),
        };
        if let Err(why) = save::restore_verdict(&self.name, &record, declared) {
            return Ok(self.set_save_aside(shell, &why));
        }
        tracing::info!(vm = %self.name, saved_by = %record.qemu_version, "restoring from the managed save");
        let spec = &record.spec;
        let (pid, qmp) = self
            .launch(rt, shell, spec, &["-S", "-incoming", "defer"])
            .await?;
        let vm_dir = shell.run_dir.vm(&self.name);
        let log_tail = || process::qemu_log_tail(&vm_dir);
        // QEMU binds the incoming socket in its VM dir, sealed since the launch: an unprivileged
        // QEMU may write there for as long as the load runs, as for its own sockets at launch.
        let loaded = async {
            confine::open_vm_dir(&vm_dir, shell.confinement.run_as.as_ref())?;
            let loaded = crate::qemu::save::load_from_file(
                &qmp,
                pid,
                &vm_dir.migration_socket(),
                &state,
                log_tail,
            )
            .await;
            confine::seal_vm_dir(&vm_dir)?;
            loaded
        }
        .await
        // Consumed before the guest runs: a save is never restored twice.
        .and_then(|()| saves::consume(&shell.saved, &self.name));
        if let Err(e) = loaded {
            let _ = lifecycle::stop(None, pid, Duration::ZERO).await;
            self.launch_failed(shell, spec);
            return Ok(self.set_save_aside(
                shell,
                &format!(
                    "QEMU could not load it (saved by QEMU {}): {e:#}",
                    record.qemu_version
                ),
            ));
        }
        if let Err(e) = qmp.cont().await {
            // The save is gone already and the state lives only in this QEMU: keep it, paused.
            tracing::error!(vm = %self.name, pid, "restored but could not resume the guest: {e}");
        }
        self.connect(rt, shell, qmp, pid, spec.clone(), Instant::now());
        self.started(shell, pid, "restored");
        self.update_status(|s| s.last_error = None);
        tracing::info!(vm = %self.name, pid, "restored from the managed save");
        Ok(Restore::Restored)
    }

    /// Sets the committed save aside as unrestorable, says so in the log and the status.
    fn set_save_aside(&self, shell: &Shell, why: &str) -> Restore {
        let message = match saves::set_aside(&shell.saved, &self.name, why) {
            Ok(kept) => format!(
                "the managed save could not be restored ({why}); it is kept at {} and the VM boots fresh",
                kept.display()
            ),
            Err(e) => format!(
                "the managed save could not be restored ({why}) nor set aside ({e:#}); the VM boots fresh"
            ),
        };
        tracing::error!(vm = %self.name, "{message}");
        self.update_status(|s| s.last_error = Some(message.clone()));
        Restore::SetAside(message)
    }

    /// Managed save: stops the guest, writes its whole state under the state dir, commits the
    /// save, then quits QEMU. The VM's next start restores it. Refused (the VM untouched) when
    /// the VM was changed live since it booted.
    pub async fn save(&self, shell: &Shell) -> Result<String> {
        let mut rt = self.change().await;
        let conn = rt
            .conn
            .as_ref()
            .with_context(|| format!("VM {} is not running", self.name))?;
        if let Some(existing) = saves::committed(&shell.saved, &self.name).ok().flatten() {
            bail!(
                "VM {} already has a save that was never restored ({}); set it aside by hand first",
                self.name,
                existing.0.display()
            );
        }
        let mut observed = observe::observe(&conn.qmp, conn.pid, conn.boot_spec.clone()).await?;
        observed.unplugging = rt.unplugging.clone();
        if let Some(why) = save::save_blocker(&self.name, &conn.boot_spec, &observed) {
            bail!(why);
        }
        let started = Instant::now();
        let partial = saves::begin(&shell.saved, &self.name)?;
        let socket = shell.run_dir.vm(&self.name).migration_socket();
        self.update_status(|s| s.state = VmState::Saving);
        let written = match crate::qemu::save::save_to_file(
            &conn.qmp,
            &socket,
            &crate::paths::saved_state(&partial),
            shell.confinement.run_as.as_ref().map(|u| (u.uid, u.gid)),
        )
        .await
        {
            Ok(written) => written,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                self.update_status(|s| s.state = VmState::Running);
                return Err(e);
            }
        };
        let record = SavedRecord {
            format: save::RECORD_FORMAT,
            spec: conn.boot_spec.clone(),
            qemu_version: written.qemu_version,
            saved_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            bytes: written.bytes,
        };
        if let Err(e) = saves::commit(&shell.saved, &self.name, &partial, &record) {
            let _ = std::fs::remove_dir_all(&partial);
            let _ = conn.qmp.cont().await;
            self.update_status(|s| s.state = VmState::Running);
            return Err(e);
        }
        // Committed: from here the save is the VM. QEMU (paused since the save) goes.
        let conn = rt.conn.take().expect("checked above");
        if let Err(e) = lifecycle::force_quit(Some(&conn.qmp), conn.pid).await {
            tracing::error!(vm = %self.name, pid = conn.pid, "saved, but QEMU would not exit: {e:#}");
        }
        self.forget_process(&mut rt, shell, &conn.boot_spec);
        shell.journal.vm(
            &self.name,
            What::Stopped {
                reason: "saved (managed save; the next start restores it)".into(),
            },
        );
        self.update_status(|s| {
            let declared = s.declared;
            *s = VmStatus {
                state: VmState::Saved,
                restarts: s.restarts,
                ..VmStatus::stopped(declared)
            };
        });
        Ok(format!(
            "{}: saved ({} MiB in {:.2} s) to {}; the next start restores it",
            self.name,
            record.bytes >> 20,
            started.elapsed().as_secs_f64(),
            shell.saved.committed(&self.name).display()
        ))
    }

    /// After adopting a QEMU whose VM also has a committed save (an agent that died between
    /// committing a save and quitting QEMU, or between launching a restore and consuming it):
    /// a QEMU whose guest never ran past the save is quit and the save stays; a guest that runs
    /// is newer than the save, which is set aside.
    pub async fn settle_save(&self, shell: &Shell) {
        if !shell.saved.committed(&self.name).is_dir() {
            return;
        }
        let mut rt = self.change().await;
        let Some(conn) = rt.conn.as_ref() else { return };
        match conn.qmp.query_status().await {
            Ok(status) if status.running => {
                drop(rt);
                self.set_save_aside(
                    shell,
                    "the VM was found running after the save was made: the save is older than the guest",
                );
            }
            _ => {
                tracing::warn!(vm = %self.name, pid = conn.pid, "found a QEMU that never ran past the VM's managed save; quitting it and keeping the save");
                let conn = rt.conn.take().expect("checked above");
                let _ = lifecycle::force_quit(Some(&conn.qmp), conn.pid).await;
                self.forget_process(&mut rt, shell, &conn.boot_spec);
                self.update_status(|s| {
                    *s = VmStatus {
                        state: VmState::Saved,
                        ..VmStatus::stopped(s.declared)
                    }
                });
            }
        }
    }

    /// An operator stop (`plasmavmc stop`): powerdown and wait up to `timeout` (then quit,
    /// then SIGKILL), or with `force` quit at once. `force` also kills an unresponsive QEMU,
    /// with its guard: every process of this VM, found as `identity` finds them.
    pub async fn stop_now(
        &self,
        shell: &Shell,
        timeout: Duration,
        force: bool,
    ) -> Result<StopOutcome> {
        let mut rt = self.change().await;
        if let Some(conn) = rt.conn.take() {
            tracing::info!(vm = %self.name, pid = conn.pid, force, "stopping: operator");
            self.update_status(|s| s.state = VmState::Stopping);
            let stopped = if force {
                lifecycle::force_quit(Some(&conn.qmp), conn.pid).await
            } else {
                lifecycle::stop(Some(&conn.qmp), conn.pid, timeout).await
            };
            return match stopped {
                Ok(outcome) => {
                    tracing::info!(vm = %self.name, ?outcome, "stopped");
                    self.forget_process(&mut rt, shell, &conn.boot_spec);
                    self.mark_stopped();
                    let reason = format!("operator stop ({})", outcome_words(outcome));
                    shell.journal.vm(&self.name, What::Stopped { reason });
                    Ok(outcome)
                }
                Err(e) => {
                    rt.conn = Some(conn);
                    self.update_status(|s| s.state = VmState::Running);
                    Err(e)
                }
            };
        }
        let Some(already) = rt.untouchable.clone() else {
            return Ok(StopOutcome::AlreadyGone);
        };
        if !force {
            bail!(
                "VM {} is unresponsive ({already}); `plasmavmc stop --force {}` kills it",
                self.name,
                self.name
            );
        }
        let vm_dir = shell.run_dir.vm(&self.name);
        let found = process::sighting(&self.name, &vm_dir);
        for pid in found.qemus.iter().chain(&found.guards) {
            tracing::warn!(vm = %self.name, pid, "killing the unresponsive QEMU (stop --force)");
            lifecycle::kill(*pid)?;
        }
        for pid in found.qemus.iter().chain(&found.guards) {
            if !process::wait_for_exit(*pid, EXIT_WAIT).await {
                bail!("pid {pid} did not die on SIGKILL (stuck in the kernel?)");
            }
        }
        rt.untouchable = None;
        process::clear_runtime_files(&self.name, &vm_dir)?;
        self.mark_stopped();
        shell.journal.vm(
            &self.name,
            What::Stopped {
                reason: "operator stop --force (the unresponsive QEMU was killed)".into(),
            },
        );
        Ok(StopOutcome::Killed)
    }

    fn mark_stopped(&self) {
        self.update_status(|s| {
            let declared = s.declared;
            *s = VmStatus {
                last_error: s.last_error.take(),
                restarts: s.restarts,
                ..VmStatus::stopped(declared)
            };
        });
    }

    /// Stops the VM now (ACPI powerdown, `quit` after `timeout`), outside any plan: the host
    /// shutdown.
    pub async fn stop_within(&self, shell: &Shell, reason: &str, timeout: Duration) -> Result<()> {
        let mut rt = self.change().await;
        self.stop_with(&mut rt, shell, reason, timeout).await
    }

    async fn stop(&self, rt: &mut Runtime, shell: &Shell, reason: &str) -> Result<()> {
        self.stop_with(rt, shell, reason, shell.stop_timeout).await
    }

    async fn stop_with(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        reason: &str,
        timeout: Duration,
    ) -> Result<()> {
        let Some(conn) = rt.conn.take() else {
            return Ok(());
        };
        tracing::info!(vm = %self.name, pid = conn.pid, "stopping: {reason}");
        self.update_status(|s| s.state = VmState::Stopping);
        match lifecycle::stop(Some(&conn.qmp), conn.pid, timeout).await {
            Ok(outcome) => {
                tracing::info!(vm = %self.name, ?outcome, "stopped");
                let reason = format!("{reason} ({})", outcome_words(outcome));
                shell.journal.vm(&self.name, What::Stopped { reason });
            }
            Err(e) => {
                rt.conn = Some(conn);
                self.update_status(|s| s.state = VmState::Running);
                return Err(e);
            }
        }
        self.forget_process(rt, shell, &conn.boot_spec);
        self.mark_stopped();
        Ok(())
    }

    /// A QMP connection closed. If it is the current one, QEMU is gone (or is made gone):
    /// clean up after it and say how it ended. None: a stale event (the VM was stopped or
    /// restarted on purpose meanwhile).
    ///
    /// `decide` (the restart policy) runs before the VM's runtime lock is released, so no
    /// reconcile can see the VM gone without also seeing what its exit decided.
    pub async fn on_exit(
        &self,
        shell: &Shell,
        generation: u64,
        clean: bool,
        decide: impl FnOnce(&Exit),
    ) -> Option<Exit> {
        let mut rt = self.change().await;
        if rt.generation != generation || rt.conn.is_none() {
            return None;
        }
        let conn = rt.conn.take().expect("checked above");
        if !process::wait_for_exit(conn.pid, Duration::from_secs(2)).await {
            // The QMP stream broke but QEMU lives: without a monitor it cannot be managed, and a
            // second QEMU must never run beside it. Take it down; the restart policy decides.
            tracing::warn!(vm = %self.name, pid = conn.pid, "QMP closed but QEMU lives; killing it");
            let _ = lifecycle::stop(None, conn.pid, Duration::ZERO).await;
        }
        let vm_dir = shell.run_dir.vm(&self.name);
        let fenced = process::take_fence_marker(&vm_dir);
        let reason = if let Some(fenced) = &fenced {
            fenced.clone()
        } else if clean {
            format!("guest shut down (QEMU pid {} exited)", conn.pid)
        } else {
            let tail = process::qemu_log_tail(&vm_dir);
            let mut reason = format!("QEMU (pid {}) exited unexpectedly", conn.pid);
            if !tail.is_empty() {
                reason.push_str(&format!(": {tail}"));
            }
            reason
        };
        self.forget_process(&mut rt, shell, &conn.boot_spec);
        self.update_status(|s| {
            let declared = s.declared;
            *s = VmStatus {
                state: if clean {
                    VmState::Stopped
                } else {
                    VmState::Failed
                },
                last_error: if clean {
                    s.last_error.take()
                } else {
                    Some(reason.clone())
                },
                restarts: s.restarts,
                ..VmStatus::stopped(declared)
            };
        });
        let what = match &fenced {
            Some(why) => What::Fenced {
                reason: why.clone(),
            },
            None if clean => What::Stopped {
                reason: reason.clone(),
            },
            None => What::Failed {
                reason: reason.clone(),
            },
        };
        shell.journal.vm(&self.name, what);
        let exit = Exit {
            ran_for: conn.started.elapsed(),
            clean,
            reason,
            fenced,
        };
        decide(&exit);
        drop(rt);
        Some(exit)
    }

    /// The configuration this VM's QEMU runs with now (boot spec plus live changes, devices
    /// where they sit), with its QMP connection and PID: what a migration source sends.
    pub async fn running_config(
        &self,
        declared: &VmSpec,
    ) -> Result<(RunningConfig, Arc<Qmp>, u32)> {
        let rt = self.runtime.lock().await;
        let conn = rt
            .conn
            .as_ref()
            .with_context(|| format!("VM {} is not running here", self.name))?;
        if !rt.unplugging.is_empty() {
            bail!(
                "VM {} has devices the guest has not released yet ({}); move it once they are gone",
                self.name,
                rt.unplugging.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        let observed = observe::observe(&conn.qmp, conn.pid, conn.boot_spec.clone()).await?;
        let placements = crate::qemu::migrate::placements(&conn.qmp).await?;
        let cpus = crate::qemu::migrate::cpus(&conn.qmp).await?;
        Ok((
            running::running_config(&observed, placements, cpus, declared),
            conn.qmp.clone(),
            conn.pid,
        ))
    }

    /// The QMP connection of this VM's QEMU, if one runs.
    pub async fn qmp(&self) -> Option<Arc<Qmp>> {
        self.runtime
            .lock()
            .await
            .conn
            .as_ref()
            .map(|c| c.qmp.clone())
    }

    /// A migration target's QEMU: `running`'s devices, paused, waiting for `migrate-incoming`,
    /// under a fence guard bound to `lease`. It is not this VM's QEMU yet (the VM shows no PID,
    /// reconciles and fencing leave it alone) until `adopt_incoming`.
    pub async fn launch_incoming(
        &self,
        shell: &Shell,
        running: &RunningConfig,
        lease: Option<i64>,
    ) -> Result<(u32, Qmp)> {
        let mut rt = self.runtime.lock().await;
        if let Some(conn) = &rt.conn {
            bail!("VM {} already runs here (pid {})", self.name, conn.pid);
        }
        if let Some(already) = &rt.untouchable {
            bail!("VM {} has a QEMU here already: {already}", self.name);
        }
        let launched = self
            .launch_running(
                &mut rt,
                shell,
                running,
                &["-S", "-incoming", "defer"],
                lease,
            )
            .await;
        self.update_status(|s| s.state = VmState::Migrating);
        launched
    }

    /// The incoming QEMU, resumed: from now on it is this VM's.
    pub async fn adopt_incoming(&self, shell: &Shell, qmp: Qmp, pid: u32, boot_spec: VmSpec) {
        let mut rt = self.runtime.lock().await;
        self.connect(&mut rt, shell, qmp, pid, boot_spec, Instant::now());
        self.update_status(|s| {
            s.migration = None;
            s.last_error = None;
            s.state_reason = None;
        });
    }

    /// Kills an incoming QEMU that will not run the guest, and cleans up after it.
    pub async fn discard_incoming(&self, shell: &Shell, pid: u32, running: &RunningConfig) {
        let _ = lifecycle::kill(pid);
        if !process::wait_for_exit(pid, EXIT_WAIT).await {
            let mut rt = self.runtime.lock().await;
            let why = "an incoming migration QEMU did not die on SIGKILL".to_owned();
            self.set_untouchable(&mut rt, AlreadyRuns { pid, reason: why });
            return;
        }
        self.launch_failed(shell, &running.spec);
        self.mark_stopped();
        self.update_status(|s| s.migration = None);
    }

    /// After a completed move: this QEMU (paused since the switchover) quits, never resumed.
    pub async fn quit_migrated(&self, shell: &Shell, to: &str) {
        let mut rt = self.runtime.lock().await;
        let Some(conn) = rt.conn.take() else { return };
        if let Err(e) = lifecycle::force_quit(Some(&conn.qmp), conn.pid).await {
            tracing::error!(vm = %self.name, pid = conn.pid, "migrated, but QEMU would not exit: {e:#}");
        }
        self.forget_process(&mut rt, shell, &conn.boot_spec);
        self.mark_stopped();
        self.update_status(|s| {
            s.migration = None;
            s.state_reason = Some(format!("migrated to {to}"));
        });
    }

    pub async fn reset(&self, shell: &Shell, soft: bool) -> Result<String> {
        let rt = self.change().await;
        let conn = rt
            .conn
            .as_ref()
            .with_context(|| format!("VM {} is not running", self.name))?;
        if !soft {
            lifecycle::reset_hard(&conn.qmp).await?;
            return Ok(format!("{}: hard reset (system_reset)", self.name));
        }
        Ok(
            match lifecycle::reset_soft(&conn.qmp, shell.stop_timeout).await? {
                ResetOutcome::Soft => format!(
                    "{}: soft reset: the guest shut down and started again",
                    self.name
                ),
                ResetOutcome::HardAfterTimeout => format!(
                    "{}: the guest did not shut down within {:?}; it was hard-reset instead",
                    self.name, shell.stop_timeout
                ),
            },
        )
    }

    fn connect(
        &self,
        rt: &mut Runtime,
        shell: &Shell,
        qmp: Qmp,
        pid: u32,
        boot_spec: VmSpec,
        started: Instant,
    ) {
        rt.generation += 1;
        let qmp = Arc::new(qmp.count_into(Arc::clone(&self.metrics.qmp)));
        self.metrics.connected(&qmp, pid, started);
        let watcher = tokio::spawn(watch_events(
            self.name.clone(),
            rt.generation,
            qmp.clone(),
            qmp.subscribe(),
            shell.events.clone(),
        ));
        let fence_guard = crate::qemu::guard::guard_of(pid, &shell.run_dir.vm(&self.name));
        if boot_spec.ha.enable && shell.fencing.is_some() && fence_guard.is_none() {
            tracing::warn!(vm = %self.name, pid, "HA VM runs without a fence guard (it was started standalone or by an older agent): only this agent fences it; restart it to guard it");
        }
        self.set_images(boot_spec.disks.values().map(|disk| &disk.path));
        rt.conn = Some(Conn {
            qmp,
            pid,
            boot_spec,
            started,
            watcher,
        });
        self.update_status(|s| {
            s.state = VmState::Running;
            s.pid = Some(pid);
            s.fence_guard = fence_guard;
            s.uptime_seconds = Some(started.elapsed().as_secs());
        });
    }

    /// After QEMU is gone: delete the taps the agent made for it, its cgroup, and its pidfile and
    /// socket.
    fn forget_process(&self, rt: &mut Runtime, shell: &Shell, boot_spec: &VmSpec) {
        rt.unplugging.clear();
        self.metrics.disconnected();
        self.set_images([]);
        if let Some(cgroups) = &shell.confinement.cgroups {
            cgroups.remove(&self.name);
        }
        if let Err(e) = lifecycle::release_host_devices(&self.name, boot_spec) {
            tracing::warn!(vm = %self.name, "releasing host devices: {e:#}");
        }
        if let Err(e) = process::clear_runtime_files(&self.name, &shell.run_dir.vm(&self.name)) {
            tracing::warn!(vm = %self.name, "{e:#}");
        }
    }
}

/// Forwards what the daemon acts on from one QMP connection, until it closes.
async fn watch_events(
    vm: String,
    generation: u64,
    qmp: Arc<Qmp>,
    mut events: broadcast::Receiver<QemuEvent>,
    tx: mpsc::UnboundedSender<VmEvent>,
) {
    let mut clean = false;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = qmp.disconnected() => Err(broadcast::error::RecvError::Closed),
        };
        let vm = vm.clone();
        let _ = match event {
            Ok(QemuEvent::Shutdown { .. }) => {
                clean = true;
                continue;
            }
            Ok(QemuEvent::DeviceDeleted {
                device: Some(_), ..
            }) => tx.send(VmEvent::DeviceDeleted { vm }),
            Ok(QemuEvent::DeviceUnplugGuestError { device, path }) => {
                tx.send(VmEvent::UnplugRefused {
                    vm,
                    device: device.unwrap_or(path),
                })
            }
            Ok(QemuEvent::GuestPanicked) => tx.send(VmEvent::GuestPanicked { vm }),
            Ok(QemuEvent::Disconnected { after_shutdown }) => {
                let _ = tx.send(VmEvent::Exited {
                    vm,
                    generation,
                    clean: clean || after_shutdown,
                });
                return;
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = tx.send(VmEvent::Exited {
                    vm,
                    generation,
                    clean,
                });
                return;
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
        };
    }
}

/// What the steps so far mean for the next ones.
#[derive(Default)]
pub struct Progress {
    /// Devices whose removal did not complete: their add (a replacement) waits.
    blocked: BTreeSet<String>,
    /// Why every remaining step is skipped, after a lifecycle step failed.
    halted: Option<String>,
}

impl Progress {
    fn skip(&self, action: &Action) -> Option<String> {
        if let Some(reason) = &self.halted {
            return Some(reason.clone());
        }
        device_of(action)
            .filter(|device| self.blocked.contains(device))
            .map(|device| format!("the removal of {device} has not completed"))
    }
}

/// The actions in order, cut so that consecutive disk and NIC removals share a batch and every
/// other action is a batch of its own.
fn removal_batches(actions: &[Action]) -> Vec<&[Action]> {
    let is_removal = |a: &Action| matches!(a, Action::RemoveDisk { .. } | Action::RemoveNic { .. });
    let mut batches = Vec::new();
    let mut rest = actions;
    while !rest.is_empty() {
        let len = rest.iter().take_while(|a| is_removal(a)).count().max(1);
        let (batch, tail) = rest.split_at(len);
        batches.push(batch);
        rest = tail;
    }
    batches
}

/// A live action's result, with the VM's list of devices still being unplugged kept up to date.
fn record_live(
    rt: &mut Runtime,
    action: &Action,
    result: Result<LiveOutcome, LiveError>,
) -> Result<StepOutcome> {
    match result? {
        LiveOutcome::Done => {
            if let Some(device) = device_of(action) {
                rt.unplugging.remove(&device);
            }
            if let Action::RemoveDisk {
                delete_image: Some(image),
                ..
            } = action
            {
                images::delete(image)?;
            }
            Ok(StepOutcome::Done)
        }
        LiveOutcome::Unplugging { device } => {
            rt.unplugging.insert(device.clone());
            Ok(StepOutcome::Unplugging { device })
        }
    }
}

/// The environment variable that makes the agent panic while it executes steps for the VM it
/// names, with that VM's runtime lock held: a stand-in for an agent bug, so tests can prove a
/// panic costs that VM's steps and nothing else (no QEMU lost or doubled, the agent answering).
/// Nothing sets it but a test (docs/robustness.md).
pub const PANIC_IN_VM_ENV: &str = "PLASMAVMC_TEST_PANIC_IN_VM";

fn panic_if_injected(vm: &str) {
    if std::env::var_os(PANIC_IN_VM_ENV).is_some_and(|named| named == vm) {
        panic!("{PANIC_IN_VM_ENV}={vm}: injected panic");
    }
}

/// Releases a `VmSlot::claim_refresh` however the refresh ends, and tells whoever waits for it.
pub struct RefreshClaim(Arc<VmSlot>);

impl Drop for RefreshClaim {
    fn drop(&mut self) {
        *self
            .0
            .refresh_claimed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.0.refreshing.store(false, Ordering::Release);
        self.0.refreshes.send_modify(|ended| *ended += 1);
    }
}

/// How a stop ended, in a few words for its event.
fn outcome_words(outcome: StopOutcome) -> &'static str {
    match outcome {
        StopOutcome::PoweredDown => "the guest shut down",
        StopOutcome::Quit => "QEMU was told to quit",
        StopOutcome::Killed => "QEMU was killed",
        StopOutcome::AlreadyGone => "it was gone already",
    }
}

/// Why QEMU `pid` has not answered on QMP since `since`, as far as `/proc` tells.
fn silence(pid: u32, since: Instant) -> String {
    let state = process::stat_field(pid, 3);
    let why = match state.as_deref() {
        Some("T" | "t") => "is stopped (SIGSTOP, or a debugger)",
        Some("D") => "waits in the kernel (uninterruptible I/O: stuck storage?)",
        None | Some("Z" | "X") => "is gone",
        Some(_) => {
            "runs but does not answer (another client may hold its qmp.sock, or QEMU is stuck)"
        }
    };
    format!(
        "QEMU (pid {pid}) {why}; no QMP answer for {}s",
        since.elapsed().as_secs()
    )
}

/// The QEMU device a disk/NIC action is about (to block the add of a failed replacement).
fn device_of(action: &Action) -> Option<String> {
    match action {
        Action::AddDisk { id, .. }
        | Action::RemoveDisk { id, .. }
        | Action::ResizeDisk { id, .. } => Some(ids::disk_device(id)),
        Action::AddNic { id, .. } | Action::RemoveNic { id } => Some(ids::nic_device(id)),
        _ => None,
    }
}

/// How long process `pid` has been running (from `/proc/<pid>/stat` and `/proc/uptime`).
fn process_uptime(pid: u32) -> Option<Duration> {
    let started_after_boot = process::started_after_boot(pid)?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64(uptime).saturating_sub(started_after_boot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_uptime_is_small_and_known() {
        let uptime = process_uptime(std::process::id()).expect("uptime of this test");
        assert!(uptime < Duration::from_secs(3600), "{uptime:?}");
        assert_eq!(process_uptime(u32::MAX), None);
    }

    #[test]
    fn consecutive_removals_share_a_batch() {
        let remove_disk = |id: &str| Action::RemoveDisk {
            id: id.into(),
            delete_image: None,
        };
        let actions = [
            Action::RemoveOrphanNetdev {
                netdev: "net-x".into(),
            },
            remove_disk("a"),
            Action::RemoveNic { id: "eth1".into() },
            remove_disk("b"),
            Action::SetVcpus { from: 2, to: 1 },
            remove_disk("c"),
        ];
        let sizes: Vec<usize> = removal_batches(&actions).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [1, 3, 1, 1]);
        assert!(removal_batches(&[]).is_empty());
    }

    #[test]
    fn replacement_steps_share_a_device() {
        let remove = Action::RemoveDisk {
            id: "data".into(),
            delete_image: None,
        };
        assert_eq!(device_of(&remove), Some("disk-data".into()));
        assert_eq!(device_of(&Action::SetVcpus { from: 1, to: 2 }), None);
    }
}
