//! Publishing against a real etcd: read back with `etcdctl`, one write per real change, zero
//! writes in steady state, startup reconciliation, watch events between two sessions.

mod support;

use std::time::Duration;

use plasmavmc_agent::chainfire::{Notice, Session, StateEvent};
use support::etcd::*;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_changes_only_and_reads_back_with_etcdctl() {
    let etcd = single();
    let eps = etcd.endpoints();
    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    session.sync(picture([
        local_vm("db", "running", false, Some(4242)),
        local_vm("web", "stopped", false, None),
    ]));

    eventually("db and web published", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/web").is_some()
    })
    .await;
    let db = get_json(&eps, "/plasmavmc/vms/acme/web/db").unwrap();
    assert_eq!(
        (
            db["host"].as_str(),
            db["state"].as_str(),
            db["spec"]["memoryMiB"].as_u64()
        ),
        (Some("h1"), Some("running"), Some(512))
    );
    let handle = get_json(&eps, "/plasmavmc/handles/acme/web/db").unwrap();
    assert_eq!(
        (handle["host"].as_str(), handle["pid"].as_u64()),
        (Some("h1"), Some(4242))
    );
    assert_eq!(
        get_json(&eps, "/plasmavmc/hosts/h1").unwrap()["hostId"],
        "h1"
    );
    assert!(get_json(&eps, "/plasmavmc/handles/acme/web/web").is_none());
    let lease = etcdctl(&eps, &["lease", "list"]);
    assert!(
        lease.contains(&format!("{:x}", session.lease_id().unwrap())),
        "host key's lease listed: {lease}"
    );

    // Steady state: the same picture again and again (fresh updatedAt each time) writes nothing.
    let before = revision(&eps);
    for _ in 0..8 {
        session.sync(picture([
            local_vm("db", "running", false, Some(4242)),
            local_vm("web", "stopped", false, None),
        ]));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        revision(&eps),
        before,
        "no writes beyond keep-alives in steady state"
    );

    // One real change, one write.
    session.sync(picture([
        local_vm("db", "running", false, Some(4242)),
        local_vm("web", "running", false, None),
    ]));
    eventually("web running", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/web").unwrap()["state"] == "running"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(revision(&eps), before + 1);

    // A VM gone from the host: its record and handle go.
    session.sync(picture([local_vm("web", "running", false, None)]));
    eventually("db removed", WAIT, || {
        keys(&eps, "/plasmavmc/")
            .iter()
            .all(|k| !k.ends_with("/db"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_vms_steady_state_writes_nothing() {
    let etcd = single();
    let eps = etcd.endpoints();
    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    let fifty = || {
        picture((0..50).map(|i| local_vm(&format!("vm{i:02}"), "running", false, Some(1000 + i))))
    };
    session.sync(fifty());
    eventually("50 VMs and handles", WAIT, || {
        keys(&eps, "/plasmavmc/handles/").len() == 50
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = revision(&eps);
    let mut notices = session.notices();
    for _ in 0..10 {
        session.sync(fifty());
        tokio::time::sleep(Duration::from_millis(500)).await; // 5 s: 20 keep-alives
    }
    assert_eq!(revision(&eps), before);
    assert_eq!(keys(&eps, "/plasmavmc/vms/").len(), 50);
    // Nor does the quiet connection drop (etcd cuts clients that ping too often).
    while let Ok(notice) = notices.try_recv() {
        assert!(!matches!(notice, Notice::Disconnected { .. }), "{notice:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_corrects_stale_entries_and_removes_orphans() {
    let etcd = single();
    let eps = etcd.endpoints();
    // A previous life of h1 left: db marked running (it is stopped now) and ghost (gone).
    let (_, mut stale) = local_vm("db", "running", false, Some(1));
    stale.record.host = "h1".into();
    etcdctl(
        &eps,
        &[
            "put",
            "/plasmavmc/vms/acme/web/db",
            &serde_json::to_string(&stale.record).unwrap(),
        ],
    );
    let (_, mut ghost) = local_vm("ghost", "running", false, None);
    ghost.record.host = "h1".into();
    etcdctl(
        &eps,
        &[
            "put",
            "/plasmavmc/vms/acme/web/ghost",
            &serde_json::to_string(&ghost.record).unwrap(),
        ],
    );
    let handle = serde_json::json!({"host": "h1", "pid": 1, "qmpSocket": "/x", "startedAt": "t"});
    etcdctl(
        &eps,
        &["put", "/plasmavmc/handles/acme/web/db", &handle.to_string()],
    );

    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    let mut notices = session.notices();
    session.sync(picture([local_vm("db", "stopped", false, None)]));
    eventually("db corrected", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/db").unwrap()["state"] == "stopped"
    })
    .await;
    eventually("ghost and db's handle removed", WAIT, || {
        keys(&eps, "/plasmavmc/")
            == ["/plasmavmc/hosts/h1", "/plasmavmc/vms/acme/web/db"]
                .map(String::from)
                .into()
    })
    .await;
    let mut reported_ghost = false;
    while let Ok(notice) = notices.try_recv() {
        if let Notice::Wrote(plasmavmc_agent::chainfire::reconcile::Write::DeleteVm {
            key, ..
        }) = notice
        {
            reported_ghost |= key == vm_key("ghost");
        }
    }
    assert!(reported_ghost, "the orphan removal is reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_session_sees_vm_and_handle_events() {
    let etcd = single();
    let eps = etcd.endpoints();
    let observer = Session::start(config(eps.clone(), "h2", 3)).unwrap();
    let mut events = observer.notices();
    let cluster = observer.cluster();
    let publisher = Session::start(config(eps.clone(), "h1", 3)).unwrap();

    publisher.sync(picture([local_vm("db", "running", false, Some(7))]));
    eventually("observer's view has db on h1", WAIT, || {
        cluster
            .borrow()
            .vms
            .get(&vm_key("db"))
            .is_some_and(|r| r.value.host == "h1")
            && cluster.borrow().handles.contains_key(&vm_key("db"))
    })
    .await;
    publisher.sync(picture([local_vm("db", "stopped", false, None)]));
    eventually("observer sees db stopped", WAIT, || {
        cluster
            .borrow()
            .vms
            .get(&vm_key("db"))
            .is_some_and(|r| r.value.state == "stopped")
    })
    .await;
    publisher.sync(picture([]));
    etcdctl(&eps, &["put", "/plasmavmc/vms/only-two/segments", "{}"]);
    eventually("db gone from the view", WAIT, || {
        !cluster.borrow().vms.contains_key(&vm_key("db"))
    })
    .await;
    eventually("malformed key in the view", WAIT, || {
        cluster
            .borrow()
            .malformed
            .contains_key("/plasmavmc/vms/only-two/segments")
    })
    .await;

    let mut seen = Vec::new();
    while let Ok(notice) = events.try_recv() {
        match notice {
            Notice::Store(StateEvent::VmUpdated { key, record, .. }) if key == vm_key("db") => {
                seen.push(format!("vm {}", record.state))
            }
            Notice::Store(StateEvent::VmDeleted { key, .. }) if key == vm_key("db") => {
                seen.push("vm deleted".into())
            }
            Notice::Store(StateEvent::HandleUpdated { key, record, .. }) if key == vm_key("db") => {
                seen.push(format!("handle {}", record.pid))
            }
            Notice::Store(StateEvent::HandleDeleted { key, .. }) if key == vm_key("db") => {
                seen.push("handle deleted".into())
            }
            Notice::Store(StateEvent::Malformed { key, reason }) => {
                seen.push(format!("malformed {key}: {reason}"))
            }
            _ => {}
        }
    }
    let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
    assert!(seen.starts_with(&["vm running", "handle 7"]), "{seen:?}");
    assert!(
        seen.contains(&"vm stopped")
            && seen.contains(&"handle deleted")
            && seen.contains(&"vm deleted"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.starts_with("malformed /plasmavmc/vms/only-two/segments")),
        "{seen:?}"
    );
}
