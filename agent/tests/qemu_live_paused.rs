//! Live actions against a real QEMU whose guest is paused (`-S`): everything QEMU does on its
//! side of a hotplug, observed back through `observe`. A paused guest never answers an unplug,
//! which is exactly the "guest ignores the unplug" case. (The guest's own view is covered by
//! `qemu_live_guest`.)

#[path = "support/qemu_harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use plasmavmc_agent::action::Action;
use plasmavmc_agent::argv::qemu_argv;
use plasmavmc_agent::ids;
use plasmavmc_agent::observed::{ObservedDisk, ObservedNic};
use plasmavmc_agent::qemu::live::{apply_live, LiveError, LiveOutcome};
use plasmavmc_agent::qemu::observe::observe;
use plasmavmc_agent::qemu::process::qmp_after_launch;
use plasmavmc_agent::qemu::{lifecycle, Qmp};
use plasmavmc_agent::spec::{DiskSpec, NicSpec, VmSpec};
use serde_json::json;

const SHORT_UNPLUG: Duration = Duration::from_secs(2);

struct PausedVm {
    pid: u32,
    qmp: Qmp,
    spec: VmSpec,
    _guard: KillOnDrop,
}

async fn launch_paused(run: &TempRun, name: &str, spec: VmSpec) -> PausedVm {
    let vm = run.vm(name);
    lifecycle::prepare_host_devices(name, &spec, None).expect("taps");
    let mut argv = qemu_argv(name, &spec, &vm, &Default::default(), &Default::default());
    argv.push("-S".into());
    let pid = launch_argv(name, &spec, &vm, &argv).expect("launch");
    let guard = KillOnDrop(pid);
    let qmp = qmp_after_launch(pid, &vm, STARTUP).await.expect("QMP");
    PausedVm {
        pid,
        qmp,
        spec,
        _guard: guard,
    }
}

impl PausedVm {
    async fn apply(&self, action: Action) -> Result<LiveOutcome, LiveError> {
        apply_live(&self.qmp, "web", &self.spec, &action, SHORT_UNPLUG, None).await
    }
}

fn disk(path: &std::path::Path, format: &str, extra: serde_json::Value) -> DiskSpec {
    let mut disk = json!({"path": path, "format": format});
    disk.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(disk).unwrap()
}

#[test]
fn observe_reads_back_what_was_booted_and_hotplugged() {
    in_netns(|| async {
        let run = TempRun::new();
        let root = image(run.dir.path(), "root.qcow2", "qcow2", 16);
        let data = image(run.dir.path(), "data.raw", "raw", 8);
        let spec = spec(json!({
            "vcpus": 2, "maxVcpus": 4, "memoryMiB": 128, "maxMemoryMiB": 384,
            "accel": "tcg", "kernel": kernel(), "hotplugSlots": 2,
            "disks": {
                "root": {"path": root, "format": "qcow2", "serial": "ROOT1", "sizeMiB": 16},
                "data": {"path": data, "format": "raw", "readOnly": true, "cache": "none", "sizeMiB": 8},
            },
            "nics": {"eth0": {"mac": "52:54:00:12:34:56", "bridge": "br0"}},
        }));
        let vm = launch_paused(&run, "web", spec.clone()).await;
        let observed = observe(&vm.qmp, vm.pid, spec.clone())
            .await
            .expect("observe");
        assert!(observed.paused);
        assert_eq!(observed.vcpus, 2);
        assert_eq!(observed.memory.boot_mib, 128);
        assert_eq!(observed.memory.requested_mib, 0);
        for (id, declared) in &spec.disks {
            assert_eq!(
                observed.disks[id],
                ObservedDisk::from_spec(declared, true),
                "{id}"
            );
        }
        assert_eq!(
            observed.nics["eth0"],
            ObservedNic::from_spec("web", "eth0", &spec.nics["eth0"], true)
        );
        assert!(observed.orphan_block_nodes.is_empty() && observed.orphan_netdevs.is_empty());

        // Hotplug a disk and a NIC: they show up as hotplugged, same shape as cold-plugged (the
        // declared sizes are the images' sizes, read back from QEMU).
        let extra = image(run.dir.path(), "extra.qcow2", "qcow2", 8);
        let extra = disk(&extra, "qcow2", json!({"serial": "EXTRA", "sizeMiB": 8}));
        let add = Action::AddDisk {
            id: "extra".into(),
            disk: extra.clone(),
        };
        assert_eq!(vm.apply(add).await.unwrap(), LiveOutcome::Done);
        let nic: NicSpec =
            serde_json::from_value(json!({"mac": "52:54:00:00:00:02", "bridge": "br0"})).unwrap();
        let add = Action::AddNic {
            id: "eth1".into(),
            nic: nic.clone(),
        };
        assert_eq!(vm.apply(add).await.unwrap(), LiveOutcome::Done);
        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert_eq!(
            observed.disks["extra"],
            ObservedDisk::from_spec(&extra, false)
        );
        assert_eq!(
            observed.nics["eth1"],
            ObservedNic::from_spec("web", "eth1", &nic, false)
        );
        assert_eq!(observed.nics["eth1"].bridge.as_deref(), Some("br0"));

        // Both free ports are taken now: the next hotplug says so and leaves nothing behind.
        let third = image(run.dir.path(), "third.raw", "raw", 8);
        let add = Action::AddDisk {
            id: "third".into(),
            disk: disk(&third, "raw", json!({})),
        };
        assert!(matches!(
            vm.apply(add).await,
            Err(LiveError::NoFreeSlot { .. })
        ));
        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert!(!observed.disks.contains_key("third"));
        assert!(
            observed.orphan_block_nodes.is_empty(),
            "{:?}",
            observed.orphan_block_nodes
        );

        // vCPUs and memory, QEMU's side.
        let set = Action::SetVcpus { from: 2, to: 4 };
        assert_eq!(vm.apply(set).await.unwrap(), LiveOutcome::Done);
        let set = Action::SetMemory {
            from_mib: 128,
            to_mib: 256,
        };
        assert_eq!(vm.apply(set).await.unwrap(), LiveOutcome::Done);
        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert_eq!(observed.vcpus, 4);
        assert_eq!(observed.memory.requested_mib, 128);
        let below_boot = Action::SetMemory {
            from_mib: 256,
            to_mib: 64,
        };
        assert!(vm.apply(below_boot).await.is_err());
    });
}

