//! An in-memory mirror of the store, fed by [`StateEvent`]s: what `status --cluster` renders
//! and what the publisher compares against.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::events::{StateEvent, StateSink};
use super::keys::VmKey;
use super::records::{HandleRecord, HostRecord, LockRecord, VmRecord};
use crate::migration::{IncomingRecord, MigrationRecord};

/// A value with the store revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped<T> {
    pub value: T,
    pub revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub vms: BTreeMap<VmKey, Stamped<VmRecord>>,
    pub handles: BTreeMap<VmKey, Stamped<HandleRecord>>,
    pub hosts: BTreeMap<String, HostRecord>,
    pub locks: BTreeMap<VmKey, LockRecord>,
    /// Moves in flight: the sources' requests and the targets' answers.
    pub migrations: BTreeMap<VmKey, Stamped<MigrationRecord>>,
    pub incoming: BTreeMap<VmKey, Stamped<IncomingRecord>>,
    /// Keys that could not be read, with the reason.
    pub malformed: BTreeMap<String, String>,
}

impl StateSink for ClusterView {
    fn apply(&mut self, event: &StateEvent) {
        match event {
            StateEvent::VmUpdated {
                key,
                record,
                revision,
            } => put_newer(&mut self.vms, key, record, *revision),
            StateEvent::VmDeleted { key, revision } => delete_newer(&mut self.vms, key, *revision),
            StateEvent::HandleUpdated {
                key,
                record,
                revision,
            } => put_newer(&mut self.handles, key, record, *revision),
            StateEvent::HandleDeleted { key, revision } => {
                delete_newer(&mut self.handles, key, *revision)
            }
            StateEvent::HostUp { host_id, record } => {
                self.hosts.insert(host_id.clone(), record.clone());
            }
            StateEvent::HostDown { host_id } => {
                self.hosts.remove(host_id);
            }
            StateEvent::LockTaken { key, holder } => {
                self.locks.insert(key.clone(), holder.clone());
            }
            StateEvent::LockReleased { key } => {
                self.locks.remove(key);
            }
            StateEvent::MigrationUpdated {
                key,
                record,
                revision,
            } => put_newer(&mut self.migrations, key, record.as_ref(), *revision),
            StateEvent::MigrationDeleted { key, revision } => {
                delete_newer(&mut self.migrations, key, *revision)
            }
            StateEvent::IncomingUpdated {
                key,
                record,
                revision,
            } => put_newer(&mut self.incoming, key, record, *revision),
            StateEvent::IncomingDeleted { key, revision } => {
                delete_newer(&mut self.incoming, key, *revision)
            }
            StateEvent::Malformed { key, reason } => {
                self.malformed.insert(key.clone(), reason.clone());
            }
        }
    }
}

/// The session applies its own writes before their watch events come back; an event older than
/// what the view holds must not roll it back.
fn put_newer<T: Clone>(
    map: &mut BTreeMap<VmKey, Stamped<T>>,
    key: &VmKey,
    value: &T,
    revision: i64,
) {
    if !map.get(key).is_some_and(|old| old.revision > revision) {
        map.insert(
            key.clone(),
            Stamped {
                value: value.clone(),
                revision,
            },
        );
    }
}

fn delete_newer<T>(map: &mut BTreeMap<VmKey, Stamped<T>>, key: &VmKey, revision: i64) {
    if map.get(key).is_some_and(|old| old.revision <= revision) {
        map.remove(key);
    }
}

/// One event per key of `older` that `newer` lacks.
fn vanished<'a, K: Ord, V>(
    older: &'a BTreeMap<K, V>,
    newer: &'a BTreeMap<K, V>,
    event: impl Fn(&K) -> StateEvent + 'a,
) -> impl Iterator<Item = StateEvent> + 'a {
    older
        .keys()
        .filter(|key| !newer.contains_key(key))
        .map(event)
}

