//! `plasmavmc first-apply`, which a switch that restarts the agent runs (as
//! plasmavmc-first-apply.service) to learn whether the new agent's first apply went through: a
//! VM that passes validation but cannot start (its disk image is not there) fails it, named with
//! the reason, while the agent and the other VM run on; a reload that fixes it is the reload's
//! success, not the first apply's; the next agent start's first apply passes.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use harness::*;
use serde_json::{json, Value};

#[test]
fn a_failed_first_apply_names_its_vm_and_the_agent_and_other_vms_go_on() {
    let mut host = Host::new();
    let absent = host.dir.path().join("absent.qcow2");
    let good = host.vm(json!({}));
    let with_data = |path: &std::path::Path| {
        let mut vm = good.clone();
        vm["disks"] = json!({"data": {"path": path, "format": "qcow2"}});
        vm
    };
    host.write_config(json!({"good": good, "broken": with_data(&absent)}));
    host.start_agent();

    // Asked at once: it waits for the apply (a QEMU start or two) to end.
    let out = host
        .cli(&["first-apply", "--timeout", "3m"])
        .expect_code(1, "first-apply after a first apply that failed");
    assert!(
        out.stdout.starts_with(
            "first apply FAILED for broken (plasmavmc first-apply and status say why)\n"
        ),
        "{}",
        out.stdout
    );
    let why = out
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("broken: "))
        .unwrap_or_else(|| panic!("no line for broken:\n{}", out.stdout));
    assert!(why.contains(path_str(&absent)), "the reason: {why}");
    let json: Value = serde_json::from_str(
        &host
            .cli(&["first-apply", "--json"])
            .expect_code(1, "first-apply --json")
            .stdout,
    )
    .unwrap();
    assert_eq!(json["state"], "failed", "{json:#}");
    assert_eq!(json["vms"].as_object().unwrap().len(), 1, "{json:#}");

    // The agent and the VM that started are untouched by it.
    let good_pid = host.wait_running("good");
    assert!(is_alive(host.agent_pid()), "the agent runs on");
    assert_eq!(host.qemu_count("good"), 1);

    // Fixed by a reload: that is the reload's success; the first apply stays what it was.
    let image = host.image("data.qcow2");
    host.write_config(json!({"good": good, "broken": with_data(&image)}));
    host.cli(&["reload", "--wait"])
        .expect_code(0, "the reload that fixes broken");
    host.wait_running("broken");
    host.cli(&["first-apply"]).expect_code(
        1,
        "first-apply is about the agent's start, not the last reload",
    );

    // The next agent start adopts both VMs: its first apply goes through.
    host.kill_agent();
    host.start_agent();
    let out = host
        .cli(&["first-apply"])
        .expect_code(0, "first-apply of the next agent");
    assert!(out.stdout.starts_with("first apply done"), "{}", out.stdout);
    assert_eq!(
        host.wait_running("good"),
        good_pid,
        "adopted, not restarted"
    );
    assert_eq!(host.qemu_count("broken"), 1);
}
