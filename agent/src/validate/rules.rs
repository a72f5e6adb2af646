//! Semantic rules serde cannot express: names, ranges, references, and uniqueness across VMs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::names::{is_valid_device_id, is_valid_ifname, is_valid_vm_name, parse_mac};
use super::provisioning;
use super::structure::render_path;
use super::{Problem, ResolvePaths};
use crate::ids;
use crate::spec::{DesiredState, DiskSpec, Machine, NicSpec, VmSpec, SCHEMA_VERSION};

/// q35 accepts 288 and pc 255 with TCG; 255 is safe on both without an IOMMU.
pub const MAX_VCPUS: u32 = 255;
/// Below this even a tiny kernel does not boot.
pub const MIN_MEMORY_MIB: u64 = 16;
/// 16 TiB: far above any host here, low enough that no size arithmetic can overflow.
pub const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;
/// virtio-mem's block size on x86 (QEMU's default: the THP size, 2 MiB): the device's size and
/// requested size must be multiples of it.
pub const VIRTIO_MEM_BLOCK_MIB: u64 = 2;
/// Free PCIe root ports reserved at boot (q35).
pub const MAX_HOTPLUG_SLOTS: u32 = 32;
/// Disks plus NICs per VM. q35 packs 8 root ports per slot of pcie.0, so this is about bounds,
/// not space; pc puts each device on its own slot of pci.0 (32 slots, 2 taken, 1 for virtio-mem).
pub const MAX_DEVICES_Q35: usize = 64;
pub const MAX_DEVICES_PC: usize = 28;
/// cgroup v2's `cpu.weight` range.
pub const CPU_WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// 1% of one CPU up to 1024 CPUs.
pub const CPU_QUOTA_PERCENT_RANGE: std::ops::RangeInclusive<u32> = 1..=102_400;
/// virtio-blk serial numbers are at most 20 bytes.
const MAX_SERIAL_LEN: usize = 20;
/// x86 `COMMAND_LINE_SIZE` (2048) less the final NUL; the agent adds nothing to `cmdline`.
pub const MAX_CMDLINE_BYTES: usize = 2047;

pub(super) fn check(
    state: &DesiredState,
    broken_vms: &BTreeSet<String>,
    paths: &dyn ResolvePaths,
    out: &mut Vec<Problem>,
) {
    let mut report = Report { out };
    if state.version != SCHEMA_VERSION {
        report.at(
            &["version"],
            format!(
                "unsupported version {} (this agent reads version {SCHEMA_VERSION})",
                state.version
            ),
        );
    }
    let sound: Vec<(&String, &VmSpec)> = state
        .vms
        .iter()
        .filter(|(name, _)| !broken_vms.contains(*name))
        .collect();
    for (name, vm) in &sound {
        check_vm(&mut report, name, vm);
    }
    check_unique_macs(&mut report, &sound);
    check_unique_taps(&mut report, &sound);
    check_exclusive_images(&mut report, &sound, paths);
}

pub(super) struct Report<'a> {
    out: &'a mut Vec<Problem>,
}

impl Report<'_> {
    pub(super) fn at(&mut self, path: &[&str], message: impl Into<String>) {
        self.out.push(Problem {
            path: render_path(path),
            message: message.into(),
        });
    }
}

fn check_vm(report: &mut Report, name: &str, vm: &VmSpec) {
    let at = |field| vm_field(name, field);
    if !is_valid_vm_name(name) {
        report.at(
            &["vms", name],
            "VM name must match ^[a-z][a-z0-9-]{0,31}$ (it names a directory, a systemd unit and QEMU ids)",
        );
    }
    check_cpus(report, name, vm);
    check_memory(report, name, vm);
    check_limits(report, name, vm);
    check_boot(report, name, vm);
    for (id, disk) in &vm.disks {
        check_disk(report, &["vms", name, "disks", id], disk);
        provisioning::check_disk(report, name, id, disk);
    }
    provisioning::check_credentials(report, name, vm);
    if let Some(cloud_init) = &vm.cloud_init {
        provisioning::check_cloud_init(report, name, cloud_init);
    }
    check_unique_serials(report, name, vm);
    check_preferred_hosts(report, name, vm);
    for (id, nic) in &vm.nics {
        check_nic(report, &["vms", name, "nics", id], nic);
    }
    if vm.hotplug_slots > MAX_HOTPLUG_SLOTS {
        report.at(&at("hotplugSlots"), format!("at most {MAX_HOTPLUG_SLOTS}"));
    }
    let (devices, max_devices) = (
        vm.disks.len() + vm.nics.len(),
        match vm.machine {
            Machine::Q35 => MAX_DEVICES_Q35,
            Machine::Pc => MAX_DEVICES_PC,
        },
    );
    if devices > max_devices {
        report.at(
            &["vms", name],
            format!("{devices} disks and NICs; at most {max_devices} on this machine type"),
        );
    }
    for (field, value) in [("orgId", &vm.org_id), ("projectId", &vm.project_id)] {
        if value.is_empty()
            || value
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            report.at(
                &at(field),
                "must be non-empty, without '/', whitespace or control characters",
            );
        }
    }
}

