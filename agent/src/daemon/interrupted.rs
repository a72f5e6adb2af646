//! At start: the moves this host was part of (source or target) when its previous agent died
//! (kill -9, a crash), settled as `migration::interrupted` decides from the HA lock and the
//! adopted QEMU.
//!
//! Before the first reconcile, every adopted VM whose QEMU is in a migration (or paused after
//! one, or incoming) is held away from reconciles; a task then reads the moves recorded with
//! this host as source or target and each one's HA lock (again and again while the store does
//! not answer: never a guess), acts, forgets what this host wrote of the move, and lets the VM
//! go. Evacuations wait for it (`moves_settled`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

use super::arrivals::end_images;
use super::supervisor::{Daemon, Trigger};
use super::vm::VmSlot;
use crate::chainfire::moves::MoveStore;
use crate::chainfire::{keys, VmKey};
use crate::migration::arrival::{self, Arrival, Leftover, QemuHere};
use crate::migration::interrupted::{self, AdoptedQemu, LockSeen, Reached, Settle};
use crate::migration::MigrationRecord;
use crate::qemu::migrate as qemu_migrate;
use crate::qemu::Qmp;
use crate::status::VmState;

/// How long to wait before asking the store again.
const RETRY: Duration = Duration::from_secs(1);
/// How long a QEMU may take to leave a cancelled migration, or (its lock the target's) to send
/// the rest after the switchover.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// The adopted VMs held until their move is settled, by name.
pub(super) type HeldVms = BTreeMap<String, Held>;

impl Daemon {
    /// Before the first reconcile: holds every adopted VM whose QEMU is in a migration (or
    /// paused after one), for `settle_interrupted_moves`.
    pub(super) async fn hold_vms_mid_move(&self) -> HeldVms {
        let mut held = BTreeMap::new();
        if self.chainfire.lock().unwrap().is_none() {
            return held; // standalone: no move was possible
        }
        for slot in self.slots() {
            let Some(qemu) = adopted_qemu(&slot).await else {
                continue;
            };
            if !interrupted::mid_move(&qemu) {
                continue;
            }
            tracing::warn!(vm = %slot.name, migration = %qemu.migration, run_state = %qemu.run_state,
                "found a QEMU in a move the previous agent left unfinished; holding it until the move is settled");
            slot.update_status(|s| {
                s.state_reason = Some("settling a move the previous agent left unfinished".into())
            });
            held.insert(slot.name.clone(), Held::take(slot).await);
        }
        held
    }

