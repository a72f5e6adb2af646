//! The configuration a VM *runs* with: the spec it booted with plus every device, vCPU and memory
//! change applied live since. A migration target is launched with exactly this, so its device
//! tree (ids, PCI placement, MACs, serials) matches the source's and QEMU accepts the stream;
//! pending changes are not in it (they wait for the next boot, on the target too).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ids;
use crate::observed::ObservedVm;
use crate::spec::{DiskSpec, NicSpec, VmSpec};

/// Where a PCI device sits: its bus (`port3`, `pci.0`) and slot.function (`0x4.0`). A device
/// placed explicitly lands there on the target whatever order it was plugged in on the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    pub bus: Option<String>,
    pub addr: Option<String>,
}

impl Placement {
    /// From QOM: the device's `parent_bus` path and its `addr` (a devfn, as QEMU reports it).
    pub fn from_qom(parent_bus: &str, devfn: i64) -> Self {
        let bus = parent_bus.rsplit('/').next().filter(|b| !b.is_empty());
        let addr = (devfn >= 0).then(|| format!("{:x}.{:x}", devfn >> 3, devfn & 7));
        Placement {
            bus: bus.map(str::to_owned),
            addr,
        }
    }
}

/// How the command line lays devices out where the spec alone does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    /// Root ports made at launch (q35): the boot spec's count, whatever was plugged since.
    pub root_ports: Option<u32>,
    /// Disk and NIC devices by QEMU device id (`disk-data`, `nic-eth0`).
    pub placements: BTreeMap<String, Placement>,
    /// The virtio-mem device's `requested-size` in MiB (0 or absent: empty, as at boot).
    #[serde(rename = "virtioMemRequestedMiB")]
    pub virtio_mem_requested_mib: Option<u64>,
    /// vCPUs plugged live, in slot order: plugged the same way into the target before the
    /// stream comes (QEMU refuses a stream whose vCPUs were on the command line instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hotplugged_cpus: Vec<HotCpu>,
}

/// One vCPU plugged live: `device_add` of `driver` with `id` and the slot's properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HotCpu {
    pub driver: String,
    pub id: String,
    pub props: serde_json::Map<String, serde_json::Value>,
}

/// The vCPUs QEMU has: how many of the boot ones are still there, and those plugged live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpus {
    pub boot_present: u32,
    pub hotplugged: Vec<HotCpu>,
}

/// What a migration target launches, and what it records as its boot spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningConfig {
    /// The spec the source's QEMU booted with: the target keeps it as its own boot spec, so a
    /// change pending on the source is pending on the target.
    pub boot_spec: VmSpec,
    /// The spec as it runs now: disks, NICs and vCPUs as plugged, for the target's command line.
    pub spec: VmSpec,
    pub layout: Layout,
}

/// The running configuration of a VM observed as `observed` (with `placements` of its disk and
/// NIC devices read from QOM). A disk is `shared` as `declared` (the VM's declaration now) says
/// for the same image. A NIC keeps its MAC and declared tap; an agent-made tap is made again on
/// the target (on the bridge the target declares: `for_target`).
pub fn running_config(
    observed: &ObservedVm,
    placements: BTreeMap<String, Placement>,
    cpus: Cpus,
    declared: &VmSpec,
) -> RunningConfig {
    let boot = &observed.boot_spec;
    let mut spec = boot.clone();
    spec.vcpus = cpus.boot_present;
    spec.disks = observed
        .disks
        .iter()
        .map(|(id, disk)| {
            let declared = declared.disks.get(id).filter(|d| d.path == disk.path);
            let running = DiskSpec {
                path: disk.path.clone(),
                format: disk.format,
                read_only: disk.read_only,
                cache: disk.cache,
                serial: disk.serial.clone(),
                size_mib: Some(disk.size_bytes.div_ceil(crate::devices::MIB)),
                create: None,
                delete_on_remove: false,
                shared: declared.is_some_and(|d| d.shared),
            };
            (id.clone(), running)
        })
        .collect();
    spec.nics = observed
        .nics
        .iter()
        .map(|(id, nic)| {
            let agent_tap = ids::is_agent_tap(&nic.tap);
            let running = NicSpec {
                mac: nic.mac.clone(),
                bridge: if agent_tap { nic.bridge.clone() } else { None },
                tap: (!agent_tap).then(|| nic.tap.clone()),
            };
            (id.clone(), running)
        })
        .collect();
    let layout = Layout {
        root_ports: Some(crate::argv::root_port_count(boot)),
        placements,
        virtio_mem_requested_mib: Some(observed.memory.requested_mib).filter(|&mib| mib > 0),
        hotplugged_cpus: cpus.hotplugged,
    };
    RunningConfig {
        boot_spec: boot.clone(),
        spec,
        layout,
    }
}

impl RunningConfig {
    /// A boot: `spec` as declared, laid out as a boot lays it out.
    pub fn booting(spec: &VmSpec) -> RunningConfig {
        RunningConfig {
            boot_spec: spec.clone(),
            spec: spec.clone(),
            layout: Layout::default(),
        }
    }