/// `ha.preferredHosts`: host ids as `--host-id` takes them, each once, on an HA VM (a VM
/// declared on one host only has nowhere to move).
fn check_preferred_hosts(report: &mut Report, name: &str, vm: &VmSpec) {
    let hosts = &vm.ha.preferred_hosts;
    let at = ["vms", name, "ha", "preferredHosts"];
    if !hosts.is_empty() && !vm.ha.enable {
        report.at(
            &at,
            "needs ha.enable: only an HA VM (declared on several hosts) can be placed, \
             by moving it live",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, host) in hosts.iter().enumerate() {
        let index = i.to_string();
        let at = ["vms", name, "ha", "preferredHosts", &index];
        if host.is_empty()
            || host
                .chars()
                .any(|c| c == '/' || c.is_whitespace() || c.is_control())
        {
            report.at(
                &at,
                format!("{host:?} is no host id (non-empty, without '/', whitespace or control characters)"),
            );
        } else if !seen.insert(host) {
            report.at(&at, format!("{host} is listed twice"));
        }
    }
}

fn vm_field<'a>(name: &'a str, field: &'a str) -> [&'a str; 3] {
    ["vms", name, field]
}

fn check_cpus(report: &mut Report, name: &str, vm: &VmSpec) {
    let at = |field| vm_field(name, field);
    if !(1..=MAX_VCPUS).contains(&vm.vcpus) {
        report.at(&at("vcpus"), format!("must be between 1 and {MAX_VCPUS}"));
    }
    if let Some(max) = vm.max_vcpus {
        if max < vm.vcpus {
            report.at(
                &at("maxVcpus"),
                format!("{max} is below vcpus ({})", vm.vcpus),
            );
        } else if max > MAX_VCPUS {
            report.at(&at("maxVcpus"), format!("at most {MAX_VCPUS}"));
        }
    }
}

fn check_memory(report: &mut Report, name: &str, vm: &VmSpec) {
    let at = |field| vm_field(name, field);
    let range = MIN_MEMORY_MIB..=MAX_MEMORY_MIB;
    if !range.contains(&vm.memory_mib) {
        report.at(
            &at("memoryMiB"),
            format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"),
        );
    }
    let Some(max) = vm.max_memory_mib else {
        return;
    };
    if max < vm.memory_mib {
        report.at(
            &at("maxMemoryMiB"),
            format!("{max} is below memoryMiB ({})", vm.memory_mib),
        );
    } else if max > MAX_MEMORY_MIB {
        report.at(&at("maxMemoryMiB"), format!("at most {MAX_MEMORY_MIB}"));
    }
    for (field, value) in [("memoryMiB", vm.memory_mib), ("maxMemoryMiB", max)] {
        if value % VIRTIO_MEM_BLOCK_MIB != 0 {
            report.at(
                &at(field),
                format!(
                    "must be a multiple of {VIRTIO_MEM_BLOCK_MIB} MiB when maxMemoryMiB is set \
                     (virtio-mem block size)"
                ),
            );
        }
    }
}

