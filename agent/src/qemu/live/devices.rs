//! Disk and NIC hotplug: block nodes / netdev first, then the device; removal in reverse.
//! The QEMU objects come from `crate::devices`, the same JSON `argv` uses at boot.

use std::time::Duration;

use anyhow::anyhow;

use super::unplug::{unplug, GoneWhen, Unplugged};
use super::{is_not_found, LiveError, LiveOutcome};
use crate::devices::{self, DeviceProps};
use crate::ids;
use crate::qemu::observe::{device_path, peripherals};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::qemu::{confine, tap};
use crate::runas::RunAs;
use crate::spec::{DiskSpec, Machine, NicSpec, VmSpec};

pub(super) async fn add_disk(
    qmp: &Qmp,
    boot_spec: &VmSpec,
    id: &str,
    disk: &DiskSpec,
    run_as: Option<&RunAs>,
) -> Result<(), LiveError> {
    confine::grant_disk(&disk.path, disk.read_only, run_as)?;
    let device_id = ids::disk_device(id);
    let bus = hotplug_bus(qmp, boot_spec, &device_id).await?;
    let backing = crate::qemu::backing::disk_backing(&disk.path);
    qmp.blockdev_add(devices::disk_file_node(id, disk, backing))
        .await?;
    let boot = boot_spec.boot_disk.as_deref() == Some(id);
    let plugged = async {
        qmp.blockdev_add(devices::disk_format_node(id, disk))
            .await?;
        device_add(qmp, &devices::disk_device(id, disk, bus, boot)).await
    };
    if let Err(e) = plugged.await {
        // Leave nothing half-made behind: the next attempt starts clean.
        if let Err(undo) = remove_disk_nodes(qmp, id).await {
            tracing::warn!(
                disk = id,
                "could not remove the nodes of a failed disk add: {undo}"
            );
        }
        return Err(e.into());
    }
    Ok(())
}

pub(super) async fn remove_disk(
    qmp: &Qmp,
    id: &str,
    timeout: Duration,
) -> Result<LiveOutcome, LiveError> {
    let device = ids::disk_device(id);
    match unplug_freed(qmp, &device, timeout).await? {
        Unplugged::Pending => Ok(LiveOutcome::Unplugging { device }),
        Unplugged::Gone => {
            remove_disk_nodes(qmp, id).await?;
            Ok(LiveOutcome::Done)
        }
    }
}

/// A block node left behind by an interrupted add or remove. Agent-made nodes go as the pair
/// they were made as (format node first: it holds the file node).
pub(super) async fn remove_orphan_block_node(qmp: &Qmp, node: &str) -> Result<(), LiveError> {
    match ids::parse_disk_node(node) {
        Some(disk) => remove_disk_nodes(qmp, disk).await,
        None => ignore_not_found(qmp.blockdev_del(node).await),
    }
}

async fn remove_disk_nodes(qmp: &Qmp, disk: &str) -> Result<(), LiveError> {
    ignore_not_found(qmp.blockdev_del(&ids::disk_format_node(disk)).await)?;
    ignore_not_found(qmp.blockdev_del(&ids::disk_file_node(disk)).await)
}

pub(super) async fn add_nic(
    qmp: &Qmp,
    vm: &str,
    boot_spec: &VmSpec,
    id: &str,
    nic: &NicSpec,
    run_as: Option<&RunAs>,
) -> Result<(), LiveError> {
    let device_id = ids::nic_device(id);
    let bus = hotplug_bus(qmp, boot_spec, &device_id).await?;
    let tap = devices::nic_tap(vm, id, nic);
    match &nic.bridge {
        Some(bridge) => tap::ensure_tap(&tap, bridge, run_as)?,
        None if !tap::interface_exists(&tap) => {
            return Err(anyhow!("NIC {id}: tap {tap} does not exist on this host").into())
        }
        None => {}
    }
    let plugged = async {
        qmp.netdev_add(devices::nic_netdev(vm, id, nic)).await?;
        device_add(qmp, &devices::nic_device(id, nic, bus)).await
    };
    if let Err(e) = plugged.await {
        if let Err(undo) = remove_netdev(qmp, &ids::nic_netdev(id)).await {
            tracing::warn!(
                nic = id,
                "could not remove the netdev of a failed NIC add: {undo}"
            );
        }
        if nic.bridge.is_some() {
            if let Err(undo) = tap::delete_tap(&tap) {
                tracing::warn!(
                    nic = id,
                    "could not delete the tap of a failed NIC add: {undo}"
                );
            }
        }
        return Err(e.into());
    }
    Ok(())
}

