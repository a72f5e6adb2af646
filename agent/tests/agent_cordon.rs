//! `cordon`/`uncordon` answer once ChainFire holds the new state: two real agents (hosts `a` and
//! `b`, no VMs) and a real etcd. Right after each command returns, etcd already has `b`'s host
//! key with that state, and `a`'s cluster view follows it from the watch. With `b` cut off from
//! the store, `cordon` still cordons `b` here, exits 0 and says (`cluster: "notYet"`) the
//! cluster does not know yet; once the store is back, `b` tells it by itself.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::Instant;

use etcd::{get_json, single, CutProxy};
use harness::*;
use serde_json::{json, Value};

const B_KEY: &str = "/plasmavmc/hosts/b";

fn start(host: &mut Host, endpoint: &str, id: &str) {
    host.write_config(json!({}));
    host.start_agent_with(&[
        "--chainfire",
        endpoint,
        "--host-id",
        id,
        "--lease-ttl",
        "20",
    ]);
}

/// `b`'s `cordoned` as etcd holds it now (None: no host key).
fn stored(endpoints: &[String]) -> Option<bool> {
    get_json(endpoints, B_KEY).map(|record| record["cordoned"] == true)
}

/// `b`'s `cordoned` in `a`'s cluster view (`status --cluster --json`).
fn seen_from_a(a: &Host) -> Option<bool> {
    let out = a
        .cli(&["status", "--cluster", "--json"])
        .expect_code(0, "status --cluster");
    let view: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let hosts = view["hosts"].as_array()?.clone();
    hosts
        .iter()
        .find(|h| h["hostId"] == "b")
        .map(|h| h["cordoned"] == true)
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + AGENT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {AGENT:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn change(host: &Host, command: &str) -> Value {
    let out = host.cli(&[command, "--json"]).expect_code(0, command);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{command}: {e}: {out:?}"))
}

#[test]
fn cordon_and_uncordon_return_once_chainfire_has_them_and_say_so_when_it_cannot() {
    let etcd = single();
    let endpoints = vec![etcd.endpoint(0)];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(CutProxy::start(etcd.endpoint(0)));
    let mut a = Host::new();
    let mut b = Host::another(&a);
    start(&mut a, &endpoints[0], "a");
    start(&mut b, &proxy.endpoint, "b");
    wait_until("b in a's view", || seen_from_a(&a) == Some(false));

    for round in 0..3 {
        for (command, cordoned) in [("cordon", true), ("uncordon", false)] {
            let answer = change(&b, command);
            assert_eq!(answer["cluster"], "published", "{answer}");
            assert_eq!(answer["cordoned"], cordoned, "{answer}");
            assert_eq!(
                stored(&endpoints),
                Some(cordoned),
                "round {round}: etcd right after `{command}` returned on b"
            );
            wait_until(
                &format!("round {round}: a sees b after `{command}`"),
                || seen_from_a(&a) == Some(cordoned),
            );
        }
    }

    // Cut off: cordoned here all the same, saying the cluster does not know yet.
    proxy.cut();
    let answer = change(&b, "cordon");
    assert_eq!(answer["cluster"], "notYet", "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("does NOT know yet"), "{message}");
    assert!(b.status()["cordon"]["by"] == "cordon", "cordoned locally");
    assert_ne!(stored(&endpoints), Some(true), "the store was out of reach");
    let plain = b
        .cli(&["cordon"])
        .expect_code(0, "cordon again, still cut off");
    assert!(plain.stdout.contains("does NOT know yet"), "{plain:?}");

    // Back: b tells the cluster by itself.
    proxy.heal();
    wait_until("the cordon reaches etcd once the store is back", || {
        stored(&endpoints) == Some(true)
    });
    wait_until("and a's view", || seen_from_a(&a) == Some(true));
}
