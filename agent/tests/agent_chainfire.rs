//! The real agent with `--chainfire` against a real etcd on loopback: it publishes its VM (record,
//! handle with the QEMU PID), `status --cluster` shows the store's view, and when the agent is
//! killed -9 another session marks its VM `unknown` within the lease TTL + 1 s; two agents
//! declaring one HA VM run exactly one copy, and the one cut off from the store fences its copy
//! before the other starts one.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use etcd::CutProxy;
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
    let ttl = TTL.to_string();
    host.start_agent_with(&[
        "--stop-timeout",
        "2",
        "--chainfire",
        &endpoints.join(","),
        "--host-id",
        "h1",
        "--lease-ttl",
        &ttl,
    ]);
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

/// The PID in `host`'s pidfile for VM `name`, if that QEMU is alive.
fn live_qemu(host: &Host, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(host.run_dir.join("vms").join(name).join("pid")).ok()?;
    text.trim().parse().ok().filter(|pid| is_alive(*pid))
}

fn chainfire_flags<'a>(endpoint: &'a str, host_id: &'a str, ttl: &'a str) -> [&'a str; 8] {
    [
        "--stop-timeout",
        "2",
        "--chainfire",
        endpoint,
        "--host-id",
        host_id,
        "--lease-ttl",
        ttl,
    ]
}

#[test]
fn ha_vm_runs_once_and_a_partitioned_host_fences_before_the_other_takes_over() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let proxy = runtime.block_on(CutProxy::start(endpoint.clone()));
    let ttl = TTL.to_string();

    let mut a = Host::new();
    let mut b = Host::another(&a);
    for host in [&a, &b] {
        host.write_config(json!({ "ha1": host.vm(json!({"ha": {"enable": true}})) }));
    }
    a.start_agent_with(&chainfire_flags(&proxy.endpoint, "a", &ttl));
    let a_pid = a.wait_running("ha1");
    b.start_agent_with(&chainfire_flags(&endpoint, "b", &ttl));
    let held = b.wait_status("ha1 held on b", AGENT, |s| {
        s["vms"]["ha1"]["heldDown"]
            .as_str()
            .is_some_and(|r| r.starts_with("HA: another host holds it"))
    });
    assert!(held["vms"]["ha1"]["pid"].is_null(), "{held:#}");
    assert_eq!(live_qemu(&b, "ha1"), None, "one copy only");
    assert!(is_alive(a_pid));

    proxy.cut();
    let cut = Instant::now();
    let mut a_dead = None;
    let b_pid = loop {
        let a_alive = is_alive(a_pid);
        let b_pid = live_qemu(&b, "ha1");
        assert!(
            !(a_alive && b_pid.is_some()),
            "two copies of ha1 alive at once (a {a_pid}, b {b_pid:?})"
        );
        if !a_alive && a_dead.is_none() {
            a_dead = Some(cut.elapsed());
        }
        if let Some(pid) = b_pid {
            break pid;
        }
        assert!(
            cut.elapsed() < AGENT,
            "b never took ha1 over; a dead after {a_dead:?}\nb's log:\n{}",
            b.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let b_up = cut.elapsed();
    let a_dead = a_dead.expect("a's copy died before b's started");
    eprintln!("cut: a fenced after {a_dead:?}, b started its copy after {b_up:?}");
    assert!(a_dead < Duration::from_secs(TTL), "a fenced within the TTL");
    assert_eq!(b.wait_running("ha1"), b_pid);

    let on_a = a.wait_status("ha1 fenced on a", AGENT, |s| {
        s["vms"]["ha1"]["lastError"] == "fenced: lost the ChainFire lease"
    });
    assert!(on_a["vms"]["ha1"]["pid"].is_null(), "{on_a:#}");
    assert!(a
        .agent_log_text()
        .contains("fenced: lost the ChainFire lease"));
}
