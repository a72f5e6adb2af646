//! The desired-state file (`/etc/plasmavmc/desired.json`): what the operator declared.
//!
//! Plain data, deserialized strictly (unknown keys are errors). Field names here are the JSON keys
//! and the NixOS option names: one name, one meaning, end to end. Semantic checks that serde
//! cannot express live in `validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The only schema version this agent understands.
pub const SCHEMA_VERSION: u32 = 1;

/// The whole file: `{"version": 1, "vms": {NAME: VM}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DesiredState {
    pub version: u32,
    #[serde(default)]
    pub vms: BTreeMap<String, VmSpec>,
}

/// One declared virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// vCPUs online now. Moves live between 1 and `maxVcpus`.
    pub vcpus: u32,
    /// Ceiling for live vCPU changes, fixed at boot (`-smp maxcpus=`). Defaults to `vcpus`.
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// Guest memory in MiB. With `maxMemoryMiB`, the part above the boot memory is a virtio-mem
    /// device and moves live; without it, a change waits for the next boot.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Ceiling for live memory changes, fixed at boot. Absent: memory is fixed for the boot.
    #[serde(rename = "maxMemoryMiB", default)]
    pub max_memory_mib: Option<u64>,
    #[serde(default)]
    pub machine: Machine,
    #[serde(default)]
    pub accel: Accel,
    /// Direct kernel boot: kernel image. Either this or `bootDisk`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Boot from this disk (an id in `disks`) instead of a kernel.
    #[serde(default)]
    pub boot_disk: Option<String>,
    /// UEFI firmware image (e.g. OVMF.fd); absent means SeaBIOS / direct boot.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    #[serde(default)]
    pub disks: BTreeMap<String, DiskSpec>,
    #[serde(default)]
    pub nics: BTreeMap<String, NicSpec>,
    /// PCIe root ports reserved at boot for hotplugged disks and NICs (q35 only; `pc` hotplugs
    /// onto the root bus).
    #[serde(default = "default_hotplug_slots")]
    pub hotplug_slots: u32,
    /// Start the VM when the agent starts or the VM is declared.
    #[serde(default = "default_true")]
    pub autostart: bool,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// What to do when a change cannot be applied live.
    #[serde(default)]
    pub on_restart_required: OnRestartRequired,
    /// What the host's shutdown or reboot does to this VM when it runs.
    #[serde(default)]
    pub on_host_shutdown: OnHostShutdown,
    #[serde(default = "default_scope")]
    pub org_id: String,
    #[serde(default = "default_scope")]
    pub project_id: String,
    /// Log the serial console to `<run-dir>/vms/NAME/console.log` and serve it to
    /// `plasmavmc console`; false: no serial console at all.
    #[serde(default = "default_true")]
    pub console_log: bool,
    /// High availability across hosts (needs ChainFire and shared storage).
    #[serde(default)]
    pub ha: HaSpec,
    /// Host resources QEMU may use (its cgroup); changed live.
    #[serde(default)]
    pub limits: Limits,
    /// systemd credentials handed to the guest through fw_cfg
    /// (`opt/io.systemd.credentials/NAME`), read when the VM starts.
    #[serde(default)]
    pub credentials: BTreeMap<String, Content>,
    /// A cloud-init NoCloud seed (a `cidata` vfat disk) built when the VM starts.
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: DiskFormat,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub cache: DiskCache,
    /// Serial number the guest sees (virtio-blk: at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// The image's virtual size. Creates the image at this size (with `create`), grows it live
    /// when raised, and is checked against the file; a shrink is refused (it destroys data).
    #[serde(rename = "sizeMiB", default)]
    pub size_mib: Option<u64>,
    /// How to create the image when `path` does not exist; absent: it must exist.
    #[serde(default)]
    pub create: Option<DiskCreate>,
    /// Delete the image when the disk is removed from a declared VM (default: keep it).
    #[serde(default)]
    pub delete_on_remove: bool,
    /// The image is on storage every host that declares the VM sees under the same path: a
    /// live migration leaves it where it is. A disk that is not shared is copied to the target
    /// while the VM runs (QEMU block mirror over NBD). Written only when set, as the NixOS
    /// module writes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// How a missing disk image is made. Never applied over an existing file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskCreate {
    /// A base image: copied (converted to `format`), or with `backing` used read-only under a
    /// qcow2 overlay. Absent: a blank image of `sizeMiB`.
    #[serde(default)]
    pub from: Option<PathBuf>,
    /// Make a qcow2 overlay on `from` instead of a copy; the base is never written.
    #[serde(default)]
    pub backing: bool,
}

