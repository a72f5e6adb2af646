//! The agent daemon (`plasmavmc agent`): adopts running VMs, then reconciles whenever something
//! happens — config change, SIGHUP, control request, QEMU event or exit. No polling loop.
//!
//! - `supervisor`: desired state, VMs, reconcile, restart policy, control requests.
//! - `vm`: one VM's QEMU connection and status snapshot.
//! - `adopt`: taking over QEMUs a previous agent left running.
//! - `restart`, `operator`: restart backoff; persisted operator start/stop.
//! - `run_lock`: one agent per run dir.
//! - `watch`: config directory watch and SIGHUP; `config_file`: reading the config off the runtime.
//! - `cluster`: the ChainFire session's config and notices.
//! - `console`: `plasmavmc console` (QEMU's console socket fanned out) and console log rotation.
//! - `handover`: disk images moving from one VM to another in one reconcile.
//! - `cordon`: the host's cordon, persisted in the state dir; `evacuate`: `plasmavmc evacuate`.
//! - `placement`: moving HA VMs to their `ha.preferredHosts`.
//! - `metrics`, `metrics_http`: the sampler behind `/metrics`, and the endpoint.
//! - `journal`: the event stream behind `plasmavmc events`.
//! - `first_apply`: the first apply after start, its outcome kept for `plasmavmc first-apply`.
//! - `migration`: live migration, both the source's and the target's side; `arrivals`: the
//!   moves arriving here, kept in the state dir; `interrupted`: moves an agent restart cut.

mod adopt;
mod arrivals;
mod cluster;
mod config_file;
mod console;
mod cordon;
mod evacuate;
mod first_apply;
mod handover;
mod interrupted;
mod journal;
mod metrics;
mod metrics_http;
mod migration;
mod operator;
mod placement;
mod restart;
mod run_lock;
mod saves;
mod supervisor;
mod vm;
mod watch;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::chainfire::{ChainFireConfig, Session};
use crate::control::server;
use crate::paths::RunDir;
use crate::qemu::cgroup::Cgroups;
use crate::qemu::confine::{self, Confinement};
pub use migration::{MigrationError, MigrationSettings};
use operator::OperatorIntents;
use supervisor::{Daemon, Trigger};
use vm::{Fencing, Shell};

/// Quiet time after a config directory event before the file is compared and reloaded.
const CONFIG_DEBOUNCE: Duration = Duration::from_millis(200);
/// How long the agent waits for its first apply before it tells systemd it is ready (well within
/// the unit's TimeoutStartSec, which the module sizes from the stop timeout).
const FIRST_APPLY_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub qemu: Option<PathBuf>,
    /// `--qemu-user`, `--qemu-group`: the unprivileged identity QEMU runs as.
    pub qemu_user: Option<String>,
    pub qemu_group: Option<String>,
    pub stop_timeout: Duration,
    pub unplug_timeout: Duration,
    pub chainfire: Option<ChainfireOptions>,
    /// `--metrics-listen`: serve Prometheus metrics.
    pub metrics: Option<MetricsOptions>,
    /// Where this host receives migrations (`--migration-*`).
    pub migration: MigrationSettings,
    /// `--placement-settle`: how long a host must have been live and uncordoned before VMs are
    /// moved to it because they prefer it.
    pub placement_settle: Duration,
}

#[derive(Debug, Clone)]
pub struct MetricsOptions {
    pub listen: std::net::SocketAddr,
    /// How often each VM's QEMU is sampled (QMP, /proc, sysfs).
    pub interval: Duration,
}

