//! The user-facing examples work as the docs say: `examples/demo.json` is valid for the real agent,
//! and `scripts/quickstart.sh` (README's quick start) does what it says here, with the demo's
//! paths moved into a temp dir: the test guest (the script builds the same one with
//! `tests/guest/build.sh`), the data disk made with `qemu-img` as the script makes it, the agent
//! on the demo config, `start demo`, the guest boots, `plan --config` has nothing left to do, and
//! README's `stop demo` is a clean ACPI shutdown. (`install-deps.sh` and the release build are
//! not run; the NixOS example hypervisor is checked in `nix_module.rs`.) A docs example that rots
//! fails here.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::*;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value of `NAME=VALUE` in the quickstart script (up to a comment).
fn script_var(script: &str, name: &str) -> String {
    script
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .map(|value| value.split('#').next().unwrap().trim().to_owned())
        .unwrap_or_else(|| panic!("scripts/quickstart.sh sets no {name}="))
}

#[test]
fn the_demo_config_is_valid_and_the_quickstart_parses() {
    let out = run(&["validate", "--json", path_str(&repo("examples/demo.json"))])
        .expect_code(0, "validate examples/demo.json");
    let answer: Value = serde_json::from_str(&out.stdout).expect("--json");
    assert_eq!(answer["valid"], true, "{answer:#}");
    assert_eq!(answer["vms"], 1, "{answer:#}");
    let syntax = Command::new("bash")
        .args(["-n", path_str(&repo("scripts/quickstart.sh"))])
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{syntax:?}");
    assert!(
        read("README.md").contains("[`examples/demo.json`](examples/demo.json)"),
        "README points to the demo config this test checks"
    );
}

#[test]
fn the_quickstart_boots_the_demo_vm_here() {
    let script = read("scripts/quickstart.sh");
    let demo_dir = script_var(&script, "demo");
    let demo = read("examples/demo.json");
    assert!(demo.contains(&demo_dir), "demo.json names {demo_dir}");
    let mut host = Host::new();
    let root = host.dir.path().join("demo");
    let relocated = demo.replace(&demo_dir, path_str(&root));
    // What the script makes: the guest, and the data disk.
    let guest = guest::guest_artifacts();
    std::fs::create_dir_all(root.join("guest")).unwrap();
    std::fs::copy(&guest.kernel, root.join("guest/vmlinuz")).unwrap();
    std::fs::copy(&guest.initrd, root.join("guest/initramfs.cpio.gz")).unwrap();
    let disk = root.join("data.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", path_str(&disk), "64M"])
        .status()
        .unwrap();
    assert!(made.success());
    host.write_config_text(&relocated);
    run(&["validate", path_str(&host.config)]).expect_code(0, "validate the relocated demo");

    host.start_agent();
    host.cli(&["start", "demo"]).expect_code(0, "start demo");
    host.wait_boot("demo");
    let status = host.vm_status("demo");
    assert_eq!(status["state"], "running", "{status:#}");
    let plan = host
        .cli(&["plan", "--json", "--config", path_str(&host.config)])
        .expect_code(0, "plan");
    let plan: Value = serde_json::from_str(&plan.stdout).expect("--json");
    assert!(
        plan["steps"].as_array().is_some_and(|a| a.is_empty())
            && plan["pending"].as_array().is_some_and(|a| a.is_empty()),
        "the demo as declared runs: nothing to do\n{plan:#}"
    );
    let stop = host.cli(&["stop", "demo"]).expect_code(0, "stop demo");
    assert!(stop.stdout.contains("the guest shut down"), "{stop:?}");
}
