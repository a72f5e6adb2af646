//! The agent supervising real guests, through the real `plasmavmc` binary: boot to the guest's
//! marker, status, adoption after the agent is killed (same QEMU PID, no second boot), QEMU
//! killed → `failed` and restarted per `restartPolicy`, operator stop/start, strangers untouched.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::Duration;

use harness::guest::guest_cmdline_ignoring_powerdown;
use harness::*;
use serde_json::json;

#[test]
fn a_vm_boots_and_survives_an_agent_kill_9_on_the_same_qemu() {
    let mut host = Host::new();
    let data = host.image("data.qcow2");
    host.write_config(json!({
        "web": host.vm(json!({"disks": {"data": {"path": data, "format": "qcow2"}}})),
    }));
    host.start_agent();
    let pid = host.wait_running("web");
    host.wait_boot("web");

    let web = host.vm_status("web");
    assert_eq!(web["state"], "running", "{web:#}");
    assert!(web["uptimeSeconds"].is_u64(), "{web:#}");
    assert!(
        web["pending"].as_array().is_some_and(|p| p.is_empty()),
        "{web:#}"
    );
    assert!(web["lastError"].is_null(), "{web:#}");
    let data_disk = web["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == "disk-data"))
        .unwrap_or_else(|| panic!("disk-data among the devices QEMU reports: {web:#}"));
    assert_eq!(data_disk["kind"], "disk");
    let pidfile = host.run_dir.join("vms/web/pid");
    assert_eq!(
        std::fs::read_to_string(pidfile).unwrap().trim(),
        pid.to_string()
    );

    let human = host.cli(&["status"]).expect_code(0, "status");
    assert!(
        human.stdout.contains("web") && human.stdout.contains("running"),
        "{}",
        human.stdout
    );

    let old_agent = host.agent_pid();
    host.kill_agent();
    assert!(is_alive(pid), "QEMU outlives a kill -9 of the agent");
    host.start_agent();
    assert_ne!(host.agent_pid(), old_agent);
    assert_eq!(
        host.wait_running("web"),
        pid,
        "the new agent adopts the same QEMU"
    );
    let devices = device_ids(&host.vm_status("web"));
    assert!(
        devices.contains(&"disk-data".to_owned()),
        "re-read: {devices:?}"
    );

    // Re-applying the unchanged config after adoption changes nothing.
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload after adoption");
    assert_eq!(host.wait_running("web"), pid);
    assert_eq!(
        host.console("web").matches(BOOT_MARKER).count(),
        1,
        "the guest booted once: it never noticed the agent's restart"
    );
}

#[test]
fn a_killed_qemu_is_failed_and_restarted_per_restart_policy() {
    let mut host = Host::new();
    host.write_config(json!({
        "crashy": host.vm(json!({"restartPolicy": "on-failure"})),
        "fragile": host.vm(json!({"restartPolicy": "never"})),
    }));
    host.start_agent();
    let crashy = host.wait_running("crashy");
    let fragile = host.wait_running("fragile");
    assert_ne!(crashy, fragile);

    kill_9(crashy);
    kill_9(fragile);

    let status = host.wait_status("fragile failed", AGENT, |s| {
        s["vms"]["fragile"]["state"] == "failed"
    });
    let failed = &status["vms"]["fragile"];
    assert!(failed["pid"].is_null(), "{failed:#}");
    assert!(
        failed["lastError"].as_str().is_some_and(|e| !e.is_empty()),
        "the failure is explained: {failed:#}"
    );

    let restarted = host.wait_status("crashy restarted", BOOT, |s| {
        s["vms"]["crashy"]["state"] == "running"
            && s["vms"]["crashy"]["pid"]
                .as_u64()
                .is_some_and(|p| p != crashy as u64)
    });
    let new_crashy = restarted["vms"]["crashy"]["pid"].as_u64().unwrap() as u32;
    host.wait_boot("crashy");

    // restartPolicy never: it stays failed (a reload does not bring it back either).
    std::thread::sleep(Duration::from_secs(3));
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    assert_eq!(host.vm_status("fragile")["state"], "failed");

    // The operator brings it back.
    host.cli(&["start", "fragile"])
        .expect_code(0, "start fragile");
    host.wait_running("fragile");

    // An operator stop keeps the VM down, also across a reload.
    host.cli(&["stop", "crashy"]).expect_code(0, "stop crashy");
    assert!(wait_dead(new_crashy, AGENT), "stop ends its QEMU");
    host.wait_status("crashy stopped", AGENT, |s| {
        s["vms"]["crashy"]["state"] == "stopped"
    });
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    assert_eq!(host.vm_status("crashy")["state"], "stopped");
    host.cli(&["start", "crashy"])
        .expect_code(0, "start crashy");
    let again = host.wait_running("crashy");
    assert_ne!(again, new_crashy);
}

#[test]
fn a_qemu_the_agent_cannot_identify_is_reported_and_never_touched() {
    use plasmavmc_agent::paths::RunDir;
    let mut host = Host::new();
    // A guest-less QEMU in a VM directory whose boot spec this agent cannot read.
    let run_dir = RunDir::new(&host.run_dir);
    let vm_dir = run_dir.vm("ghost");
    let spec = serde_json::from_value(host.vm(json!({}))).unwrap();
    let argv = qemu_harness::bare_argv("ghost", &vm_dir);
    let ghost = qemu_harness::launch_argv("ghost", &spec, &vm_dir, &argv).unwrap();
    let _guard = qemu_harness::KillOnDrop(ghost);
    std::fs::write(vm_dir.boot_spec(), "not a spec").unwrap();

    host.write_config(json!({}));
    host.start_agent();
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    let human = host.cli(&["status"]).expect_code(0, "status");
    assert!(
        human.stdout.contains("ghost"),
        "the stranger is reported:\n{}",
        human.stdout
    );
    let json = host
        .cli(&["status", "--json"])
        .expect_code(0, "status --json");
    assert!(json.stdout.contains("ghost"), "{}", json.stdout);
    std::thread::sleep(Duration::from_secs(2));
    assert!(is_alive(ghost), "the stranger's QEMU is left alone");
}

#[test]
fn a_vm_slow_to_stop_does_not_hold_up_another_vms_restart() {
    let mut host = Host::new();
    host.write_config(json!({
        "slow": host.vm(json!({"cmdline": guest_cmdline_ignoring_powerdown()})),
        "crashy": host.vm(json!({"restartPolicy": "on-failure"})),
    }));
    // `slow` ignores ACPI powerdown: stopping it takes the whole stop timeout.
    host.start_agent_with(&["--stop-timeout", "40"]);
    let slow = host.wait_running("slow");
    let crashy = host.wait_running("crashy");

    let run_dir = host.run_dir.clone();
    let stopping = std::thread::spawn(move || {
        plasmavmc()
            .args(["stop", "slow", "--run-dir"])
            .arg(&run_dir)
            .output()
            .expect("plasmavmc stop")
    });
    host.wait_status("slow stopping", AGENT, |s| {
        s["vms"]["slow"]["state"] == "stopping"
    });
    kill_9(crashy);
    host.wait_status("crashy restarted", BOOT, |s| {
        s["vms"]["crashy"]["state"] == "running"
            && s["vms"]["crashy"]["pid"]
                .as_u64()
                .is_some_and(|p| p != crashy as u64)
    });
    assert!(
        is_alive(slow) && !stopping.is_finished(),
        "crashy was restarted while slow was still powering down"
    );
    let stopped = stopping.join().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(wait_dead(slow, AGENT));
}

#[test]
fn reset_reboots_the_guest_in_the_same_qemu_and_soft_falls_back_to_hard() {
    let mut host = Host::new();
    host.write_config(json!({
        "web": host.vm(json!({"cmdline": guest_cmdline_ignoring_powerdown()})),
    }));
    host.start_agent();
    let pid = host.wait_running("web");
    host.wait_boot("web");
    let boots = |host: &Host| host.console("web").matches(BOOT_MARKER).count();

    let out = host.cli(&["reset", "web"]).expect_code(0, "reset");
    assert!(out.stdout.contains("hard reset"), "{}", out.stdout);
    wait_for(|| boots(&host) == 2, "the guest to boot again after reset");
    assert_eq!(
        host.wait_running("web"),
        pid,
        "a reset keeps the QEMU process"
    );

    // `web` ignores ACPI powerdown: the soft reset falls back and says so.
    let out = host
        .cli(&["reset", "--soft", "web"])
        .expect_code(0, "reset --soft");
    assert!(out.stdout.contains("hard-reset instead"), "{}", out.stdout);
    wait_for(
        || boots(&host) == 3,
        "the guest to boot again after reset --soft",
    );
    assert_eq!(host.wait_running("web"), pid);

    let out = host.cli(&["reset", "nosuchvm"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("nosuchvm"), "{}", out.stderr);
}

fn wait_for(done: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + BOOT;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
