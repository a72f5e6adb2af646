//! The ChainFire session: tokio tasks the daemon talks to through channels, so nothing the store
//! does (slowness, outages) ever blocks the daemon's event loop.
//!
//! - the daemon hands over its full local picture with [`SessionHandle::sync`] (latest wins);
//! - the session publishes real changes only, watches `/plasmavmc/` from its last revision,
//!   marks lost hosts' VMs `unknown`, takes HA locks;
//! - [`SessionHandle::may_run`] says which HA VMs this host may run now (self-fencing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Client, WatchOptions};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use super::backoff::Backoff;
use super::config::ChainFireConfig;
use super::events::{StateEvent, StateSink};
use super::fence::{self, LeaseStatus};
use super::keys::{self, VmKey};
use super::reconcile::{self, Write};
use super::records::{self, HostRecord, LocalVm};
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

/// The daemon's end. Dropping it stops the session without revoking the lease (like a crash:
/// the host key and HA locks go when the lease expires); [`SessionHandle::shutdown`] revokes.
pub struct SessionHandle {
    config: ChainFireConfig,
    local: watch::Sender<Option<BTreeMap<VmKey, LocalVm>>>,
    may_run: watch::Receiver<BTreeSet<VmKey>>,
    cluster: watch::Receiver<Arc<ClusterView>>,
    lease: watch::Receiver<Option<LeaseStatus>>,
    notices: broadcast::Sender<Notice>,
    tasks: Vec<JoinHandle<()>>,
}

impl Session {
    /// Starts the session's tasks on the current tokio runtime. Returns at once: the store may
    /// well be unreachable; the session keeps trying.
    pub fn start(config: ChainFireConfig) -> anyhow::Result<SessionHandle> {
        config.check()?;
        let (local_tx, local_rx) = watch::channel(None);
        let (lease_tx, lease_rx) = watch::channel(None);
        let (held_tx, held_rx) = watch::channel(BTreeMap::new());
        let (may_run_tx, may_run_rx) = watch::channel(BTreeSet::new());
        let (cluster_tx, cluster_rx) = watch::channel(Arc::new(ClusterView::default()));
        let (notices, _) = broadcast::channel(4096);
        let worker = Worker {
            config: config.clone(),
            view: ClusterView::default(),
            revision: 0,
            registered_lease: None,
            started_at: records::now(),
            local: local_rx,
            lease: lease_rx.clone(),
            held: held_tx,
            cluster: cluster_tx,
            notices: notices.clone(),
        };
        let tasks = vec![
            tokio::spawn(lease::keep_alive(config.clone(), lease_tx)),
            tokio::spawn(gate(config.clone(), lease_rx.clone(), held_rx, may_run_tx)),
            tokio::spawn(worker.run()),
        ];
        Ok(SessionHandle {
            config,
            local: local_tx,
            may_run: may_run_rx,
            cluster: cluster_rx,
            lease: lease_rx,
            notices,
            tasks,
        })
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

    /// Stops the session and revokes its lease: the host key and HA locks go at once, so
    /// standby hosts take over without waiting for the TTL. Best effort when the store is away.
    pub async fn shutdown(mut self) {
        self.abort();
        let Some(lease) = self.lease_id() else { return };
        let revoked = async {
            let mut client = self.config.connect().await?;
            client
                .lease_revoke(lease)
                .await
                .context("revoking the lease")
        };
        match tokio::time::timeout(self.config.op_timeout(), revoked).await {
            Ok(Ok(_)) => tracing::info!(lease, "chainfire: lease revoked"),
            Ok(Err(e)) => {
                tracing::warn!(lease, error = %format!("{e:#}"), "chainfire: lease not revoked")
            }
            Err(_) => tracing::warn!(lease, "chainfire: lease revoke timed out"),
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

/// Recomputes [`fence::may_run`] whenever the lease, the held locks or the trust deadline move.
async fn gate(
    config: ChainFireConfig,
    mut lease: watch::Receiver<Option<LeaseStatus>>,
    mut held: watch::Receiver<BTreeMap<VmKey, i64>>,
    may_run: watch::Sender<BTreeSet<VmKey>>,
) {
    let (ttl, margin) = (config.lease_ttl, config.fence_margin());
    loop {
        let now = Instant::now();
        let status = *lease.borrow_and_update();
        let allowed = fence::may_run(&held.borrow_and_update(), status.as_ref(), ttl, margin, now);
        may_run.send_if_modified(|current| {
            let changed = *current != allowed;
            if changed {
                tracing::info!(may_run = ?allowed, "chainfire: HA VMs this host may run");
                *current = allowed;
            }
            changed
        });
        let deadline = status
            .map(|l| fence::trusted_until(&l, ttl, margin))
            .filter(|d| *d > now);
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { break },
            changed = held.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline.unwrap_or(now).into()), if deadline.is_some() => {}
        }
    }
    may_run.send_replace(BTreeSet::new());
}

/// Publishing, watching and reconciling, in one task.
struct Worker {
    config: ChainFireConfig,
    view: ClusterView,
    /// Last store revision the view has seen; 0: read everything first.
    revision: i64,
    /// The lease the host key was last written under.
    registered_lease: Option<i64>,
    started_at: String,
    local: watch::Receiver<Option<BTreeMap<VmKey, LocalVm>>>,
    lease: watch::Receiver<Option<LeaseStatus>>,
    held: watch::Sender<BTreeMap<VmKey, i64>>,
    cluster: watch::Sender<Arc<ClusterView>>,
    notices: broadcast::Sender<Notice>,
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
        let mut client = self.config.connect().await?;
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
        loop {
            tokio::select! {
                message = watch.message() => {
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
                }
                changed = self.local.changed() => changed.context("daemon gone")?,
                changed = self.lease.changed() => changed.context("lease task gone")?,
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
            return Ok(()); // nothing is written before the host key can be bound to a lease
        };
        if self.registered_lease != Some(lease) || !self.view.hosts.contains_key(&host) {
            store::put_host(client, &host, lease, &self.started_at, limit).await?;
            let record = HostRecord {
                host_id: host.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                started_at: self.started_at.clone(),
            };
            self.view.apply(&StateEvent::HostUp {
                host_id: host.clone(),
                record,
            });
            self.registered_lease = Some(lease);
        }
        let local = self.local.borrow_and_update().clone();
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
        let _ = self.notices.send(notice); // nobody listening is fine
    }
}

/// One-shot read of the whole cluster, for `plasmavmc status --cluster`.
pub async fn read_cluster(config: &ChainFireConfig) -> anyhow::Result<ClusterView> {
    let mut client = config.connect().await?;
    let (events, _) = store::load(&mut client, config.op_timeout()).await?;
    let mut view = ClusterView::default();
    events.iter().for_each(|e| view.apply(e));
    Ok(view)
}
