//! HA failover against a real etcd: two sessions declare one HA VM; exactly one may run it.
//! Cutting the holder off the store (a partition only it sees) makes it fence itself before the
//! other takes the lock; killing the holder hands the VM over within the lease TTL; a holder
//! restarted in time resumes its lease from the trust file and keeps the VM.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plasmavmc_agent::chainfire::trust;
use plasmavmc_agent::chainfire::{ChainFireConfig, Notice, Session, SessionHandle, StateEvent};
use support::etcd::*;

const TTL: u64 = 3;
const WAIT: Duration = Duration::from_secs(20);

/// Every change of "may run the HA VM", per host, on this process's monotonic clock.
#[derive(Clone, Default)]
struct Timeline(Arc<Mutex<Vec<Transition>>>);

/// When, which host, and whether it may now run the VM.
type Transition = (Instant, &'static str, bool);

impl Timeline {
    fn follow(&self, host: &'static str, session: &SessionHandle) {
        let mut may_run = session.may_run();
        let log = self.0.clone();
        tokio::spawn(async move {
            loop {
                let holds = may_run.borrow_and_update().contains(&vm_key("ha"));
                log.lock().unwrap().push((Instant::now(), host, holds));
                if may_run.changed().await.is_err() {
                    log.lock().unwrap().push((Instant::now(), host, false));
                    return;
                }
            }
        });
    }

    fn holds(&self, host: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, h, _)| *h == host)
            .is_some_and(|(_, _, holds)| *holds)
    }

    /// When `host` last changed to `holds`.
    fn last(&self, host: &str, holds: bool) -> Instant {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(_, h, x)| *h == host && *x == holds)
            .expect("transition")
            .0
    }

    /// Replays the log: never two holders at once.
    fn assert_never_two_holders(&self) {
        let log = self.0.lock().unwrap();
        let mut holding = std::collections::BTreeMap::new();
        for (t, host, holds) in log.iter() {
            holding.insert(*host, *holds);
            assert!(
                holding.values().filter(|h| **h).count() <= 1,
                "two holders at {t:?}: {log:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_holder_fences_before_the_other_takes_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let etcd = single();
    let eps = etcd.endpoints();
    let proxy = CutProxy::start(etcd.endpoint(0)).await;
    let timeline = Timeline::default();

    let a = Session::start(config(vec![proxy.endpoint.clone()], "h1", TTL)).unwrap();
    timeline.follow("h1", &a);
    a.sync(picture([local_vm("ha", "running", true, Some(11))]));
    eventually("h1 holds the HA VM", WAIT, || timeline.holds("h1")).await;
    let b = Session::start(config(eps.clone(), "h2", TTL)).unwrap();
    timeline.follow("h2", &b);
    b.sync(picture([local_vm("ha", "stopped", true, None)]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!timeline.holds("h2"), "the standby waits");
    assert_eq!(
        get_json(&eps, "/plasmavmc/locks/acme/web/ha").unwrap()["host"],
        "h1"
    );
    assert_eq!(
        get_json(&eps, "/plasmavmc/vms/acme/web/ha").unwrap()["host"],
        "h1"
    );

    let cut = Instant::now();
    proxy.cut();
    eventually("h2 takes over", WAIT, || timeline.holds("h2")).await;
    let fenced = timeline.last("h1", false);
    let acquired = timeline.last("h2", true);
    assert!(
        fenced < acquired,
        "h1 fenced at +{:?}, h2 acquired at +{:?}",
        fenced - cut,
        acquired - cut
    );
    eprintln!(
        "partition: h1 fenced {:?} after the cut, h2 runs the VM {:?} after the cut",
        fenced - cut,
        acquired - cut
    );

    // The new holder publishes the VM; the healed old holder stays out.
    b.sync(picture([local_vm("ha", "running", true, Some(22))]));
    eventually("record names h2", WAIT, || {
        get_json(&eps, "/plasmavmc/vms/acme/web/ha").unwrap()["host"] == "h2"
    })
    .await;
    proxy.heal();
    tokio::time::sleep(Duration::from_secs(TTL + 1)).await;
    assert!(!timeline.holds("h1"));
    assert_eq!(
        get_json(&eps, "/plasmavmc/locks/acme/web/ha").unwrap()["host"],
        "h2"
    );

    // The holder is killed (no revoke): the lock expires with its lease, h1 takes over.
    let killed = Instant::now();
    drop(b);
    eventually("h1 takes over again", WAIT, || timeline.holds("h1")).await;
    eprintln!(
        "holder kill: h1 runs the VM {:?} after the kill",
        timeline.last("h1", true) - killed
    );
    timeline.assert_never_two_holders();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_session_resumes_the_lease_and_keeps_its_locks() {
    let etcd = single();
    let eps = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let trust_file = dir.path().join("lease.json");
    let with_trust = |host| ChainFireConfig {
        trust_file: Some(trust_file.clone()),
        ..config(eps.clone(), host, TTL)
    };
    let observer = Session::start(config(eps.clone(), "obs", TTL)).unwrap();
    observer.sync(picture([]));
    let mut notices = observer.notices();
    let timeline = Timeline::default();
    let a = Session::start(with_trust("h1")).unwrap();
    timeline.follow("h1", &a);
    a.sync(picture([local_vm("ha", "running", true, Some(11))]));
    eventually("h1 holds", WAIT, || timeline.holds("h1")).await;
    let b = Session::start(config(eps.clone(), "h2", TTL)).unwrap();
    timeline.follow("h2", &b);
    b.sync(picture([local_vm("ha", "stopped", true, None)]));
    let lease = trust::read(&trust_file).unwrap().lease;
    assert_eq!(trust::read(&trust_file).unwrap().held, [vm_key("ha")]);

    drop(a); // like kill -9: no goodbye, the lease is neither revoked nor kept alive
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = Session::start(with_trust("h1")).unwrap();
    assert!(
        again.may_run().borrow().contains(&vm_key("ha")),
        "the previous agent's locks are trusted from the first instant"
    );
    timeline.follow("h1", &again);
    again.sync(picture([local_vm("ha", "running", true, Some(11))]));
    tokio::time::sleep(Duration::from_secs(TTL + 1)).await;

    assert!(timeline.holds("h1") && !timeline.holds("h2"));
    assert_eq!(trust::read(&trust_file).unwrap().lease, lease, "same lease");
    let lock = get_json(&eps, "/plasmavmc/locks/acme/web/ha").unwrap();
    assert_eq!(
        (lock["host"].as_str(), lock["lease"].as_i64()),
        (Some("h1"), Some(lease))
    );
    while let Ok(notice) = notices.try_recv() {
        assert!(
            !matches!(&notice, Notice::Store(StateEvent::HostDown { host_id }) if host_id == "h1"),
            "the restart flapped h1 in the store"
        );
    }
    timeline.assert_never_two_holders();
}
