//! `plasmavmc evacuate`: cordon this host, then move every VM that can move to another host,
//! live, [`PARALLEL`] at a time. Where each VM goes, and why one stays, is
//! `crate::evacuation`'s decision; each move is [`Daemon::migrate_vm`].

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;

use super::migration::{MigrationError, MoveOptions};
use super::supervisor::{Daemon, Refusal};
use crate::control::protocol::{ErrorKind, Response};
use crate::evacuation::{self, Evacuation, MoveState, Route};
use crate::migration::{MigrationProgress, Mode};

/// Moves at once: enough to empty a host quickly, few enough that each keeps its bandwidth.
const PARALLEL: usize = 2;

impl Daemon {
    /// Cordons the host, plans the moves and starts them; answers with the plan at once (the
    /// moves go on; `status` follows them). An evacuation still running is answered as it is.
    pub(super) async fn evacuate(self: &Arc<Self>) -> Result<Response, Refusal> {
        let Some(view) = self.cluster_view() else {
            return Err((
                ErrorKind::BadRequest,
                "this agent runs standalone (no --chainfire): there is no other host to move VMs to"
                    .into(),
            ));
        };
        self.cordon("evacuate")?;
        if let Some(running) = self.evacuation.lock().unwrap().clone() {
            if !running.finished {
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
        let evacuation = Evacuation::start(crate::chainfire::records::now(), &routes);
        tracing::warn!(
            "evacuating: {}",
            evacuation.render().trim_end().replace('\n', ";")
        );
        *self.evacuation.lock().unwrap() = Some(evacuation.clone());
        tokio::spawn(Arc::clone(self).run_evacuation(routes));
        Ok(Response::Evacuation { evacuation })
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
        match done.filter(Evacuation::succeeded) {
            Some(_) => tracing::info!("evacuation finished"),
            None => tracing::error!("evacuation finished, some moves FAILED (status says which)"),
        }
    }

    /// One VM's move, with its evacuation entry kept up to date.
    async fn evacuate_vm(self: &Arc<Self>, vm: &str, targets: &[String]) {
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
        evacuation.as_mut().map(|e| {
            change(e);
            e.clone()
        })
    }
}
