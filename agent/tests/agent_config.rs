//! Config changes through the real `plasmavmc` binary against real guests: an invalid or missing
//! config is refused and every VM stays exactly as it was (also when the agent starts on it);
//! a file change alone is noticed without a reload, even a NixOS-style swap of `/etc/static`;
//! a VM removed from the config is stopped; two VMs run at once; `plan` is read-only;
//! `reload --wait` applies a live change on the same QEMU.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::Duration;

use harness::*;
use serde_json::json;

#[test]
fn an_invalid_config_is_refused_and_the_vms_keep_running() {
    let mut host = Host::new();
    let web = host.vm(json!({"restartPolicy": "always"}));
    host.write_config(json!({"web": web}));
    host.start_agent();
    let pid = host.wait_running("web");
    host.wait_boot("web");

    let mut broken = web.clone();
    broken["vcpus"] = json!(0);
    broken["nics"] = json!({"eth0": {"mac": "01:00:5e:00:00:01", "bridge": "br0"}});
    host.write_config(json!({"web": broken}));
    let out = host
        .cli(&["reload", "--wait"])
        .expect_code(2, "reload of an invalid config");
    assert!(
        out.stderr.contains("vms.web.vcpus"),
        "every problem:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("vms.web.nics.eth0.mac"),
        "every problem:\n{}",
        out.stderr
    );

    std::fs::remove_file(&host.config).unwrap();
    let out = host.cli(&["reload", "--wait"]);
    assert_ne!(out.code, 0, "a missing config is refused:\n{}", out.stdout);
    assert!(
        out.stderr.contains("desired.json"),
        "names the file:\n{}",
        out.stderr
    );

    std::thread::sleep(Duration::from_secs(2)); // give the file watcher its chance to misbehave
    let status = host.vm_status("web");
    assert_eq!(status["state"], "running", "{status:#}");
    assert_eq!(status["pid"], pid, "the same QEMU");

    // An agent that starts on an invalid config adopts nothing away: the VM stays as it is.
    host.kill_agent();
    host.write_config_text("{\"version\": 1, \"vms\": {\"web\": ");
    host.start_agent();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        is_alive(pid),
        "an agent on an invalid config leaves the VM alone"
    );
    host.cli(&["reload", "--wait"])
        .expect_code(2, "still invalid");
    assert!(is_alive(pid));

    // A valid config again, with a live change: applied to the same QEMU.
    let extra = host.image("extra.qcow2");
    let mut fixed = web.clone();
    fixed["disks"] = json!({"extra": {"path": extra, "format": "qcow2"}});
    host.write_config(json!({"web": fixed}));
    let out = host
        .cli(&["reload", "--wait"])
        .expect_code(0, "reload of the fixed config");
    assert!(
        out.stdout.contains("extra"),
        "prints what it applied:\n{}",
        out.stdout
    );
    let status = host.vm_status("web");
    assert_eq!(status["pid"], pid, "applied live: {status:#}");
    assert!(
        device_ids(&status).contains(&"disk-extra".to_owned()),
        "{status:#}"
    );
}

#[test]
fn two_vms_run_at_once_and_one_removed_from_the_config_is_stopped() {
    let mut host = Host::new();
    let (a, b) = (host.vm(json!({})), host.vm(json!({})));
    host.switch_config(1, json!({"alpha": a, "beta": b}));
    host.start_agent();
    let alpha = host.wait_running("alpha");
    let beta = host.wait_running("beta");
    assert_ne!(alpha, beta);
    host.wait_boot("alpha");
    host.wait_boot("beta");

    // `plan` against the running agent is read-only and shows what a change would do.
    let candidate = host.dir.path().join("candidate.json");
    let mut bigger = a.clone();
    bigger["vcpus"] = json!(2); // above maxVcpus (= vcpus at boot): pending
    std::fs::write(
        &candidate,
        json!({"version": 1, "vms": {"alpha": bigger}}).to_string(),
    )
    .unwrap();
    let out = host
        .cli(&["plan", "--config", path_str(&candidate)])
        .expect_code(0, "plan");
    assert!(
        out.stdout.contains("beta"),
        "beta would be stopped:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("vcpus"),
        "the vCPU change is pending:\n{}",
        out.stdout
    );
    let out = host
        .cli(&["plan", "--config", path_str(&candidate), "--json"])
        .expect_code(0, "plan --json");
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["vm"] == "beta" && s["action"]["kind"] == "stopVm"),
        "{plan:#}"
    );
    assert!(
        plan["pending"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["vm"] == "alpha"),
        "{plan:#}"
    );
    assert!(is_alive(beta), "plan touched nothing");

    // A NixOS-style switch (only the `etc/static` symlink changes) and no reload: the agent
    // notices and stops beta.
    host.switch_config(2, json!({"alpha": a}));
    assert!(
        wait_dead(beta, Duration::from_secs(120)),
        "beta's QEMU is stopped"
    );
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    let status = host.status();
    let beta_state = &status["vms"]["beta"];
    assert!(
        beta_state.is_null() || beta_state["state"] == "stopped",
        "beta is gone: {status:#}"
    );
    assert_eq!(status["vms"]["alpha"]["pid"], alpha, "alpha untouched");
    assert_eq!(status["vms"]["alpha"]["state"], "running");
}
