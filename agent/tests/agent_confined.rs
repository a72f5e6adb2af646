//! The agent with `--qemu-user`: every QEMU runs as that unprivileged user under QEMU's seccomp
//! sandbox, in a cgroup of its own with the declared limits (changed live by a reload), with its
//! disk given to it; the agent's control socket stays root's alone. Checked against what the
//! kernel says (`/proc/PID/status`, `/proc/PID/cgroup`, the cgroup's files), not status.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use harness::*;
use qemu_harness::{cgroup_file, proc_status, qemu_test_user, TEST_QEMU_USER};
use serde_json::json;

#[test]
fn qemu_runs_unprivileged_sandboxed_and_limited_and_the_control_socket_stays_roots() {
    let user = qemu_test_user();
    let mut host = Host::new();
    // The temp dir is 0700: the QEMU user must be able to walk to the run dir inside it.
    std::fs::set_permissions(host.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let image = host.image("data.qcow2");
    let vm = |host: &Host, weight: u32| {
        host.vm(json!({
            "disks": {"data": {"path": image, "format": "qcow2"}},
            "limits": {"cpuWeight": weight, "memoryMaxMiB": 1536},
        }))
    };
    host.write_config(json!({ "web": vm(&host, 300) }));
    host.start_agent_with(&["--stop-timeout", "5", "--qemu-user", TEST_QEMU_USER]);
    let pid = host.wait_running("web");

    let uid = user.uid.to_string();
    assert_eq!(
        proc_status(pid, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "QEMU's -sandbox filter");
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