#[derive(Debug, Clone)]
pub struct ChainfireOptions {
    pub endpoints: Vec<String>,
    pub host_id: Option<String>,
    pub lease_ttl: Option<u64>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Runs the agent until SIGTERM/SIGINT. VMs keep running when it returns.
pub async fn run(options: AgentOptions) -> Result<()> {
    let run_dir = RunDir::new(&options.run_dir);
    create_dir(run_dir.root(), 0o755)?;
    let _one_agent = run_lock::lock(run_dir.root())?;
    create_dir(&run_dir.vms_dir(), 0o700)?;
    create_dir(&options.state_dir, 0o700)?;
    // Bound first: a port in use is said at once, before anything is touched.
    let metrics_listener = match &options.metrics {
        Some(metrics) => Some(metrics_http::bind(metrics.listen).await?),
        None => None,
    };
    let confinement = Confinement {
        run_as: match &options.qemu_user {
            Some(user) => Some(confine::resolve_user(user, options.qemu_group.as_deref())?),
            None => None,
        },
        cgroups: Some(Cgroups::detect(run_dir.root())),
    };
    confine::prepare_run_dir(&run_dir, confinement.run_as.as_ref())?;
    if let Some(run_as) = &confinement.run_as {
        tracing::info!(uid = run_as.uid, gid = run_as.gid, groups = ?run_as.groups, "QEMU runs unprivileged");
    } else {
        tracing::warn!("QEMU runs as root (no --qemu-user)");
    }
    let trust_file = run_dir.lease_trust();
    let qemu = crate::qemu::process::qemu_binary(options.qemu.as_deref());
    let chainfire = match &options.chainfire {
        Some(chainfire) => Some(ChainFireConfig {
            trust_file: Some(trust_file.clone()),
            host_facts: cluster::host_facts(&qemu, &options.migration),
            ..cluster::chainfire_config(chainfire)?
        }),
        None => None,
    };
    let cordons = cordon::Cordons::load(&options.state_dir);
    if let Some(cordon) = cordons.get() {
        tracing::warn!(since = %cordon.since, by = %cordon.by, "this host is cordoned (`plasmavmc uncordon` opens it)");
    }
    let host_label = metrics::host_label(chainfire.as_ref().map(|c| c.host_id.as_str()))?;
    let session = match chainfire {
        Some(config) => {
            tracing::info!(endpoints = ?config.endpoints, host = %config.host_id, "chainfire: starting the session");
            let host_id = config.host_id.clone();
            let session = Session::start_cordoned(config, cordons.get().is_some())?;
            cluster::log_notices(&session);
            Some((host_id, session))
        }
        None => None,
    };
    let fencing = match &session {
        Some((_, session)) => Some(Fencing {
            guard_exe: std::env::current_exe().context("locating this binary for fence guards")?,
            trust_file: trust_file.clone(),
            gate: session.ha_gate(),
        }),
        None => None,
    };

    let (vm_events, mut vm_event_rx) = mpsc::unbounded_channel();
    let (triggers, mut trigger_rx) = mpsc::unbounded_channel();
    let shell = Shell {
        run_dir: run_dir.clone(),
        saved: crate::paths::SavedDir::new(&options.state_dir),
        qemu,
        stop_timeout: options.stop_timeout,
        unplug_timeout: options.unplug_timeout,
        confinement,
        events: vm_events,
        fencing,
        journal: journal::Journal::default(),
        arrivals: arrivals::Arrivals::new(&options.state_dir),
    };
    let operator = OperatorIntents::load(&options.state_dir)?;
    let daemon = Arc::new(Daemon::new(
        options.config.clone(),
        shell,
        operator,
        triggers.clone(),
        session,
        cordons,
        options.migration.clone(),
    ));

    // An invalid config at startup: adopt (watch) what runs, touch nothing until a valid one.
    let _ = daemon.load_config().await;
    adopt::adopt_running(&daemon).await?;
    // Moves the previous agent left unfinished: their VMs are held from the first reconcile
    // until each is settled (which may wait for ChainFire); then its evacuation goes on.
    let mid_move = daemon.hold_vms_mid_move().await;
    // Moves that were arriving here when the previous agent stopped, their QEMU gone: settled
    // now, before anything can start the VM here (or another move arrive).
    let arriving = daemon.settle_arrivals_left(&mid_move).await;
    tokio::spawn({
        let daemon = Arc::clone(&daemon);
        async move {
            daemon.settle_interrupted_moves(mid_move, arriving).await;
            daemon.resume_evacuation().await;
        }
    });
    // Moves addressed to this host are answered from now on, not only after the first apply
    // (which may take a while): a source waits a minute at most.
    tokio::spawn(migration::follow_requests(Arc::clone(&daemon)));

    let listener = server::bind(&run_dir.control_socket())?;
    let handler = {
        let daemon = daemon.clone();
        Arc::new(move |request| {
            let daemon = daemon.clone();
            async move { daemon.handle(request).await }
        })
    };
    let consoles = console::Consoles::new(run_dir.clone());
    let attach = {
        let journal = daemon.shell.journal.clone();
        Arc::new(move |attached: server::Attached| {
            let (consoles, journal) = (Arc::clone(&consoles), journal.clone());
            async move {
                match attached.request {
                    crate::control::protocol::Request::Events => journal.stream(attached).await,
                    _ => consoles.attach(attached).await,
                }
            }
        })
    };
    tokio::spawn(server::serve(listener, handler, attach));
    tokio::spawn(console::rotate_logs(run_dir.clone()));
    if let (Some(listener), Some(options)) = (metrics_listener, &options.metrics) {
        let exposition = crate::metrics::Exposition::new(&host_label, Arc::clone(&daemon.metrics));
        let scrape = {
            let daemon = Arc::clone(&daemon);
            move || exposition.text(&metrics::figures(&daemon))
        };
        tracing::info!(listen = %options.listen, interval = ?options.interval, "serving Prometheus metrics at /metrics");
        tokio::spawn(metrics::sample_forever(
            Arc::clone(&daemon),
            options.interval,
        ));
        tokio::spawn(metrics_http::serve(listener, Arc::new(scrape)));
    }
    let config_watch = match watch::ConfigWatch::start(&options.config, triggers.clone()) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!("{e:#}; config changes need `plasmavmc reload` or SIGHUP");
            None
        }
    };
    watch::forward_sighup(triggers.clone())?;
    // READY only once the first apply is done (or has run for FIRST_APPLY_WAIT): a switch that
    // restarts the agent then waits for it, and `systemctl status` says how it went. Whether it
    // failed, the switch learns from `plasmavmc first-apply` (plasmavmc-first-apply.service).
    let first_apply = match first_apply::run(&daemon, FIRST_APPLY_WAIT).await {
        outcome if outcome.is_pending() => format!(
            "first apply still running after {}s; it goes on (`plasmavmc first-apply` waits for it)",
            FIRST_APPLY_WAIT.as_secs()
        ),
        outcome => outcome.summary(),
    };
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&first_apply),
        ],
    );
    tracing::info!(control = %run_dir.control_socket().display(), "agent ready: {first_apply}");
    if let Some(may_run) = daemon.may_run() {
        tokio::spawn(follow_may_run(Arc::clone(&daemon), may_run));
        tokio::spawn(placement::follow(
            Arc::clone(&daemon),
            options.placement_settle,
        ));
    }

    let events = async {
        loop {
            tokio::select! {
                // Reconciles run in tasks of their own: the loop only dispatches, so a VM busy
                // for a while (a guest slow to power down) never delays another VM's event.
                Some(event) = vm_event_rx.recv() => {
                    let daemon = Arc::clone(&daemon);
                    tokio::spawn(async move { daemon.on_vm_event(event).await });
                }
                Some(trigger) = trigger_rx.recv() => {
                    if let Some(reload) = debounce(&daemon, config_watch.as_ref(), trigger, &mut trigger_rx).await {
                        let daemon = Arc::clone(&daemon);
                        tokio::spawn(async move { daemon.reconcile_logged(reload).await });
                    }
                }
            }
        }
    };
    tokio::select! {
        () = events => {}
        () = shutdown_signal()? => tracing::info!("stopping the agent; VMs keep running"),
    }
    let _ = std::fs::remove_file(run_dir.control_socket());
    if options.chainfire.is_some() {
        // The lease is left alive for the next agent to resume: an agent restart neither flaps
        // the host in the store nor hands its HA VMs over. With no agent back in time, the fence
        // guards kill the HA VMs and the lease expires.
        tracing::info!(trust = %trust_file.display(), "chainfire: leaving the lease to the next agent");
    }
    Ok(())
}

