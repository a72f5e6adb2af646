//! The QEMU objects behind declared disks, NICs and virtio-mem, as QMP JSON.
//!
//! One description serves both paths: `argv` renders it as command-line options (cold plug at
//! boot) and the QEMU shell passes it to `blockdev-add` / `netdev_add` / `device_add` (hotplug).
//! So a disk plugged live is the same device as one present since boot, with the same ids.

use serde_json::{json, Map, Value};

use crate::ids;
use crate::spec::{DiskCache, DiskFormat, DiskSpec, NicSpec};

/// What `device_add` takes: driver, id and bus apart, the rest as properties.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProps {
    pub driver: &'static str,
    pub id: String,
    /// `None` lets QEMU pick (the root bus).
    pub bus: Option<String>,
    pub properties: Map<String, Value>,
}

/// What a disk's path is on the host; the shell finds out (`stat`), this module decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBacking {
    /// An image file: QEMU's `file` protocol driver.
    File,
    /// A block device (`/dev/vg0/web-data`): QEMU's `file` driver refuses those, `host_device`
    /// takes them.
    BlockDevice,
}

/// `blockdev-add` options of a disk's protocol node (`disk-<id>-file`).
pub fn disk_file_node(id: &str, disk: &DiskSpec, backing: DiskBacking) -> Value {
    let driver = match backing {
        DiskBacking::File => "file",
        DiskBacking::BlockDevice => "host_device",
    };
    json!({
        "driver": driver,
        "node-name": ids::disk_file_node(id),
        "filename": disk.path,
        "read-only": disk.read_only,
        "cache": node_cache(disk.cache),
    })
}

/// `blockdev-add` options of a disk's format node (`disk-<id>-fmt`), on top of its file node.
pub fn disk_format_node(id: &str, disk: &DiskSpec) -> Value {
    let driver = match disk.format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    };
    json!({
        "driver": driver,
        "node-name": ids::disk_format_node(id),
        "file": ids::disk_file_node(id),
        "read-only": disk.read_only,
        "cache": node_cache(disk.cache),
    })
}

/// The virtio-blk device of a disk. `boot` gives it `bootindex=1` (also when hotplugged, so a
/// replaced boot disk is still booted from after the next reset).
pub fn disk_device(id: &str, disk: &DiskSpec, bus: Option<String>, boot: bool) -> DeviceProps {
    let mut properties = Map::new();
    properties.insert("drive".into(), ids::disk_format_node(id).into());
    properties.insert("write-cache".into(), on_off(device_write_cache(disk.cache)));
    if let Some(serial) = &disk.serial {
        properties.insert("serial".into(), serial.as_str().into());
    }
    if boot {
        properties.insert("bootindex".into(), 1.into());
    }
    DeviceProps {
        driver: "virtio-blk-pci",
        id: ids::disk_device(id),
        bus,
        properties,
    }
}

/// The cloud-init seed's protocol node: the image QEMU reads from descriptor `fd`.
pub fn seed_file_node(fd: std::os::fd::RawFd) -> Value {
    json!({
        "driver": "file",
        "node-name": ids::SEED_FILE_NODE,
        "filename": format!("/dev/fd/{fd}"),
        "read-only": true,
    })
}

pub fn seed_format_node() -> Value {
    json!({
        "driver": "raw",
        "node-name": ids::SEED_FORMAT_NODE,
        "file": ids::SEED_FILE_NODE,
        "read-only": true,
    })
}

/// The seed disk: serial `cidata`, on the root bus (QEMU picks the slot; never unplugged).
pub fn seed_device() -> DeviceProps {
    let mut properties = Map::new();
    properties.insert("drive".into(), ids::SEED_FORMAT_NODE.into());
    properties.insert("serial".into(), "cidata".into());
    DeviceProps {
        driver: "virtio-blk-pci",
        id: ids::SEED_DEVICE.to_owned(),
        bus: None,
        properties,
    }
}

/// The host tap behind a NIC: the declared one, or the one the agent makes for a bridge.
pub fn nic_tap(vm: &str, id: &str, nic: &NicSpec) -> String {
    nic.tap.clone().unwrap_or_else(|| ids::agent_tap(vm, id))
}

/// `netdev_add` options of a NIC (`net-<id>`): its tap, no scripts (the agent does the wiring).
pub fn nic_netdev(vm: &str, id: &str, nic: &NicSpec) -> Value {
    json!({
        "type": "tap",
        "id": ids::nic_netdev(id),
        "ifname": nic_tap(vm, id, nic),
        "script": "no",
        "downscript": "no",
    })
}

pub fn nic_device(id: &str, nic: &NicSpec, bus: Option<String>) -> DeviceProps {
    let mut properties = Map::new();
    properties.insert("netdev".into(), ids::nic_netdev(id).into());
    properties.insert("mac".into(), nic.mac.to_ascii_lowercase().into());
    DeviceProps {
        driver: "virtio-net-pci",
        id: ids::nic_device(id),
        bus,
        properties,
    }
}

/// `object-add` options of the RAM backing the virtio-mem device (`mem0-ram`).
pub fn virtio_mem_backend(size_mib: u64) -> Value {
    json!({
        "qom-type": "memory-backend-ram",
        "id": ids::VIRTIO_MEM_BACKEND,
        "size": size_mib * MIB,
    })
}

/// The virtio-mem device (`mem0`); it starts with nothing plugged (boot memory is `-m`).
pub fn virtio_mem_device() -> DeviceProps {
    let mut properties = Map::new();
    properties.insert("memdev".into(), ids::VIRTIO_MEM_BACKEND.into());
    DeviceProps {
        driver: "virtio-mem-pci",
        id: ids::VIRTIO_MEM_DEVICE.to_owned(),
        bus: None,
        properties,
    }
}

