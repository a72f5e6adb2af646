//! The NixOS module and the agent cannot drift apart: the module is evaluated by the real nixpkgs
//! module system (`checks/eval/`), and the desired-state JSON it generates goes through the
//! agent's own validator.
//!
//! Needs `nix-instantiate` and the nixpkgs lib beside the repository (`../shared/nixpkgs-lib`, or
//! `PLASMAVMC_NIXPKGS_LIB`). Without nix the test is skipped loudly, except under CI, where that is
//! a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use plasmavmc_agent::spec::DesiredState;
use plasmavmc_agent::validate::parse_desired_state;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

fn nix_available() -> bool {
    let found = Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if !found {
        assert!(
            !in_ci,
            "nix-instantiate is missing and CI is set: the module/agent drift check cannot run"
        );
        eprintln!(
            "\n*** SKIPPING nix_module tests: nix-instantiate not found (apt-get install nix-bin) ***\n"
        );
    }
    found
}

/// The JSON text the module writes to /etc/plasmavmc/desired.json for a configuration module
/// (a path relative to the repository root), parsed by the agent's validator.
fn module_output(config_module: &str) -> (String, DesiredState) {
    let root = repo_root();
    let expr = format!(
        "import {}/checks/eval/desired-json.nix {{ module = {}/{config_module}; }}",
        root.display(),
        root.display()
    );
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", &expr])
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "evaluating {config_module} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --json prints the Nix string (the document) as a JSON string.
    let text: String =
        serde_json::from_slice(&out.stdout).expect("nix-instantiate printed a JSON string");
    let state = parse_desired_state(&text).unwrap_or_else(|errors| {
        panic!("the agent rejects what the module generated for {config_module}:\n{errors}\n{text}")
    });
    (text, state)
}

#[test]
fn example_hypervisor_config_is_valid_for_the_agent() {
    if !nix_available() {
        return;
    }
    let (_, state) = module_output("examples/hypervisor/vms.nix");
    assert_eq!(state.vms.keys().collect::<Vec<_>>(), ["db", "web"]);
    let web = &state.vms["web"];
    assert_eq!((web.vcpus, web.max_vcpus), (2, Some(8)));
    assert_eq!(web.nics["eth0"].bridge.as_deref(), Some("br0"));
}

#[test]
fn every_module_option_reaches_the_agent() {
    if !nix_available() {
        return;
    }
    let (text, state) = module_output("checks/eval/fixtures/every-field.nix");
    let tiny = &state.vms["tiny"];
    // Every field set away from its default arrives as set: nothing is dropped or renamed. (The
    // agent writes absent optionals as null; the module leaves them out.)
    let reserialized = without_nulls(serde_json::to_value(&state).expect("serialize"));
    let generated: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        reserialized, generated,
        "module output and agent schema disagree"
    );
    assert!(tiny.ha.enable);
    assert_eq!(tiny.nics.len(), 3);
}

/// The module writes every default explicitly; the agent fills absent fields with serde defaults.
/// Both must describe the same VM, or a field would mean different things on each side.
#[test]
fn module_defaults_equal_agent_defaults() {
    if !nix_available() {
        return;
    }
    let (_, from_module) = module_output("checks/eval/fixtures/minimal.nix");
    let only_required = r#"{"version": 1, "vms": {"a": {
        "vcpus": 1, "memoryMiB": 512, "bootDisk": "root",
        "disks": {"root": {"path": "/var/lib/vms/a.qcow2", "format": "qcow2"}}}}}"#;
    let from_agent = parse_desired_state(only_required).expect("valid");
    assert_eq!(from_module, from_agent);
}

fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, without_nulls(v)))
            .collect(),
        other => other,
    }
}
