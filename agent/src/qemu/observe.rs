//! Reads a VM's state back from QEMU: devices, block nodes, netdevs, vCPUs, memory.
//!
//! Only QEMU's answers count. Devices are recognised by the deterministic ids in `ids`, so
//! whatever the agent made (on the command line or hotplugged, before or after a crash) maps
//! back to a declared disk or NIC; anything else QEMU has is ignored.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};

use super::qmp::{raw::BlockNode, Qmp};
use super::tap;
use crate::observed::{ObservedDisk, ObservedMemory, ObservedNic, ObservedVm};
use crate::spec::{DiskFormat, VmSpec};
use crate::{devices, ids};

const PERIPHERAL: &str = "/machine/peripheral";
const MIB: u64 = 1024 * 1024;

/// A device with an id (`-device id=..` or `device_add id=..`), by id: its QOM type.
pub type Peripherals = BTreeMap<String, String>;

/// Observes one VM. `unplugging` is left empty: only the daemon knows which `device_del`s it
/// issued that the guest has not answered yet.
pub async fn observe(qmp: &Qmp, pid: u32, boot_spec: VmSpec) -> Result<ObservedVm> {
    let peripherals = peripherals(qmp).await?;
    let nodes = qmp
        .query_named_block_nodes()
        .await
        .context("query-named-block-nodes")?;
    let netdevs = qmp.netdevs().await.context("info network")?;

    let mut disks = BTreeMap::new();
    let mut nics = BTreeMap::new();
    for id in peripherals.keys() {
        if let Some(disk) = ids::parse_disk_device(id) {
            disks.insert(disk.to_owned(), observe_disk(qmp, id, &nodes).await?);
        } else if let Some(nic) = ids::parse_nic_device(id) {
            nics.insert(nic.to_owned(), observe_nic(qmp, id, &netdevs).await?);
        }
    }
    let orphan_block_nodes = nodes
        .iter()
        .filter_map(|node| node.node_name.as_deref())
        .filter(|name| ids::parse_disk_node(name).is_some_and(|disk| !disks.contains_key(disk)))
        .map(str::to_owned)
        .collect();
    let orphan_netdevs = netdevs
        .keys()
        .filter(|name| ids::parse_nic_netdev(name).is_some_and(|nic| !nics.contains_key(nic)))
        .cloned()
        .collect();

    let status = qmp.query_status().await.context("query-status")?;
    let vcpus = qmp
        .query_hotpluggable_cpus()
        .await
        .context("query-hotpluggable-cpus")?
        .iter()
        .filter(|cpu| cpu.qom_path.is_some())
        .map(|cpu| cpu.vcpus_count as u32)
        .sum();
    let memory = observe_memory(qmp, &peripherals).await?;

    Ok(ObservedVm {
        pid,
        boot_spec,
        paused: !status.running,
        disks,
        nics,
        orphan_block_nodes,
        orphan_netdevs,
        vcpus,
        memory,
        unplugging: BTreeSet::new(),
        limits: None, // the cgroup's, read by the caller (`cgroup::read_limits`)
    })
}

/// Every device that has an id, with its type (from `qom-list /machine/peripheral`).
pub async fn peripherals(qmp: &Qmp) -> Result<Peripherals> {
    let children = qmp
        .qom_list(PERIPHERAL)
        .await
        .context("qom-list /machine/peripheral")?;
    Ok(children
        .into_iter()
        .filter_map(|prop| {
            let kind = prop.type_.strip_prefix("child<")?.strip_suffix('>')?;
            Some((prop.name, kind.to_owned()))
        })
        .collect())
}

/// QOM path of a device with an id.
pub fn device_path(id: &str) -> String {
    format!("{PERIPHERAL}/{id}")
}

async fn observe_disk(qmp: &Qmp, device: &str, nodes: &[BlockNode]) -> Result<ObservedDisk> {
    let path = device_path(device);
    let drive: String = qmp.qom_get(&path, "drive").await?;
    let node = nodes
        .iter()
        .find(|node| node.node_name.as_deref() == Some(drive.as_str()))
        .with_context(|| format!("device {device}: its block node {drive} is not listed"))?;
    let format = match node.drv.as_str() {
        "qcow2" => DiskFormat::Qcow2,
        "raw" => DiskFormat::Raw,
        other => anyhow::bail!("device {device}: unexpected block driver {other}"),
    };
    // OnOffAuto: "on", "off" or "auto" (= on for virtio-blk).
    let write_cache = qmp.qom_get::<String>(&path, "write-cache").await? != "off";
    let serial: String = qmp.qom_get(&path, "serial").await?;
    Ok(ObservedDisk {
        path: node.file.clone().into(),
        format,
        read_only: node.ro,
        cache: devices::cache_mode(node.cache.direct, node.cache.no_flush, write_cache),
        serial: Some(serial).filter(|s| !s.is_empty()),
        cold_plugged: !qmp.qom_get::<bool>(&path, "hotplugged").await?,
        size_bytes: node.image.virtual_size,
        // The daemon fills this in from the previous declaration: QEMU does not know it.
        delete_on_remove: false,
    })
}

async fn observe_nic(
    qmp: &Qmp,
    device: &str,
    netdevs: &BTreeMap<String, super::qmp::Netdev>,
) -> Result<ObservedNic> {
    let path = device_path(device);
    let mac: String = qmp.qom_get(&path, "mac").await?;
    let netdev: String = qmp.qom_get(&path, "netdev").await?;
    let tap = netdevs
        .get(&netdev)
        .and_then(|n| n.ifname.clone())
        .unwrap_or_default();
    Ok(ObservedNic {
        mac,
        bridge: tap::bridge_of(&tap),
        tap,
        cold_plugged: !qmp.qom_get::<bool>(&path, "hotplugged").await?,
    })
}

async fn observe_memory(qmp: &Qmp, peripherals: &Peripherals) -> Result<ObservedMemory> {
    let summary = qmp
        .query_memory_size_summary()
        .await
        .context("query-memory-size-summary")?;
    let (requested, plugged) = if peripherals.contains_key(ids::VIRTIO_MEM_DEVICE) {
        let path = device_path(ids::VIRTIO_MEM_DEVICE);
        (
            qmp.qom_get::<u64>(&path, "requested-size").await?,
            qmp.qom_get::<u64>(&path, "size").await?,
        )
    } else {
        (0, 0)
    };
    Ok(ObservedMemory {
        boot_mib: summary.base_memory / MIB,
        requested_mib: requested / MIB,
        plugged_mib: plugged / MIB,
    })
}
