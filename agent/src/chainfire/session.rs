//! The ChainFire session: tokio tasks the daemon talks to through channels, so nothing the store
//! does (slowness, outages) ever blocks the daemon's event loop.
//!
//! - the daemon hands over its full local picture with [`SessionHandle::sync`] (latest wins);
//! - the session publishes real changes only, watches `/plasmavmc/` from its last revision,
//!   marks lost hosts' VMs `unknown`, takes HA locks;
//! - [`SessionHandle::may_run`] says which HA VMs this host may run now (self-fencing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, WatchOptions};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::backoff::Backoff;
use super::clock::{self, BootTime};
use super::config::ChainFireConfig;
use super::events::{StateEvent, StateSink};
use super::fence::{self, LeaseStatus};
use super::keys::{self, VmKey};
use super::members::Members;
use super::reconcile::{self, Write};
use super::records::{self, HostRecord, LocalVm};
use super::trust::{self, LeaseTrust};
use super::view::ClusterView;
use super::{lease, store};

/// What the session tells whoever listens (the daemon logs them; tests count them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Watching from this revision on.
    Connected {
        revision: i64,
    },
    Disconnected {
        error: String,
    },
    /// The watch start had been compacted: the view was re-read from scratch.
    Resynced {
        revision: i64,
    },
    /// A change in the store, as the watch delivered it.
    Store(StateEvent),
    /// A write this session made (one per real change). A `DeleteVm` found by reconciliation
    /// is an entry that claimed this host without a VM here; a `PutVm` with state `unknown`
    /// for another host's VM is a host-failure mark.
    Wrote(Write),
}

pub struct Session;

/// The daemon's end. Dropping it stops the session and leaves the lease alone: the next agent
/// on this host resumes it from the trust file; if none comes, it expires with its host key and
/// HA locks (after the fence guards have killed this host's HA VMs).
pub struct SessionHandle {
    config: ChainFireConfig,
    local: watch::Sender<Option<BTreeMap<VmKey, LocalVm>>>,
    cordoned: watch::Sender<bool>,
    published_cordon: watch::Receiver<Option<bool>>,
    may_run: watch::Receiver<BTreeSet<VmKey>>,
    cluster: watch::Receiver<Arc<ClusterView>>,
    lease: watch::Receiver<Option<LeaseStatus>>,
    notices: broadcast::Sender<Notice>,
    connected: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Session {
    /// Starts the session's tasks on the current tokio runtime. Returns at once: the store may
    /// well be unreachable; the session keeps trying. With a trust file left by the previous
    /// agent of this host (same host id, same boot), its lease is resumed and its locks trusted
    /// until the same deadline: a restarted agent keeps running the HA VMs it holds.
    pub fn start(config: ChainFireConfig) -> anyhow::Result<SessionHandle> {
        Session::start_cordoned(config, false)
    }

    /// [`Session::start`] for a host that is cordoned from its first write on (the cordon an
    /// earlier agent left in the state dir): no instant where it looks open to the cluster.
    pub fn start_cordoned(
        config: ChainFireConfig,
        cordoned: bool,
    ) -> anyhow::Result<SessionHandle> {
        config.check()?;
        let (lease, held) = restore(&config);
        let allowed = fence::may_run(&held, lease.as_ref(), BootTime::now());
        let (local_tx, local_rx) = watch::channel(None);
        let (cordoned_tx, cordoned_rx) = watch::channel(cordoned);
        let (published_cordon_tx, published_cordon) = watch::channel(None);
        let (lease_tx, lease_rx) = watch::channel(lease);
        let (held_tx, held_rx) = watch::channel(held);
        let (may_run_tx, may_run_rx) = watch::channel(allowed);
        let (cluster_tx, cluster_rx) = watch::channel(Arc::new(ClusterView::default()));
        let (notices, _) = broadcast::channel(4096);
        let (connected_tx, connected) = watch::channel(false);
        let worker = Worker {
            members: config.members(),
            config: config.clone(),
            view: ClusterView::default(),
            revision: 0,
            registered: None,
            started_at: records::now(),
            local: local_rx,
            cordoned: cordoned_rx,
            published_cordon: published_cordon_tx,
            lease: lease_rx.clone(),
            held: held_tx,
            cluster: cluster_tx,
            notices: notices.clone(),
            connected: connected_tx,
        };
        let tasks = vec![
            tokio::spawn(lease::keep_alive(config.clone(), lease_tx)),
            tokio::spawn(gate(config.clone(), lease_rx.clone(), held_rx, may_run_tx)),
            tokio::spawn(worker.run()),
        ];
        Ok(SessionHandle {
            config,
            local: local_tx,
            cordoned: cordoned_tx,
            published_cordon,
            may_run: may_run_rx,
            cluster: cluster_rx,
            lease: lease_rx,
            notices,
            connected,
            tasks,
        })
    }
}

/// The previous agent's lease and locks, from the trust file, if they are this host's and boot's.
fn restore(config: &ChainFireConfig) -> (Option<LeaseStatus>, BTreeMap<VmKey, i64>) {
    let Some(path) = &config.trust_file else {
        return Default::default();
    };
    let restored = trust::read(path)
        .ok()
        .and_then(|t| t.restore(&config.host_id, &clock::boot_id()));
    match restored {
        Some((lease, held)) => {
            tracing::info!(lease = lease.id, held = ?held.keys().collect::<Vec<_>>(), "chainfire: resuming the previous agent's lease");
            (Some(lease), held)
        }
        None => Default::default(),
    }
}

impl SessionHandle {
    /// The host's full local picture; the session writes what differs from the store. Never
    /// blocks; a newer picture replaces one not yet written. Records and handles are stamped
    /// with this session's host id.
    pub fn sync(&self, local: BTreeMap<VmKey, LocalVm>) {
        let host = &self.config.host_id;
        let local = local
            .into_iter()
            .map(|(key, mut vm)| {
                vm.record.host.clone_from(host);
                if let Some(handle) = vm.handle.as_mut() {
                    handle.host.clone_from(host);
                }
                (key, vm)
            })
            .collect();
        self.local.send_replace(Some(local));
    }

