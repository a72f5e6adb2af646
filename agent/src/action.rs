//! The planner's output: ordered steps that move a VM from what is observed to what is declared.
//!
//! Plain data. The shell executes `Action`s; `plan` and `status` print them. Every action is
//! idempotent against observed state (ids are deterministic, see `ids`), so re-planning after a
//! crash in the middle of an apply neither duplicates nor loses a device.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{DiskSpec, Limits, NicSpec, VmSpec};

/// The whole plan for a host: per-VM steps in execution order, and what must wait for a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Declared changes QEMU cannot take live, per VM; applied at the VM's next start (or by a
    /// `RestartVm` step when the VM says `onRestartRequired = "restart"`).
    pub pending: Vec<PendingChange>,
    /// Declared changes that are never applied because they would destroy data (a disk shrink):
    /// the VM keeps what it has until the declaration is corrected.
    #[serde(default)]
    pub refused: Vec<RefusedChange>,
    /// HA VMs whose move to another host would copy disks (those not declared `shared`): a
    /// note per VM naming them (see `migration::running::copy_note`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub migration_copies: std::collections::BTreeMap<String, String>,
}

impl Plan {
    /// Notes, for every HA VM of `desired`, which disks a migration would copy.
    pub fn note_migration_copies(&mut self, desired: &crate::spec::DesiredState) {
        self.migration_copies = desired
            .vms
            .iter()
            .filter(|(_, spec)| spec.ha.enable)
            .filter_map(|(name, spec)| {
                Some((name.clone(), crate::migration::running::copy_note(spec)?))
            })
            .collect();
    }
}

/// One action on one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub vm: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Action {
    /// Launch QEMU with this spec (the declared one, pending changes included).
    StartVm {
        spec: Box<VmSpec>,
    },
    /// ACPI powerdown, wait, then quit; used for VMs no longer declared or no longer wanted here.
    StopVm {
        reason: String,
    },
    /// Stop then start with the declared spec, to apply pending changes (`onRestartRequired`).
    RestartVm {
        spec: Box<VmSpec>,
        reason: String,
    },
    AddDisk {
        id: String,
        disk: DiskSpec,
    },
    /// `device_del`, wait for the guest, then `blockdev-del`. The image stays on disk unless
    /// `delete_image` names it (`deleteOnRemove` on a disk no longer declared).
    RemoveDisk {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delete_image: Option<PathBuf>,
    },
    /// Grow a plugged disk's image live (`block_resize`); the guest sees the new size at once.
    ResizeDisk {
        id: String,
        #[serde(rename = "fromMiB")]
        from_mib: u64,
        #[serde(rename = "toMiB")]
        to_mib: u64,
    },
    AddNic {
        id: String,
        nic: NicSpec,
    },
    /// `device_del`, wait for the guest, `netdev_del`, then delete the tap if the agent made it.
    RemoveNic {
        id: String,
    },
    /// Delete block nodes / netdevs left behind by an interrupted apply.
    RemoveOrphanBlockNode {
        node: String,
    },
    RemoveOrphanNetdev {
        netdev: String,
    },
    SetVcpus {
        from: u32,
        to: u32,
    },
    /// Resize the virtio-mem device so the guest has `to_mib` in total.
    SetMemory {
        #[serde(rename = "fromMiB")]
        from_mib: u64,
        #[serde(rename = "toMiB")]
        to_mib: u64,
    },
    /// Write the VM cgroup's limits (or set its scope's properties): takes effect at once.
    SetLimits {
        from: Limits,
        to: Limits,
    },
}

/// A declared change that waits for the VM's next boot, e.g. `machine: q35 -> pc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingChange {
    pub vm: String,
    /// The spec field as named in the desired-state file (`machine`, `disks.root.path`, ...).
    pub field: String,
    pub from: String,
    pub to: String,
    /// Why it cannot be applied live (`boot-time setting`, `above maxVcpus`, ...).
    pub reason: String,
}

/// A declared change that is refused rather than deferred (same shape as a pending change; its
/// `reason` says why and what to do).
pub type RefusedChange = PendingChange;
