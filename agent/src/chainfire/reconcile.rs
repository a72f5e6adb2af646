//! What to write so the store matches this host: a pure function of the host's local picture
//! and the store view. Startup reconciliation, publishing on change, republishing after an
//! outage and marking lost hosts' VMs are all this one comparison.
//!
//! Every write is conditional on the revision the view holds for the key, so a stale view costs
//! a failed compare and a re-read, never a lost update, and two agents never fight.

use std::collections::BTreeMap;

use super::keys::VmKey;
use super::records::{HandleRecord, HostRecord, LocalVm, VmRecord, STATE_UNKNOWN};
use super::view::ClusterView;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Put `record` if the key is still at `expected` (0: absent).
    PutVm {
        record: VmRecord,
        expected: i64,
    },
    DeleteVm {
        key: VmKey,
        expected: i64,
    },
    PutHandle {
        key: VmKey,
        record: HandleRecord,
        expected: i64,
    },
    DeleteHandle {
        key: VmKey,
        expected: i64,
    },
    /// Create the HA lock bound to this host's lease, if nobody holds it.
    AcquireLock {
        key: VmKey,
    },
    /// Delete this host's HA lock (the VM is no longer declared here as HA, or this host no
    /// longer wants to run it).
    ReleaseLock {
        key: VmKey,
    },
}

/// What this host's entries need. `lease` is the current lease id; locks of another lease are
/// not this session's to release (they expire with their lease).
pub fn own_writes(
    host: &str,
    lease: i64,
    local: &BTreeMap<VmKey, LocalVm>,
    view: &ClusterView,
) -> Vec<Write> {
    let mut writes = Vec::new();
    let cordoned = view.is_cordoned(host);
    for (key, vm) in local {
        if vm.record.spec.ha && seeks_lock(vm, cordoned) && !view.locks.contains_key(key) {
            writes.push(Write::AcquireLock { key: key.clone() });
        }
        if !publishable(host, lease, key, vm, view) {
            continue;
        }
        let stored = view.vms.get(key);
        if !stored.is_some_and(|s| s.value.same_content(&vm.record)) {
            writes.push(Write::PutVm {
                record: vm.record.clone(),
                expected: revision(stored),
            });
        }
        let stored = view.handles.get(key);
        match (&vm.handle, stored) {
            (Some(handle), Some(s)) if *handle == s.value => {}
            (Some(handle), _) => writes.push(Write::PutHandle {
                key: key.clone(),
                record: handle.clone(),
                expected: revision(stored),
            }),
            (None, Some(s)) if s.value.host == host => writes.push(Write::DeleteHandle {
                key: key.clone(),
                expected: s.revision,
            }),
            (None, _) => {}
        }
    }
    for (key, stored) in view.vms_on(host) {
        if !local.contains_key(key) {
            writes.push(Write::DeleteVm {
                key: key.clone(),
                expected: stored.revision,
            });
        }
    }
    for (key, stored) in &view.handles {
        if stored.value.host == host && !local.contains_key(key) {
            writes.push(Write::DeleteHandle {
                key: key.clone(),
                expected: stored.revision,
            });
        }
    }
    for (key, lock) in &view.locks {
        let still_wanted = local
            .get(key)
            .is_some_and(|vm| vm.record.spec.ha && seeks_lock(vm, cordoned));
        if lock.host == host && lock.lease == lease && !still_wanted {
            writes.push(Write::ReleaseLock { key: key.clone() });
        }
    }
    writes
}

/// Whether this host holds on to (or competes for) an HA VM's lock. A cordoned host keeps the
/// locks of the VMs running or arriving here (evacuation moves them away live) and no other:
/// nothing is failed over or started here while it is cordoned.
fn seeks_lock(vm: &LocalVm, cordoned: bool) -> bool {
    vm.wants_to_run && (!cordoned || vm.handle.is_some() || vm.arriving)
}

/// Entries that claim this host but have no VM here: `own_writes` removes them; the daemon
/// reports them.
pub fn orphans(host: &str, local: &BTreeMap<VmKey, LocalVm>, view: &ClusterView) -> Vec<VmKey> {
    view.vms_on(host)
        .map(|(key, _)| key)
        .filter(|key| !local.contains_key(*key))
        .cloned()
        .collect()
}

