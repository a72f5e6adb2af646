//! Zero-restart config changes through the real `plasmavmc` binary and a real guest: each change
//! is a new desired state plus `plasmavmc reload --wait`, as `nixos-rebuild switch` does it. Every
//! test checks the QEMU PID stays the same and that the guest itself sees the change (its console
//! `STATE` lines list online CPUs, MemTotal and block devices).

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::path::Path;
use std::time::Duration;

use harness::guest::{guest_cmdline, Console, GuestState, READY};
use harness::*;
use plasmavmc_agent::devices;
use plasmavmc_agent::ids;
use plasmavmc_agent::qemu::{QemuEvent, Qmp};
use plasmavmc_agent::spec::DiskSpec;
use serde_json::{json, Value};

const GUEST: Duration = Duration::from_secs(90);

fn console(host: &Host, vm: &str) -> Console {
    Console::new(host.run_dir.join("vms").join(vm).join("console.log"))
}

fn wait_guest(host: &Host, vm: &str, done: impl Fn(&GuestState) -> bool) -> GuestState {
    console(host, vm)
        .wait_for_state(done, GUEST)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn boot(host: &Host, vm: &str) -> GuestState {
    console(host, vm)
        .wait_for(READY, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_guest(host, vm, |_| true)
}

fn reload(host: &Host) -> Cli {
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload --wait")
}

#[test]
fn disks_vcpus_and_memory_change_live_in_the_same_qemu() {
    let mut host = Host::new();
    let data = host.image("data.qcow2");
    let base = host.vm(json!({"maxVcpus": 3, "maxMemoryMiB": 256}));
    host.write_config(json!({ "web": base }));
    host.start_agent();
    let pid = host.wait_running("web");
    let booted = boot(&host, "web");
    assert_eq!(booted.online_cpus, 1);

    let mut grown = base.clone();
    grown["disks"] = json!({"data": {"path": data, "format": "qcow2", "serial": "data"}});
    grown["vcpus"] = json!(2);
    grown["memoryMiB"] = json!(192);
    host.write_config(json!({ "web": grown }));
    let applied = reload(&host);
    for line in [
        "web: add disk data",
        "web: vCPUs 1 -> 2: done",
        "web: memory 128 MiB -> 192 MiB: done",
    ] {
        assert!(
            applied.stdout.contains(line),
            "reload --wait says what it applied ({line}):\n{}",
            applied.stdout
        );
    }
    let state = wait_guest(&host, "web", |s| {
        s.blocks.get("vda").is_some_and(|serial| serial == "data")
            && s.online_cpus == 2
            && s.mem_kib >= booted.mem_kib + 60 * 1024
    });
    assert_eq!(
        host.wait_running("web"),
        pid,
        "same QEMU after live adds: {state:?}"
    );
    let web = host.vm_status("web");
    assert!(
        device_ids(&web).contains(&"disk-data".to_owned()),
        "{web:#}"
    );
    assert!(
        web["pending"].as_array().is_some_and(|p| p.is_empty()),
        "{web:#}"
    );

    host.write_config(json!({ "web": base }));
    reload(&host);
    wait_guest(&host, "web", |s| {
        s.blocks.is_empty() && s.online_cpus == 1 && s.mem_kib < booted.mem_kib + 16 * 1024
    });
    assert_eq!(
        host.wait_running("web"),
        pid,
        "same QEMU after live removals"
    );
    assert!(!device_ids(&host.vm_status("web")).contains(&"disk-data".to_owned()));
    assert_eq!(
        host.console("web").matches(READY).count(),
        1,
        "the guest never rebooted"
    );
}

#[test]
fn a_boot_time_change_is_pending_until_the_next_start() {
    let mut host = Host::new();
    let base = host.vm(json!({}));
    host.write_config(json!({ "web": base }));
    host.start_agent();
    let pid = host.wait_running("web");

    let mut changed = base.clone();
    changed["cmdline"] = json!(format!("{} plasmavmc.test=pending", guest_cmdline(false)));
    host.write_config(json!({ "web": changed }));
    let plan = host.cli(&["plan", "--config", path_str(&host.config)]);
    assert!(
        plan.code == 0 && plan.stdout.contains("cmdline"),
        "plan shows the pending change:\n{}{}",
        plan.stdout,
        plan.stderr
    );
    reload(&host);
    let web = host.vm_status("web");
    assert_eq!(
        host.wait_running("web"),
        pid,
        "a pending change restarts nothing"
    );
    let pending = web["pending"].as_array().cloned().unwrap_or_default();
    assert!(
        pending.iter().any(|p| p.to_string().contains("cmdline")),
        "status lists the pending cmdline change: {web:#}"
    );
    let human = host.cli(&["status"]).expect_code(0, "status");
    assert!(human.stdout.contains("cmdline"), "{}", human.stdout);

    host.cli(&["stop", "web"]).expect_code(0, "stop");
    host.wait_status("web stopped", AGENT, |s| {
        s["vms"]["web"]["state"] == "stopped"
    });
    host.cli(&["start", "web"]).expect_code(0, "start");
    let new_pid = host.wait_running("web");
    assert_ne!(new_pid, pid, "stop/start is a new QEMU");
    let web = host.vm_status("web");
    assert!(
        web["pending"].as_array().is_some_and(|p| p.is_empty()),
        "applied: {web:#}"
    );
    let cmdline = std::fs::read(format!("/proc/{new_pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("plasmavmc.test=pending"),
        "the new QEMU boots with the new cmdline"
    );
}

/// The agent dies between `blockdev-add` and `device_add` of a disk, and again between
/// `device_del` and `blockdev-del` of another. (The test plays the dead agent's half-done steps on
/// QMP itself, which is what makes the crash point exact.) The next agent converges: one device
/// each, no duplicate, no leftover block node.
#[test]
fn an_agent_killed_mid_apply_converges_on_restart() {
    let mut host = Host::new();
    let old = host.image("old.qcow2");
    let new = host.image("new.qcow2");
    let disk = |path: &Path| json!({"path": path, "format": "qcow2"});
    let with_old = host.vm(json!({"disks": {"old": disk(&old)}}));
    host.write_config(json!({ "web": with_old }));
    host.start_agent();
    let pid = host.wait_running("web");
    boot(&host, "web");
    host.kill_agent();

    let socket = host.run_dir.join("vms/web/qmp.sock");
    let new_disk: DiskSpec = serde_json::from_value(disk(&new)).unwrap();
    block_on(async {
        let qmp = Qmp::connect(&socket, AGENT)
            .await
            .expect("QMP while the agent is dead");
        // Half an add: the block nodes exist, the device does not.
        qmp.blockdev_add(devices::disk_file_node(
            "new",
            &new_disk,
            devices::DiskBacking::File,
        ))
        .await
        .unwrap();
        qmp.blockdev_add(devices::disk_format_node("new", &new_disk))
            .await
            .unwrap();
        // Half a removal: the device is gone, its block nodes are not.
        let mut events = qmp.subscribe();
        qmp.device_del(&ids::disk_device("old")).await.unwrap();
        wait_device_deleted(&mut events, &ids::disk_device("old")).await;
    });

    let mut with_new = with_old.clone();
    with_new["disks"] = json!({"new": disk(&new)});
    host.write_config(json!({ "web": with_new }));
    host.start_agent();
    let status = host.wait_status("disk-new attached", AGENT, |s| {
        device_ids(&s["vms"]["web"]).contains(&"disk-new".to_owned())
    });
    let devices = device_ids(&status["vms"]["web"]);
    assert_eq!(
        devices
            .iter()
            .filter(|d| d.starts_with("disk-"))
            .collect::<Vec<_>>(),
        ["disk-new"],
        "exactly the declared disk, once: {devices:?}"
    );
    assert_eq!(host.wait_running("web"), pid, "converged without a restart");
    // Nothing left to do once converged.
    let plan = host.cli(&["plan", "--json"]).expect_code(0, "plan --json");
    let plan: Value = serde_json::from_str(&plan.stdout).expect("plan --json is JSON");
    assert_eq!(plan["steps"], json!([]), "{plan:#}");

    host.kill_agent();
    let nodes = block_on(async {
        let qmp = Qmp::connect(&socket, AGENT).await.unwrap();
        qmp.query_named_block_nodes().await.unwrap()
    });
    let names: Vec<String> = nodes.into_iter().filter_map(|n| n.node_name).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("disk-old")),
        "the half-removed disk's nodes are gone: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| n.starts_with("disk-new")).count(),
        2,
        "one file and one format node for disk-new: {names:?}"
    );
    host.start_agent();
}

/// A guest that never answers the unplug request: the disk stays, shown `unplugging` (not lost,
/// not re-added), and the removal is retried; once the guest is reset, the unplug completes.
#[test]
fn an_unplug_the_guest_ignores_stays_visible_as_unplugging() {
    let mut host = Host::new();
    let data = host.image("data.qcow2");
    let with_disk = host.vm(json!({
        "cmdline": guest_cmdline(true),
        "disks": {"data": {"path": data, "format": "qcow2", "serial": "data"}},
    }));
    host.write_config(json!({ "web": with_disk }));
    host.start_agent();
    let pid = host.wait_running("web");
    boot(&host, "web");

    let mut without = with_disk.clone();
    without["disks"] = json!({});
    host.write_config(json!({ "web": without }));
    let reload = host.cli(&["reload", "--wait"]);
    assert!(
        reload.stdout.contains("unplugging") || reload.stderr.contains("unplugging"),
        "reload says the guest has not released the disk yet:\n{}{}",
        reload.stdout,
        reload.stderr
    );
    let web = host.vm_status("web");
    assert!(
        device_ids(&web).contains(&"disk-data".to_owned()),
        "not lost: {web:#}"
    );
    assert!(
        web["unplugging"].to_string().contains("disk-data"),
        "status shows it unplugging: {web:#}"
    );
    let human = host.cli(&["status"]).expect_code(0, "status");
    assert!(human.stdout.contains("unplugging"), "{}", human.stdout);
    assert!(
        console(&host, "web")
            .state()
            .unwrap()
            .unwrap()
            .blocks
            .contains_key("vda"),
        "the guest still has it"
    );
    assert_eq!(host.wait_running("web"), pid);

    // A reset finishes a pending unplug; the agent sees the device go and cleans up, and says
    // so although the reload that asked for it returned long ago.
    let events = Follower::events_from_now(&host);
    host.cli(&["reset", "web"]).expect_code(0, "reset");
    host.wait_status("disk-data gone", GUEST, |s| {
        !device_ids(&s["vms"]["web"]).contains(&"disk-data".to_owned())
    });
    events.wait_for("deviceRemoved", |e| {
        e["event"] == "deviceRemoved" && e["vm"] == "web" && e["device"] == "disk-data"
    });
    assert_eq!(host.wait_running("web"), pid, "a reset is not a restart");
}

async fn wait_device_deleted(events: &mut tokio::sync::broadcast::Receiver<QemuEvent>, id: &str) {
    tokio::time::timeout(GUEST, async {
        loop {
            if let Ok(QemuEvent::DeviceDeleted {
                device: Some(device),
                ..
            }) = events.recv().await
            {
                if device == id {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no DEVICE_DELETED for {id}"));
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(future)
}