/// Fences at once when HA VMs leave `may_run`, and reconciles so new ones start here.
async fn follow_may_run(
    daemon: Arc<Daemon>,
    mut may_run: tokio::sync::watch::Receiver<std::collections::BTreeSet<crate::chainfire::VmKey>>,
) {
    let mut held = may_run.borrow_and_update().clone();
    while may_run.changed().await.is_ok() {
        let now = may_run.borrow_and_update().clone();
        let journal = &daemon.shell.journal;
        for key in now.difference(&held) {
            journal.vm(&key.vm, crate::events::What::LockGained);
        }
        for key in held.difference(&now) {
            journal.vm(&key.vm, crate::events::What::LockLost);
        }
        held = now;
        daemon.fence_now();
        daemon.trigger(Trigger::Reconcile);
    }
}

/// What a trigger asks for: `Some(reload)` to reconcile (re-reading the config first if
/// `reload`), `None` for nothing.
async fn debounce(
    daemon: &Daemon,
    config_watch: Option<&watch::ConfigWatch>,
    trigger: Trigger,
    pending: &mut mpsc::UnboundedReceiver<Trigger>,
) -> Option<bool> {
    match trigger {
        Trigger::ConfigTouched => {
            // Editors and switches touch the file several times in a row. Triggers that queued
            // up meanwhile are folded in, never dropped.
            tokio::time::sleep(CONFIG_DEBOUNCE).await;
            let (mut reload, mut reconcile) = (false, false);
            while let Ok(next) = pending.try_recv() {
                reload |= matches!(next, Trigger::Reload);
                reconcile |= matches!(next, Trigger::Reconcile);
            }
            // Before comparing: a change made after this is seen by the new watches.
            if let Some(watch) = config_watch {
                watch.refresh();
            }
            if reload || daemon.config_changed_on_disk().await {
                tracing::info!("config file changed: reloading");
                Some(true)
            } else {
                reconcile.then_some(false)
            }
        }
        Trigger::Reload => Some(true),
        Trigger::Reconcile => Some(false),
    }
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn create_dir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}