    /// Settles every move the previous agent left (each VM in `held`, each move recorded with
    /// this host as its source), then lets the VMs go. `arrivals`: what this host kept of the
    /// moves arriving with the QEMUs held (`settle_arrivals_left`).
    pub(super) async fn settle_interrupted_moves(
        self: &Arc<Self>,
        mut held: HeldVms,
        mut arrivals: BTreeMap<String, Arrival>,
    ) {
        let Some(config) = self
            .chainfire
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.config().clone())
        else {
            self.moves_settled.send_replace(true);
            return;
        };
        let (store, recorded) = loop {
            let read = async {
                let store = MoveStore::connect(&config).await?;
                let recorded = store.requests_involving(&self.host_id).await?;
                anyhow::Ok((store, recorded))
            };
            match read.await {
                Ok(read) => break read,
                Err(e) => {
                    tracing::warn!(
                        "settling the moves the previous agent left: {e:#}; asking ChainFire again"
                    );
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let mut moves: Vec<(VmKey, Option<MigrationRecord>)> = Vec::new();
        for (key, record) in recorded {
            // As the target, only a QEMU held here is this task's; a request with nothing here
            // is `follow_requests`' (it answers a new one, the source gives up on an old one).
            if record.from == self.host_id {
                moves.push((key, Some(record)));
            } else if held.contains_key(&key.vm) {
                self.moves.lock().unwrap().claim(&record.id);
                moves.push((key, Some(record)));
            }
        }
        for vm in held.keys() {
            if moves.iter().any(|(key, _)| &key.vm == vm) {
                continue;
            }
            match self.declared_spec(vm) {
                Some(spec) => moves.push((VmKey::new(&spec.org_id, &spec.project_id, vm), None)),
                None => tracing::warn!(
                    vm,
                    "a QEMU mid-move, no move recorded, not declared: left to the reconcile"
                ),
            }
        }
        for (key, record) in moves {
            let this_vm = match held.remove(&key.vm) {
                Some(held) => Some(held),
                None => match self.slot(&key.vm) {
                    Some(slot) => Some(Held::take(slot).await),
                    None => None,
                },
            };
            if self.moves.lock().unwrap().is_outgoing(&key.vm) {
                continue; // a move this agent started (after the read): not the previous one's
            }
            self.settle_move(
                &store,
                &key,
                record.as_ref(),
                this_vm.as_ref().map(|h| &h.slot),
                arrivals.remove(&key.vm),
            )
            .await;
        }
        drop(held);
        self.moves_settled.send_replace(true);
        self.publish();
        self.trigger(Trigger::Reconcile);
    }

    /// One move: read, decide, act (again while the lock cannot be read or the stream still
    /// arrives), forget what this host wrote of it (`arrival`: what it kept of a move arriving
    /// here).
    async fn settle_move(
        &self,
        store: &MoveStore,
        key: &VmKey,
        record: Option<&MigrationRecord>,
        slot: Option<&Arc<VmSlot>>,
        arrival: Option<Arrival>,
    ) {
        let vm = key.vm.as_str();
        let source = record.is_some_and(|r| r.from == self.host_id);
        let peer = record.map_or("-".to_owned(), |r| {
            if source {
                r.to.clone()
            } else {
                r.from.clone()
            }
        });
        let copied = record
            .map(|r| r.running.disks_to_copy())
            .unwrap_or_default();
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut discarded = false;
        // The QEMU as last seen and what was done with it, for the images.
        let mut last: Option<(AdoptedQemu, Settle)> = None;
        loop {
            let (lock, holder) = self
                .lock_seen(store, key, record.map(|r| r.to.as_str()))
                .await;
            let qemu = match slot {
                Some(slot) => adopted_qemu(slot).await,
                None => None,
            };
            let settled = interrupted::settle(&lock, qemu.as_ref());
            tracing::info!(
                vm,
                peer,
                holder,
                ?qemu,
                ?settled,
                "settling the move the previous agent left"
            );
            let qmp = match slot {
                Some(slot) if qemu.is_some() => slot.qmp().await,
                _ => None,
            };
            let (Some(slot), Some(qmp)) = (slot, qmp) else {
                break; // Forget: no QEMU here
            };
            let waiting = Instant::now() < deadline;
            last = qemu.clone().map(|qemu| (qemu, settled.clone()));
            match settled {
                Settle::ReadLockAgain => {
                    tracing::warn!(vm, "the HA lock cannot be read ({holder}); the guest stays as it is until it can");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
                Settle::AwaitStream if waiting => {
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Settle::KeepHere { cancel: true, .. } if waiting => {
                    // Resumed only once QEMU left the migration and the lock was read again.
                    let _ = qemu_migrate::disks::finish(&qmp, &copied, true).await;
                    if let Err(e) = qemu_migrate::cancel(&qmp).await {
                        tracing::debug!(vm, "migrate_cancel: {e}");
                    }
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Settle::KeepHere { cancel, resume } => {
                    if cancel {
                        tracing::error!(
                            vm,
                            "QEMU did not leave the migration within {}s",
                            SETTLE_WAIT.as_secs()
                        );
                    }
                    if !source && record.is_some() {
                        qemu_migrate::disks::unexport(&qmp, &copied).await;
                    }
                    if resume {
                        if let Err(e) = qmp.cont().await {
                            tracing::error!(vm, "the guest could not be resumed: {e}");
                        }
                    }
                    let what = if source {
                        format!("the move to {peer} was interrupted by an agent restart and abandoned (the HA lock is still this host's); the VM runs here as before")
                    } else {
                        format!("arrived from {peer} while this agent restarted (the stream is complete, the HA lock is this host's): the VM runs here")
                    };
                    tracing::warn!(vm, "{what}");
                    if let Some(record) = record.filter(|_| !source) {
                        self.keep_running_here(vm, &record.running).await;
                    }
                    slot.update_status(|s| {
                        if s.state == VmState::Migrating {
                            s.state = VmState::Running;
                        }
                        s.migration = None;
                        s.state_reason = None;
                        s.last_error = Some(what);
                    });
                }
                Settle::FinishThenQuit => {
                    self.moves
                        .lock()
                        .unwrap()
                        .handing_over
                        .insert(vm.to_owned());
                    tracing::warn!(vm, peer, "the HA lock is {peer}'s: letting the paused QEMU send the rest, then quitting it");
                    if let Err(e) = finish_stream(&qmp, deadline).await {
                        tracing::error!(
                            vm,
                            peer,
                            "{e}; {peer} holds the lock and boots the VM afresh"
                        );
                    }
                    slot.quit_migrated(&self.shell, &peer).await;
                    self.moves.lock().unwrap().handing_over.remove(vm);
                }
                Settle::AwaitStream | Settle::Quit => {
                    tracing::warn!(
                        vm,
                        peer,
                        "the HA lock is {holder}: quitting this QEMU, never resumed"
                    );
                    slot.quit_migrated(&self.shell, &peer).await;
                    slot.update_status(|s| {
                        s.state_reason = Some(format!(
                            "quit after an agent restart mid-move: the HA lock is {holder}"
                        ))
                    });
                    discarded = true;
                }
                Settle::Forget => {}
            }
            break;
        }
        if source {
            let _ = store.forget(keys::migration(key)).await;
            let _ = store.forget(keys::incoming(key)).await;
        } else if discarded && record.is_some() {
            // The source sees this host withdraw and resumes the guest there.
            let _ = store.forget(keys::incoming(key)).await;
        }
        if source {
            return;
        }
        let kept_here = arrival.is_some();
        // Without a record of its own (kept by an agent before this one), the move's: its older
        // copies found by their names.
        let arrival = arrival.or_else(|| {
            record.map(|r| {
                Arrival::new(vm, &r.id, &r.from, &r.running, |_, kept| {
                    std::fs::symlink_metadata(kept).is_ok()
                })
            })
        });
        match (arrival, last) {
            (Some(arrival), Some((qemu, settled))) => {
                // Read only once the answer is withdrawn: the lock can no longer move here.
                let reached = if discarded {
                    self.reached(store, key, &arrival.id).await
                } else {
                    Reached::Unknown
                };
                let images = interrupted::images_after(source, &qemu, &settled, reached);
                end_images(vm, images, &arrival);
                self.shell.arrivals.remove(vm);
            }
            // Its QEMU went meanwhile.
            (Some(arrival), None) if kept_here => {
                if let Leftover::Images(images) =
                    arrival::leftover(arrival.confirmed, QemuHere::None)
                {
                    self.end_arrival_without_qemu(&arrival, images);
                }
            }
            _ => {}
        }
    }

    /// How far move `id` to this host got, as the store says now (the lock read before the
    /// request: both change in one transaction).
    pub(super) async fn reached(&self, store: &MoveStore, key: &VmKey, id: &str) -> Reached {
        let (lock, _) = self
            .lock_seen(store, key, Some(self.host_id.as_str()))
            .await;
        match (lock, store.requests_involving(&self.host_id).await) {
            (LockSeen::Unknown, _) | (_, Err(_)) => Reached::Unknown,
            (lock, Ok(requests)) => {
                let phase = requests
                    .into_iter()
                    .find(|(k, r)| k == key && r.id == id)
                    .map(|(_, r)| r.phase);
                interrupted::reached(phase, matches!(lock, LockSeen::Here | LockSeen::Target))
            }
        }
    }

    /// Who holds `key`'s lock, relative to this host and the move's target `to`; and a name
    /// for it.
    async fn lock_seen(
        &self,
        store: &MoveStore,
        key: &VmKey,
        to: Option<&str>,
    ) -> (LockSeen, String) {
        let lease = self
            .chainfire
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|s| s.lease_id());
        match store.lock_holder(key).await {
            Ok(Some(holder)) if holder.host == self.host_id && Some(holder.lease) == lease => {
                (LockSeen::Here, "this host's".into())
            }
            Ok(Some(holder)) if to == Some(holder.host.as_str()) => {
                (LockSeen::Target, format!("{}'s", holder.host))
            }
            Ok(Some(holder)) => (
                LockSeen::Elsewhere,
                format!("{}'s (lease {})", holder.host, holder.lease),
            ),
            Ok(None) => (LockSeen::Elsewhere, "held by no host".into()),
            Err(e) => (LockSeen::Unknown, format!("{e:#}")),
        }
    }
}

/// A VM held from reconciles: its reconcile lock, owned.
pub(super) struct Held {
    slot: Arc<VmSlot>,
    _reconcile: OwnedMutexGuard<()>,
}

impl Held {
    async fn take(slot: Arc<VmSlot>) -> Held {
        let reconcile = Arc::clone(&slot.reconciling).lock_owned().await;
        Held {
            slot,
            _reconcile: reconcile,
        }
    }
}

/// Lets a source paused at the switchover send the rest; Err when it does not complete.
async fn finish_stream(qmp: &Qmp, deadline: Instant) -> Result<(), String> {
    qemu_migrate::continue_after_pause(qmp)
        .await
        .map_err(|e| format!("migrate-continue: {e}"))?;
    while Instant::now() < deadline {
        let status = qemu_migrate::status(qmp)
            .await
            .map_err(|e| format!("query-migrate: {e}"))?;
        match status.status.as_deref() {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                return Err(format!(
                    "the migration {s} after the switchover: {}",
                    status.error.as_deref().unwrap_or("QEMU gave no reason")
                ))
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
    Err("the rest of the stream was not sent in time".into())
}

/// The QEMU of `slot` as QMP says (None: no QEMU, or it does not answer).
pub(super) async fn adopted_qemu(slot: &VmSlot) -> Option<AdoptedQemu> {
    let qmp = slot.qmp().await?;
    let migration = qemu_migrate::status(&qmp).await.ok()?;
    let status = qmp
        .command("query-status", serde_json::json!({}))
        .await
        .ok()?;
    Some(AdoptedQemu {
        migration: migration.status.unwrap_or_else(|| "none".into()),
        run_state: status["status"].as_str()?.to_owned(),
    })
}
