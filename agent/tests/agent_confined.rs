//! The agent with `--qemu-user`: every QEMU runs as that unprivileged user under QEMU's seccomp
//! sandbox, in a cgroup of its own with the declared limits (changed live by a reload), with its
//! disk given to it; the agent's control socket stays root's alone. Checked against what the
//! kernel says (`/proc/PID/status` of every QEMU thread, `/proc/PID/cgroup`, the cgroup's files,
//! the sockets' owners and modes), not status; and only once the guest has booted under that
//! confinement and seen its disk, so a sandbox or a permission that breaks a running guest (not
//! only QEMU's start) fails here too.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use harness::guest::Console;
use harness::*;
use qemu_harness::{cgroup_file, proc_status, qemu_test_user, TEST_QEMU_USER};
use serde_json::json;

/// `/proc/PID/status` field `field` of every thread of `pid` (QEMU's vCPU, I/O and RCU threads
/// included: a filter installed on one thread only would show here).
fn every_thread(pid: u32, field: &str) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    let threads: Vec<u32> = tasks
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(threads.len() > 1, "QEMU runs more than one thread");
    threads
        .into_iter()
        .map(|tid| proc_status_of(&format!("/proc/{pid}/task/{tid}/status"), field))
        .collect()
}

fn proc_status_of(path: &str, field: &str) -> String {
    let status = std::fs::read_to_string(path).expect("a status file");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {path}"))
        .trim()
        .to_owned()
}

#[test]
fn qemu_runs_unprivileged_sandboxed_and_limited_and_the_control_socket_stays_roots() {
    let user = qemu_test_user();
    let mut host = Host::new();
    // The temp dir is 0700: the QEMU user must be able to walk to the run dir inside it.
    std::fs::set_permissions(host.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let image = host.image("data.qcow2");
    let vm = |host: &Host, weight: u32| {
        host.vm(json!({
            "disks": {"data": {"path": image, "format": "qcow2", "serial": "confined-data"}},
            "limits": {"cpuWeight": weight, "memoryMaxMiB": 1536},
        }))
    };
    host.write_config(json!({ "web": vm(&host, 300) }));
    host.start_agent_with(&["--stop-timeout", "5", "--qemu-user", TEST_QEMU_USER]);
    let pid = host.wait_running("web");
    // The guest boots and finds its disk while confined: QEMU survived its own sandbox and could
    // read the kernel, the initrd and the image as the unprivileged user.
    let console = Console::new(host.run_dir.join("vms/web/console.log"));
    console
        .wait_for_state(
            |guest| guest.blocks.values().any(|s| s == "confined-data"),
            BOOT,
        )
        .unwrap_or_else(|e| panic!("the confined guest: {e}"));
    assert_eq!(
        harness::procs::qemu_pids(&host.run_dir, "web"),
        [pid],
        "status names the one QEMU of the VM"
    );

    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    for (field, id) in [("Uid", &uid), ("Gid", &gid)] {
        for ids in every_thread(pid, field) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            assert_eq!(ids, [id.as_str(); 4], "real, effective, saved, fs {field}");
        }
    }
    assert!(every_thread(pid, "CapEff")
        .iter()
        .all(|caps| caps == "0000000000000000"));
    assert!(every_thread(pid, "NoNewPrivs").iter().all(|n| n == "1"));
    assert!(
        every_thread(pid, "Seccomp").iter().all(|mode| mode == "2"),
        "QEMU's -sandbox filter on every thread"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    assert!(
        args.windows(2).any(|w| w[0] == b"-sandbox"
            && w[1] == b"on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
        "every denial asked for: {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    );
    assert_eq!(
        proc_status(host.agent_pid(), "Uid")
            .split_whitespace()
            .next(),
        Some("0")
    );

    let control = std::fs::metadata(host.run_dir.join("control.sock")).unwrap();
    assert_eq!(
        (control.uid(), control.mode() & 0o777),
        (0, 0o600),
        "control socket"
    );
    assert_eq!(
        std::fs::metadata(&image).unwrap().uid(),
        user.uid,
        "the disk is QEMU's"
    );
    let run = std::fs::metadata(&host.run_dir).unwrap();
    assert_eq!(
        (run.uid(), run.gid(), run.mode() & 0o777),
        (0, user.gid, 0o710)
    );
    let qmp = std::fs::metadata(host.run_dir.join("vms/web/qmp.sock")).unwrap();
    assert_eq!(
        (qmp.uid(), qmp.mode() & 0o777),
        (user.uid, 0o600),
        "QMP socket: QEMU's (and root's) alone"
    );
    let vm_dir = std::fs::metadata(host.run_dir.join("vms/web")).unwrap();
    assert_eq!(
        (vm_dir.uid(), vm_dir.gid(), vm_dir.mode() & 0o7777),
        (0, user.gid, 0o710),
        "the VM dir: QEMU may enter, not write"
    );

    let weight = |pid| {
        let cpu = cgroup_file(pid, "cpu", &["cpu.weight", "cpu.shares"]);
        assert!(
            cpu.path.ends_with("/vm-web"),
            "QEMU's own cgroup: {}",
            cpu.path
        );
        let value: u64 = cpu.value.parse().unwrap();
        match cpu.file {
            "cpu.shares" => (value * 100 + 512) / 1024, // v1: weight * 1024 / 100
            _ => value,
        }
    };
    assert_eq!(weight(pid), 300);
    let memory = cgroup_file(pid, "memory", &["memory.max", "memory.limit_in_bytes"]);
    assert!(memory.path.ends_with("/vm-web"), "{}", memory.path);
    assert_eq!(memory.value, (1536u64 << 20).to_string());
    let agent_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", host.agent_pid()));
    assert_ne!(
        agent_cgroup.unwrap(),
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
    );

    // A new limit is applied live: same QEMU, new value in its cgroup.
    host.write_config(json!({ "web": vm(&host, 50) }));
    host.cli(&["reload", "--wait"]).expect_code(0, "reload");
    assert_eq!(weight(pid), 50);
    assert_eq!(host.wait_running("web"), pid, "the VM was not restarted");
    assert!(is_alive(pid));
}