fn check_limits(report: &mut Report, name: &str, vm: &VmSpec) {
    let at = |field| ["vms", name, "limits", field];
    let limits = &vm.limits;
    let ranges = [
        (
            "cpuWeight",
            limits.cpu_weight,
            CPU_WEIGHT_RANGE,
            "cgroup cpu.weight",
        ),
        (
            "cpuQuotaPercent",
            limits.cpu_quota_percent,
            CPU_QUOTA_PERCENT_RANGE,
            "percent of one host CPU",
        ),
    ];
    for (field, value, range, what) in ranges {
        if value.is_some_and(|v| !range.contains(&v)) {
            report.at(
                &at(field),
                format!(
                    "must be between {} and {} ({what})",
                    range.start(),
                    range.end()
                ),
            );
        }
    }
    if let Some(max) = limits.memory_max_mib {
        let guest = vm.effective_max_memory_mib();
        if max <= guest {
            report.at(
                &at("memoryMaxMiB"),
                format!(
                    "{max} MiB leaves no room for the guest's {guest} MiB of RAM plus QEMU's \
                     own memory: the kernel would kill QEMU once the guest uses its RAM"
                ),
            );
        } else if max > MAX_MEMORY_MIB * 2 {
            report.at(
                &at("memoryMaxMiB"),
                format!("at most {}", MAX_MEMORY_MIB * 2),
            );
        }
    }
}

fn check_boot(report: &mut Report, name: &str, vm: &VmSpec) {
    let at = |field| vm_field(name, field);
    match (&vm.kernel, &vm.boot_disk) {
        (None, None) => report.at(
            &["vms", name],
            "declare how it boots: `kernel` or `bootDisk`",
        ),
        (Some(_), Some(_)) => report.at(
            &at("bootDisk"),
            "set either `kernel` or `bootDisk`, not both",
        ),
        (None, Some(disk)) if !vm.disks.contains_key(disk) => report.at(
            &at("bootDisk"),
            format!("names no disk of this VM: {disk:?} is not in vms.{name}.disks"),
        ),
        _ => {}
    }
    if vm.kernel.is_none() {
        for (field, set) in [
            ("initrd", vm.initrd.is_some()),
            ("cmdline", vm.cmdline.is_some()),
        ] {
            if set {
                report.at(&at(field), "only used with `kernel` (direct kernel boot)");
            }
        }
    }
    for (field, path) in [
        ("kernel", &vm.kernel),
        ("initrd", &vm.initrd),
        ("firmware", &vm.firmware),
    ] {
        if let Some(path) = path {
            check_host_path(report, &at(field), path);
        }
    }
    if let Some(cmdline) = &vm.cmdline {
        if cmdline.chars().any(char::is_control) {
            report.at(&at("cmdline"), "must not contain control characters");
        }
        if cmdline.len() > MAX_CMDLINE_BYTES {
            report.at(
                &at("cmdline"),
                format!(
                    "{} bytes; the kernel takes at most {MAX_CMDLINE_BYTES} \
                     (x86 COMMAND_LINE_SIZE, 2048 with the final NUL)",
                    cmdline.len()
                ),
            );
        }
    }
}

fn check_disk(report: &mut Report, path: &[&str; 4], disk: &DiskSpec) {
    if !is_valid_device_id(path[3]) {
        report.at(
            path,
            "disk id must match ^[a-z][a-z0-9-]{0,19}$ (it is part of QEMU ids)",
        );
    }
    check_host_path(
        report,
        &[path[0], path[1], path[2], path[3], "path"],
        &disk.path,
    );
    if let Some(serial) = &disk.serial {
        let printable = serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if serial.is_empty() || serial.len() > MAX_SERIAL_LEN || !printable || serial.contains(',')
        {
            report.at(
                &[path[0], path[1], path[2], path[3], "serial"],
                format!("must be 1 to {MAX_SERIAL_LEN} printable ASCII characters without ','"),
            );
        }
    }
}

fn check_nic(report: &mut Report, path: &[&str; 4], nic: &NicSpec) {
    let field = |name: &'static str| [path[0], path[1], path[2], path[3], name];
    if !is_valid_device_id(path[3]) {
        report.at(
            path,
            "NIC id must match ^[a-z][a-z0-9-]{0,19}$ (it is part of QEMU ids)",
        );
    }
    match parse_mac(&nic.mac) {
        None => report.at(
            &field("mac"),
            "not a MAC address (expected xx:xx:xx:xx:xx:xx)",
        ),
        Some(octets) if octets == [0; 6] => {
            report.at(&field("mac"), "the all-zero MAC address is not usable")
        }
        Some(octets) if octets[0] & 1 == 1 => report.at(&field("mac"), "not a unicast MAC address"),
        Some(_) => {}
    }
    match (&nic.bridge, &nic.tap) {
        (None, None) => report.at(
            path,
            "declare `bridge` (the agent makes the tap) or `tap` (an existing one)",
        ),
        (Some(_), Some(_)) => report.at(&field("tap"), "set either `bridge` or `tap`, not both"),
        _ => {}
    }
    for (name, ifname) in [("bridge", &nic.bridge), ("tap", &nic.tap)] {
        match ifname {
            Some(ifname) if !is_valid_ifname(ifname) => report.at(
                &field(name),
                "not a valid interface name (1 to 15 of A-Z a-z 0-9 _ . -)",
            ),
            _ => {}
        }
    }
    if nic.tap.as_deref().is_some_and(ids::is_agent_tap) {
        report.at(
            &field("tap"),
            "names of the form pv<12 hex> are reserved for taps the agent makes",
        );
    }
}