/// A value given either inline (`text`, which lands in the desired-state file and, from NixOS,
/// in the Nix store: never a secret) or as a host file read when the VM starts (`file`, for
/// secrets). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Content {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// cloud-init NoCloud data; `metaData` defaults to an instance id and hostname from the VM name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInitSpec {
    #[serde(default)]
    pub user_data: Option<Content>,
    #[serde(default)]
    pub meta_data: Option<Content>,
    #[serde(default)]
    pub network_config: Option<Content>,
}

/// A NIC is either on a bridge (the agent creates, attaches and removes the tap) or on an
/// existing tap the operator manages. Exactly one of `bridge` and `tap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSpec {
    pub mac: String,
    #[serde(default)]
    pub bridge: Option<String>,
    #[serde(default)]
    pub tap: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HaSpec {
    #[serde(default)]
    pub enable: bool,
    /// Host ids (`--host-id`) in order of preference: the VM runs on the first of them that is
    /// live and not cordoned, and is moved there live when that changes (after the host has been
    /// live for the agent's `--placement-settle`). Empty: it stays wherever it runs.
    #[serde(default)]
    pub preferred_hosts: Vec<String>,
}

/// Limits on the VM's cgroup (QEMU and, for HA VMs, its fence guard). Absent: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// CPU share against other VMs when the host is busy (cgroup `cpu.weight`, 1..10000; the
    /// kernel's default is 100).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// CPU time QEMU may use, in percent of one host CPU (150 = one and a half CPUs), whether
    /// the host is busy or not (cgroup `cpu.max`).
    #[serde(default)]
    pub cpu_quota_percent: Option<u32>,
    /// Host memory QEMU may use, guest RAM and QEMU's own overhead together, in MiB (cgroup
    /// `memory.max`; beyond it the kernel reclaims, then kills QEMU).
    #[serde(rename = "memoryMaxMiB", default)]
    pub memory_max_mib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    #[default]
    Q35,
    Pc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

/// QEMU's cache modes; `writeback` is QEMU's own default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    None,
    #[default]
    Writeback,
    Writethrough,
    Directsync,
    Unsafe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRestartRequired {
    /// Record the change as pending; apply it at the VM's next start.
    #[default]
    Pending,
    /// Restart the VM now to apply it.
    Restart,
}

/// What a host shutdown or reboot does to a running VM (`plasmavmc shutdown-host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnHostShutdown {
    /// ACPI powerdown (all VMs in parallel), then `quit` after the stop timeout.
    #[default]
    Powerdown,
    /// Managed save: the VM's state goes to the state dir and is restored at its next start.
    Save,
    /// Move the VM live to another host (an HA VM; powered down if no host takes it); a VM
    /// declared on this host only is saved.
    Evacuate,
}

fn default_true() -> bool {
    true
}

fn default_scope() -> String {
    "default".to_owned()
}

fn default_hotplug_slots() -> u32 {
    8
}

impl VmSpec {
    pub fn effective_max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus)
    }

    /// The most guest RAM this boot can reach, in MiB.
    pub fn effective_max_memory_mib(&self) -> u64 {
        self.max_memory_mib
            .unwrap_or(self.memory_mib)
            .max(self.memory_mib)
    }
}

/// `cpuWeight=200 memoryMaxMiB=4096`, or `no limits`: for plans, logs and status.
impl std::fmt::Display for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set: Vec<String> = [
            self.cpu_weight.map(|v| format!("cpuWeight={v}")),
            self.cpu_quota_percent
                .map(|v| format!("cpuQuotaPercent={v}")),
            self.memory_max_mib.map(|v| format!("memoryMaxMiB={v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.is_empty() {
            f.write_str("no limits")
        } else {
            f.write_str(&set.join(" "))
        }
    }
}

/// The kernel's CPU weight of a cgroup nobody set one for.
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

impl Limits {
    /// The same limits with defaults spelled as absent, so "declared 100" equals "not declared"
    /// (both read back from the cgroup as the kernel's default).
    pub fn normalized(self) -> Limits {
        Limits {
            cpu_weight: self.cpu_weight.filter(|&w| w != DEFAULT_CPU_WEIGHT),
            ..self
        }
    }
}