#[test]
fn leftovers_of_an_interrupted_apply_are_observed_and_removed() {
    in_netns(|| async {
        let run = TempRun::new();
        let spec = spec(json!({"vcpus": 1, "memoryMiB": 64, "accel": "tcg", "kernel": kernel()}));
        let vm = launch_paused(&run, "web", spec.clone()).await;
        // As if the agent died between blockdev-add and device_add, and between netdev_add and
        // device_add.
        let img = image(run.dir.path(), "half.qcow2", "qcow2", 8);
        let half = disk(&img, "qcow2", json!({}));
        vm.qmp
            .blockdev_add(plasmavmc_agent::devices::disk_file_node(
                "half",
                &half,
                plasmavmc_agent::devices::DiskBacking::File,
            ))
            .await
            .unwrap();
        vm.qmp
            .blockdev_add(plasmavmc_agent::devices::disk_format_node("half", &half))
            .await
            .unwrap();
        let nic: NicSpec =
            serde_json::from_value(json!({"mac": "52:54:00:00:00:03", "bridge": "br0"})).unwrap();
        let tap = ids::agent_tap("web", "half");
        plasmavmc_agent::qemu::tap::ensure_tap(&tap, "br0", None).unwrap();
        vm.qmp
            .netdev_add(plasmavmc_agent::devices::nic_netdev("web", "half", &nic))
            .await
            .unwrap();

        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert_eq!(
            observed
                .orphan_block_nodes
                .iter()
                .cloned()
                .collect::<Vec<_>>(),
            vec![ids::disk_file_node("half"), ids::disk_format_node("half")]
        );
        assert_eq!(
            observed.orphan_netdevs.iter().cloned().collect::<Vec<_>>(),
            vec![ids::nic_netdev("half")]
        );
        // In the planner's (alphabetical) order: the file node first, although the format node
        // holds it. Each removal is idempotent.
        for node in observed.orphan_block_nodes.iter() {
            let action = Action::RemoveOrphanBlockNode { node: node.clone() };
            assert_eq!(vm.apply(action).await.unwrap(), LiveOutcome::Done);
        }
        let action = Action::RemoveOrphanNetdev {
            netdev: ids::nic_netdev("half"),
        };
        assert_eq!(vm.apply(action).await.unwrap(), LiveOutcome::Done);
        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert!(observed.orphan_block_nodes.is_empty() && observed.orphan_netdevs.is_empty());
        assert!(
            !plasmavmc_agent::qemu::tap::interface_exists(&tap),
            "agent tap deleted"
        );
    });
}

#[test]
fn an_unplug_the_guest_never_answers_leaves_the_device_unplugging() {
    in_netns(|| async {
        let run = TempRun::new();
        let img = image(run.dir.path(), "data.qcow2", "qcow2", 8);
        let spec = spec(json!({
            "vcpus": 1, "memoryMiB": 64, "accel": "tcg", "kernel": kernel(),
            "disks": {"data": {"path": img, "format": "qcow2"}},
        }));
        let vm = launch_paused(&run, "web", spec.clone()).await;
        for attempt in 0..2 {
            // The retry finds the first request still pending and keeps waiting for it.
            let outcome = vm
                .apply(Action::RemoveDisk {
                    id: "data".into(),
                    delete_image: None,
                })
                .await;
            assert_eq!(
                outcome.unwrap(),
                LiveOutcome::Unplugging {
                    device: ids::disk_device("data")
                },
                "attempt {attempt}"
            );
        }
        let observed = observe(&vm.qmp, vm.pid, spec.clone()).await.unwrap();
        assert!(
            observed.disks.contains_key("data"),
            "the device is still there, not lost"
        );
        assert!(
            observed.orphan_block_nodes.is_empty(),
            "its nodes stay with it"
        );
    });
}