    /// Every disk not declared `shared`: copied to the target (the shared ones are opened in
    /// place there).
    pub fn disks_to_copy(&self) -> Vec<String> {
        disks_to_copy(&self.spec)
    }

    /// For every disk move `id` copies, its path and where the target keeps the older copy it
    /// finds there meanwhile (`PATH.before-migration-ID`): put back if the move is abandoned,
    /// removed once it completes.
    pub fn older_copies(&self, id: &str) -> Vec<(PathBuf, PathBuf)> {
        self.disks_to_copy()
            .into_iter()
            .map(|disk| {
                let path = &self.spec.disks[&disk].path;
                let kept = format!("{}.before-migration-{id}", path.display());
                (path.clone(), PathBuf::from(kept))
            })
            .collect()
    }

    /// The target's version: NICs on the bridges the target declares for them (same tap name,
    /// same MAC); disks the move copies created blank at their size (`create`), the copy fills
    /// them.
    pub fn for_target(&self, declared_on_target: &VmSpec) -> RunningConfig {
        let mut adapted = self.clone();
        for (id, nic) in &mut adapted.spec.nics {
            if let Some(theirs) = declared_on_target.nics.get(id) {
                if nic.tap.is_none() && theirs.bridge.is_some() {
                    nic.bridge.clone_from(&theirs.bridge);
                }
            }
        }
        for disk in adapted.spec.disks.values_mut().filter(|d| !d.shared) {
            disk.create = Some(Default::default());
        }
        adapted
    }

    /// Why the target cannot take this VM's disks as the source sends them: both hosts must
    /// agree which disks are shared (a disk the target thinks is its own to create would be
    /// put aside under a source that still writes it).
    pub fn shared_disagreement(&self, declared_on_target: &VmSpec) -> Option<String> {
        let differ: Vec<String> = self
            .spec
            .disks
            .iter()
            .filter(|(id, disk)| {
                let theirs = declared_on_target
                    .disks
                    .get(*id)
                    .filter(|d| d.path == disk.path);
                theirs.map_or(disk.shared, |theirs| theirs.shared != disk.shared)
            })
            .map(|(id, disk)| {
                format!(
                    "{id} ({})",
                    if disk.shared {
                        "shared on the source"
                    } else {
                        "not shared on the source"
                    }
                )
            })
            .collect();
        (!differ.is_empty()).then(|| {
            format!(
                "the hosts disagree on which disks are shared: {}; declare `shared` the same on both",
                differ.join(", ")
            )
        })
    }
}

/// Disk ids a move copies (every disk not declared `shared`), in id order. Read-only disks are
/// copied too: the target has no file at that path otherwise.
pub fn disks_to_copy(spec: &VmSpec) -> Vec<String> {
    spec.disks
        .iter()
        .filter(|(_, disk)| !disk.shared)
        .map(|(id, _)| id.clone())
        .collect()
}

