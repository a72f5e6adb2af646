//! Managed save and host shutdown with real guests, through the real `plasmavmc` binary: a saved
//! guest is restored, not booted (its console never shows a second boot, and it goes on taking
//! live changes), also across an agent restart; a save that cannot be restored is kept, reported,
//! and the VM boots fresh; `shutdown-host` takes VMs down in parallel (guests that ignore ACPI:
//! each is quit at its stop timeout, all at once) and saves those that say `save`, which the next
//! agent restores.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::time::{Duration, Instant};

use harness::guest::{guest_cmdline_ignoring_powerdown, Console};
use harness::*;
use serde_json::{json, Value};

fn console(host: &Host, name: &str) -> Console {
    Console::new(host.run_dir.join("vms").join(name).join("console.log"))
}

/// How often the guest of VM `name` booted: the console log keeps every QEMU's output.
fn boots(host: &Host, name: &str) -> usize {
    host.console(name).matches(BOOT_MARKER).count()
}

fn save(host: &Host, name: &str) -> Cli {
    host.cli(&["save", name])
}

/// Saves VM `name` and checks it is `saved` with its QEMU gone.
fn save_and_check(host: &Host, name: &str, pid: u32) {
    let out = save(host, name).expect_code(0, "save");
    assert!(out.stdout.contains("saved"), "{}", out.stdout);
    assert!(wait_dead(pid, AGENT), "QEMU {pid} quits after the save");
    assert_eq!(host.qemu_count(name), 0, "a saved VM has no QEMU");
    let vm = host.vm_status(name);
    assert_eq!(vm["state"], "saved", "{vm:#}");
    assert!(vm["pid"].is_null(), "{vm:#}");
    assert!(vm["saved"].is_string(), "{vm:#}");
}

/// `start` restores: a new QEMU, running, whose guest did not boot again.
fn start_restored(host: &Host, name: &str, old_pid: u32) -> u32 {
    host.cli(&["start", name]).expect_code(0, "start");
    let pid = host.wait_running(name);
    assert_ne!(pid, old_pid);
    assert_eq!(host.qemu_count(name), 1, "one QEMU: the restored one");
    let vm = host.vm_status(name);
    assert!(vm["saved"].is_null(), "the save is consumed: {vm:#}");
    assert_eq!(
        boots(host, name),
        1,
        "a restored guest does not boot again; console:\n{}",
        host.console(name)
    );
    pid
}

