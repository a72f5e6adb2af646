//! The store side of the session: reading the whole prefix, conditional writes, watch events.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::events::{decode, Change, StateEvent};
use super::keys;
use super::reconcile::Write;
use super::records::{self, HostRecord, LockRecord};

/// Everything under `/plasmavmc/`, as events, and the revision it was read at.
pub async fn load(
    client: &mut Client,
    timeout: Duration,
) -> anyhow::Result<(Vec<StateEvent>, i64)> {
    let read = client.get(keys::ROOT, Some(GetOptions::new().with_prefix()));
    let resp = tokio::time::timeout(timeout, read)
        .await
        .context("reading the store timed out")??;
    let revision = resp.header().map_or(0, |h| h.revision());
    let events = resp
        .kvs()
        .iter()
        .map(|kv| decode(Change::Put, kv.key(), kv.value(), kv.mod_revision()))
        .collect();
    Ok((events, revision))
}

pub fn watch_event(event: &etcd_client::Event) -> Option<StateEvent> {
    let kv = event.kv()?;
    let change = match event.event_type() {
        EventType::Put => Change::Put,
        EventType::Delete => Change::Delete,
    };
    Some(decode(change, kv.key(), kv.value(), kv.mod_revision()))
}

/// What a write did: `applied` or not, and the event that brings the view up to date either
/// way (the write itself, or the key as the store holds it after a failed compare).
pub struct Outcome {
    pub applied: bool,
    pub event: StateEvent,
}

/// One conditional write, one transaction.
pub async fn execute(
    client: &mut Client,
    write: &Write,
    host: &str,
    lease: i64,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let Operation {
        key,
        compare,
        value,
    } = operation(write, host, lease)?;
    let op = match &value {
        Some(value) => {
            let options = matches!(write, Write::AcquireLock { .. })
                .then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key.clone(), value.clone(), options)
        }
        None => TxnOp::delete(key.clone(), None),
    };
    let txn = Txn::new()
        .when([compare])
        .and_then([op])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = tokio::time::timeout(timeout, client.txn(txn))
        .await
        .with_context(|| format!("writing {key} timed out"))??;
    let revision = resp.header().map_or(0, |h| h.revision());
    if resp.succeeded() {
        let event = match &value {
            Some(value) => decode(Change::Put, key.as_bytes(), value, revision),
            None => decode(Change::Delete, key.as_bytes(), b"", revision),
        };
        return Ok(Outcome {
            applied: true,
            event,
        });
    }
    let current = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| decode(Change::Put, kv.key(), kv.value(), kv.mod_revision())),
        _ => None,
    });
    let event = current.unwrap_or_else(|| decode(Change::Delete, key.as_bytes(), b"", revision));
    Ok(Outcome {
        applied: false,
        event,
    })
}

/// Registers this host under its lease. Unconditional: the key is this host's alone.
pub async fn put_host(
    client: &mut Client,
    record: &HostRecord,
    lease: i64,
    timeout: Duration,
) -> anyhow::Result<i64> {
    let put = client.put(
        keys::host(&record.host_id),
        serde_json::to_vec(record)?,
        Some(PutOptions::new().with_lease(lease)),
    );
    let resp = tokio::time::timeout(timeout, put)
        .await
        .context("registering the host timed out")??;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// A write as the store sees it: the key, the condition, and the value to put (none: delete).
struct Operation {
    key: String,
    compare: Compare,
    value: Option<Vec<u8>>,
}

fn operation(write: &Write, host: &str, lease: i64) -> anyhow::Result<Operation> {
    let at_revision = |key: String, expected: i64, value: Option<Vec<u8>>| Operation {
        compare: Compare::mod_revision(key.clone(), CompareOp::Equal, expected),
        key,
        value,
    };
    Ok(match write {
        Write::PutVm { record, expected } => {
            let stamped = records::VmRecord {
                updated_at: records::now(),
                ..record.clone()
            };
            at_revision(
                keys::vm(&record.key()),
                *expected,
                Some(serde_json::to_vec(&stamped)?),
            )
        }
        Write::DeleteVm { key, expected } => at_revision(keys::vm(key), *expected, None),
        Write::PutHandle {
            key,
            record,
            expected,
        } => at_revision(
            keys::handle(key),
            *expected,
            Some(serde_json::to_vec(record)?),
        ),
        Write::DeleteHandle { key, expected } => at_revision(keys::handle(key), *expected, None),
        Write::AcquireLock { key } => {
            let holder = LockRecord {
                host: host.to_owned(),
                lease,
                acquired_at: records::now(),
            };
            let key = keys::lock(key);
            Operation {
                compare: Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                key,
                value: Some(serde_json::to_vec(&holder)?),
            }
        }
        Write::ReleaseLock { key } => {
            let key = keys::lock(key);
            Operation {
                compare: Compare::lease(key.clone(), CompareOp::Equal, lease),
                key,
                value: None,
            }
        }
    })
}
