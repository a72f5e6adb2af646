//! Store changes as typed events: the watch stream and the initial read both decode through
//! [`decode`], so a view built from a snapshot equals one built from the history.

use super::keys::{self, Key, VmKey};
use super::records::{HandleRecord, HostRecord, LockRecord, VmRecord};
use crate::migration::{IncomingRecord, MigrationRecord};

/// One change under `/plasmavmc/`. `revision` is the store revision of the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    VmUpdated {
        key: VmKey,
        record: VmRecord,
        revision: i64,
    },
    VmDeleted {
        key: VmKey,
        revision: i64,
    },
    HandleUpdated {
        key: VmKey,
        record: HandleRecord,
        revision: i64,
    },
    HandleDeleted {
        key: VmKey,
        revision: i64,
    },
    HostUp {
        host_id: String,
        record: HostRecord,
    },
    /// The host's key is gone: its lease expired or was revoked.
    HostDown {
        host_id: String,
    },
    LockTaken {
        key: VmKey,
        holder: LockRecord,
    },
    LockReleased {
        key: VmKey,
    },
    MigrationUpdated {
        key: VmKey,
        /// Boxed: it carries the VM's whole running configuration.
        record: Box<MigrationRecord>,
        revision: i64,
    },
    MigrationDeleted {
        key: VmKey,
        revision: i64,
    },
    IncomingUpdated {
        key: VmKey,
        record: IncomingRecord,
        revision: i64,
    },
    IncomingDeleted {
        key: VmKey,
        revision: i64,
    },
    /// A key or value this agent cannot read; reported, never fatal.
    Malformed {
        key: String,
        reason: String,
    },
}

/// Whether the change wrote or removed the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Put,
    Delete,
}

/// Applies events, in store order. Implemented by [`super::view::ClusterView`].
pub trait StateSink {
    fn apply(&mut self, event: &StateEvent);
}

/// Decodes one change. Never panics: anything unreadable becomes [`StateEvent::Malformed`].
pub fn decode(change: Change, key: &[u8], value: &[u8], revision: i64) -> StateEvent {
    let malformed = |reason: String| StateEvent::Malformed {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let parsed = match keys::parse(key) {
        Ok(parsed) => parsed,
        Err(e) => return malformed(e.to_string()),
    };
    let event = match (change, parsed) {
        (Change::Delete, Key::Vm(key)) => Ok(StateEvent::VmDeleted { key, revision }),
        (Change::Delete, Key::Handle(key)) => Ok(StateEvent::HandleDeleted { key, revision }),
        (Change::Delete, Key::Host(host_id)) => Ok(StateEvent::HostDown { host_id }),
        (Change::Delete, Key::Lock(key)) => Ok(StateEvent::LockReleased { key }),
        (Change::Delete, Key::Migration(key)) => Ok(StateEvent::MigrationDeleted { key, revision }),
        (Change::Delete, Key::Incoming(key)) => Ok(StateEvent::IncomingDeleted { key, revision }),
        (Change::Put, Key::Migration(key)) => {
            json(value).map(|record| StateEvent::MigrationUpdated {
                key,
                record,
                revision,
            })
        }
        (Change::Put, Key::Incoming(key)) => {
            json(value).map(|record| StateEvent::IncomingUpdated {
                key,
                record,
                revision,
            })
        }
        (Change::Put, Key::Vm(key)) => json(value).and_then(|record: VmRecord| {
            if record.key() == key {
                Ok(StateEvent::VmUpdated {
                    key,
                    record,
                    revision,
                })
            } else {
                Err(format!(
                    "record names {} but sits under {key}",
                    record.key()
                ))
            }
        }),
        (Change::Put, Key::Handle(key)) => json(value).map(|record| StateEvent::HandleUpdated {
            key,
            record,
            revision,
        }),
        (Change::Put, Key::Host(host_id)) => json(value).and_then(|record: HostRecord| {
            if record.host_id == host_id {
                Ok(StateEvent::HostUp { host_id, record })
            } else {
                Err(format!("record names host {:?}", record.host_id))
            }
        }),
        (Change::Put, Key::Lock(key)) => {
            json(value).map(|holder| StateEvent::LockTaken { key, holder })
        }
    };
    event.unwrap_or_else(malformed)
}

fn json<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(value);
    serde_path_to_error::deserialize(de)
        .map_err(|e| format!("value at {}: {}", e.path(), e.inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_put_and_delete_decode_with_their_key() {
        let key = VmKey::new("acme", "web", "vm1");
        let record = VmRecord::for_test(&key, "h1", "running");
        let raw = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            decode(Change::Put, keys::vm(&key).as_bytes(), &raw, 7),
            StateEvent::VmUpdated {
                key: key.clone(),
                record,
                revision: 7
            }
        );
        assert_eq!(
            decode(Change::Delete, keys::vm(&key).as_bytes(), b"", 8),
            StateEvent::VmDeleted { key, revision: 8 }
        );
    }

    #[test]
    fn unreadable_changes_are_reported_not_fatal() {
        let bad_key = decode(Change::Put, b"/plasmavmc/vms/a", b"{}", 1);
        assert!(
            matches!(bad_key, StateEvent::Malformed { ref reason, .. } if reason.contains("segments"))
        );
        let bad_json = decode(
            Change::Put,
            b"/plasmavmc/handles/a/b/c",
            b"{\"host\": 1}",
            1,
        );
        assert!(
            matches!(bad_json, StateEvent::Malformed { ref reason, .. } if reason.contains("host")),
            "{bad_json:?}"
        );
        let misplaced = br#"{"name":"x","orgId":"a","projectId":"b","host":"h","state":"s","spec":{"vcpus":1,"memoryMiB":1,"disks":[],"nics":[]}}"#;
        let wrong_key = decode(Change::Put, b"/plasmavmc/vms/a/b/c", misplaced, 1);
        assert!(
            matches!(wrong_key, StateEvent::Malformed { ref reason, .. } if reason.contains("sits under"))
        );
    }
}
