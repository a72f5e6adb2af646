//! Failures against a real etcd: an agent killed without goodbye, a 30 s store outage, a
//! 3-member cluster losing its leader or running with a member down, a silent partition
//! (connections open, nothing through).

mod support;

use std::time::{Duration, Instant};

use plasmavmc_agent::chainfire::{Notice, Session};
use support::etcd::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agents_host_is_marked_lost_within_ttl() {
    let ttl = 3;
    let etcd = single();
    let eps = etcd.endpoints();
    let survivor = Session::start(config(eps.clone(), "h2", ttl)).unwrap();
    let victim = Session::start(config(eps.clone(), "h1", ttl)).unwrap();
    victim.sync(picture([local_vm("db", "running", false, Some(99))]));
    let cluster = survivor.cluster();
    eventually("survivor sees db on h1", WAIT, || {
        cluster
            .borrow()
            .vms
            .get(&vm_key("db"))
            .is_some_and(|r| r.value.state == "running")
    })
    .await;

    let killed = Instant::now();
    drop(victim); // like kill -9: no revoke, the lease just stops being kept alive
    eventually("db marked unknown", WAIT, || {
        cluster
            .borrow()
            .vms
            .get(&vm_key("db"))
            .is_some_and(|r| r.value.state == "unknown")
    })
    .await;
    let detected = killed.elapsed();
    assert!(
        detected <= Duration::from_secs(ttl + 1),
        "detected after {detected:?}, TTL {ttl} s"
    );

    let db = get_json(&eps, "/plasmavmc/vms/acme/web/db").unwrap();
    assert_eq!(db["host"], "h1");
    let reason = db["lastError"].as_str().unwrap();
    assert!(
        reason.contains("host h1 lost its lease") && reason.contains("seen by h2"),
        "{reason}"
    );
    assert!(get_json(&eps, "/plasmavmc/hosts/h1").is_none());

    // h1 comes back: it corrects its record.
    let back = Session::start(config(eps.clone(), "h1", ttl)).unwrap();
    back.sync(picture([local_vm("db", "running", false, Some(99))]));
    eventually("h1 republished db", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/db").unwrap()["state"] == "running"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_second_outage_loses_and_duplicates_nothing() {
    let mut etcd = single();
    let eps = etcd.endpoints();
    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    let mut notices = session.notices();
    session.sync(picture([
        local_vm("a", "running", false, Some(1)),
        local_vm("b", "running", false, Some(2)),
    ]));
    eventually("a and b published", WAIT, || {
        keys(&eps, "/plasmavmc/handles/").len() == 2
    })
    .await;

    etcd.kill(0);
    let outage = Instant::now();
    // The daemon goes on locally: b stops, c appears; none of this may block it.
    let picture_during = || {
        picture([
            local_vm("a", "running", false, Some(1)),
            local_vm("b", "stopped", false, None),
            local_vm("c", "running", false, Some(3)),
        ])
    };
    let started = Instant::now();
    session.sync(picture_during());
    // Waiting for the store means retries and timeouts (seconds); a busy 2-core machine can keep
    // a runnable thread off the CPU for tens of milliseconds, so the bound is not that tight.
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "sync must not wait for the store (took {took:?})"
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    etcd.restart(0).unwrap();
    etcd.wait_ready(0).unwrap();

    eventually(
        "c published after the outage",
        Duration::from_secs(30),
        || get_json(&eps, "/plasmavmc/vms/acme/web/c").is_some(),
    )
    .await;
    eventually("b stopped, its handle gone", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/b").unwrap()["state"] == "stopped"
            && get_json(&eps, "/plasmavmc/handles/acme/web/b").is_none()
    })
    .await;
    let expected: std::collections::BTreeSet<String> = [
        "/plasmavmc/handles/acme/web/a",
        "/plasmavmc/handles/acme/web/c",
        "/plasmavmc/hosts/h1",
        "/plasmavmc/vms/acme/web/a",
        "/plasmavmc/vms/acme/web/b",
        "/plasmavmc/vms/acme/web/c",
    ]
    .map(String::from)
    .into();
    assert_eq!(keys(&eps, "/plasmavmc/"), expected);
    let mut disconnected = false;
    while let Ok(n) = notices.try_recv() {
        disconnected |= matches!(n, Notice::Disconnected { .. });
    }
    assert!(disconnected, "the outage was noticed");
    // And then quiet again.
    let before = revision(&eps);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(revision(&eps), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_goes_on_after_the_leader_is_killed() {
    let mut etcd = cluster(3);
    let eps = etcd.endpoints();
    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    session.sync(picture([local_vm("a", "running", false, Some(1))]));
    eventually("a published", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/a").is_some()
    })
    .await;

    let leader = leader_index(&eps);
    etcd.kill(leader);
    let survivors: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| etcd.endpoint(i))
        .collect();
    session.sync(picture([
        local_vm("a", "stopped", false, None),
        local_vm("b", "running", false, Some(2)),
    ]));
    eventually("changes published through the new leader", WAIT, || {
        get_json(&survivors, "/plasmavmc/vms/acme/web/b").is_some()
            && get_json(&survivors, "/plasmavmc/vms/acme/web/a").unwrap()["state"] == "stopped"
    })
    .await;
    assert!(
        get_json(&survivors, "/plasmavmc/hosts/h1").is_some(),
        "the host's lease survived the election"
    );
}