/// What `plan`/`status` say about a VM's disks and a move: `None` when every disk is shared.
pub fn copy_note(spec: &VmSpec) -> Option<String> {
    let copied = disks_to_copy(spec);
    (!copied.is_empty()).then(|| {
        format!(
            "a migration copies disk{} {} (not declared shared)",
            if copied.len() == 1 { "" } else { "s" },
            copied.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observed::{ObservedDisk, ObservedMemory, ObservedNic};

    fn boot_spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "vcpus": 1, "maxVcpus": 4, "memoryMiB": 256, "maxMemoryMiB": 512,
            "kernel": "/k", "hotplugSlots": 2,
            "ha": {"enable": true},
            "disks": {"root": {"path": "/img/root.qcow2", "format": "qcow2", "shared": true},
                      "old": {"path": "/img/old.raw", "format": "raw"}},
            "nics": {"eth0": {"mac": "52:54:00:00:00:01", "bridge": "br0"}}
        }))
        .unwrap()
    }

    /// The declaration now: `data` (plugged live) shared, `root` not any more (a declaration
    /// that changed since boot: what counts is what it says now).
    fn declared() -> VmSpec {
        let mut spec = boot_spec();
        spec.disks.get_mut("root").unwrap().shared = false;
        let mut data = spec.disks["old"].clone();
        data.path = "/img/data.raw".into();
        data.shared = true;
        spec.disks.insert("data".into(), data);
        spec
    }

    fn cpus() -> Cpus {
        let hot = |core: i64| HotCpu {
            driver: "max-x86_64-cpu".into(),
            id: format!("vcpu-0-{core}-0"),
            props: serde_json::json!({"socket-id": 0, "core-id": core, "thread-id": 0})
                .as_object()
                .unwrap()
                .clone(),
        };
        Cpus {
            boot_present: 1,
            hotplugged: vec![hot(1), hot(2)],
        }
    }

    fn observed() -> ObservedVm {
        let boot = boot_spec();
        let mut vm = ObservedVm::freshly_booted("web", &boot, 7);
        // Since boot: `old` unplugged, `data` and `eth1` (a declared tap) plugged, 2 more vCPUs,
        // 128 MiB more memory.
        vm.disks.remove("old");
        vm.disks.insert(
            "data".into(),
            ObservedDisk {
                size_bytes: 1 << 30,
                cold_plugged: false,
                ..ObservedDisk::from_spec(&boot.disks["old"], false)
            },
        );
        vm.disks.get_mut("data").unwrap().path = "/img/data.raw".into();
        vm.nics.insert(
            "eth1".into(),
            ObservedNic {
                mac: "52:54:00:00:00:02".into(),
                tap: "tapx".into(),
                bridge: None,
                cold_plugged: false,
            },
        );
        vm.vcpus = 3;
        vm.memory = ObservedMemory {
            boot_mib: 256,
            requested_mib: 128,
            plugged_mib: 128,
        };
        vm
    }

    #[test]
    fn running_config_is_the_boot_spec_plus_live_changes_and_keeps_the_boot_spec() {
        let placements = BTreeMap::from([(
            "disk-data".to_owned(),
            Placement::from_qom("/machine/peripheral/port3/port3", 0),
        )]);
        let running = running_config(&observed(), placements, cpus(), &declared());
        assert_eq!(
            running.boot_spec,
            boot_spec(),
            "pending changes stay pending"
        );
        assert_eq!(running.spec.vcpus, 1, "the boot vCPUs on the command line");
        assert_eq!(
            running.layout.hotplugged_cpus.len(),
            2,
            "the others plugged live"
        );
        assert_eq!(
            running.spec.disks.keys().collect::<Vec<_>>(),
            ["data", "root"]
        );
        assert_eq!(running.spec.disks["data"].size_mib, Some(1024));
        assert!(!running.spec.disks["root"].shared && running.spec.disks["data"].shared);
        assert_eq!(running.spec.nics["eth0"].bridge.as_deref(), Some("br0"));
        assert_eq!(running.spec.nics["eth1"].tap.as_deref(), Some("tapx"));
        assert_eq!(running.spec.nics["eth1"].mac, "52:54:00:00:00:02");
        assert_eq!(running.layout.root_ports, Some(2 + 1 + 2));
        assert_eq!(running.layout.virtio_mem_requested_mib, Some(128));
        assert_eq!(
            running.layout.placements["disk-data"],
            Placement {
                bus: Some("port3".into()),
                addr: Some("0.0".into())
            }
        );
        assert_eq!(running.disks_to_copy(), ["root"]);
    }

    #[test]
    fn placements_read_from_qom() {
        assert_eq!(
            Placement::from_qom("/machine/i440fx/pci.0", 0x21),
            Placement {
                bus: Some("pci.0".into()),
                addr: Some("4.1".into())
            }
        );
        assert_eq!(
            Placement::from_qom("", -1),
            Placement {
                bus: None,
                addr: None
            }
        );
    }

    #[test]
    fn the_target_uses_its_own_bridges_creates_copied_disks_and_must_agree_on_sharing() {
        let running = running_config(&observed(), BTreeMap::new(), cpus(), &declared());
        let mut theirs = declared();
        theirs.nics.get_mut("eth0").unwrap().bridge = Some("br-vms".into());
        let adapted = running.for_target(&theirs);
        assert_eq!(adapted.spec.nics["eth0"].bridge.as_deref(), Some("br-vms"));
        assert_eq!(adapted.spec.nics["eth0"].mac, "52:54:00:00:00:01");
        assert!(
            adapted.spec.disks["root"].create.is_some(),
            "copied: made blank here"
        );
        assert!(
            adapted.spec.disks["data"].create.is_none(),
            "shared: opened in place"
        );
        assert_eq!(running.shared_disagreement(&theirs), None);
        theirs.disks.get_mut("data").unwrap().shared = false;
        let why = running.shared_disagreement(&theirs).unwrap();
        assert!(why.contains("data (shared on the source)"), "{why}");
        theirs.disks.remove("data");
        assert!(
            running.shared_disagreement(&theirs).is_some(),
            "undeclared there"
        );
    }

    #[test]
    fn older_copies_are_kept_beside_each_copied_disk_under_the_move_id() {
        let running = RunningConfig::booting(&boot_spec());
        assert_eq!(
            running.older_copies("m-17"),
            [(
                PathBuf::from("/img/old.raw"),
                PathBuf::from("/img/old.raw.before-migration-m-17")
            )],
            "the shared disk is not copied: nothing of it is set aside"
        );
    }

    #[test]
    fn copy_note_names_the_disks_a_move_copies() {
        assert_eq!(
            copy_note(&boot_spec()).as_deref(),
            Some("a migration copies disk old (not declared shared)")
        );
        let mut all_shared = boot_spec();
        all_shared.disks.get_mut("old").unwrap().shared = true;
        assert_eq!(copy_note(&all_shared), None);
    }
}