pub const MIB: u64 = 1024 * 1024;

/// QEMU's `cache=` modes spelled out for `-blockdev`: (direct, no-flush) per node, and the
/// guest-visible write cache on the device.
fn node_cache(cache: DiskCache) -> Value {
    let (direct, no_flush) = match cache {
        DiskCache::None | DiskCache::Directsync => (true, false),
        DiskCache::Writeback | DiskCache::Writethrough => (false, false),
        DiskCache::Unsafe => (false, true),
    };
    json!({"direct": direct, "no-flush": no_flush})
}

/// The cache mode back from what QEMU reports (format node `cache.direct`/`cache.no-flush`,
/// device `write-cache`), for observation. The inverse of `node_cache` + `device_write_cache`.
pub fn cache_mode(direct: bool, no_flush: bool, write_cache: bool) -> DiskCache {
    match (direct, no_flush, write_cache) {
        (_, true, _) => DiskCache::Unsafe,
        (true, _, true) => DiskCache::None,
        (true, _, false) => DiskCache::Directsync,
        (false, _, true) => DiskCache::Writeback,
        (false, _, false) => DiskCache::Writethrough,
    }
}

fn device_write_cache(cache: DiskCache) -> bool {
    !matches!(cache, DiskCache::Writethrough | DiskCache::Directsync)
}

fn on_off(on: bool) -> Value {
    if on { "on" } else { "off" }.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn disk(cache: DiskCache) -> DiskSpec {
        DiskSpec {
            path: PathBuf::from("/img/a.qcow2"),
            format: DiskFormat::Qcow2,
            read_only: true,
            cache,
            serial: Some("S1".into()),
            size_mib: None,
            create: None,
            delete_on_remove: false,
            shared: false,
        }
    }

    #[test]
    fn disk_nodes_chain_file_then_format_with_deterministic_names() {
        let d = disk(DiskCache::None);
        assert_eq!(
            disk_file_node("data", &d, DiskBacking::File),
            json!({"driver": "file", "node-name": "disk-data-file", "filename": "/img/a.qcow2",
                   "read-only": true, "cache": {"direct": true, "no-flush": false}})
        );
        assert_eq!(
            disk_format_node("data", &d),
            json!({"driver": "qcow2", "node-name": "disk-data-fmt", "file": "disk-data-file",
                   "read-only": true, "cache": {"direct": true, "no-flush": false}})
        );
    }

    #[test]
    fn a_block_device_gets_the_host_device_driver() {
        let node = disk_file_node("data", &disk(DiskCache::None), DiskBacking::BlockDevice);
        assert_eq!(node["driver"], "host_device");
        assert_eq!(node["filename"], "/img/a.qcow2");
    }

    #[test]
    fn cache_modes_map_to_node_and_device_settings() {
        for (cache, direct, no_flush, write_cache) in [
            (DiskCache::Writeback, false, false, "on"),
            (DiskCache::None, true, false, "on"),
            (DiskCache::Writethrough, false, false, "off"),
            (DiskCache::Directsync, true, false, "off"),
            (DiskCache::Unsafe, false, true, "on"),
        ] {
            let d = disk(cache);
            assert_eq!(
                disk_file_node("x", &d, DiskBacking::File)["cache"],
                json!({"direct": direct, "no-flush": no_flush})
            );
            assert_eq!(
                disk_device("x", &d, None, false).properties["write-cache"],
                write_cache
            );
            assert_eq!(cache_mode(direct, no_flush, write_cache == "on"), cache);
        }
    }

    #[test]
    fn disk_device_carries_serial_bus_and_bootindex() {
        let dev = disk_device(
            "root",
            &disk(DiskCache::Writeback),
            Some("port3".into()),
            true,
        );
        assert_eq!(dev.driver, "virtio-blk-pci");
        assert_eq!(dev.id, "disk-root");
        assert_eq!(dev.bus.as_deref(), Some("port3"));
        assert_eq!(dev.properties["drive"], "disk-root-fmt");
        assert_eq!(dev.properties["serial"], "S1");
        assert_eq!(dev.properties["bootindex"], 1);
        assert!(
            !disk_device("root", &disk(DiskCache::Writeback), None, false)
                .properties
                .contains_key("bootindex")
        );
    }

    #[test]
    fn nic_uses_declared_tap_or_agent_tap() {
        let bridged = NicSpec {
            mac: "52:54:00:AA:00:01".into(),
            bridge: Some("br0".into()),
            tap: None,
        };
        let tapped = NicSpec {
            mac: "52:54:00:aa:00:02".into(),
            bridge: None,
            tap: Some("tap7".into()),
        };
        assert_eq!(
            nic_netdev("web", "eth0", &bridged)["ifname"],
            ids::agent_tap("web", "eth0")
        );
        assert_eq!(
            nic_netdev("web", "eth1", &tapped),
            json!({"type": "tap", "id": "net-eth1", "ifname": "tap7", "script": "no", "downscript": "no"})
        );
        let dev = nic_device("eth0", &bridged, None);
        assert_eq!(
            (dev.driver, dev.id.as_str()),
            ("virtio-net-pci", "nic-eth0")
        );
        assert_eq!(dev.properties["mac"], "52:54:00:aa:00:01");
        assert_eq!(dev.properties["netdev"], "net-eth0");
    }

    #[test]
    fn virtio_mem_backend_is_sized_in_bytes() {
        assert_eq!(virtio_mem_backend(512)["size"], 512 * MIB);
        assert_eq!(virtio_mem_device().properties["memdev"], "mem0-ram");
    }
}
