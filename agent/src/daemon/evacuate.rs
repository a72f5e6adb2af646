//! `plasmavmc evacuate`: cordon this host, then move every VM that can move to another host,
//! live, [`PARALLEL`] at a time. Where each VM goes, and why one stays, is
//! `crate::evacuation`'s decision; each move is [`Daemon::migrate_vm`].

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::migration::{MigrationError, MoveOptions};
use super::supervisor::{Daemon, Refusal};
use crate::chainfire::ClusterView;
use crate::control::protocol::{ErrorKind, Response};
use crate::evacuation::ready::{self, NotReady, Seen};
use crate::evacuation::{self, Evacuation, MoveState, Route};
use crate::migration::{MigrationProgress, Mode};

/// Moves at once: enough to empty a host quickly, few enough that each keeps its bandwidth.
const PARALLEL: usize = 2;
/// How long `evacuate` waits to be ready to move VMs (an agent that just started, a VM arriving).
const READY_WAIT: Duration = Duration::from_secs(60);

impl Daemon {
    /// Cordons the host, plans the moves and starts them; answers with the plan at once (the
    /// moves go on; `status` follows them). An evacuation running is answered as it is; one the
    /// previous agent left unfinished (`evacuation.json`) is carried on.
    pub(super) async fn evacuate(self: &Arc<Self>) -> Result<Response, Refusal> {
        let (Some(cluster), Some(cordon)) = (self.cluster_watch(), self.published_cordon()) else {
            return Err((
                ErrorKind::BadRequest,
                "this agent runs standalone (no --chainfire): there is no other host to move VMs to"
                    .into(),
            ));
        };
        self.cordon("evacuate").await?;
        let view = self
            .ready_to_move(cluster, cordon)
            .await
            .map_err(|reason| {
                (
                    ErrorKind::Failed,
                    format!(
                        "the host is cordoned here, but this agent is not ready to move VMs after \
                     {}s: {reason}; nothing moved yet; run `plasmavmc evacuate` again",
                        READY_WAIT.as_secs()
                    ),
                )
            })?;
        let mut current = self.evacuation.lock().unwrap();
        if self.evacuating.load(Ordering::SeqCst) {
            if let Some(running) = current.clone() {
                return Ok(Response::Evacuation {
                    evacuation: running,
                });
            }
        }
        let Some(desired) = self.desired_state() else {
            return Err((
                ErrorKind::InvalidConfig,
                "no valid config yet: the host is cordoned, nothing is moved".into(),
            ));
        };
        let running: Vec<(&str, &crate::spec::VmSpec)> = desired
            .vms
            .iter()
            .filter(|(name, _)| self.runs_here(name))
            .map(|(name, spec)| (name.as_str(), spec))
            .collect();
        let routes = evacuation::plan(self.host_id(), &running, &view);
        let evacuation = match current.as_ref().filter(|e| !e.finished) {
            Some(unfinished) => unfinished.resume(&routes),
            None => Evacuation::start(crate::chainfire::records::now(), &routes),
        };
        tracing::warn!(
            "evacuating: {}",
            evacuation.render().trim_end().replace('\n', ";")
        );
        self.keep_evacuation(&evacuation);
        *current = Some(evacuation.clone());
        self.evacuating.store(true, Ordering::SeqCst);
        drop(current);
        tokio::spawn(Arc::clone(self).run_evacuation(routes));
        Ok(Response::Evacuation { evacuation })
    }

    /// At start: carries on the evacuation the previous agent left unfinished.
    pub(super) async fn resume_evacuation(self: &Arc<Self>) {
        if !self.evacuation_unfinished() || !self.is_cordoned() {
            return;
        }
        tracing::warn!("carrying on the evacuation the previous agent left unfinished");
        if let Err((_, why)) = self.evacuate().await {
            tracing::error!("the evacuation the previous agent left cannot go on: {why}");
        }
    }

