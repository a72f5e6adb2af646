//! HA end to end: two real agents (hosts `a` and `b`) declare one HA VM against a real etcd, with
//! real QEMUs. Exactly one copy runs, whatever happens to the holder: cut off from the store
//! (partition), its agent killed -9 and not restarted (its fence guard kills the VM), its agent
//! killed and restarted at once (the VM stays, the lease is resumed), its QEMU or its guard
//! killed -9 (restarted on the holder; handed over when the holder's policy gives up); its
//! pidfile deleted under a new agent (the guarded QEMU found by the identity scan, never doubled).
//! Every test polls both hosts every 50 ms and fails if it ever sees two copies alive.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use etcd::{get_json, single, CutProxy};
use harness::*;
use plasmavmc_agent::chainfire::trust;
use serde_json::{json, Value};

const VM: &str = "ha1";
const VM_KEY: &str = "/plasmavmc/vms/default/default/ha1";

/// Hosts `a` and `b`, both declaring `ha1` (with `extra` settings) as HA.
fn pair(extra: Value) -> (Host, Host) {
    let a = Host::new();
    let b = Host::another(&a);
    for host in [&a, &b] {
        let mut ha = json!({"ha": {"enable": true}});
        ha.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        host.write_config(json!({ VM: host.vm(ha) }));
    }
    (a, b)
}

/// The PID in `host`'s pidfile for the VM, if that QEMU is alive.
fn live_qemu(host: &Host) -> Option<u32> {
    let text = std::fs::read_to_string(host.run_dir.join("vms").join(VM).join("pid")).ok()?;
    text.trim().parse().ok().filter(|pid| is_alive(*pid))
}

/// The parent process of `pid`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Starts `a` (the holder, once its VM runs) then `b` (standby), each with its way to the store;
/// returns a's QEMU PID.
fn start_holder_then_standby(a: &mut Host, b: &mut Host, stores: [&str; 2], ttl: u64) -> u32 {
    a.start_agent_with(&cluster_agent_flags(stores[0], "a", ttl));
    let pid = a.wait_running(VM);
    b.start_agent_with(&cluster_agent_flags(stores[1], "b", ttl));
    b.wait_status("ha1 held on b", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (a)"
    });
    assert_eq!(live_qemu(b), None, "one copy only");
    pid
}

