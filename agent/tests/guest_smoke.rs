//! The shared test guest (`tests/guest/`) booted by the agent's own launcher: it comes up, reports
//! what it sees, sees a live vCPU and memory added and a disk unplugged, and — booted with the ignore-unplug
//! command line — keeps a disk whose unplug QEMU requested.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use plasmavmc_agent::action::Action;
use plasmavmc_agent::paths::RunDir;
use plasmavmc_agent::qemu::live::{apply_live, LiveOutcome};
use plasmavmc_agent::qemu::process::{qemu_binary, qmp_after_launch};
use plasmavmc_agent::qemu::{launch, Qmp};
use plasmavmc_agent::spec::VmSpec;
use serde_json::json;
use support::guest::{
    guest_artifacts, guest_cmdline, qemu_test_lock, Console, BOOT_TIMEOUT, READY,
};

const SERIAL: &str = "smoke-root";
/// How long the guest gets to react to a hotplug event under TCG on a loaded machine.
const GUEST: Duration = Duration::from_secs(60);
/// How long an unplug request is given before it counts as ignored.
const UNPLUG: Duration = Duration::from_secs(10);

/// A QEMU launched by the agent's launcher, killed on drop even when the test fails.
struct Booted {
    pid: u32,
    spec: VmSpec,
    qmp: Qmp,
    console: Console,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Booted {
    fn boot(ignore_unplug: bool) -> Booted {
        let dir = tempfile::Builder::new()
            .prefix("pv-guest-")
            .tempdir()
            .unwrap();
        let guest = guest_artifacts();
        let disk = dir.path().join("root.qcow2");
        qcow2(&disk);
        let spec: VmSpec = serde_json::from_value(json!({
            "vcpus": 1, "maxVcpus": 4, "memoryMiB": 256, "maxMemoryMiB": 512,
            "accel": "tcg", "machine": "q35",
            "kernel": guest.kernel, "initrd": guest.initrd, "cmdline": guest_cmdline(ignore_unplug),
            "disks": {"root": {"path": disk, "format": "qcow2", "serial": SERIAL}},
        }))
        .expect("smoke spec");
        let vm_dir = RunDir::new(dir.path()).vm("smoke");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let pid = launch("smoke", &spec, &vm_dir, &qemu_binary(None)).expect("launch");
        let kill = KillOnDrop(pid);
        let qmp = runtime
            .block_on(qmp_after_launch(pid, &vm_dir, Duration::from_secs(30)))
            .expect("QMP");
        let console = Console::new(vm_dir.console_log());
        console.wait_for(READY, BOOT_TIMEOUT).unwrap();
        eprintln!("guest ready {:?} after launch", started.elapsed());
        std::mem::forget(kill); // Booted's own Drop takes over
        Booted {
            pid,
            spec,
            qmp,
            console,
            runtime,
            _dir: dir,
        }
    }

    fn apply(&self, action: Action) -> LiveOutcome {
        self.runtime
            .block_on(apply_live(&self.qmp, "smoke", &self.spec, &action, UNPLUG))
            .unwrap_or_else(|e| panic!("{action:?}: {e}"))
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        kill(self.pid);
    }
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0);
    }
}

fn kill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn qcow2(path: &Path) {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("16M")
        .status()
        .expect("qemu-img (qemu-utils)");
    assert!(status.success(), "qemu-img create {}", path.display());
}

#[test]
fn guest_reports_its_devices_and_sees_live_changes() {
    let _lock = qemu_test_lock();
    let vm = Booted::boot(false);
    let state = vm
        .console
        .wait_for_state(|s| s.blocks.contains_key("vda"), GUEST)
        .unwrap();
    assert_eq!(state.blocks["vda"], SERIAL);
    assert_eq!(state.online_cpus, 1, "{state:?}");
    assert!(state.mem_kib > 100 * 1024, "{state:?}");

    assert_eq!(
        vm.apply(Action::SetVcpus { from: 1, to: 2 }),
        LiveOutcome::Done
    );
    vm.console
        .wait_for_state(|s| s.online_cpus == 2, GUEST)
        .unwrap();

    let before = state.mem_kib;
    let memory = Action::SetMemory {
        from_mib: 256,
        to_mib: 384,
    };
    assert_eq!(vm.apply(memory), LiveOutcome::Done);
    // virtio-mem memory is onlined by the guest (movable) as soon as it is plugged.
    vm.console
        .wait_for_state(|s| s.mem_kib >= before + 120 * 1024, GUEST)
        .unwrap();

    let removed = vm.apply(Action::RemoveDisk { id: "root".into() });
    assert_eq!(
        removed,
        LiveOutcome::Done,
        "a normal guest releases the disk"
    );
    vm.console
        .wait_for_state(|s| s.blocks.is_empty(), GUEST)
        .unwrap();
}

#[test]
fn ignore_unplug_guest_keeps_the_disk() {
    let _lock = qemu_test_lock();
    let vm = Booted::boot(true);
    vm.console
        .wait_for_state(
            |s| s.blocks.get("vda").map(String::as_str) == Some(SERIAL),
            GUEST,
        )
        .unwrap();

    let outcome = vm.apply(Action::RemoveDisk { id: "root".into() });
    assert_eq!(
        outcome,
        LiveOutcome::Unplugging {
            device: "disk-root".into()
        },
        "no DEVICE_DELETED within {UNPLUG:?}"
    );
    let state = vm.console.state().expect("a state line").unwrap();
    assert_eq!(
        state.blocks.get("vda").map(String::as_str),
        Some(SERIAL),
        "{state:?}"
    );
}