    /// Publishes this host cordoned (or not): a cordoned host seeks no HA lock for a VM that
    /// does not already run here, and lets go of the locks of those that stop.
    pub fn set_cordoned(&self, cordoned: bool) {
        self.cordoned
            .send_if_modified(|current| std::mem::replace(current, cordoned) != cordoned);
    }

    /// The cordon state the store holds for this host, as this session last wrote (or found)
    /// it under its current lease; None before that, and while it has no lease.
    pub fn published_cordon(&self) -> watch::Receiver<Option<bool>> {
        self.published_cordon.clone()
    }

    /// HA VMs this host may run now: their lock is held under a lease the host still trusts.
    /// An HA VM is desired-running only while in this set; when it leaves, stop it hard.
    pub fn may_run(&self) -> watch::Receiver<BTreeSet<VmKey>> {
        self.may_run.clone()
    }

    /// The whole cluster as the store says (updated as the watch delivers).
    pub fn cluster(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.cluster.clone()
    }

    pub fn notices(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    pub fn lease_id(&self) -> Option<i64> {
        self.lease.borrow().map(|l| l.id)
    }

    /// The lease as the keep-alive loop last saw it (None: no lease yet, or lost).
    pub fn lease_status(&self) -> Option<LeaseStatus> {
        *self.lease.borrow()
    }

    /// Whether the session is connected to the store now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    pub fn config(&self) -> &ChainFireConfig {
        &self.config
    }

    /// What HA VMs are launched under (see [`HaGate`]).
    pub fn ha_gate(&self) -> HaGate {
        HaGate {
            lease: self.lease.clone(),
            may_run: self.may_run.clone(),
        }
    }

