//! Applies the planner's live actions to a running QEMU over QMP: disk and NIC hotplug and
//! unplug, disk growth, leftover cleanup, vCPU and memory resizing. Host files (creating an
//! image before its hotplug, deleting one after its removal) are the daemon's, around these.
//!
//! Every action is idempotent against QEMU's actual state (deterministic ids; "not found" on a
//! removal means it is already done), so re-applying after an agent crash is safe.

mod cpu;
mod devices;
mod memory;
mod unplug;

use std::time::Duration;

use crate::action::Action;
use crate::runas::RunAs;
use crate::spec::VmSpec;

use super::qmp::{Qmp, QmpError};

/// How a live action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveOutcome {
    Done,
    /// `device_del` was issued but the guest has not released the device within the timeout.
    /// The device stays (and works); the daemon shows it `unplugging` and retries the action.
    Unplugging {
        device: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("the guest refused to release device {device}")]
    GuestRefused { device: String },
    #[error("no free hotplug slot (pcie-root-port) for {device}; raise hotplugSlots (takes effect at the next boot)")]
    NoFreeSlot { device: String },
    #[error("{0} is not applied over QMP")]
    NotLive(&'static str),
    #[error("QEMU went away while waiting for {what}")]
    Disconnected { what: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

/// Applies one live `action` to VM `vm`. `boot_spec` is the spec QEMU was launched with (machine
/// type, boot disk). `unplug_timeout` bounds how long a removal waits for the guest. `run_as`:
/// the user QEMU runs as, who gets added disks and taps (`None`: root).
pub async fn apply_live(
    qmp: &Qmp,
    vm: &str,
    boot_spec: &VmSpec,
    action: &Action,
    unplug_timeout: Duration,
    run_as: Option<&RunAs>,
) -> Result<LiveOutcome, LiveError> {
    match action {
        Action::AddDisk { id, disk } => devices::add_disk(qmp, boot_spec, id, disk, run_as)
            .await
            .map(|()| LiveOutcome::Done),
        Action::RemoveDisk { id, .. } => devices::remove_disk(qmp, id, unplug_timeout).await,
        Action::ResizeDisk { id, to_mib, .. } => qmp
            .block_resize(
                &crate::ids::disk_format_node(id),
                to_mib * crate::devices::MIB,
            )
            .await
            .map(|()| LiveOutcome::Done)
            .map_err(LiveError::from),
        Action::AddNic { id, nic } => devices::add_nic(qmp, vm, boot_spec, id, nic, run_as)
            .await
            .map(|()| LiveOutcome::Done),
        Action::RemoveNic { id } => devices::remove_nic(qmp, id, unplug_timeout).await,
        Action::RemoveOrphanBlockNode { node } => devices::remove_orphan_block_node(qmp, node)
            .await
            .map(|()| LiveOutcome::Done),
        Action::RemoveOrphanNetdev { netdev } => devices::remove_netdev(qmp, netdev)
            .await
            .map(|()| LiveOutcome::Done),
        Action::SetVcpus { to, .. } => cpu::set_vcpus(qmp, *to, unplug_timeout).await,
        Action::SetMemory { to_mib, .. } => memory::set_memory(qmp, *to_mib)
            .await
            .map(|()| LiveOutcome::Done),
        Action::StartVm { .. } => Err(LiveError::NotLive("StartVm")),
        Action::StopVm { .. } => Err(LiveError::NotLive("StopVm")),
        Action::RestartVm { .. } => Err(LiveError::NotLive("RestartVm")),
        Action::SetLimits { .. } => Err(LiveError::NotLive("SetLimits")),
    }
}

/// QEMU's "no such thing" answers, which make a removal a no-op.
fn is_not_found(e: &QmpError) -> bool {
    match e {
        QmpError::Command { class, desc, .. } => {
            class == "DeviceNotFound"
                || desc.starts_with("Failed to find node")
                || desc.contains("not found")
        }
        _ => false,
    }
}
