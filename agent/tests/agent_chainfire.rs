//! The real agent with `--chainfire` against a real etcd on loopback: it publishes its VM (record,
//! handle with the QEMU PID), `status --cluster` shows the store's view, and when the agent is
//! killed -9 another session marks its VM `unknown` within the lease TTL + 1 s. HA: agent_ha.rs.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use etcd::{config, get_json, single};
use harness::*;
use plasmavmc_agent::chainfire::Session;
use serde_json::{json, Value};

const TTL: u64 = 3;
const VM_KEY: &str = "/plasmavmc/vms/default/default/web";
const HANDLE_KEY: &str = "/plasmavmc/handles/default/default/web";

/// Polls `key` every 50 ms until `done` holds for its value.
fn wait_key(endpoints: &[String], key: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + AGENT;
    loop {
        if let Some(value) = get_json(endpoints, key).filter(|v| done(v)) {
            return value;
        }
        assert!(Instant::now() < deadline, "{key} never showed {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agent_publishes_its_vm_and_a_killed_agents_vm_turns_unknown() {
    let etcd = single();
    let endpoints = etcd.endpoints();
    let mut host = Host::new();
    host.write_config(json!({ "web": host.vm(json!({})) }));
    host.start_agent_with(&cluster_agent_flags(&endpoints.join(","), "h1", TTL));
    let pid = host.wait_running("web");

    let record = wait_key(&endpoints, VM_KEY, "state running", |v| {
        v["state"] == "running"
    });
    assert_eq!(record["host"], "h1", "{record:#}");
    let handle = wait_key(&endpoints, HANDLE_KEY, "the QEMU pid", |v| v["pid"] == pid);
    assert_eq!(handle["host"], "h1", "{handle:#}");
    assert!(
        handle["qmpSocket"]
            .as_str()
            .is_some_and(|s| s.ends_with("qmp.sock")),
        "{handle:#}"
    );
    assert!(get_json(&endpoints, "/plasmavmc/hosts/h1").is_some());

    // The view comes from the session's watch: it may lag the store by a moment.
    let deadline = Instant::now() + AGENT;
    loop {
        let table = host
            .cli(&["status", "--cluster"])
            .expect_code(0, "status --cluster");
        if table.stdout.contains("default/default/web") && table.stdout.contains("running") {
            assert!(table.stdout.contains("h1"), "{}", table.stdout);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status --cluster:\n{}",
            table.stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let json = host
        .cli(&["status", "--cluster", "--json"])
        .expect_code(0, "status --cluster --json");
    let view: Value = serde_json::from_str(&json.stdout).expect("JSON view");
    assert!(
        view["vms"]
            .as_array()
            .is_some_and(|vms| vms.iter().any(|vm| vm["handle"]["pid"] == pid)),
        "{view:#}"
    );

    // An observer on the library side, then the agent dies without a goodbye.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let observer = Session::start(config(endpoints.clone(), "obs", TTL)).unwrap();
    observer.sync(Default::default());
    let cluster = observer.cluster();
    let seen_running = Instant::now() + AGENT;
    while !cluster
        .borrow()
        .vms
        .values()
        .any(|vm| vm.value.name == "web" && vm.value.state == "running")
    {
        assert!(
            Instant::now() < seen_running,
            "observer never saw web running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    host.kill_agent();
    let killed = Instant::now();
    let limit = Duration::from_secs(TTL + 1);
    while !cluster
        .borrow()
        .vms
        .values()
        .any(|vm| vm.value.name == "web" && vm.value.state == "unknown")
    {
        assert!(
            killed.elapsed() < limit,
            "web not unknown within TTL + 1 s: {:?}",
            cluster.borrow().vms
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("web unknown {:?} after the kill -9", killed.elapsed());
    assert!(
        is_alive(pid),
        "the VM itself is untouched by the agent's death"
    );
}

#[test]
fn status_cluster_on_a_standalone_agent_says_so() {
    let mut host = Host::new();
    host.write_config(json!({}));
    host.start_agent();
    let out = host
        .cli(&["status", "--cluster"])
        .expect_code(2, "status --cluster");
    assert!(
        out.stderr
            .contains("this agent runs standalone (no --chainfire)"),
        "{}",
        out.stderr
    );
}