    fn abort(&mut self) {
        self.tasks.drain(..).for_each(|t| t.abort());
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Which lease an HA VM starting now is bound to, for its fence guard.
#[derive(Clone)]
pub struct HaGate {
    lease: watch::Receiver<Option<LeaseStatus>>,
    may_run: watch::Receiver<BTreeSet<VmKey>>,
}

impl HaGate {
    /// The current lease, if this host may run HA VM `key` under it now.
    pub fn lease_for(&self, key: &VmKey) -> Option<i64> {
        let lease = self.lease.borrow().map(|l| l.id)?;
        self.may_run.borrow().contains(key).then_some(lease)
    }
}

/// Recomputes [`fence::may_run`] whenever the lease, the held locks or the trust deadline move,
/// and keeps the trust file in step (before anyone may act on the new `may_run`).
async fn gate(
    config: ChainFireConfig,
    mut lease: watch::Receiver<Option<LeaseStatus>>,
    mut held: watch::Receiver<BTreeMap<VmKey, i64>>,
    may_run: watch::Sender<BTreeSet<VmKey>>,
) {
    let boot_id = clock::boot_id();
    let mut persisted = None;
    loop {
        let now = BootTime::now();
        let status = *lease.borrow_and_update();
        let locks = held.borrow_and_update().clone();
        if let Some(path) = &config.trust_file {
            let trust = status.map(|l| LeaseTrust::new(&config.host_id, &boot_id, &l, &locks));
            if persisted.as_ref() != Some(&trust) {
                let written = match &trust {
                    Some(trust) => trust::write(path, trust),
                    None => trust::remove(path),
                };
                if let Err(e) = written {
                    tracing::error!("chainfire: {e:#}; fence guards cannot see the lease renewed");
                }
                persisted = Some(trust);
            }
        }
        let allowed = fence::may_run(&locks, status.as_ref(), now);
        may_run.send_if_modified(|current| {
            let changed = *current != allowed;
            if changed {
                tracing::info!(may_run = ?allowed, "chainfire: HA VMs this host may run");
                *current = allowed;
            }
            changed
        });
        let wait = status
            .map(|l| now.until(l.trusted_until()))
            .filter(|d| !d.is_zero());
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { break },
            changed = held.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
        }
    }
    may_run.send_replace(BTreeSet::new());
}

/// Publishing, watching and reconciling, in one task.
struct Worker {
    config: ChainFireConfig,
    /// Which store member the next connection tries first.
    members: Members,
    view: ClusterView,
    /// Last store revision the view has seen; 0: read everything first.
    revision: i64,
    /// The lease the host key was last written under, and the record written.
    registered: Option<(i64, HostRecord)>,
    started_at: String,
    local: watch::Receiver<Option<BTreeMap<VmKey, LocalVm>>>,
    cordoned: watch::Receiver<bool>,
    /// What the store holds of `cordoned` (see [`SessionHandle::published_cordon`]).
    published_cordon: watch::Sender<Option<bool>>,
    lease: watch::Receiver<Option<LeaseStatus>>,
    held: watch::Sender<BTreeMap<VmKey, i64>>,
    cluster: watch::Sender<Arc<ClusterView>>,
    notices: broadcast::Sender<Notice>,
    connected: watch::Sender<bool>,
}

impl Worker {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(2));
        loop {
            let error = self.connected(&mut backoff).await.unwrap_err();
            let error = format!("{error:#}");
            tracing::warn!(%error, "chainfire: store unreachable; local VMs untouched, retrying");
            self.notify(Notice::Disconnected { error });
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One connection's life: catch up, watch, publish. Returns only on trouble.
    async fn connected(
        &mut self,
        backoff: &mut Backoff,
    ) -> anyhow::Result<std::convert::Infallible> {
        let limit = self.config.op_timeout();
        let mut client = self.config.connect(&mut self.members).await?;
        if self.revision == 0 {
            self.reload(&mut client).await?;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let mut watch = tokio::time::timeout(limit, client.watch(keys::ROOT, Some(options)))
            .await
            .context("opening the watch timed out")??;
        self.notify(Notice::Connected {
            revision: self.revision,
        });
        self.flush(&mut client).await?;
        backoff.reset();
        // A watch on a connection that died silently (a partition without resets) would wait
        // forever: every `limit` it is asked for a progress report, and a whole `limit` without
        // any answer ends the connection.
        let mut liveness = tokio::time::interval(limit);
        liveness.tick().await;
        let mut unanswered = false;
        loop {
            tokio::select! {
                message = watch.message() => {
                    unanswered = false;
                    let response = message?.context("watch stream ended")?;
                    if response.canceled() {
                        if response.compact_revision() > 0 {
                            self.revision = 0;
                        }
                        bail!("watch canceled (compacted at {}): {}", response.compact_revision(), response.cancel_reason());
                    }
                    for event in response.events() {
                        let Some(decoded) = store::watch_event(event) else { continue };
                        self.revision = self.revision.max(event.kv().map_or(0, |kv| kv.mod_revision()));
                        if let StateEvent::Malformed { key, reason } = &decoded {
                            tracing::warn!(%key, %reason, "chainfire: unreadable entry");
                        }
                        self.view.apply(&decoded);
                        self.notify(Notice::Store(decoded));
                    }
                    // At once, before this host's own writes: a refusal made from the view
                    // (e.g. "host b is cordoned") follows the store as closely as it can.
                    self.cluster.send_replace(Arc::new(self.view.clone()));
                }
                changed = self.local.changed() => changed.context("daemon gone")?,
                changed = self.cordoned.changed() => changed.context("daemon gone")?,
                changed = self.lease.changed() => changed.context("lease task gone")?,
                _ = liveness.tick() => {
                    if unanswered {
                        bail!("the watch answered no progress request within {limit:?}");
                    }
                    watch.request_progress().await?;
                    unanswered = true;
                    continue;
                }
            }
            self.flush(&mut client).await?;
        }
    }

    /// Re-reads everything: at start, and when the watch start was compacted away. What changed
    /// meanwhile, deletions included, goes out as store notices before `Resynced`, so a sink
    /// that follows the notices ends up with the re-read view.
    async fn reload(&mut self, client: &mut Client) -> anyhow::Result<()> {
        let (events, revision) = store::load(client, self.config.op_timeout()).await?;
        let mut fresh = ClusterView::default();
        events.iter().for_each(|e| fresh.apply(e));
        for change in self.view.changes_to(&fresh, revision) {
            self.notify(Notice::Store(change));
        }
        self.view = fresh;
        self.revision = revision;
        self.notify(Notice::Resynced { revision });
        Ok(())
    }

    /// Brings the store in line: host key under the current lease, this host's entries, lost
    /// hosts' VMs marked. Writes only differences; a failed compare re-reads and re-plans.
    async fn flush(&mut self, client: &mut Client) -> anyhow::Result<()> {
        let limit = self.config.op_timeout();
        let host = self.config.host_id.clone();
        let Some(lease) = self.lease.borrow_and_update().map(|l| l.id) else {
            // Nothing is written before the host key can be bound to a lease (and the host key
            // of a lost lease is gone, or soon).
            self.published_cordon
                .send_if_modified(|p| p.take().is_some());
            return Ok(());
        };
        let local = self.local.borrow_and_update().clone();
        let cordoned = *self.cordoned.borrow_and_update();
        let record = HostRecord::of(
            &host,
            &self.started_at,
            cordoned,
            local.as_ref().unwrap_or(&BTreeMap::new()),
        )
        .with_facts(self.config.host_facts.clone());
        // Before the VM entries: a cordon is in the view (and the store) before `own_writes`
        // decides which locks to seek.
        let in_view = self.view.hosts.contains_key(&host);
        if reconcile::host_key_needs_write(self.registered.as_ref(), lease, &record, in_view) {
            store::put_host(client, &record, lease, limit).await?;
            self.view.apply(&StateEvent::HostUp {
                host_id: host.clone(),
                record: record.clone(),
            });
            self.registered = Some((lease, record));
        }
        self.published_cordon
            .send_if_modified(|p| p.replace(cordoned) != Some(cordoned));
        // A few rounds: each failed compare refreshes one key; a stale view converges quickly.
        for _ in 0..4 {
            let mut writes = reconcile::lost_host_writes(&host, &self.view, &records::now());
            if let Some(local) = &local {
                writes.extend(reconcile::own_writes(&host, lease, local, &self.view));
            }
            if writes.is_empty() {
                break;
            }
            for write in writes {
                let outcome = store::execute(client, &write, &host, lease, limit).await?;
                self.view.apply(&outcome.event);
                if outcome.applied {
                    tracing::debug!(?write, "chainfire: wrote");
                    self.notify(Notice::Wrote(write));
                }
            }
        }
        let held = self
            .view
            .locks
            .iter()
            .filter(|(_, lock)| lock.host == host)
            .map(|(key, lock)| (key.clone(), lock.lease))
            .collect();
        self.held
            .send_if_modified(|current| std::mem::replace(current, held) != *current);
        self.cluster.send_replace(Arc::new(self.view.clone()));
        Ok(())
    }

    fn notify(&self, notice: Notice) {
        match notice {
            Notice::Connected { .. } => self.connected.send_replace(true),
            Notice::Disconnected { .. } => self.connected.send_replace(false),
            _ => false,
        };
        let _ = self.notices.send(notice); // nobody listening is fine
    }
}
