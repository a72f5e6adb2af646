//! Live actions against a real booted guest: each keeps the same QEMU PID and the guest itself
//! sees the change (the shared test guest's state lines list online CPUs, memory, block devices,
//! NICs). QEMU runs confined as in production: an unprivileged user, the seccomp sandbox, a
//! cgroup of its own with limits, which change live too.

#[path = "support/guest.rs"]
mod guest;
#[path = "support/qemu_harness.rs"]
mod harness;

use std::time::Duration;

use guest::{
    guest_artifacts, guest_cmdline, qemu_test_lock, Console, GuestState, BOOT_TIMEOUT, READY,
};
use harness::*;
use plasmavmc_agent::action::Action;
use plasmavmc_agent::qemu::cgroup::{self, Cgroups};
use plasmavmc_agent::qemu::live::{apply_live, LiveOutcome};
use plasmavmc_agent::qemu::observe::observe;
use plasmavmc_agent::qemu::process::{is_alive, qmp_after_launch};
use plasmavmc_agent::qemu::{lifecycle, Confinement, Launcher, Qmp};
use plasmavmc_agent::runas::RunAs;
use plasmavmc_agent::spec::{Limits, VmSpec};
use serde_json::json;

const GUEST: Duration = Duration::from_secs(60);

struct Guest {
    pid: u32,
    qmp: Qmp,
    spec: VmSpec,
    console: Console,
    run_as: RunAs,
    _guard: KillOnDrop,
}

