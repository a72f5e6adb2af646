//! The store side of a live migration: the source's request, the target's answer, and the one
//! conditional transaction that moves the HA lock at the switchover (see `migration::record`).
//! Every key is bound to its writer's lease, so a dead agent's part of a move vanishes with it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use super::config::ChainFireConfig;
use super::keys::{self, VmKey};
use super::records::{self, LockRecord};
use crate::migration::{Answer, IncomingRecord, MigrationRecord, Phase};

/// One connection for one move.
pub struct MoveStore {
    client: Client,
    timeout: Duration,
}

/// How the lock transaction went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// The lock is the target's, the request says `switchover`.
    Moved,
    /// Nothing was written: the lock, the request or the answer was not as read (why).
    Refused(String),
}

impl MoveStore {
    pub async fn connect(config: &ChainFireConfig) -> Result<MoveStore> {
        Ok(MoveStore {
            client: config.connect(&mut config.members()).await?,
            timeout: config.op_timeout(),
        })
    }

    /// The request, rewritten (its phase moved on), still under the source's lease.
    pub async fn update(&self, record: &MigrationRecord, key: &VmKey, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(record)?;
        let options = PutOptions::new().with_lease(lease);
        self.run(
            client.put(keys::migration(key), value, Some(options)),
            "updating the move",
        )
        .await??;
        Ok(())
    }

    /// Records the source's request under its lease; refused when a move of the VM is already
    /// recorded (by anyone).
    pub async fn request(&self, record: &MigrationRecord, key: &VmKey, lease: i64) -> Result<()> {
        let path = keys::migration(key);
        let txn = Txn::new()
            .when([Compare::create_revision(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                path,
                serde_json::to_vec(record)?,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client.clone();
        let resp = self.run(client.txn(txn), "recording the move").await??;
        if !resp.succeeded() {
            bail!(
                "a move of {key} is already in flight (see {})",
                keys::migration(key)
            );
        }
        Ok(())
    }

    /// The target's answer, under the target's lease.
    pub async fn answer(&self, key: &VmKey, record: &IncomingRecord, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(record)?;
        let options = PutOptions::new().with_lease(lease);
        self.run(
            client.put(keys::incoming(key), value, Some(options)),
            "answering the move",
        )
        .await??;
        Ok(())
    }

    /// Removes the request (the source, at the end of a move) or the answer (either side).
    pub async fn forget(&self, path: String) -> Result<()> {
        let mut client = self.client.clone();
        self.run(client.delete(path, None), "removing a move's key")
            .await??;
        Ok(())
    }

    /// Every move recorded with `host` as its source or target, by VM (what an agent restarted
    /// mid-move finds of its previous agent's moves). An unreadable record is skipped.
    pub async fn requests_involving(&self, host: &str) -> Result<Vec<(VmKey, MigrationRecord)>> {
        let mut client = self.client.clone();
        let options = etcd_client::GetOptions::new().with_prefix();
        let resp = self
            .run(
                client.get(keys::MIGRATIONS, Some(options)),
                "reading the recorded moves",
            )
            .await??;
        let mut found = Vec::new();
        for kv in resp.kvs() {
            let Ok(keys::Key::Migration(key)) = keys::parse(kv.key()) else {
                continue;
            };
            match serde_json::from_slice::<MigrationRecord>(kv.value()) {
                Ok(record) if record.from == host || record.to == host => found.push((key, record)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(key = %keys::migration(&key), "an unreadable move record: {e}")
                }
            }
        }
        Ok(found)
    }

    /// Who holds VM `key`'s lock now, as the store says.
    pub async fn lock_holder(&self, key: &VmKey) -> Result<Option<LockRecord>> {
        let mut client = self.client.clone();
        let resp = self
            .run(client.get(keys::lock(key), None), "reading the HA lock")
            .await??;
        resp.kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).context("the HA lock is unreadable"))
            .transpose()
    }

    /// The switchover: in one transaction, the HA lock goes from `source` (under `source_lease`)
    /// to the target named by `answer` (under the target's lease) and the request's phase
    /// becomes `switchover` — only if the lock, the request and the answer are exactly as read
    /// here. Never half: either the target holds the lock and the phase says so, or nothing
    /// changed.
    pub async fn switch_lock(
        &self,
        key: &VmKey,
        request: &MigrationRecord,
        source_lease: i64,
        answer_id: &str,
    ) -> Result<Switch> {
        let (lock, migration, incoming) =
            (keys::lock(key), keys::migration(key), keys::incoming(key));
        let mut client = self.client.clone();
        let read = Txn::new().and_then([
            TxnOp::get(lock.clone(), None),
            TxnOp::get(migration.clone(), None),
            TxnOp::get(incoming.clone(), None),
        ]);
        let resp = self
            .run(client.txn(read), "reading the lock before the switchover")
            .await??;
        let mut kvs = resp.op_responses().into_iter().map(|r| match r {
            etcd_client::TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let (Some(Some(lock_kv)), Some(Some(migration_kv)), Some(Some(incoming_kv))) =
            (kvs.next(), kvs.next(), kvs.next())
        else {
            return Ok(Switch::Refused(
                "the lock, the request or the target's answer is gone".into(),
            ));
        };
        let holder: LockRecord = serde_json::from_slice(lock_kv.value())?;
        if holder.host != request.from || holder.lease != source_lease {
            return Ok(Switch::Refused(format!(
                "the lock is no longer this host's (held by {} under lease {})",
                holder.host, holder.lease
            )));
        }
        let stored: MigrationRecord = serde_json::from_slice(migration_kv.value())?;
        let target: IncomingRecord = serde_json::from_slice(incoming_kv.value())?;
        if stored.id != request.id || target.id != answer_id || target.host != request.to {
            return Ok(Switch::Refused(
                "the request or the answer is another move's".into(),
            ));
        }
        if target.answer != Answer::Confirmed {
            return Ok(Switch::Refused(
                "the target has not confirmed the switchover".into(),
            ));
        }
        let moved = LockRecord {
            host: target.host.clone(),
            lease: target.lease,
            acquired_at: records::now(),
        };
        let switched = MigrationRecord {
            phase: Phase::Switchover,
            ..request.clone()
        };
        let txn = Txn::new()
            .when([
                Compare::mod_revision(lock.clone(), CompareOp::Equal, lock_kv.mod_revision()),
                Compare::mod_revision(
                    migration.clone(),
                    CompareOp::Equal,
                    migration_kv.mod_revision(),
                ),
                Compare::mod_revision(incoming, CompareOp::Equal, incoming_kv.mod_revision()),
            ])
            .and_then([
                TxnOp::put(
                    lock,
                    serde_json::to_vec(&moved)?,
                    Some(PutOptions::new().with_lease(target.lease)),
                ),
                TxnOp::put(
                    migration,
                    serde_json::to_vec(&switched)?,
                    Some(PutOptions::new().with_lease(source_lease)),
                ),
            ]);
        let resp = self.run(client.txn(txn), "moving the HA lock").await??;
        Ok(if resp.succeeded() {
            Switch::Moved
        } else {
            Switch::Refused("the lock, the request or the answer changed meanwhile".into())
        })
    }

    async fn run<F: std::future::Future>(&self, future: F, what: &str) -> Result<F::Output> {
        tokio::time::timeout(self.timeout, future)
            .await
            .with_context(|| format!("{what}: ChainFire did not answer within {:?}", self.timeout))
    }
}