pub(super) async fn remove_nic(
    qmp: &Qmp,
    id: &str,
    timeout: Duration,
) -> Result<LiveOutcome, LiveError> {
    let device = ids::nic_device(id);
    match unplug_freed(qmp, &device, timeout).await? {
        Unplugged::Pending => Ok(LiveOutcome::Unplugging { device }),
        Unplugged::Gone => {
            remove_netdev(qmp, &ids::nic_netdev(id)).await?;
            Ok(LiveOutcome::Done)
        }
    }
}

/// Unplugs a disk or NIC device; `Gone` once QEMU has freed it, so its block nodes or netdev can go.
async fn unplug_freed(qmp: &Qmp, device: &str, timeout: Duration) -> Result<Unplugged, LiveError> {
    unplug(
        qmp,
        device,
        &device_path(device),
        timeout,
        GoneWhen::Deleted,
    )
    .await
}

/// Deletes a netdev and, if the agent made its tap, the tap.
pub(super) async fn remove_netdev(qmp: &Qmp, netdev: &str) -> Result<(), LiveError> {
    let ifname = qmp.netdevs().await?.remove(netdev).and_then(|n| n.ifname);
    ignore_not_found(qmp.netdev_del(netdev).await)?;
    if let Some(ifname) = ifname.filter(|name| ids::is_agent_tap(name)) {
        tap::delete_tap(&ifname)?;
    }
    Ok(())
}

async fn device_add(qmp: &Qmp, device: &DeviceProps) -> Result<(), QmpError> {
    qmp.device_add(
        device.driver,
        &device.id,
        device.bus.as_deref(),
        device.properties.clone(),
    )
    .await
}

/// Where a hotplugged device goes: a free root port on q35, the root bus (QEMU picks) on pc.
async fn hotplug_bus(
    qmp: &Qmp,
    boot_spec: &VmSpec,
    device: &str,
) -> Result<Option<String>, LiveError> {
    match boot_spec.machine {
        Machine::Pc => Ok(None),
        Machine::Q35 => free_root_port(qmp)
            .await?
            .map(Some)
            .ok_or_else(|| LiveError::NoFreeSlot {
                device: device.to_owned(),
            }),
    }
}

/// The lowest-numbered `port<n>` with no device on its bus (a device being unplugged still
/// holds its port).
async fn free_root_port(qmp: &Qmp) -> Result<Option<String>, LiveError> {
    let peripherals = peripherals(qmp).await?;
    let mut ports: Vec<(u32, &str)> = peripherals
        .iter()
        .filter(|(_, kind)| kind.as_str() == "pcie-root-port")
        .filter_map(|(id, _)| Some((id.strip_prefix("port")?.parse().ok()?, id.as_str())))
        .collect();
    ports.sort();
    let mut used = Vec::new();
    for (id, kind) in &peripherals {
        if kind != "pcie-root-port" && kind.ends_with("-pci") {
            let bus: String = qmp.qom_get(&device_path(id), "parent_bus").await?;
            used.push(bus.rsplit('/').next().unwrap_or_default().to_owned());
        }
    }
    Ok(ports
        .into_iter()
        .find(|(_, port)| !used.iter().any(|u| u == port))
        .map(|(_, port)| port.to_owned()))
}

fn ignore_not_found(result: Result<(), QmpError>) -> Result<(), LiveError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(e.into()),
        _ => Ok(()),
    }
}
