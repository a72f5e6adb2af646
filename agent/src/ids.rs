//! Deterministic QEMU ids and host interface names, derived from declared names only.
//!
//! Because the same declaration always yields the same ids, the agent can re-read QEMU after a
//! crash mid-apply and tell exactly which of its devices, block nodes and netdevs exist: nothing
//! is duplicated, nothing is lost. Parsing is the inverse, so observation maps QEMU's ids back to
//! declared disk and NIC ids.

const DISK_DEVICE: &str = "disk-";
const NIC_DEVICE: &str = "nic-";
const NETDEV: &str = "net-";
const FILE_NODE_SUFFIX: &str = "-file";
const FORMAT_NODE_SUFFIX: &str = "-fmt";

/// `device_add` id of a declared disk.
pub fn disk_device(disk: &str) -> String {
    format!("{DISK_DEVICE}{disk}")
}

/// Protocol (`file`) block node of a declared disk.
pub fn disk_file_node(disk: &str) -> String {
    format!("{DISK_DEVICE}{disk}{FILE_NODE_SUFFIX}")
}

/// Format (`qcow2`/`raw`) block node of a declared disk; the device's `drive`.
pub fn disk_format_node(disk: &str) -> String {
    format!("{DISK_DEVICE}{disk}{FORMAT_NODE_SUFFIX}")
}

pub fn nic_device(nic: &str) -> String {
    format!("{NIC_DEVICE}{nic}")
}

pub fn nic_netdev(nic: &str) -> String {
    format!("{NETDEV}{nic}")
}

/// The declared disk id behind a device id, if the agent made it.
pub fn parse_disk_device(device: &str) -> Option<&str> {
    device.strip_prefix(DISK_DEVICE).filter(|id| !id.is_empty())
}

pub fn parse_nic_device(device: &str) -> Option<&str> {
    device.strip_prefix(NIC_DEVICE).filter(|id| !id.is_empty())
}

/// The declared disk id behind a block node name (file or format node), if the agent made it.
pub fn parse_disk_node(node: &str) -> Option<&str> {
    let rest = node.strip_prefix(DISK_DEVICE)?;
    rest.strip_suffix(FORMAT_NODE_SUFFIX)
        .or_else(|| rest.strip_suffix(FILE_NODE_SUFFIX))
        .filter(|id| !id.is_empty())
}

pub fn parse_nic_netdev(netdev: &str) -> Option<&str> {
    netdev.strip_prefix(NETDEV).filter(|id| !id.is_empty())
}

/// PCIe root port number `n` (q35); ports are plain slots, any free one takes a hotplug.
pub fn root_port(n: u32) -> String {
    format!("port{n}")
}

/// Hotplugged vCPU devices are named by their socket/core/thread position.
pub fn vcpu_device(socket: i64, core: i64, thread: i64) -> String {
    format!("vcpu-{socket}-{core}-{thread}")
}

/// The cloud-init seed disk and its block nodes. Not `disk-`: no declared disk maps to it, so the
/// planner never removes it.
pub const SEED_DEVICE: &str = "seed-cidata";
pub const SEED_FILE_NODE: &str = "seed-cidata-file";
pub const SEED_FORMAT_NODE: &str = "seed-cidata-fmt";

pub const VIRTIO_MEM_DEVICE: &str = "mem0";
pub const VIRTIO_MEM_BACKEND: &str = "mem0-ram";

/// Host tap name the agent creates for a bridged NIC. Linux caps interface names at 15 bytes, so
/// the name is a stable hash of the VM and NIC names: `pv` + 12 hex digits.
pub fn agent_tap(vm: &str, nic: &str) -> String {
    format!(
        "pv{:012x}",
        fnv1a64(format!("{vm}/{nic}").as_bytes()) & 0xffff_ffff_ffff
    )
}

/// Whether a tap name is one `agent_tap` produces (and so the agent may delete it).
pub fn is_agent_tap(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("pv")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A short stable fingerprint of some bytes (8 hex digits), to tell two values apart in plans
/// and ids without showing them.
pub fn fingerprint(bytes: &[u8]) -> String {
    format!("{:08x}", fnv1a64(bytes) as u32)
}

/// FNV-1a: tiny, and stable across Rust releases (std's hasher is not).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_ids_round_trip() {
        assert_eq!(parse_disk_device(&disk_device("data-1")), Some("data-1"));
        assert_eq!(parse_disk_node(&disk_file_node("data-1")), Some("data-1"));
        assert_eq!(parse_disk_node(&disk_format_node("data-1")), Some("data-1"));
        assert_eq!(parse_disk_device("virtio-backend"), None);
        assert_eq!(parse_disk_device("disk-"), None);
    }

    #[test]
    fn nic_ids_round_trip() {
        assert_eq!(parse_nic_device(&nic_device("eth0")), Some("eth0"));
        assert_eq!(parse_nic_netdev(&nic_netdev("eth0")), Some("eth0"));
        assert_eq!(parse_nic_netdev("hostnet0"), None);
    }

    #[test]
    fn agent_taps_fit_ifnamsiz_and_are_stable() {
        let tap = agent_tap("a-very-long-vm-name", "a-very-long-nic-name");
        assert!(tap.len() <= 15, "{tap}");
        assert!(is_agent_tap(&tap));
        assert_eq!(
            tap,
            agent_tap("a-very-long-vm-name", "a-very-long-nic-name")
        );
        assert_ne!(agent_tap("web", "eth0"), agent_tap("web", "eth1"));
        assert!(!is_agent_tap("tap0"));
    }
}