/// An HA VM's record is written by the lock holder, or by the host the record already names
/// (to show it stopped after fencing); a standby host stays silent.
fn publishable(host: &str, lease: i64, key: &VmKey, vm: &LocalVm, view: &ClusterView) -> bool {
    !vm.record.spec.ha
        || view
            .locks
            .get(key)
            .is_some_and(|l| l.host == host && l.lease == lease)
        || view.vms.get(key).is_some_and(|s| s.value.host == host)
}

/// Marks `unknown` every VM whose host has no live host key (its lease expired), except this
/// host's own. `seen_at` is stamped into the reason.
pub fn lost_host_writes(me: &str, view: &ClusterView, seen_at: &str) -> Vec<Write> {
    view.vms
        .values()
        .filter(|s| {
            s.value.host != me
                && s.value.state != STATE_UNKNOWN
                && !view.hosts.contains_key(&s.value.host)
        })
        .map(|s| Write::PutVm {
            record: VmRecord {
                state: STATE_UNKNOWN.to_owned(),
                last_error: Some(format!(
                    "host {} lost its lease (seen by {me} at {seen_at}); was {}",
                    s.value.host, s.value.state
                )),
                ..s.value.clone()
            },
            expected: s.revision,
        })
        .collect()
}

fn revision<T>(stamped: Option<&super::view::Stamped<T>>) -> i64 {
    stamped.map_or(0, |s| s.revision)
}