/// Polls both hosts every 50 ms until `done` returns something, failing if both copies are ever
/// alive at once.
fn never_two<T>(
    a: &Host,
    b: &Host,
    what: &str,
    mut done: impl FnMut(Option<u32>, Option<u32>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + AGENT;
    loop {
        let (on_a, on_b) = (live_qemu(a), live_qemu(b));
        assert!(
            on_a.is_none() || on_b.is_none(),
            "two copies of ha1 alive at once (a {on_a:?}, b {on_b:?})"
        );
        if let Some(result) = done(on_a, on_b) {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}\na's log:\n{}\nb's log:\n{}",
            a.agent_log_text(),
            b.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After `since` (a's trouble): how long until a's copy was gone, and until b's was up.
fn fenced_then_taken_over(a: &Host, b: &Host, since: Instant) -> (Duration, Duration) {
    let mut a_gone = None;
    let b_up = never_two(a, b, "b take ha1 over", |on_a, on_b| {
        if on_a.is_none() {
            a_gone.get_or_insert(since.elapsed());
        }
        on_b.map(|_| since.elapsed())
    });
    (a_gone.expect("a's copy is gone"), b_up)
}

#[test]
fn a_partitioned_holder_fences_before_the_other_host_takes_over() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(CutProxy::start(endpoint.clone()));
    let (mut a, mut b) = pair(json!({}));
    let a_pid = start_holder_then_standby(&mut a, &mut b, [&proxy.endpoint, &endpoint], 3);
    let guard = a.vm_status(VM)["fenceGuard"]
        .as_u64()
        .expect("a fence guard") as u32;
    assert_eq!(parent_of(a_pid), guard, "QEMU runs as its guard's child");

    proxy.cut();
    let (fenced, taken_over) = fenced_then_taken_over(&a, &b, Instant::now());
    eprintln!("cut: a fenced after {fenced:?}, b started its copy after {taken_over:?}");
    assert_eq!(Some(b.wait_running(VM)), live_qemu(&b));
    let on_a = a.wait_status("ha1 fenced on a", AGENT, |s| {
        s["vms"][VM]["lastError"] == "fenced: lost the ChainFire lease"
    });
    assert!(on_a["vms"][VM]["pid"].is_null(), "{on_a:#}");
    assert!(!guard_alive(guard), "the guard went with its QEMU");
}

#[test]
fn a_killed_agents_guard_fences_its_vm_before_the_other_host_takes_over() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let (mut a, mut b) = pair(json!({}));
    let a_pid = start_holder_then_standby(&mut a, &mut b, [&endpoint; 2], 3);

    a.kill_agent(); // and nobody restarts it
    let (fenced, taken_over) = fenced_then_taken_over(&a, &b, Instant::now());
    eprintln!(
        "agent kill -9: a's guard fenced after {fenced:?}, b started its copy after {taken_over:?}"
    );
    assert!(!is_alive(a_pid));
    let marker = std::fs::read_to_string(a.run_dir.join("vms").join(VM).join("fenced"))
        .expect("the guard says why");
    assert!(marker.starts_with("fenced by its guard at "), "{marker}");
    assert!(marker.contains("past its guard deadline"), "{marker}");

    // The agent comes back late: it explains what happened and leaves the VM to b.
    a.start_agent_with(&cluster_agent_flags(&endpoint, "a", 3));
    let status = a.wait_status("a explains the fence", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (b)"
    });
    assert!(
        status["vms"][VM]["lastError"]
            .as_str()
            .is_some_and(|e| e.starts_with("fenced by its guard")),
        "{status:#}"
    );
    assert!(live_qemu(&b).is_some() && live_qemu(&a).is_none());
}

#[test]
fn an_agent_restarted_in_time_keeps_its_vm_and_its_lease() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let endpoints = etcd.endpoints();
    let (mut a, mut b) = pair(json!({}));
    let ttl = 5;
    let a_pid = start_holder_then_standby(&mut a, &mut b, [&endpoint; 2], ttl);
    let trust_file = a.run_dir.join("lease.json");
    let lease = trust::read(&trust_file).unwrap().lease;

    a.kill_agent();
    a.start_agent_with(&cluster_agent_flags(&endpoint, "a", ttl));
    let watch_until = Instant::now() + Duration::from_secs(2 * ttl);
    never_two(&a, &b, "two lease TTLs pass", |on_a, _| {
        assert_eq!(on_a, Some(a_pid), "the VM ran on, untouched");
        let record = get_json(&endpoints, VM_KEY).unwrap();
        assert_eq!(
            (record["host"].as_str(), record["state"].as_str()),
            (Some("a"), Some("running")),
            "a never looked lost"
        );
        (Instant::now() > watch_until).then_some(())
    });
    assert_eq!(
        trust::read(&trust_file).unwrap().lease,
        lease,
        "the lease was resumed"
    );
    assert_eq!(a.vm_status(VM)["pid"], a_pid);
    assert!(a
        .agent_log_text()
        .contains("resuming the previous agent's lease"));
}

#[test]
fn a_killed_qemu_or_guard_restarts_on_the_holder_and_a_holder_that_gives_up_hands_over() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let (mut a, mut b) = pair(json!({}));
    let first = start_holder_then_standby(&mut a, &mut b, [&endpoint; 2], 3);

    // QEMU killed: the holder restarts it (restartPolicy on-failure), the standby stays put.
    kill_9(first);
    let second = never_two(&a, &b, "a restart ha1", |on_a, on_b| {
        assert_eq!(on_b, None, "b must not start a copy while a holds the lock");
        on_a.filter(|pid| *pid != first)
    });

    // Its guard killed: QEMU dies with it, and is restarted the same way.
    assert_eq!(a.wait_running(VM), second);
    let guard = parent_of(second);
    kill_9(guard);
    assert!(
        wait_dead(second, Duration::from_secs(5)),
        "QEMU outlived its guard"
    );
    let third = never_two(&a, &b, "a restart ha1 again", |on_a, on_b| {
        assert_eq!(on_b, None, "b must not start a copy while a holds the lock");
        on_a.filter(|pid| *pid != second)
    });
    assert_ne!(parent_of(third), guard, "under a new guard");
    a.wait_status("both restarts counted", AGENT, |s| {
        s["vms"][VM]["restarts"] == 2
    });

    // restartPolicy never: a gives up on the VM, lets the lock go, and b takes over.
    a.write_config(json!({ VM: a.vm(json!({"ha": {"enable": true}, "restartPolicy": "never"})) }));
    a.cli(&["reload", "--wait"]).expect_code(0, "reload");
    kill_9(third);
    let killed = Instant::now();
    never_two(&a, &b, "b take ha1 over", |_, on_b| on_b);
    eprintln!(
        "QEMU kill -9 with restartPolicy never: b runs ha1 after {:?}",
        killed.elapsed()
    );
    let on_a = a.vm_status(VM);
    assert_eq!(
        on_a["heldDown"], "HA: another host holds it (b)",
        "{on_a:#}"
    );
    assert!(
        on_a["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("exited unexpectedly")),
        "{on_a:#}"
    );
}

