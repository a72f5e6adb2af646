//! What a NixOS switch hands the agent. The module points the agent at
//! `/run/current-system/etc/plasmavmc/desired.json`: the switch's activation swaps the
//! `/run/current-system` symlink (on /run, shared with the agent's mount namespace) before it
//! reloads the agent, whereas `/etc` may stay the old one inside that namespace when
//! `system.etc.overlay` remounts it (nixpkgs PR 556436). No guest boots here.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::path::Path;

use harness::*;
use serde_json::{json, Value};

/// `<root>/store-N/etc/plasmavmc/desired.json` with `vms`, like a system generation's etc.
fn generation(root: &Path, n: u32, vms: Value) -> std::path::PathBuf {
    let toplevel = root.join(format!("store-{n}"));
    let dir = toplevel.join("etc/plasmavmc");
    std::fs::create_dir_all(&dir).unwrap();
    let doc = json!({"version": 1, "vms": vms}).to_string();
    std::fs::write(dir.join("desired.json"), doc).unwrap();
    toplevel
}

/// Swaps `<root>/current-system` to `toplevel` atomically, as the activation script does.
fn activate(root: &Path, toplevel: &Path) {
    let new = root.join("current-system.new");
    let _ = std::fs::remove_file(&new);
    std::os::unix::fs::symlink(toplevel, &new).unwrap();
    std::fs::rename(&new, root.join("current-system")).unwrap();
}

fn declared(host: &Host) -> Vec<String> {
    let status = host.status();
    status["vms"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn a_reload_applies_the_generation_current_system_points_at_while_etc_is_stale() {
    let mut host = Host::new();
    let root = host.dir.path().to_owned();
    let idle = host.vm(json!({"autostart": false}));
    let first = generation(&root, 1, json!({"alpha": idle}));
    let second = generation(&root, 2, json!({"alpha": idle, "beta": idle}));
    // The agent's stale view of /etc: the first generation's file, never updated.
    let stale_etc = root.join("etc/plasmavmc");
    std::fs::create_dir_all(&stale_etc).unwrap();
    std::fs::copy(
        first.join("etc/plasmavmc/desired.json"),
        stale_etc.join("desired.json"),
    )
    .unwrap();

    activate(&root, &first);
    host.config = root.join("current-system/etc/plasmavmc/desired.json");
    host.start_agent();
    assert_eq!(declared(&host), ["alpha"]);

    activate(&root, &second);
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    assert_eq!(declared(&host), ["alpha", "beta"]);
    assert_eq!(host.status()["config"]["error"], Value::Null);
}
