//! Live actions against a real booted guest: each keeps the same QEMU PID and the guest itself
//! sees the change (its `STATE` console lines list online CPUs, memory, block devices, NICs).

#[path = "support/qemu_harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;
use plasmavmc_agent::action::Action;
use plasmavmc_agent::qemu::live::{apply_live, LiveOutcome};
use plasmavmc_agent::qemu::observe::observe;
use plasmavmc_agent::qemu::process::{is_alive, qmp_after_launch};
use plasmavmc_agent::qemu::{launch, lifecycle, Qmp};
use plasmavmc_agent::spec::VmSpec;
use serde_json::json;

const BOOT: Duration = Duration::from_secs(120);
const GUEST: Duration = Duration::from_secs(60);

struct Guest {
    pid: u32,
    qmp: Qmp,
    spec: VmSpec,
    console: std::path::PathBuf,
    _guard: KillOnDrop,
}

impl Guest {
    async fn boot(run: &TempRun, spec: VmSpec) -> Guest {
        let vm = run.vm("web");
        lifecycle::prepare_host_devices("web", &spec).expect("taps");
        let pid = launch("web", &spec, &vm, &qemu()).expect("launch");
        let guard = KillOnDrop(pid);
        let qmp = qmp_after_launch(pid, &vm, STARTUP).await.expect("QMP");
        let guest = Guest {
            pid,
            qmp,
            spec,
            console: vm.console_log(),
            _guard: guard,
        };
        guest.wait_for("GUEST-BOOTED", BOOT).await;
        guest
    }

    async fn apply(&self, action: Action) -> LiveOutcome {
        let outcome = apply_live(&self.qmp, "web", &self.spec, &action, GUEST)
            .await
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert!(is_alive(self.pid), "same QEMU process after {action:?}");
        outcome
    }

    /// Waits for a console `STATE` line, written after now, that satisfies `check`.
    async fn wait_for_state(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let seen = std::fs::read_to_string(&self.console)
            .unwrap_or_default()
            .len();
        let deadline = Instant::now() + GUEST;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.console).unwrap_or_default();
            if let Some(line) = text[seen..]
                .lines()
                .filter(|l| l.starts_with("STATE"))
                .find(|l| check(l))
            {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "guest never reported {what}; console:\n{}",
            tail(&self.console)
        );
    }

    async fn wait_for(&self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&self.console)
                .unwrap_or_default()
                .contains(marker)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no {marker} on the console:\n{}", tail(&self.console));
    }
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text[text.len().saturating_sub(2000)..].to_owned()
}

/// Hotplugged memory is onlined movable, so virtio-mem can unplug it again.
fn guest_spec(run: &TempRun) -> VmSpec {
    spec(json!({
        "vcpus": 1, "maxVcpus": 3, "memoryMiB": 256, "maxMemoryMiB": 512, "accel": "tcg",
        "kernel": kernel(), "initrd": guest_initrd(run.dir.path()),
        "cmdline": "console=ttyS0 quiet memhp_default_state=online_movable",
    }))
}

fn mem_kib(line: &str) -> u64 {
    line.split("MemTotal: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn live_changes_reach_the_guest_without_a_restart() {
    in_netns(|| async {
        let run = TempRun::new();
        let spec = guest_spec(&run);
        let guest = Guest::boot(&run, spec.clone()).await;
        let before = guest
            .wait_for_state("the boot state", |l| l.contains("cpus=0 "))
            .await;

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
        guest
            .wait_for_state("the new disk", |l| l.contains("vda"))
            .await;
        assert_eq!(
            guest.apply(Action::RemoveDisk { id: "data".into() }).await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("the disk gone", |l| !l.contains("vda"))
            .await;

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
        guest
            .wait_for_state("the new NIC", |l| l.contains("eth0"))
            .await;
        assert_eq!(
            guest.apply(Action::RemoveNic { id: "eth0".into() }).await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("the NIC gone", |l| !l.contains("eth0"))
            .await;

        // vCPUs up and down.
        assert_eq!(
            guest.apply(Action::SetVcpus { from: 1, to: 3 }).await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("3 CPUs", |l| l.contains("cpus=0-2 "))
            .await;
        assert_eq!(
            guest.apply(Action::SetVcpus { from: 3, to: 1 }).await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("1 CPU", |l| l.contains("cpus=0 "))
            .await;

        // Memory up and down.
        let boot_kib = mem_kib(&before);
        assert_eq!(
            guest
                .apply(Action::SetMemory {
                    from_mib: 256,
                    to_mib: 512
                })
                .await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("256 MiB more", |l| mem_kib(l) >= boot_kib + 256 * 1024)
            .await;
        assert_eq!(
            guest
                .apply(Action::SetMemory {
                    from_mib: 512,
                    to_mib: 256
                })
                .await,
            LiveOutcome::Done
        );
        guest
            .wait_for_state("the memory back", |l| mem_kib(l) == boot_kib)
            .await;
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
