//! Live actions against a real booted guest: each keeps the same QEMU PID and the guest itself
//! sees the change (the shared test guest's state lines list online CPUs, memory, block devices,
//! NICs).

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
use plasmavmc_agent::qemu::live::{apply_live, LiveOutcome};
use plasmavmc_agent::qemu::observe::observe;
use plasmavmc_agent::qemu::process::{is_alive, qmp_after_launch};
use plasmavmc_agent::qemu::{launch, lifecycle, Qmp};
use plasmavmc_agent::spec::VmSpec;
use serde_json::json;

const GUEST: Duration = Duration::from_secs(60);

struct Guest {
    pid: u32,
    qmp: Qmp,
    spec: VmSpec,
    console: Console,
    _guard: KillOnDrop,
}

impl Guest {
    async fn boot(run: &TempRun, spec: VmSpec) -> Guest {
        let vm = run.vm("web");
        lifecycle::prepare_host_devices("web", &spec).expect("taps");
        let pid = launch("web", &spec, &vm, &qemu(), None).expect("launch");
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
            _guard: guard,
        }
    }

    async fn apply(&self, action: Action) -> LiveOutcome {
        let outcome = apply_live(&self.qmp, "web", &self.spec, &action, GUEST)
            .await
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert!(is_alive(self.pid), "same QEMU process after {action:?}");
        outcome
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
    }))
}

#[test]
fn live_changes_reach_the_guest_without_a_restart() {
    let _lock = qemu_test_lock();
    in_netns(|| async {
        let run = TempRun::new();
        let spec = guest_spec();
        let guest = Guest::boot(&run, spec.clone()).await;
        let before = guest.wait_for_state(|s| s.online_cpus == 1);

        // Disk add / remove.
        let img = image(run.dir.path(), "data.qcow2", "qcow2", 8);
        let disk =
            serde_json::from_value(json!({"path": img, "format": "qcow2", "serial": "DATA1"}))
                .unwrap();
        assert_eq!(
            guest
                .apply(Action::AddDisk {
                    id: "data".into(),
                    disk
                })
                .await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.blocks.get("vda").is_some_and(|serial| serial == "DATA1"));
        assert_eq!(
            guest.apply(Action::RemoveDisk { id: "data".into() }).await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.blocks.is_empty());

        // NIC add / remove on a bridge.
        let nic =
            serde_json::from_value(json!({"mac": "52:54:00:aa:bb:01", "bridge": "br0"})).unwrap();
        assert_eq!(
            guest
                .apply(Action::AddNic {
                    id: "eth0".into(),
                    nic
                })
                .await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.nics.values().any(|mac| mac == "52:54:00:aa:bb:01"));
        assert_eq!(
            guest.apply(Action::RemoveNic { id: "eth0".into() }).await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.nics.is_empty());

        // vCPUs up and down.
        assert_eq!(
            guest.apply(Action::SetVcpus { from: 1, to: 3 }).await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.online_cpus == 3);
        assert_eq!(
            guest.apply(Action::SetVcpus { from: 3, to: 1 }).await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.online_cpus == 1);

        // Memory up and down.
        let boot_kib = before.mem_kib;
        assert_eq!(
            guest
                .apply(Action::SetMemory {
                    from_mib: 256,
                    to_mib: 512
                })
                .await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.mem_kib >= boot_kib + 256 * 1024);
        assert_eq!(
            guest
                .apply(Action::SetMemory {
                    from_mib: 512,
                    to_mib: 256
                })
                .await,
            LiveOutcome::Done
        );
        guest.wait_for_state(|s| s.mem_kib == boot_kib);
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