/// Whether the host key must be written: `record` under `lease` is not what this host last wrote
/// (`written`), or the view lost the key (deleted from outside). The view alone cannot say
/// whether the store holds `record`: the watch may still deliver an older write of this key, and
/// a view rolled back by it would make a newer record look written (an `uncordon` right after a
/// `cordon` was skipped so and the store kept the cordon).
pub fn host_key_needs_write(
    written: Option<&(i64, HostRecord)>,
    lease: i64,
    record: &HostRecord,
    in_view: bool,
) -> bool {
    !in_view || written.map_or(true, |(at, last)| *at != lease || last != record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chainfire::events::{StateEvent, StateSink};
    use crate::chainfire::records::LockRecord;

    fn record(name: &str, host: &str, state: &str, ha: bool) -> VmRecord {
        let mut record = VmRecord::for_test(&VmKey::new("o", "p", name), host, state);
        record.spec.ha = ha;
        record
    }

    fn handle(host: &str) -> HandleRecord {
        HandleRecord {
            host: host.into(),
            pid: 42,
            qmp_socket: "/run/q.sock".into(),
            started_at: "t0".into(),
        }
    }

    fn local(vms: &[(VmRecord, Option<HandleRecord>)]) -> BTreeMap<VmKey, LocalVm> {
        vms.iter()
            .map(|(r, h)| {
                (
                    r.key(),
                    LocalVm {
                        record: r.clone(),
                        handle: h.clone(),
                        wants_to_run: true,
                        arriving: false,
                    },
                )
            })
            .collect()
    }

    fn view_of(vms: &[(VmRecord, Option<HandleRecord>)], rev: i64) -> ClusterView {
        let mut view = ClusterView::default();
        for (r, h) in vms {
            view.apply(&StateEvent::VmUpdated {
                key: r.key(),
                record: r.clone(),
                revision: rev,
            });
            if let Some(h) = h {
                view.apply(&StateEvent::HandleUpdated {
                    key: r.key(),
                    record: h.clone(),
                    revision: rev,
                });
            }
        }
        view
    }

    fn lock(view: &mut ClusterView, name: &str, host: &str, lease: i64) {
        let holder = LockRecord {
            host: host.into(),
            lease,
            acquired_at: "t".into(),
        };
        view.apply(&StateEvent::LockTaken {
            key: VmKey::new("o", "p", name),
            holder,
        });
    }

    #[test]
    fn nothing_changed_means_no_writes_even_with_new_timestamps() {
        let vms = [(record("a", "h1", "running", false), Some(handle("h1")))];
        let view = view_of(&vms, 5);
        let mut fresh = local(&vms);
        fresh
            .values_mut()
            .for_each(|vm| vm.record.updated_at = "t1".into());
        assert_eq!(own_writes("h1", 1, &fresh, &view), vec![]);
    }

    #[test]
    fn one_write_per_real_change_conditional_on_the_seen_revision() {
        let view = view_of(
            &[(record("a", "h1", "running", false), Some(handle("h1")))],
            5,
        );
        let now = local(&[
            (record("a", "h1", "stopped", false), None),
            (record("b", "h1", "running", false), None),
        ]);
        assert_eq!(
            own_writes("h1", 1, &now, &view),
            vec![
                Write::PutVm {
                    record: record("a", "h1", "stopped", false),
                    expected: 5
                },
                Write::DeleteHandle {
                    key: VmKey::new("o", "p", "a"),
                    expected: 5
                },
                Write::PutVm {
                    record: record("b", "h1", "running", false),
                    expected: 0
                },
            ]
        );
    }

    #[test]
    fn entries_claiming_this_host_without_a_vm_are_removed_and_reported() {
        let view = view_of(
            &[
                (record("gone", "h1", "running", false), Some(handle("h1"))),
                (record("other", "h2", "running", false), None),
            ],
            3,
        );
        let none = BTreeMap::new();
        let key = VmKey::new("o", "p", "gone");
        assert_eq!(orphans("h1", &none, &view), vec![key.clone()]);
        assert_eq!(
            own_writes("h1", 1, &none, &view),
            vec![
                Write::DeleteVm {
                    key: key.clone(),
                    expected: 3
                },
                Write::DeleteHandle { key, expected: 3 }
            ]
        );
    }

    #[test]
    fn ha_vm_is_published_by_its_holder_only_and_locks_are_sought_when_free() {
        let ha = [(record("ha", "h2", "stopped", true), None)];
        let mut view = view_of(&[(record("ha", "h1", "running", true), None)], 4);
        lock(&mut view, "ha", "h1", 7);
        // Standby h2: the record names h1, the lock is h1's: nothing to write.
        assert_eq!(own_writes("h2", 9, &local(&ha), &view), vec![]);
        view.apply(&StateEvent::LockReleased {
            key: VmKey::new("o", "p", "ha"),
        });
        assert_eq!(
            own_writes("h2", 9, &local(&ha), &view),
            vec![Write::AcquireLock {
                key: VmKey::new("o", "p", "ha")
            }]
        );
        lock(&mut view, "ha", "h2", 9);
        assert_eq!(
            own_writes("h2", 9, &local(&ha), &view),
            vec![Write::PutVm {
                record: record("ha", "h2", "stopped", true),
                expected: 4
            }]
        );
        // No longer declared HA here: release.
        assert_eq!(
            own_writes("h2", 9, &BTreeMap::new(), &view),
            vec![Write::ReleaseLock {
                key: VmKey::new("o", "p", "ha")
            }]
        );
        // A lock of an older lease is not ours to release.
        assert_eq!(own_writes("h2", 10, &BTreeMap::new(), &view), vec![]);
    }

    #[test]
    fn a_host_that_does_not_want_to_run_an_ha_vm_lets_its_lock_go_and_seeks_none() {
        let mut unwanted = local(&[(record("ha", "h2", "stopped", true), None)]);
        unwanted.values_mut().for_each(|vm| vm.wants_to_run = false);
        let key = VmKey::new("o", "p", "ha");
        let mut view = view_of(&[(record("ha", "h2", "stopped", true), None)], 4);
        lock(&mut view, "ha", "h2", 9);
        assert_eq!(
            own_writes("h2", 9, &unwanted, &view),
            vec![Write::ReleaseLock { key: key.clone() }]
        );
        view.apply(&StateEvent::LockReleased { key });
        assert_eq!(own_writes("h2", 9, &unwanted, &view), vec![]);
    }

    fn cordon(view: &mut ClusterView, host: &str, cordoned: bool) {
        view.apply(&StateEvent::HostUp {
            host_id: host.into(),
            record: HostRecord {
                cordoned,
                ..HostRecord::of(host, "t", false, &BTreeMap::new())
            },
        });
    }

    #[test]
    fn a_cordoned_host_keeps_the_locks_of_what_runs_here_and_seeks_or_keeps_no_other() {
        let vms = [
            (record("running", "h2", "running", true), Some(handle("h2"))),
            (record("stopped", "h2", "stopped", true), None),
            (record("free", "h2", "stopped", true), None),
        ];
        let mut view = view_of(&vms[..2], 4);
        lock(&mut view, "running", "h2", 9);
        lock(&mut view, "stopped", "h2", 9);
        cordon(&mut view, "h2", true);
        assert_eq!(
            own_writes("h2", 9, &local(&vms), &view),
            vec![Write::ReleaseLock {
                key: VmKey::new("o", "p", "stopped")
            }],
            "keeps the running VM's lock, lets the stopped one's go, seeks no free one"
        );
        cordon(&mut view, "h2", false);
        assert_eq!(
            own_writes("h2", 9, &local(&vms), &view),
            vec![Write::AcquireLock {
                key: VmKey::new("o", "p", "free")
            }],
            "uncordoned: competes again"
        );
    }

    #[test]
    fn a_cordoned_host_keeps_the_lock_of_a_vm_arriving_here() {
        let vms = [(record("arriving", "h2", "stopped", true), None)];
        let mut view = view_of(&vms, 4);
        lock(&mut view, "arriving", "h2", 9);
        cordon(&mut view, "h2", true);
        let mut local = local(&vms);
        local.values_mut().for_each(|vm| vm.arriving = true);
        assert_eq!(
            own_writes("h2", 9, &local, &view),
            vec![],
            "the lock a move gave it stays while the VM is adopted"
        );
        local.values_mut().for_each(|vm| vm.arriving = false);
        assert_eq!(
            own_writes("h2", 9, &local, &view),
            vec![Write::ReleaseLock {
                key: VmKey::new("o", "p", "arriving")
            }],
            "neither running nor arriving: let go"
        );
    }

    #[test]
    fn vms_of_hosts_without_a_host_key_become_unknown_once() {
        let mut view = view_of(
            &[
                (record("a", "h2", "running", false), None),
                (record("b", "h1", "running", false), None),
            ],
            6,
        );
        view.apply(&StateEvent::HostUp {
            host_id: "h3".into(),
            record: HostRecord::of("h3", "t", false, &BTreeMap::new()),
        });
        let writes = lost_host_writes("h1", &view, "T");
        let [Write::PutVm {
            record,
            expected: 6,
        }] = &writes[..]
        else {
            panic!("{writes:?}")
        };
        assert_eq!(
            (record.name.as_str(), record.state.as_str()),
            ("a", STATE_UNKNOWN)
        );
        assert!(record
            .last_error
            .as_deref()
            .unwrap()
            .contains("host h2 lost its lease"));
        view.apply(&StateEvent::VmUpdated {
            key: record.key(),
            record: record.clone(),
            revision: 7,
        });
        assert_eq!(lost_host_writes("h1", &view, "T"), vec![]);
    }

    #[test]
    fn the_host_key_is_written_when_it_differs_from_the_last_write_whatever_the_view_says() {
        let cordoned = HostRecord::of("h", "t0", true, &BTreeMap::new());
        let open = HostRecord::of("h", "t0", false, &BTreeMap::new());
        // The last write was the cordon; a late watch event rolled the view back to `open`.
        let written = (7, cordoned.clone());
        assert!(host_key_needs_write(Some(&written), 7, &open, true));
        assert!(!host_key_needs_write(Some(&written), 7, &cordoned, true));
        // A new lease, nothing written yet, or the key gone from the view: write.
        assert!(host_key_needs_write(Some(&written), 8, &cordoned, true));
        assert!(host_key_needs_write(None, 7, &cordoned, true));
        assert!(host_key_needs_write(Some(&written), 7, &cordoned, false));
    }
}