/// One event per entry of `newer` that `older` lacks or holds otherwise.
fn updated<'a, K: Ord, V: PartialEq>(
    older: &'a BTreeMap<K, V>,
    newer: &'a BTreeMap<K, V>,
    event: impl Fn(&K, &V) -> StateEvent + 'a,
) -> impl Iterator<Item = StateEvent> + 'a {
    newer
        .iter()
        .filter(|(key, value)| older.get(key) != Some(value))
        .map(move |(key, value)| event(key, value))
}

impl ClusterView {
    /// The events that turn this view into `newer`, a later reading of the same store (the
    /// resync after the watch lost its history). The deletions' own revisions were compacted
    /// away: they are dated `revision`, the one `newer` was read at. Malformed entries only
    /// accumulate, as on the watch: no event says a key became readable.
    pub fn changes_to(&self, newer: &ClusterView, revision: i64) -> Vec<StateEvent> {
        let mut events = Vec::new();
        events.extend(vanished(&self.vms, &newer.vms, |key| {
            StateEvent::VmDeleted {
                key: key.clone(),
                revision,
            }
        }));
        events.extend(updated(&self.vms, &newer.vms, |key, vm| {
            StateEvent::VmUpdated {
                key: key.clone(),
                record: vm.value.clone(),
                revision: vm.revision,
            }
        }));
        events.extend(vanished(&self.handles, &newer.handles, |key| {
            StateEvent::HandleDeleted {
                key: key.clone(),
                revision,
            }
        }));
        events.extend(updated(&self.handles, &newer.handles, |key, handle| {
            StateEvent::HandleUpdated {
                key: key.clone(),
                record: handle.value.clone(),
                revision: handle.revision,
            }
        }));
        events.extend(vanished(&self.hosts, &newer.hosts, |host_id| {
            StateEvent::HostDown {
                host_id: host_id.clone(),
            }
        }));
        events.extend(updated(&self.hosts, &newer.hosts, |host_id, record| {
            StateEvent::HostUp {
                host_id: host_id.clone(),
                record: record.clone(),
            }
        }));
        events.extend(vanished(&self.locks, &newer.locks, |key| {
            StateEvent::LockReleased { key: key.clone() }
        }));
        events.extend(updated(&self.locks, &newer.locks, |key, holder| {
            StateEvent::LockTaken {
                key: key.clone(),
                holder: holder.clone(),
            }
        }));
        events.extend(vanished(&self.migrations, &newer.migrations, |key| {
            StateEvent::MigrationDeleted {
                key: key.clone(),
                revision,
            }
        }));
        events.extend(updated(&self.migrations, &newer.migrations, |key, m| {
            StateEvent::MigrationUpdated {
                key: key.clone(),
                record: Box::new(m.value.clone()),
                revision: m.revision,
            }
        }));
        events.extend(vanished(&self.incoming, &newer.incoming, |key| {
            StateEvent::IncomingDeleted {
                key: key.clone(),
                revision,
            }
        }));
        events.extend(updated(&self.incoming, &newer.incoming, |key, i| {
            StateEvent::IncomingUpdated {
                key: key.clone(),
                record: i.value.clone(),
                revision: i.revision,
            }
        }));
        events.extend(updated(&self.malformed, &newer.malformed, |key, reason| {
            StateEvent::Malformed {
                key: key.clone(),
                reason: reason.clone(),
            }
        }));
        events
    }