impl Guest {
    async fn boot(run: &TempRun, spec: VmSpec) -> Guest {
        let vm = run.vm("web");
        let run_as = qemu_test_user();
        let confinement = Confinement {
            run_as: Some(run_as.clone()),
            cgroups: Some(Cgroups::detect(run.dir.path())),
        };
        plasmavmc_agent::qemu::confine::prepare_run_dir(&run.run_dir, Some(&run_as))
            .expect("run dir");
        lifecycle::prepare_host_devices("web", &spec, Some(&run_as)).expect("taps");
        let launcher = Launcher {
            name: "web",
            vm_dir: &vm,
            qemu: &qemu(),
            guard: None,
            confinement: &confinement,
        };
        let pid = launcher.launch(&spec).expect("launch");
        let guard = KillOnDrop(pid);
        let qmp = qmp_after_launch(pid, &vm, STARTUP).await.expect("QMP");
        let console = Console::new(vm.console_log());
        console
            .wait_for(READY, BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        Guest {
            pid,
            qmp,
            spec,
            console,
            run_as,
            _guard: guard,
        }
    }

    /// Applies `action` live; it must be done at once, by the same QEMU process.
    async fn apply_done(&self, action: Action) {
        let outcome = apply_live(
            &self.qmp,
            "web",
            &self.spec,
            &action,
            GUEST,
            Some(&self.run_as),
        )
        .await
        .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert!(is_alive(self.pid), "same QEMU process after {action:?}");
        assert_eq!(outcome, LiveOutcome::Done, "{action:?}");
    }

    /// Waits until the guest's latest state satisfies `check`. (Blocks the runtime's thread;
    /// QMP traffic waits in the socket meanwhile.)
    fn wait_for_state(&self, check: impl Fn(&GuestState) -> bool) -> GuestState {
        self.console
            .wait_for_state(check, GUEST)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Hotplugged memory is onlined movable by the guest's init, so virtio-mem can unplug it again.
fn guest_spec() -> VmSpec {
    let guest = guest_artifacts();
    spec(json!({
        "vcpus": 1, "maxVcpus": 3, "memoryMiB": 256, "maxMemoryMiB": 512, "accel": "tcg",
        "kernel": guest.kernel, "initrd": guest.initrd, "cmdline": guest_cmdline(false),
        "limits": {"cpuWeight": 200, "cpuQuotaPercent": 150, "memoryMaxMiB": 3072},
    }))
}

/// What the kernel says about the confined QEMU: its user, its seccomp filter, its own cgroup
/// with the declared limits; and who may touch its files.
fn assert_confined(guest: &Guest, run: &TempRun) {
    let (pid, user) = (guest.pid, &guest.run_as);
    let uid = user.uid.to_string();
    assert_eq!(
        proc_status(pid, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4],
        "real, effective, saved and filesystem uid"
    );
    assert_eq!(
        proc_status(pid, "Gid").split_whitespace().next(),
        Some(user.gid.to_string().as_str())
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "QEMU's -sandbox filter is on"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");

    assert_limits(pid, 200, "150000", 3072);
    let agent_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let qemu_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_ne!(
        agent_cgroup, qemu_cgroup,
        "QEMU is not in the launcher's cgroup"
    );

    use std::os::unix::fs::MetadataExt;
    let vm = run.vm("web");
    let socket = std::fs::metadata(vm.qmp_socket()).unwrap();
    assert_eq!((socket.uid(), socket.mode() & 0o777), (user.uid, 0o600));
    let dir = std::fs::metadata(vm.dir()).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o7777),
        (0, user.gid, 0o710),
        "the VM dir is closed to QEMU once it runs"
    );
    let spec_file = std::fs::metadata(vm.boot_spec()).unwrap();
    assert_eq!((spec_file.uid(), spec_file.mode() & 0o777), (0, 0o600));
}

/// The VM's cgroup files say weight (v2 `cpu.weight`, or v1 `cpu.shares` = weight * 1024 / 100),
/// the quota per 100 ms and the memory ceiling.
fn assert_limits(pid: u32, weight: u64, quota_us: &str, memory_mib: u64) {
    let cpu = cgroup_file(pid, "cpu", &["cpu.weight", "cpu.shares"]);
    assert!(
        cpu.path.ends_with("/vm-web"),
        "QEMU's own cgroup, not {}",
        cpu.path
    );
    let expected = match cpu.file {
        "cpu.shares" => (weight * 1024 + 50) / 100,
        _ => weight,
    };
    assert_eq!(cpu.value, expected.to_string(), "{}", cpu.file);
    let quota = cgroup_file(pid, "cpu", &["cpu.max", "cpu.cfs_quota_us"]);
    assert_eq!(
        quota.value.split_whitespace().next(),
        Some(quota_us),
        "{}",
        quota.file
    );
    let memory = cgroup_file(pid, "memory", &["memory.max", "memory.limit_in_bytes"]);
    assert!(
        memory.path.ends_with("/vm-web"),
        "QEMU's own cgroup, not {}",
        memory.path
    );
    assert_eq!(
        memory.value,
        (memory_mib << 20).to_string(),
        "{}",
        memory.file
    );
}

#[test]
fn live_changes_reach_the_guest_without_a_restart() {
    let _lock = qemu_test_lock();
    in_netns(|| async {
        let run = TempRun::new();
        let spec = guest_spec();
        let guest = Guest::boot(&run, spec.clone()).await;
        let before = guest.wait_for_state(|s| s.online_cpus == 1);
        assert_confined(&guest, &run);

        // Disk add / remove.
        let img = image(run.dir.path(), "data.qcow2", "qcow2", 8);
        let disk =
            serde_json::from_value(json!({"path": img, "format": "qcow2", "serial": "DATA1"}))
                .unwrap();
        guest
            .apply_done(Action::AddDisk {
                id: "data".into(),
                disk,
            })
            .await;
        guest.wait_for_state(|s| s.blocks.get("vda").is_some_and(|serial| serial == "DATA1"));
        guest
            .apply_done(Action::RemoveDisk {
                id: "data".into(),
                delete_image: None,
            })
            .await;
        guest.wait_for_state(|s| s.blocks.is_empty());

        // NIC add / remove on a bridge.
        let nic =
            serde_json::from_value(json!({"mac": "52:54:00:aa:bb:01", "bridge": "br0"})).unwrap();
        guest
            .apply_done(Action::AddNic {
                id: "eth0".into(),
                nic,
            })
            .await;
        guest.wait_for_state(|s| s.nics.values().any(|mac| mac == "52:54:00:aa:bb:01"));
        guest
            .apply_done(Action::RemoveNic { id: "eth0".into() })
            .await;
        guest.wait_for_state(|s| s.nics.is_empty());

        // vCPUs up and down.
        guest.apply_done(Action::SetVcpus { from: 1, to: 3 }).await;
        guest.wait_for_state(|s| s.online_cpus == 3);
        guest.apply_done(Action::SetVcpus { from: 3, to: 1 }).await;
        guest.wait_for_state(|s| s.online_cpus == 1);

        // Memory up and down.
        let boot_kib = before.mem_kib;
        guest
            .apply_done(Action::SetMemory {
                from_mib: 256,
                to_mib: 512,
            })
            .await;
        guest.wait_for_state(|s| s.mem_kib >= boot_kib + 256 * 1024);
        guest
            .apply_done(Action::SetMemory {
                from_mib: 512,
                to_mib: 256,
            })
            .await;
        guest.wait_for_state(|s| s.mem_kib == boot_kib);

        // Limits change live, in the files of QEMU's own cgroup.
        let to = Limits {
            cpu_weight: Some(50),
            cpu_quota_percent: Some(80),
            memory_max_mib: Some(2048),
        };
        cgroup::set_limits("web", guest.pid, &to).expect("set limits");
        assert_limits(guest.pid, 50, "80000", 2048);
        assert_eq!(cgroup::read_limits("web", guest.pid), Some(to));
        assert!(is_alive(guest.pid));
        let observed = observe(&guest.qmp, guest.pid, spec.clone())
            .await
            .expect("observe");
        assert_eq!(observed.memory.plugged_mib, 0);
        assert!(
            guest.qmp.is_connected(),
            "the QMP stream survived every event"
        );
    });
}