fn guard_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("fence-guard"))
        && is_alive(pid)
}

/// Copies of ha1 on both hosts, counted by scanning `/proc` (not from status or pidfiles).
fn qemus(a: &Host, b: &Host) -> usize {
    a.qemu_count(VM) + b.qemu_count(VM)
}

#[test]
fn a_cordoned_host_takes_no_vm_over_until_uncordoned_and_a_cordoned_holder_lets_a_dead_vm_go() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let endpoints = etcd.endpoints();
    let (mut a, mut b) = pair(json!({}));
    start_holder_then_standby(&mut a, &mut b, [&endpoint; 2], 3);

    // Cordoned, then its agent restarted: the cordon is in the store and stays.
    b.cli(&["cordon"]).expect_code(0, "cordon b");
    b.kill_agent();
    b.start_agent_with(&cluster_agent_flags(&endpoint, "b", 3));
    let status = b.status();
    assert_eq!(status["cordon"]["by"], "cordon", "{status:#}");
    let published = || get_json(&endpoints, "/plasmavmc/hosts/b").unwrap();
    let deadline = Instant::now() + AGENT;
    while published()["cordoned"] != true {
        assert!(Instant::now() < deadline, "b's cordon never published");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(b
        .cli(&["status", "--cluster"])
        .stdout
        .contains("b (cordoned)"));

    // The holder dies for good: its lock expires, and cordoned b takes nothing.
    a.kill_agent();
    let watch_until = Instant::now() + Duration::from_secs(10);
    never_two(&a, &b, "three lease TTLs pass", |_, on_b| {
        assert_eq!(on_b, None, "cordoned b started ha1");
        assert!(qemus(&a, &b) <= 1);
        (Instant::now() > watch_until).then_some(())
    });
    assert_eq!(qemus(&a, &b), 0, "a's guard fenced it");
    let held = b.vm_status(VM)["heldDown"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(held.contains("this host is cordoned"), "{held}");

    // Uncordoned: b takes it over.
    b.cli(&["uncordon"]).expect_code(0, "uncordon b");
    never_two(&a, &b, "b take ha1 over", |_, on_b| on_b);
    let b_pid = b.wait_running(VM);

    // b cordoned while it runs ha1: it stays. Its QEMU killed: b lets it go to a instead of
    // restarting it.
    a.start_agent_with(&cluster_agent_flags(&endpoint, "a", 3));
    b.cli(&["cordon"])
        .expect_code(0, "cordon b while it runs ha1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        live_qemu(&b),
        Some(b_pid),
        "a cordon moves or stops nothing"
    );
    kill_9(b_pid);
    never_two(&a, &b, "a take ha1 over", |on_a, _| {
        assert!(qemus(&a, &b) <= 1);
        on_a
    });
    assert_eq!(b.qemu_count(VM), 0);
}

/// The identity scan of a guarded QEMU: with its pidfile deleted while no agent runs, the next
/// agent finds the guard and its QEMU by their command lines alone (`/proc`), reports the VM
/// `unresponsive` with the QEMU's PID and why, and starts nothing beside it.
#[test]
fn a_guarded_qemu_whose_pidfile_is_gone_is_found_by_the_scan_and_never_doubled() {
    let etcd = single();
    let endpoint = etcd.endpoint(0);
    let mut a = Host::new();
    a.write_config(json!({ VM: a.vm(json!({"ha": {"enable": true}})) }));
    a.start_agent_with(&cluster_agent_flags(&endpoint, "a", 10));
    let pid = a.wait_running(VM);
    let guard = parent_of(pid);
    assert!(
        guard_alive(guard),
        "the QEMU of an HA VM runs under its guard"
    );

    a.kill_agent();
    std::fs::remove_file(a.run_dir.join("vms").join(VM).join("pid")).unwrap();
    a.start_agent_with(&cluster_agent_flags(&endpoint, "a", 10));
    let status = a.wait_status("ha1 found by the scan", AGENT, |s| {
        s["vms"][VM]["state"] == "unresponsive"
    });
    let vm = &status["vms"][VM];
    assert_eq!(vm["pid"], pid, "{status:#}");
    assert!(
        vm["stateReason"].as_str().unwrap().contains("is missing"),
        "{status:#}"
    );
    a.cli(&["reload", "--wait"]).expect_code(0, "reload");
    for _ in 0..30 {
        assert_eq!(
            a.qemu_count(VM),
            1,
            "never a second QEMU beside the guarded one"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(guard_alive(guard) && is_alive(pid), "left alone");
}