/// A member that is down from the start (the list names all three): the session connects to
/// one that answers and keeps to it, so not one request fails. (etcd-client's balanced channel
/// sent every third request to the dead member.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_in_the_list_fails_no_request() {
    let mut etcd = cluster(3);
    let eps = etcd.endpoints();
    let follower = (leader_index(&eps) + 1) % 3; // no election: the store stays writable
    etcd.kill(follower);
    let survivors: Vec<String> = (0..3)
        .filter(|i| *i != follower)
        .map(|i| etcd.endpoint(i))
        .collect();
    let session = Session::start(config(eps.clone(), "h1", 3)).unwrap();
    let mut notices = session.notices();
    for round in 0..10 {
        let state = ["running", "stopped"][round % 2];
        session.sync(picture([local_vm("a", state, false, None)]));
        eventually(&format!("a {state} (round {round})"), WAIT, || {
            get_json(&survivors, "/plasmavmc/vms/acme/web/a").is_some_and(|a| a["state"] == state)
        })
        .await;
    }
    while let Ok(notice) = notices.try_recv() {
        assert!(
            !matches!(notice, Notice::Disconnected { .. }),
            "a request failed: {notice:?}"
        );
    }
}

/// Which member leads, from `etcdctl endpoint status`.
fn leader_index(eps: &[String]) -> usize {
    let out = etcdctl(eps, &["endpoint", "status", "-w", "json"]);
    let statuses: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    statuses
        .iter()
        .position(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
        .expect("a leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_noticed_and_the_holder_fences_in_time() {
    let ttl = 3;
    let etcd = single();
    let proxy = CutProxy::start(etcd.endpoint(0)).await;
    let session = Session::start(config(vec![proxy.endpoint.clone()], "h1", ttl)).unwrap();
    session.sync(picture([local_vm("ha", "running", true, Some(7))]));
    let may_run = session.may_run();
    eventually("h1 may run its HA VM", WAIT, || {
        may_run.borrow().contains(&vm_key("ha"))
    })
    .await;
    let mut notices = session.notices();

    proxy.freeze();
    let frozen = Instant::now();
    eventually("h1 fences", WAIT, || may_run.borrow().is_empty()).await;
    let fenced = frozen.elapsed();
    // The store may expire the lease one store TTL (ttl - 1 s) after the last keep-alive.
    assert!(
        fenced < Duration::from_secs(ttl - 1),
        "fenced after {fenced:?}"
    );
    let noticed = loop {
        match tokio::time::timeout(WAIT, notices.recv()).await {
            Ok(Ok(Notice::Disconnected { error })) => break error,
            Ok(Ok(_)) => continue,
            other => panic!("no disconnect noticed: {other:?}"),
        }
    };
    eprintln!(
        "silent partition: fenced after {fenced:?}, watch given up after {:?}: {noticed}",
        frozen.elapsed()
    );
}
