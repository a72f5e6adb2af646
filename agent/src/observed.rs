//! What is actually there, read back from QEMU (and `/proc`), never from the agent's memory of
//! what it did: after a crash, memory lies; QEMU does not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::nic_tap;
use crate::spec::{DiskCache, DiskFormat, DiskSpec, Limits, NicSpec, VmSpec};

/// Everything the agent observed on this host, keyed by VM name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedHost {
    pub vms: BTreeMap<String, ObservedVm>,
}

/// One VM whose QEMU process exists (running, paused or starting). A VM with no QEMU process is
/// simply absent from `ObservedHost::vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedVm {
    pub pid: u32,
    /// The spec QEMU was booted with (persisted in the run dir at launch): the source of truth for
    /// boot-time settings QEMU cannot report (kernel, cmdline, machine, ceilings).
    pub boot_spec: VmSpec,
    /// QEMU reports its vCPUs stopped (`query-status`), e.g. after a `stop` or an I/O error.
    pub paused: bool,
    /// Hot-pluggable devices QEMU has now, by the declared disk/NIC id (parsed from device ids).
    pub disks: BTreeMap<String, ObservedDisk>,
    pub nics: BTreeMap<String, ObservedNic>,
    /// Block nodes the agent created whose device is gone (an interrupted unplug or add).
    pub orphan_block_nodes: BTreeSet<String>,
    /// Netdevs the agent created whose device is gone.
    pub orphan_netdevs: BTreeSet<String>,
    /// vCPUs present now (boot CPUs plus hotplugged ones).
    pub vcpus: u32,
    /// Memory: boot memory plus what the virtio-mem device has actually plugged.
    pub memory: ObservedMemory,
    /// Devices the agent asked the guest to release that are still present, by QEMU device id
    /// (`disk-<id>`, `nic-<id>`).
    pub unplugging: BTreeSet<String>,
    /// The limits QEMU's own cgroup has now (normalized, see `Limits::normalized`); `None` when
    /// QEMU is in no cgroup of its own (started by an agent that made none), where changing a
    /// limit waits for the next start.
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
    /// From the format node's `cache.direct`/`cache.no-flush` and the device's `write-cache`
    /// (`devices::cache_mode` maps them back).
    pub cache: DiskCache,
    /// The device's `serial` property; QEMU reports "" for none.
    pub serial: Option<String>,
    /// Present since boot (on the command line) rather than hotplugged.
    pub cold_plugged: bool,
    /// The image's virtual size in bytes, as QEMU reports it.
    pub size_bytes: u64,
    /// The disk was last declared with `deleteOnRemove` (the agent's memory of the previous
    /// declaration; false when it does not know, so an image is only ever kept by mistake).
    #[serde(default)]
    pub delete_on_remove: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedNic {
    pub mac: String,
    /// The host-side tap interface name of its netdev.
    pub tap: String,
    /// The bridge the tap is attached to now, if any (read from sysfs).
    pub bridge: Option<String>,
    pub cold_plugged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservedMemory {
    /// Memory given at boot (`-m`), in MiB.
    #[serde(rename = "bootMiB")]
    pub boot_mib: u64,
    /// What the virtio-mem device was asked for, in MiB (0 without the device).
    #[serde(rename = "requestedMiB")]
    pub requested_mib: u64,
    /// What the guest actually plugged, in MiB (virtio-mem `size`).
    #[serde(rename = "pluggedMiB")]
    pub plugged_mib: u64,
}

impl ObservedMemory {
    /// The memory the guest has now.
    pub fn total_mib(&self) -> u64 {
        self.boot_mib + self.plugged_mib
    }
}

impl ObservedVm {
    /// What QEMU reports right after booting `spec`: every declared device cold-plugged, no
    /// hotplugged vCPU, an empty virtio-mem device. What the planner compares a fresh boot against.
    pub fn freshly_booted(name: &str, spec: &VmSpec, pid: u32) -> Self {
        Self {
            pid,
            boot_spec: spec.clone(),
            paused: false,
            disks: spec
                .disks
                .iter()
                .map(|(id, disk)| (id.clone(), ObservedDisk::from_spec(disk, true)))
                .collect(),
            nics: spec
                .nics
                .iter()
                .map(|(id, nic)| (id.clone(), ObservedNic::from_spec(name, id, nic, true)))
                .collect(),
            orphan_block_nodes: BTreeSet::new(),
            orphan_netdevs: BTreeSet::new(),
            vcpus: spec.vcpus,
            memory: ObservedMemory {
                boot_mib: spec.memory_mib,
                requested_mib: 0,
                plugged_mib: 0,
            },
            unplugging: BTreeSet::new(),
            limits: Some(spec.limits.normalized()),
        }
    }
}

impl ObservedDisk {
    /// The disk as QEMU reports it once `disk` is attached.
    pub fn from_spec(disk: &DiskSpec, cold_plugged: bool) -> Self {
        Self {
            path: disk.path.clone(),
            format: disk.format,
            read_only: disk.read_only,
            cache: disk.cache,
            serial: disk.serial.clone(),
            cold_plugged,
            size_bytes: disk.size_mib.unwrap_or(0) * crate::devices::MIB,
            delete_on_remove: disk.delete_on_remove,
        }
    }
}

impl ObservedNic {
    /// The NIC as QEMU and the host report it once `nic` is attached.
    pub fn from_spec(vm: &str, id: &str, nic: &NicSpec, cold_plugged: bool) -> Self {
        Self {
            mac: nic.mac.to_ascii_lowercase(),
            tap: nic_tap(vm, id, nic),
            bridge: nic.bridge.clone(),
            cold_plugged,
        }
    }
}
