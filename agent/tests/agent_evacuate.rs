//! Evacuation and placement end to end: two real agents (hosts `a` and `b`) against a real etcd,
//! three real HA guests. `evacuate --wait` moves all three live to `b`, carried on by a new
//! agent after `a`'s is killed -9 as the moves start; the cordoned `a`
//! receives nothing (no migration, no placement) until `uncordon`; then placement
//! (`ha.preferredHosts`) brings back the VM that prefers `a`, and a config reload that makes
//! another VM prefer `a` moves that one too, live. Last, `b`'s host shutdown with
//! `onHostShutdown = "evacuate"` moves its remaining VM live.
//!
//! A watcher (`support/watcher.rs`) samples both hosts every 20 ms and fails the test the moment
//! a VM has more than a source and an incoming QEMU, or two copies of a guest *run* at once (the
//! guests beat on their consoles; two running copies would interleave); at every rest point each
//! VM has exactly one, and no guest ever printed its boot marker twice (a move that restarted a
//! VM would have).

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use harness::watcher::Watcher;
use harness::*;
use serde_json::{json, Value};

const VMS: [&str; 3] = ["ev1", "ev2", "ev3"];
const SETTLE_SECS: u64 = 2;

/// Each host's migration ports.
const A_PORTS: &str = "18401-18404";
const B_PORTS: &str = "18411-18414";

fn start(host: &mut Host, endpoint: &str, id: &str, ports: &str) {
    // Room to restart an agent before its fence guards fire, on a loaded 2-core machine.
    let mut flags = cluster_agent_flags(endpoint, id, 10);
    flags.extend(migration_flags(ports));
    flags.extend(["--placement-settle".into(), SETTLE_SECS.to_string()]);
    host.start_agent_with(&flags);
}

/// The first `count` VMs as both hosts declare them; `preferred[vm]` lists its preferred hosts.
fn declare(host: &Host, count: usize, preferred: &[(&str, &[&str])]) {
    declare_with(host, count, preferred, "powerdown")
}

fn declare_with(host: &Host, count: usize, preferred: &[(&str, &[&str])], on_shutdown: &str) {
    let vms: serde_json::Map<String, Value> = VMS[..count]
        .iter()
        .map(|vm| {
            let hosts = preferred
                .iter()
                .find(|(name, _)| name == vm)
                .map_or(&[][..], |(_, hosts)| *hosts);
            let ha = json!({
                "ha": {"enable": true, "preferredHosts": hosts},
                "onHostShutdown": on_shutdown,
            });
            let mut vm_spec = host.vm(ha);
            vm_spec["cmdline"] =
                format!("{} {}", guest::guest_cmdline(false), guest::HEARTBEAT_FLAG).into();
            (vm.to_string(), vm_spec)
        })
        .collect();
    host.write_config(Value::Object(vms));
}

