//! A session whose watch history was compacted while it was cut off: after the heal it re-reads
//! the store, and its notices carry what changed meanwhile (deletions included) before
//! `Resynced`, so a sink following them loses nothing; its own view drops the deleted keys.

mod support;

use std::time::Duration;

use plasmavmc_agent::chainfire::{Notice, Session, StateEvent};
use serde_json::json;
use support::etcd::*;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_after_compaction_reports_deletions_and_changes() {
    let etcd = single();
    let eps = etcd.endpoints();
    // Another host's entries, written directly: its host keys carry no lease, so nothing expires
    // behind the test's back and the observer has no lost host to mark.
    put(&eps, "/plasmavmc/hosts/h1", host_record("h1"));
    put(&eps, "/plasmavmc/hosts/h3", host_record("h3"));
    put(
        &eps,
        "/plasmavmc/vms/acme/web/gone",
        vm_record("gone", "running"),
    );
    put(
        &eps,
        "/plasmavmc/vms/acme/web/kept",
        vm_record("kept", "running"),
    );
    let handle = json!({"host": "h1", "pid": 7, "qmpSocket": "/q", "startedAt": "t"});
    put(&eps, "/plasmavmc/handles/acme/web/gone", handle);
    let lock = json!({"host": "h1", "lease": 1, "acquiredAt": "t"});
    put(&eps, "/plasmavmc/locks/acme/web/kept", lock);

    let proxy = CutProxy::start(etcd.endpoint(0)).await;
    let observer = Session::start(config(vec![proxy.endpoint.clone()], "h2", 3)).unwrap();
    let cluster = observer.cluster();
    eventually("observer sees gone, kept and the lock", WAIT, || {
        let view = cluster.borrow();
        view.vms.contains_key(&vm_key("gone")) && view.locks.contains_key(&vm_key("kept"))
    })
    .await;

    let mut notices = observer.notices();
    proxy.cut();
    next_disconnect(&mut notices, WAIT).await; // the watch is down: what follows it cannot see
    etcdctl(&eps, &["del", "/plasmavmc/vms/acme/web/gone"]);
    etcdctl(&eps, &["del", "/plasmavmc/handles/acme/web/gone"]);
    etcdctl(&eps, &["del", "/plasmavmc/locks/acme/web/kept"]);
    etcdctl(&eps, &["del", "/plasmavmc/hosts/h3"]);
    put(
        &eps,
        "/plasmavmc/vms/acme/web/kept",
        vm_record("kept", "stopped"),
    );
    etcdctl(&eps, &["compact", &revision(&eps).to_string()]);
    proxy.heal();

    let (changes, revision) = store_events_until_resynced(&mut notices).await;
    let gone = vm_key("gone");
    for expected in [
        StateEvent::VmDeleted {
            key: gone.clone(),
            revision,
        },
        StateEvent::HandleDeleted {
            key: gone.clone(),
            revision,
        },
        StateEvent::LockReleased {
            key: vm_key("kept"),
        },
        StateEvent::HostDown {
            host_id: "h3".into(),
        },
    ] {
        assert!(
            changes.contains(&expected),
            "{expected:?} missing from {changes:#?}"
        );
    }
    let kept_stopped = |change: &StateEvent| {
        matches!(change, StateEvent::VmUpdated { key, record, .. }
            if *key == vm_key("kept") && record.state == "stopped")
    };
    assert!(
        changes.iter().any(kept_stopped),
        "kept's new state missing from {changes:#?}"
    );
    eventually(
        "observer's view without gone, with kept stopped",
        WAIT,
        || {
            let view = cluster.borrow();
            !view.vms.contains_key(&gone)
                && !view.handles.contains_key(&gone)
                && !view.locks.contains_key(&vm_key("kept"))
                && !view.hosts.contains_key("h3")
                && view
                    .vms
                    .get(&vm_key("kept"))
                    .is_some_and(|kept| kept.value.state == "stopped")
        },
    )
    .await;
}

fn put(endpoints: &[String], key: &str, value: serde_json::Value) {
    etcdctl(endpoints, &["put", key, &value.to_string()]);
}

fn host_record(host_id: &str) -> serde_json::Value {
    json!({"hostId": host_id, "agentVersion": "0.1.0", "startedAt": "t"})
}

fn vm_record(name: &str, state: &str) -> serde_json::Value {
    let (_, mut vm) = local_vm(name, state, false, None);
    vm.record.host = "h1".into();
    serde_json::to_value(vm.record).unwrap()
}

/// The store events notified until the next `Resynced`, and its revision.
async fn store_events_until_resynced(
    notices: &mut broadcast::Receiver<Notice>,
) -> (Vec<StateEvent>, i64) {
    let collect = async {
        let mut events = Vec::new();
        loop {
            match notices.recv().await.expect("notices") {
                Notice::Store(event) => events.push(event),
                Notice::Resynced { revision } => return (events, revision),
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, collect)
        .await
        .expect("no resync after the compaction")
}
