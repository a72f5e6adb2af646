//! `plasmavmc events --json` against a real guest: a disk hot-added by a reload and a `kill -9`
//! of QEMU show up in order (device added, then failed, then restarted by the restart policy),
//! with the pending change a boot-time edit makes; `status --watch` redraws the table.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

#[test]
fn events_show_a_hotplug_then_a_qemu_kill_in_order_and_status_watch_redraws() {
    let mut host = Host::new();
    let web = host.vm(json!({}));
    host.write_config(json!({"web": web}));
    host.start_agent();
    let pid = host.wait_running("web");
    let events = Follower::events_from_now(&host);

    // A disk added live, and a boot-time change that waits.
    let data = host.image("data.qcow2");
    let mut changed = web.clone();
    changed["disks"] = json!({"data": {"path": data, "format": "qcow2"}});
    changed["cmdline"] = json!(format!(
        "{} plasmavmc.changed",
        web["cmdline"].as_str().unwrap()
    ));
    host.write_config(json!({"web": changed}));
    host.cli(&["reload"]).expect_code(0, "reload");
    let added = events.wait_for("deviceAdded", |e| {
        e["event"] == "deviceAdded" && e["vm"] == "web" && e["device"] == "disk-data"
    });
    let pending = events.wait_for("pendingChanged", |e| e["event"] == "pendingChanged");
    assert!(
        events.events()[pending]["pending"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("cmdline: ")),
        "{:#?}",
        events.events()
    );

    kill_9(pid);
    let failed = events.wait_for("failed", |e| e["event"] == "failed" && e["vm"] == "web");
    let restarted = events.wait_for("restarted", |e| e["event"] == "restarted");
    let started = events.wait_for("started", |e| {
        e["event"] == "started" && e["pid"].as_u64().is_some_and(|p| p != u64::from(pid))
    });
    assert!(
        added < failed && failed < started && failed < restarted,
        "{:#?}",
        events.events()
    );
    let all = events.events();
    assert!(
        all[failed]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {pid}")),
        "{all:#?}"
    );
    for event in &all {
        assert!(
            event["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{event}"
        );
    }

    // Results as JSON for scripts, and the documented exit codes.
    let reset = host
        .cli(&["reset", "web", "--json"])
        .expect_code(0, "reset --json");
    let reset: Value = serde_json::from_str(&reset.stdout).expect("reset --json is JSON");
    assert!(
        reset["message"]
            .as_str()
            .is_some_and(|m| m.contains("hard reset")),
        "{reset}"
    );
    host.cli(&["start", "nosuch", "--json"])
        .expect_code(2, "start of an undeclared VM");
    host.cli(&["save", "nosuch", "--json"])
        .expect_code(2, "save of an undeclared VM");

    // The table, redrawn at least twice (a non-terminal gets one table after another).
    let watch = Follower::start(&host, &["status", "--watch", "--interval", "1s"]);
    let deadline = Instant::now() + AGENT;
    while watch
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("web "))
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "{:#?}",
            watch.lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = watch.lines.lock().unwrap().join("\n");
    assert!(text.contains("plasmavmc status at "), "{text}");
    drop(watch);

    // The stream ends, with exit 1, when the agent goes.
    host.kill_agent();
    let mut events = events;
    assert_eq!(events.child.wait().unwrap().code(), Some(1));
}