/// Waits until `vm` runs on `on` only (one QEMU in all) and its guest beats there twice more, then
/// checks the guest booted once: a guest started afresh prints its boot marker with its first
/// beats, so by then a restart has shown.
fn wait_only_on(vm: &str, on: &Host, off: &Host, watcher: &Watcher, what: &str) {
    let deadline = Instant::now() + AGENT;
    while !(on.qemu_count(vm) == 1 && off.qemu_count(vm) == 0) {
        watcher.check();
        assert!(
            Instant::now() < deadline,
            "{what}: {vm} never ran on one host only\nlog (on):\n{}\nlog (off):\n{}",
            on.agent_log_text(),
            off.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let beats = || on.console(vm).matches(guest::HEARTBEAT).count();
    let before = beats();
    while beats() < before + 2 {
        assert!(
            Instant::now() < deadline,
            "{what}: {vm}'s guest does not beat on the host it runs on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let boots =
        on.console(vm).matches(BOOT_MARKER).count() + off.console(vm).matches(BOOT_MARKER).count();
    assert_eq!(
        boots, 1,
        "{what}: {vm}'s guest booted again: it was restarted, not moved\nCONSOLE ON:\n{}\nCONSOLE OFF:\n{}", on.console(vm), off.console(vm)
    );
}

#[test]
fn evacuation_moves_every_vm_live_a_cordoned_host_receives_nothing_and_placement_brings_vms_back() {
    let etcd = etcd::single();
    let endpoint = etcd.endpoint(0);
    let mut a = Host::new();
    let mut b = Host::another(&a);
    let prefers_a: &[(&str, &[&str])] = &[("ev1", &["a"])];
    // One guest boots at a time (TCG on a loaded machine); `b` is not up yet, so `a` takes all.
    start(&mut a, &endpoint, "a", A_PORTS);
    for (count, vm) in VMS.iter().enumerate() {
        declare(&a, count + 1, prefers_a);
        a.wait_running(vm);
        a.wait_boot(vm);
    }
    declare(&b, VMS.len(), prefers_a);
    start(&mut b, &endpoint, "b", B_PORTS);
    b.wait_status("b standing by for all three", AGENT, |s| {
        VMS.iter()
            .all(|vm| s["vms"][vm]["heldDown"] == "HA: another host holds it (a)")
    });
    let watcher = Watcher::start(&[&a, &b], &VMS, 2);

    // Evacuation: all three move, live, although `a`'s agent is killed -9 as the moves start
    // and started again: the new agent settles the moves in flight and carries the evacuation
    // on; the client that lost it follows it again with `evacuate --wait`.
    VMS.iter().for_each(|vm| watcher.move_starts(vm));
    let first = a.cli_in_background(&["evacuate", "--wait"]);
    let started = a.wait_status("a move of the evacuation sending memory", AGENT, |s| {
        VMS.iter().any(|vm| {
            s["vms"][vm]["migration"]["ramTransferredBytes"]
                .as_u64()
                .is_some_and(|bytes| bytes > 0)
        })
    });
    a.kill_agent();
    let lost = finished(first);
    assert_ne!(lost.code, 0, "{lost:?}");
    assert!(
        lost.stderr.contains("evacuate --wait"),
        "says how to follow again: {lost:?}"
    );
    start(&mut a, &endpoint, "a", A_PORTS);
    let out = a
        .cli(&["evacuate", "--wait", "--json"])
        .expect_code(0, "evacuate --wait, again after the agent restarted");
    let evacuation: Value = serde_json::from_str(&out.stdout).expect("--json");
    assert_eq!(
        evacuation["startedAt"], started["evacuation"]["startedAt"],
        "the same evacuation, carried on: {evacuation:#}"
    );
    for vm in VMS {
        assert_eq!(evacuation["vms"][vm]["state"], "moved", "{evacuation:#}");
        assert_eq!(evacuation["vms"][vm]["to"], "b", "{evacuation:#}");
        wait_only_on(vm, &b, &a, &watcher, "evacuated");
    }
    assert_eq!(a.status()["cordon"]["by"], "evacuate");
    assert!(b
        .cli(&["status", "--cluster"])
        .stdout
        .contains("a (cordoned)"));

    // Cordoned, `a` receives nothing: no migration, and no placement although ev1 prefers it.
    let refused = b.cli(&["migrate", "ev2", "--to", "a"]);
    assert_ne!(
        refused.code, 0,
        "a migration to a cordoned host: {refused:?}"
    );
    assert!(refused.stderr.contains("cordoned"), "{refused:?}");
    std::thread::sleep(Duration::from_secs(3 * SETTLE_SECS));
    for vm in VMS {
        wait_only_on(vm, &b, &a, &watcher, "a cordoned");
    }

    // Uncordoned: placement brings ev1 back to `a`, live, once `a` has settled.
    watcher.move_starts("ev1");
    a.cli(&["uncordon"]).expect_code(0, "uncordon");
    wait_only_on("ev1", &a, &b, &watcher, "placement after uncordon");
    a.wait_running("ev1");

    // A reload that makes ev2 prefer `a` moves it there, live; ev3 (no preference) stays.
    let prefer_a_too: &[(&str, &[&str])] = &[("ev1", &["a"]), ("ev2", &["a", "b"])];
    watcher.move_starts("ev2");
    declare(&a, VMS.len(), prefer_a_too);
    declare(&b, VMS.len(), prefer_a_too);
    a.cli(&["reload", "--wait"]).expect_code(0, "reload a");
    b.cli(&["reload", "--wait"]).expect_code(0, "reload b");
    wait_only_on("ev2", &a, &b, &watcher, "placement after a reload");
    wait_only_on("ev3", &b, &a, &watcher, "no preference: stays");
    wait_only_on("ev1", &a, &b, &watcher, "still where it belongs");

    // `b` shuts down with onHostShutdown = "evacuate": ev3 moves live to `a`.
    for host in [&a, &b] {
        declare_with(host, VMS.len(), prefer_a_too, "evacuate");
        host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    }
    watcher.move_starts("ev3");
    let shutdown = b
        .cli(&["shutdown-host"])
        .expect_code(0, "shutdown-host on b");
    assert!(shutdown.stdout.contains("ev3: moved"), "{shutdown:?}");
    wait_only_on("ev3", &a, &b, &watcher, "moved away at host shutdown");
    watcher.check();
}