#[test]
fn a_saved_guest_is_restored_not_booted_also_across_an_agent_restart() {
    let mut host = Host::new();
    host.write_config(json!({"web": host.vm(json!({"maxVcpus": 2}))}));
    host.start_agent();
    let first = host.wait_running("web");
    host.wait_boot("web");

    save_and_check(&host, "web", first);
    let second = start_restored(&host, "web", first);

    save_and_check(&host, "web", second);
    host.kill_agent();
    host.start_agent();
    assert_eq!(
        host.vm_status("web")["state"],
        "saved",
        "a new agent keeps an operator save saved"
    );
    let third = start_restored(&host, "web", second);

    // The restored guest lives on where it was: it takes a live vCPU and says so, no boot.
    host.write_config(json!({"web": host.vm(json!({"vcpus": 2, "maxVcpus": 2}))}));
    console(&host, "web")
        .wait_for_state(|s| s.online_cpus == 2, BOOT)
        .unwrap();
    assert_eq!(boots(&host, "web"), 1);

    // Changed live since boot: a save would not load into the boot command line; refused.
    let refused = save(&host, "web").expect_code(1, "save after a live change");
    assert!(
        refused.stderr.contains("changed live since it booted"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        host.wait_running("web"),
        third,
        "a refused save leaves the VM running"
    );
}

#[test]
fn a_save_qemu_refuses_is_kept_and_reported_and_the_vm_boots_fresh() {
    let mut host = Host::new();
    host.write_config(json!({"web": host.vm(json!({}))}));
    host.start_agent();
    let pid = host.wait_running("web");
    host.wait_boot("web");
    save_and_check(&host, "web", pid);

    let state = host.state_dir.join("saved/web/state");
    let size = std::fs::metadata(&state).unwrap().len() as usize;
    std::fs::write(&state, vec![0x5a; size]).unwrap();

    host.cli(&["start", "web"]).expect_code(0, "start");
    host.wait_running("web");
    let deadline = Instant::now() + BOOT;
    while boots(&host, "web") < 2 {
        assert!(Instant::now() < deadline, "the VM boots fresh");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(host.qemu_count("web"), 1, "the failed restore left no QEMU");
    let vm = host.vm_status("web");
    let kept = vm["unrestorableSaves"]
        .as_array()
        .filter(|kept| kept.len() == 1)
        .unwrap_or_else(|| panic!("one unrestorable save reported: {vm:#}"));
    let kept_dir = kept[0].as_str().unwrap().split(": ").next().unwrap();
    assert_eq!(
        std::fs::read(std::path::Path::new(kept_dir).join("state")).unwrap(),
        vec![0x5a; size],
        "the refused save is kept as it was"
    );
    let human = host.cli(&["status"]).expect_code(0, "status").stdout;
    assert!(human.contains("unrestorable save (kept"), "{human}");

    // A later apply that succeeds clears lastError; the set-aside save is still reported, with
    // its reason, and the log said it once.
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload --wait");
    let vm = host.vm_status("web");
    assert!(vm["lastError"].is_null(), "{vm:#}");
    assert_eq!(vm["unrestorableSaves"], json!(kept), "{vm:#}");
    let human = host.cli(&["status"]).expect_code(0, "status").stdout;
    assert!(
        human.contains(&format!(
            "unrestorable save (kept; remove it when no longer needed): {}",
            kept[0].as_str().unwrap()
        )),
        "{human}"
    );
    assert_eq!(
        host.agent_log_text()
            .matches("the managed save could not be restored")
            .count(),
        1,
        "the log says it once"
    );
}

#[test]
fn host_shutdown_takes_vms_down_in_parallel_and_saved_ones_come_back_restored() {
    const STOP_TIMEOUT: u64 = 4;
    let mut host = Host::new();
    // Three guests that ignore the ACPI power button, as hung guests would.
    let stubborn = || host.vm(json!({"cmdline": guest_cmdline_ignoring_powerdown()}));
    let vms: Value = json!({
        "a": stubborn(),
        "b": stubborn(),
        "c": stubborn(),
        "kept": host.vm(json!({"onHostShutdown": "save"})),
    });
    host.write_config(vms);
    host.start_agent_with(&["--stop-timeout", &STOP_TIMEOUT.to_string()]);
    let pids: Vec<u32> = ["a", "b", "c", "kept"]
        .iter()
        .map(|vm| host.wait_running(vm))
        .collect();
    host.wait_boot("kept");

    // Not a host shutdown (no systemd stopping the host here): nothing is touched.
    let out = host
        .cli(&["shutdown-host", "--only-when-system-stops"])
        .expect_code(0, "shutdown-host outside a shutdown");
    assert!(out.stdout.contains("not shutting down"), "{}", out.stdout);
    assert!(pids.iter().all(|pid| is_alive(*pid)));

    let started = Instant::now();
    let out = host
        .cli(&["shutdown-host", "--timeout", "60"])
        .expect_code(0, "shutdown-host");
    let took = started.elapsed();
    assert!(pids.iter().all(|pid| !is_alive(*pid)), "{}", out.stdout);
    // The guests ignore ACPI: each is quit at its stop timeout, all at once. In sequence the
    // three would take at least three timeouts.
    assert!(
        took >= Duration::from_secs(STOP_TIMEOUT) && took < Duration::from_secs(2 * STOP_TIMEOUT),
        "took {took:?}:\n{}",
        out.stdout
    );
    assert!(out.stdout.contains("kept: saved"), "{}", out.stdout);
    assert_eq!(
        host.agent_log_text()
            .matches("guest ignored the powerdown; quitting QEMU")
            .count(),
        3
    );
    let status = host.status();
    for vm in ["a", "b", "c"] {
        assert_eq!(status["vms"][vm]["state"], "stopped", "{status:#}");
    }
    assert_eq!(status["vms"]["kept"]["state"], "saved", "{status:#}");

    // The host comes back: a new agent starts every autostart VM, the saved one restored.
    host.kill_agent();
    host.start_agent();
    for vm in ["a", "b", "c", "kept"] {
        host.wait_running(vm);
        assert_eq!(host.qemu_count(vm), 1, "{vm}");
    }
    assert_eq!(
        boots(&host, "kept"),
        1,
        "restored, not booted:\n{}",
        host.console("kept")
    );
    host.wait_boot("a");
}

#[test]
fn a_confined_vm_is_saved_and_restored_as_its_unprivileged_user() {
    use std::os::unix::fs::PermissionsExt;
    let user = qemu_harness::qemu_test_user();
    let mut host = Host::new();
    // The temp dir is 0700: the QEMU user must be able to walk to the run dir inside it.
    std::fs::set_permissions(host.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let image = host.image("data.qcow2");
    let more = host.image("more.qcow2");
    let data = json!({"path": image, "format": "qcow2", "serial": "data"});
    host.write_config(json!({"web": host.vm(json!({"disks": {"data": data}}))}));
    host.start_agent_with(&["--qemu-user", qemu_harness::TEST_QEMU_USER]);
    let pid = host.wait_running("web");
    host.wait_boot("web");
    let runs_as_the_user = |pid: u32| {
        let uids = qemu_harness::proc_status(pid, "Uid");
        assert!(
            uids.split_whitespace()
                .all(|uid| uid == user.uid.to_string()),
            "QEMU {pid} runs as {} (uid {}): Uid {uids}",
            qemu_harness::TEST_QEMU_USER,
            user.uid
        );
    };
    runs_as_the_user(pid);

    save_and_check(&host, "web", pid);
    let restored = start_restored(&host, "web", pid);
    let vm = host.vm_status("web");
    assert_eq!(
        vm["unrestorableSaves"],
        json!([]),
        "restored, not set aside: {vm:#}"
    );
    assert!(host
        .agent_log_text()
        .contains("restored from the managed save"));
    runs_as_the_user(restored);
    // The restored guest runs on, confined: it takes a disk plugged live and sees it.
    let disks = json!({"data": data, "more": {"path": more, "format": "qcow2", "serial": "more"}});
    host.write_config(json!({"web": host.vm(json!({ "disks": disks }))}));
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload --wait");
    console(&host, "web")
        .wait_for_state(|s| s.blocks.values().any(|serial| serial == "more"), BOOT)
        .unwrap_or_else(|e| panic!("the restored guest takes a disk: {e}"));
    assert_eq!(host.wait_running("web"), restored);
    assert_eq!(
        boots(&host, "web"),
        1,
        "no second boot; console:\n{}",
        host.console("web")
    );
}
