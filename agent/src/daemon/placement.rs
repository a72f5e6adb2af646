//! Placement's shell (`ha.preferredHosts`): follows the cluster view and the desired state, asks
//! `crate::placement` where each HA VM running here belongs, and moves it there live with
//! [`Daemon::migrate_vm`]; never by a restart. What it decided shows in the VM's `placement`.
//!
//! It stands aside while this host evacuates (the evacuation moves the VMs), and while a VM is
//! being moved. A move that fails is not tried again towards the same host for
//! [`RETRY_AFTER_FAILURE`]: the VM runs on here meanwhile, and its status says why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::migration::MoveOptions;
use super::supervisor::Daemon;
use crate::chainfire::clock::BootTime;
use crate::chainfire::{ClusterView, VmKey};
use crate::migration::{MigrationProgress, Mode};
use crate::placement::{self, Availability, Placement};

/// How long a host a move to failed is left alone for that VM.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);
/// Nothing to wait for: look again at least this often anyway.
const IDLE: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Moves {
    /// VMs placement is moving now.
    in_flight: BTreeSet<String>,
    /// The last failed move of each VM: to where, and when.
    failed: BTreeMap<String, (String, BootTime)>,
}

/// Runs placement until the agent stops. `settle`: `--placement-settle`.
pub async fn follow(daemon: Arc<Daemon>, settle: Duration) {
    let Some(mut cluster) = daemon.cluster_watch() else {
        return;
    };
    let moves = Arc::new(Mutex::new(Moves::default()));
    let mut seen = Availability::default();
    loop {
        let view = cluster.borrow_and_update().clone();
        let now = BootTime::now();
        seen.update(&view, now);
        let wake = place_all(&daemon, &view, &seen, now, settle, &moves);
        let sleep = wake.map_or(IDLE, |at| now.until(at));
        tokio::select! {
            changed = cluster.changed() => if changed.is_err() { return },
            () = daemon.placement_wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Decides for every HA VM running here with preferred hosts; starts the moves due; returns
/// when to look again.
fn place_all(
    daemon: &Arc<Daemon>,
    view: &ClusterView,
    seen: &Availability,
    now: BootTime,
    settle: Duration,
    moves: &Arc<Mutex<Moves>>,
) -> Option<BootTime> {
    let evacuating = daemon.evacuation_unfinished();
    let desired = daemon.desired_state()?;
    let mut wake: Option<BootTime> = None;
    for (name, spec) in &desired.vms {
        let Some(slot) = daemon.slot(name).filter(|s| s.status().pid.is_some()) else {
            continue;
        };
        if !spec.ha.enable || spec.ha.preferred_hosts.is_empty() || evacuating {
            slot.update_status(|s| s.placement = None);
            continue;
        }
        if moves.lock().unwrap().in_flight.contains(name) {
            continue;
        }
        let key = VmKey::new(&spec.org_id, &spec.project_id, name);
        let eligible = seen.eligible(daemon.host_id(), &key, view);
        let decision = placement::decide(
            daemon.host_id(),
            &spec.ha.preferred_hosts,
            &eligible,
            now,
            settle,
        );
        let note = match decision {
            Placement::Stay => None,
            Placement::Wait { to, until } => {
                wake = Some(wake.map_or(until, |w| w.min(until)));
                Some(format!(
                    "belongs on {to} (its first preferred host that is live and uncordoned); \
                     moving there live once {to} has been so for {}s",
                    settle.as_secs()
                ))
            }
            Placement::Move { to } => {
                let failed = moves.lock().unwrap().failed.get(name).cloned();
                match failed.filter(|(at, when)| *at == to && now < *when + RETRY_AFTER_FAILURE) {
                    Some((_, when)) => {
                        let retry = when + RETRY_AFTER_FAILURE;
                        wake = Some(wake.map_or(retry, |w| w.min(retry)));
                        slot.status().placement
                    }
                    None => {
                        start_move(daemon, name, &to, moves);
                        Some(format!(
                            "moving live to {to} (its first preferred host that is live and uncordoned)"
                        ))
                    }
                }
            }
        };
        slot.update_status(|s| s.placement = note);
    }
    wake
}

fn start_move(daemon: &Arc<Daemon>, vm: &str, to: &str, moves: &Arc<Mutex<Moves>>) {
    moves.lock().unwrap().in_flight.insert(vm.to_owned());
    tracing::info!(vm, to, "placement: moving live to the VM's preferred host");
    let (daemon, vm, to, moves) = (
        Arc::clone(daemon),
        vm.to_owned(),
        to.to_owned(),
        Arc::clone(moves),
    );
    tokio::spawn(async move {
        let (progress, _) = watch::channel(MigrationProgress::default());
        let options = MoveOptions {
            mode: Mode::Live,
            bandwidth: None,
        };
        let outcome = daemon.migrate_vm(&vm, &to, options, progress).await;
        let mut moves = moves.lock().unwrap();
        moves.in_flight.remove(&vm);
        match outcome {
            Ok(outcome) => {
                moves.failed.remove(&vm);
                tracing::info!(vm, "placement: {}", outcome.render());
            }
            Err(e) => {
                let now = BootTime::now();
                moves.failed.insert(vm.clone(), (to.clone(), now));
                let note = format!(
                    "belongs on {to}, but the live move failed: {e}; it runs on here, and the \
                     move is tried again in {} min (never by a restart)",
                    RETRY_AFTER_FAILURE.as_secs() / 60
                );
                tracing::warn!(vm, "placement: {note}");
                if let Some(slot) = daemon.slot(&vm) {
                    slot.update_status(|s| s.placement = Some(note));
                }
            }
        }
        drop(moves);
        daemon.placement_wake.notify_one();
    });
}