pub(super) fn check_host_path(report: &mut Report, at: &[&str], path: &Path) {
    let text = path.to_string_lossy();
    if !path.is_absolute() {
        report.at(at, "must be an absolute path");
    } else if text.chars().any(char::is_control) {
        report.at(at, "must not contain control characters");
    }
}

/// The guest finds disks by serial (`/dev/disk/by-id/virtio-<serial>`): one serial, one disk.
fn check_unique_serials(report: &mut Report, name: &str, vm: &VmSpec) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (id, disk) in &vm.disks {
        let Some(serial) = disk.serial.as_deref() else {
            continue;
        };
        match seen.get(serial) {
            Some(first) => report.at(
                &["vms", name, "disks", id, "serial"],
                format!(
                    "also the serial of {}",
                    render_path(&["vms", name, "disks", first])
                ),
            ),
            None => {
                seen.insert(serial, id);
            }
        }
    }
}

/// Two NICs with one MAC on one segment break both; unique across the whole host.
fn check_unique_macs(report: &mut Report, vms: &[(&String, &VmSpec)]) {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (vm_name, vm) in vms {
        for (id, nic) in &vm.nics {
            let here = render_path(&["vms", vm_name, "nics", id]);
            if let Some(first) = seen.get(&nic.mac.to_ascii_lowercase()) {
                report.at(
                    &["vms", vm_name, "nics", id, "mac"],
                    format!("also used by {first}"),
                );
            } else {
                seen.insert(nic.mac.to_ascii_lowercase(), here);
            }
        }
    }
}

fn check_unique_taps(report: &mut Report, vms: &[(&String, &VmSpec)]) {
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    for (vm_name, vm) in vms {
        for (id, nic) in &vm.nics {
            let Some(tap) = nic.tap.as_deref() else {
                continue;
            };
            if let Some(first) = seen.get(tap) {
                report.at(
                    &["vms", vm_name, "nics", id, "tap"],
                    format!("also used by {first}"),
                );
            } else {
                seen.insert(tap, render_path(&["vms", vm_name, "nics", id]));
            }
        }
    }
}

/// A writable image attached twice gets corrupted; read-only images may be shared. Paths are
/// compared where they lead (symlinks, `..`), not as written.
fn check_exclusive_images(
    report: &mut Report,
    vms: &[(&String, &VmSpec)],
    paths: &dyn ResolvePaths,
) {
    let mut users: BTreeMap<PathBuf, Vec<(String, &Path, bool)>> = BTreeMap::new();
    for (vm_name, vm) in vms {
        for (id, disk) in &vm.disks {
            let image = paths
                .canonical(&disk.path)
                .unwrap_or_else(|| disk.path.clone());
            users.entry(image).or_default().push((
                render_path(&["vms", vm_name, "disks", id]),
                disk.path.as_path(),
                disk.read_only,
            ));
        }
    }
    for (image, users) in users.into_iter().filter(|(_, users)| users.len() > 1) {
        if users.iter().all(|(_, _, read_only)| *read_only) {
            continue;
        }
        let (first, first_path, _) = &users[0];
        for (other, other_path, _) in &users[1..] {
            let via = if other_path == first_path {
                String::new()
            } else {
                format!(
                    " ({} and {} are both {})",
                    first_path.display(),
                    other_path.display(),
                    image.display()
                )
            };
            report.out.push(Problem {
                path: format!("{other}.path"),
                message: format!(
                    "image also used by {first}{via}; a writable image can be attached only once"
                ),
            });
        }
    }
}
