//! An in-memory mirror of the store, fed by [`StateEvent`]s: what `status --cluster` renders
//! and what the publisher compares against.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::events::{StateEvent, StateSink};
use super::keys::VmKey;
use super::records::{HandleRecord, HostRecord, LockRecord, VmRecord};

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

impl ClusterView {
    /// VM records that name `host`.
    pub fn vms_on<'a>(
        &'a self,
        host: &'a str,
    ) -> impl Iterator<Item = (&'a VmKey, &'a Stamped<VmRecord>)> {
        self.vms.iter().filter(move |(_, r)| r.value.host == host)
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
            let alive = if self.hosts.contains_key(&vm.host) {
                "yes"
            } else {
                "no"
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
        for (key, reason) in &self.malformed {
            let _ = writeln!(out, "unreadable {key}: {reason}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chainfire::records::SpecSummary;

    fn record(state: &str) -> VmRecord {
        VmRecord {
            name: "vm1".into(),
            org_id: "a".into(),
            project_id: "b".into(),
            host: "h1".into(),
            state: state.into(),
            spec: SpecSummary {
                vcpus: 1,
                memory_mib: 64,
                disks: vec![],
                nics: vec![],
                ha: false,
            },
            pending: vec![],
            last_error: None,
            updated_at: String::new(),
        }
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

    #[test]
    fn render_names_host_liveness_and_state() {
        let key = VmKey::new("a", "b", "vm1");
        let mut view = ClusterView::default();
        view.apply(&StateEvent::VmUpdated {
            key,
            record: record("running"),
            revision: 1,
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