    /// Whether the last evacuation has moves to go (this agent's, or the previous one's).
    pub(super) fn evacuation_unfinished(&self) -> bool {
        self.evacuation
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|e| !e.finished)
    }

    /// Waits until the moves the previous agent left are settled (in the view too), no VM is
    /// arriving here (a move accepted before the cordon: its VM runs here once it arrived, and
    /// is evacuated with the others; none is accepted while cordoned), the store holds this host
    /// cordoned (no host sends a VM here meanwhile) and the cluster view has this host in it (so
    /// the other hosts are known too): that view. After [`READY_WAIT`] (or if the ChainFire
    /// session ends), the wait that did not end.
    async fn ready_to_move(
        &self,
        mut cluster: watch::Receiver<Arc<ClusterView>>,
        mut cordon: watch::Receiver<Option<bool>>,
    ) -> Result<ClusterView, NotReady> {
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        let mut settled = self.moves_settled.subscribe();
        let mut arriving = self.moves.lock().unwrap().watch_incoming();
        loop {
            let view = Arc::clone(&cluster.borrow_and_update());
            let outgoing = self.moves.lock().unwrap().outgoing_vms();
            let arriving_now = arriving.borrow_and_update().clone();
            let seen = Seen {
                me: &self.host_id,
                previous_moves_settled: *settled.borrow_and_update(),
                arriving: &arriving_now,
                cordon_published: *cordon.borrow_and_update() == Some(true),
                view: &view,
                outgoing: &outgoing,
            };
            let Some(reason) = ready::not_ready(&seen) else {
                return Ok((*view).clone());
            };
            let changed = async {
                tokio::select! {
                    changed = settled.changed() => changed,
                    changed = arriving.changed() => changed,
                    changed = cordon.changed() => changed,
                    changed = cluster.changed() => changed,
                }
            };
            if !matches!(tokio::time::timeout_at(deadline, changed).await, Ok(Ok(()))) {
                return Err(reason);
            }
        }
    }

    async fn run_evacuation(self: Arc<Self>, routes: BTreeMap<String, Route>) {
        let moves = routes.into_iter().filter_map(|(vm, route)| match route {
            Route::Move { targets } => Some((vm, targets)),
            Route::Stay { .. } => None,
        });
        futures::stream::iter(moves)
            .for_each_concurrent(PARALLEL, |(vm, targets)| {
                let daemon = Arc::clone(&self);
                async move { daemon.evacuate_vm(&vm, &targets).await }
            })
            .await;
        let done = self.update_evacuation(|e| e.finished = true);
        self.evacuating.store(false, Ordering::SeqCst);
        match done.filter(Evacuation::succeeded) {
            Some(_) => tracing::info!("evacuation finished"),
            None => tracing::error!("evacuation finished, some moves FAILED (status says which)"),
        }
    }

    /// One VM's move, with its evacuation entry kept up to date.
    async fn evacuate_vm(self: &Arc<Self>, vm: &str, targets: &[String]) {
        if !self.is_cordoned() {
            let why = "the host was uncordoned before it moved: the evacuation ended".to_owned();
            self.set_evacuated(vm, MoveState::Staying, "-", Some(why));
            return;
        }
        let (state, to, note) = match self
            .try_targets(vm, targets, |to| {
                self.set_evacuated(vm, MoveState::Moving, to, None)
            })
            .await
        {
            Ok((to, note)) => (MoveState::Moved, to, note),
            Err((to, note)) => (MoveState::Failed, to, note),
        };
        self.set_evacuated(vm, state, &to, Some(note));
    }

    /// At host shutdown (`onHostShutdown = "evacuate"`): moves `vm` away as an evacuation
    /// would. Ok: where it went; Err: why it could not.
    pub(super) async fn move_away(self: &Arc<Self>, vm: &str) -> Result<String, String> {
        let view = self
            .cluster_view()
            .ok_or("this agent runs standalone (no --chainfire)")?;
        let desired = self.desired_state().ok_or("no valid config")?;
        let spec = desired.vms.get(vm).ok_or("not declared")?;
        let route = evacuation::plan(self.host_id(), &[(vm, spec)], &view).remove(vm);
        match route {
            Some(Route::Move { targets }) => self
                .try_targets(vm, &targets, |to| {
                    tracing::info!(vm, to, "host shutdown: moving live")
                })
                .await
                .map(|(_, moved)| moved)
                .map_err(|(_, why)| why),
            Some(Route::Stay { reason }) => Err(reason),
            None => Err("not planned".into()),
        }
    }

    /// Tries `targets` in order (`starting` is told each): one that refuses before anything
    /// started gives way to the next; a move abandoned midway ends the attempt (the VM runs
    /// here as before). The host it went to (or last tried) and what happened.
    async fn try_targets(
        self: &Arc<Self>,
        vm: &str,
        targets: &[String],
        starting: impl Fn(&str),
    ) -> Result<(String, String), (String, String)> {
        let mut refusals = Vec::new();
        for to in targets {
            starting(to);
            let (progress, _) = watch::channel(MigrationProgress::default());
            let options = MoveOptions {
                mode: Mode::Live,
                bandwidth: None,
            };
            return match self.migrate_vm(vm, to, options, progress).await {
                Ok(outcome) => Ok((to.clone(), outcome.render())),
                Err(MigrationError::Refused(why)) => {
                    refusals.push(format!("{to} refused: {why}"));
                    continue;
                }
                Err(e @ MigrationError::Abandoned(_)) => {
                    Err((to.clone(), format!("abandoned, runs here as before: {e}")))
                }
                Err(e @ MigrationError::AfterSwitchover(_)) => Ok((
                    to.clone(),
                    format!("{to} holds it now, but the move ended badly: {e}"),
                )),
            };
        }
        let last = targets.last().cloned().unwrap_or_else(|| "-".into());
        Err((last, refusals.join("; ")))
    }

    fn set_evacuated(&self, vm: &str, state: MoveState, to: &str, note: Option<String>) {
        match state {
            MoveState::Failed => tracing::error!(vm, to, ?note, "evacuation: move failed"),
            _ => tracing::info!(vm, to, ?state, ?note, "evacuation"),
        }
        self.update_evacuation(|e| {
            if let Some(entry) = e.vms.get_mut(vm) {
                entry.state = state;
                entry.to = Some(to.to_owned());
                entry.note = note;
            }
        });
    }

    fn update_evacuation(&self, change: impl FnOnce(&mut Evacuation)) -> Option<Evacuation> {
        let mut evacuation = self.evacuation.lock().unwrap();
        let changed = evacuation.as_mut().map(|e| {
            change(e);
            e.clone()
        });
        if let Some(changed) = &changed {
            self.keep_evacuation(changed);
        }
        changed
    }

    /// Writes the evacuation for the next agent (`evacuation.json`, beside the cordon).
    fn keep_evacuation(&self, evacuation: &Evacuation) {
        if let Err(e) = self.cordons.lock().unwrap().save_evacuation(evacuation) {
            tracing::error!("keeping the evacuation for the next agent: {e:#}; an agent restart would forget it");
        }
    }
}