    /// VM records that name `host`.
    pub fn vms_on<'a>(
        &'a self,
        host: &'a str,
    ) -> impl Iterator<Item = (&'a VmKey, &'a Stamped<VmRecord>)> {
        self.vms.iter().filter(move |(_, r)| r.value.host == host)
    }

    /// Whether `host` is live and cordoned (`plasmavmc evacuate`): nothing moves or starts there.
    pub fn is_cordoned(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|h| h.cordoned)
    }

    /// Whether live `host` declares HA VM `key` (so it could run it).
    pub fn declares(&self, host: &str, key: &VmKey) -> bool {
        let key = key.to_string();
        self.hosts
            .get(host)
            .is_some_and(|h| h.ha_vms.contains(&key))
    }

    /// A table of every VM by host, for `plasmavmc status --cluster`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<32} {:<10} {:>6} {:<6} NOTE",
            "HOST", "ALIVE", "VM", "STATE", "PID", "HA"
        );
        let mut rows: Vec<_> = self.vms.iter().collect();
        rows.sort_by(|a, b| (&a.1.value.host, a.0).cmp(&(&b.1.value.host, b.0)));
        for (key, vm) in rows {
            let vm = &vm.value;
            let alive = match self.hosts.get(&vm.host) {
                Some(host) if host.cordoned => "cordoned",
                Some(_) => "yes",
                None => "no",
            };
            let pid = self
                .handles
                .get(key)
                .map(|h| h.value.pid.to_string())
                .unwrap_or_else(|| "-".into());
            let ha = match (vm.spec.ha, self.locks.get(key)) {
                (false, _) => "-".to_owned(),
                (true, Some(lock)) => format!("@{}", lock.host),
                (true, None) => "free".to_owned(),
            };
            let mut note = vm.last_error.clone().unwrap_or_default();
            if !vm.pending.is_empty() {
                let _ = write!(
                    note,
                    "{}pending: {}",
                    if note.is_empty() { "" } else { "; " },
                    vm.pending.join(", ")
                );
            }
            let _ = writeln!(
                out,
                "{:<16} {:<8} {:<32} {:<10} {:>6} {:<6} {note}",
                vm.host,
                alive,
                key.to_string(),
                vm.state,
                pid,
                ha
            );
        }
        let hosts: Vec<String> = self
            .hosts
            .values()
            .map(|h| match h.cordoned {
                true => format!("{} (cordoned)", h.host_id),
                false => h.host_id.clone(),
            })
            .collect();
        let _ = writeln!(out, "live hosts: {}", hosts.join(", "));
        for (key, reason) in &self.malformed {
            let _ = writeln!(out, "unreadable {key}: {reason}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: &str) -> VmRecord {
        VmRecord::for_test(&VmKey::new("a", "b", "vm1"), "h1", state)
    }

    #[test]
    fn older_events_do_not_roll_the_view_back() {
        let key = VmKey::new("a", "b", "vm1");
        let mut view = ClusterView::default();
        view.apply(&StateEvent::VmUpdated {
            key: key.clone(),
            record: record("running"),
            revision: 10,
        });
        view.apply(&StateEvent::VmUpdated {
            key: key.clone(),
            record: record("stopped"),
            revision: 9,
        });
        view.apply(&StateEvent::VmDeleted {
            key: key.clone(),
            revision: 8,
        });
        assert_eq!(view.vms[&key].value.state, "running");
        view.apply(&StateEvent::VmDeleted {
            key: key.clone(),
            revision: 11,
        });
        assert!(view.vms.is_empty());
    }

    fn view_of(events: &[StateEvent]) -> ClusterView {
        let mut view = ClusterView::default();
        events.iter().for_each(|e| view.apply(e));
        view
    }

    fn vm(name: &str, state: &str, revision: i64) -> StateEvent {
        StateEvent::VmUpdated {
            key: VmKey::new("a", "b", name),
            record: VmRecord {
                name: name.into(),
                ..record(state)
            },
            revision,
        }
    }

    fn handle(name: &str, pid: u32, revision: i64) -> StateEvent {
        StateEvent::HandleUpdated {
            key: VmKey::new("a", "b", name),
            record: HandleRecord {
                host: "h1".into(),
                pid,
                qmp_socket: format!("/run/{name}/qmp.sock"),
                started_at: "t0".into(),
            },
            revision,
        }
    }

    fn host(host_id: &str, started_at: &str) -> StateEvent {
        StateEvent::HostUp {
            host_id: host_id.into(),
            record: HostRecord::of(host_id, started_at, false, &BTreeMap::new()),
        }
    }

    fn lock(name: &str, holder: &str, lease: i64) -> StateEvent {
        StateEvent::LockTaken {
            key: VmKey::new("a", "b", name),
            holder: LockRecord {
                host: holder.into(),
                lease,
                acquired_at: "t0".into(),
            },
        }
    }

    fn malformed(key: &str) -> StateEvent {
        StateEvent::Malformed {
            key: key.into(),
            reason: "not JSON".into(),
        }
    }

    #[test]
    fn changes_name_every_deletion_dated_at_the_new_reading() {
        let older = view_of(&[
            vm("gone", "running", 3),
            handle("gone", 7, 4),
            vm("kept", "running", 5),
            host("h1", "t0"),
            lock("gone", "h1", 1),
        ]);
        let newer = view_of(&[vm("kept", "stopped", 9), vm("new", "running", 10)]);
        let key = |name: &str| VmKey::new("a", "b", name);
        assert_eq!(
            older.changes_to(&newer, 12),
            [
                StateEvent::VmDeleted {
                    key: key("gone"),
                    revision: 12
                },
                vm("kept", "stopped", 9),
                vm("new", "running", 10),
                StateEvent::HandleDeleted {
                    key: key("gone"),
                    revision: 12
                },
                StateEvent::HostDown {
                    host_id: "h1".into()
                },
                StateEvent::LockReleased { key: key("gone") },
            ]
        );
        assert!(newer.changes_to(&newer.clone(), 12).is_empty());
    }

    #[test]
    fn applying_the_changes_to_the_older_view_yields_the_newer() {
        let populated = [
            vm("vm1", "running", 5),
            vm("vm2", "running", 6),
            handle("vm1", 41, 7),
            host("h1", "t0"),
            host("h2", "t0"),
            lock("vm2", "h2", 20),
            malformed("/plasmavmc/vms/x"),
        ];
        let cases: [(&str, Vec<StateEvent>, Vec<StateEvent>); 6] = [
            ("from nothing", vec![], populated.to_vec()),
            // Without the malformed entry: nothing ever clears one.
            ("everything deleted", populated[..6].to_vec(), vec![]),
            ("nothing changed", populated.to_vec(), populated.to_vec()),
            (
                "a bit of everything",
                populated.to_vec(),
                vec![
                    vm("vm1", "stopped", 12),
                    vm("vm3", "running", 13),
                    handle("vm3", 43, 14),
                    host("h1", "t0"),
                    host("h3", "t1"),
                    lock("vm2", "h3", 30),
                    malformed("/plasmavmc/vms/x"),
                    malformed("/plasmavmc/hosts/y/z"),
                ],
            ),
            (
                "deleted and put back the same",
                vec![vm("vm1", "running", 5), handle("vm1", 41, 7)],
                vec![vm("vm1", "running", 15), handle("vm1", 41, 16)],
            ),
            (
                "agent restarted, lock retaken under a new lease",
                vec![host("h1", "t0"), lock("vm1", "h1", 20)],
                vec![host("h1", "t1"), lock("vm1", "h1", 21)],
            ),
        ];
        for (case, older, newer) in cases {
            let (older, newer) = (view_of(&older), view_of(&newer));
            let mut followed = older.clone();
            for event in older.changes_to(&newer, 20) {
                followed.apply(&event);
            }
            assert_eq!(followed, newer, "{case}");
        }
    }

    #[test]
    fn render_names_host_liveness_and_state() {
        let key = VmKey::new("a", "b", "vm1");
        let mut view = ClusterView::default();
        view.apply(&StateEvent::VmUpdated {
            key,
            record: record("running"),
            revision: 1,
        });
        view.apply(&host("h1", "t0"));
        view.apply(&StateEvent::HostUp {
            host_id: "h2".into(),
            record: HostRecord {
                cordoned: true,
                ..HostRecord::of("h2", "t0", false, &BTreeMap::new())
            },
        });
        let table = view.render();
        assert!(table.contains(" yes "), "{table}");
        assert!(table.contains("live hosts: h1, h2 (cordoned)"), "{table}");
        view.apply(&StateEvent::HostDown {
            host_id: "h1".into(),
        });
        let table = view.render();
        assert!(
            table.contains("h1")
                && table.contains("a/b/vm1")
                && table.contains("running")
                && table.contains(" no "),
            "{table}"
        );
    }
}
