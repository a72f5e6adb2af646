//! What `plasmavmc status` shows: per VM its state, process, devices as QEMU reports them, pending
//! changes and last error; plus strangers (QEMUs the agent will not touch) and the config's health.
//!
//! Plain data (the `status --json` format) and its human rendering. Pure: the daemon fills it.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::action::{PendingChange, RefusedChange};
use crate::ids;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostStatus {
    pub vms: BTreeMap<String, VmStatus>,
    /// Live QEMUs in the run dir the agent cannot prove are its own; never touched.
    #[serde(default)]
    pub strangers: Vec<Stranger>,
    pub config: ConfigStatus,
    /// Set while the host is cordoned (`plasmavmc evacuate` or `cordon`, until `uncordon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordon: Option<Cordon>,
    /// The last `plasmavmc evacuate` of this agent: where each VM went, or why it stayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<crate::evacuation::Evacuation>,
}

/// Why and since when the host is closed to HA VMs coming from elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cordon {
    /// When it was cordoned (RFC 3339).
    pub since: String,
    /// What cordoned it: `evacuate`, `cordon`, or why an unreadable cordon file counts as one.
    pub by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    pub path: String,
    /// Why the file as it is now was refused; the agent keeps acting on the last valid one (or,
    /// if none was ever valid, leaves every VM exactly as it is).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    Failed,
    /// A QEMU of this VM runs that the agent cannot manage now (`stateReason` says why): it is
    /// left alone and nothing is started beside it; `plasmavmc stop --force` kills it.
    Unresponsive,
    /// Its state is being written to a managed save.
    Saving,
    /// No QEMU; a managed save holds the VM, and its next start restores it.
    Saved,
    /// Moving to (or arriving from) another host: `migration` says how far.
    Migrating,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Failed => "failed",
            VmState::Unresponsive => "unresponsive",
            VmState::Saving => "saving",
            VmState::Saved => "saved",
            VmState::Migrating => "migrating",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    pub state: VmState,
    /// Why the VM is in its state, where that needs saying (`unresponsive`: what is wrong).
    #[serde(default)]
    pub state_reason: Option<String>,
    /// QEMU's PID while it runs.
    pub pid: Option<u32>,
    /// The PID of the fence guard QEMU runs under (HA VMs with ChainFire).
    #[serde(default)]
    pub fence_guard: Option<u32>,
    /// Since the agent launched (or, for an adopted VM, first saw) this QEMU.
    pub uptime_seconds: Option<u64>,
    /// False for a VM that runs but is no longer declared (it is being stopped).
    pub declared: bool,
    /// Devices QEMU has right now (read when status was asked).
    pub devices: Vec<Device>,
    /// Device ids the guest was asked to release and has not yet.
    pub unplugging: Vec<String>,
    /// Declared changes waiting for the VM's next start.
    pub pending: Vec<PendingChange>,
    /// Declared changes refused as destructive (a disk shrink); never applied.
    #[serde(default)]
    pub refused: Vec<RefusedChange>,
    /// Disks as QEMU has them now, by declared id.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskStatus>,
    pub last_error: Option<String>,
    /// Set while the VM is kept down: by the operator, by its restart policy, or backing off.
    pub held_down: Option<String>,
    /// How often the agent restarted it after QEMU went away (restart policy).
    pub restarts: u32,
    /// The managed save its next start restores (state `saved`).
    #[serde(default)]
    pub saved: Option<String>,
    /// Saves that could not be restored, kept for the operator: `PATH: REASON` each.
    #[serde(default)]
    pub unrestorable_saves: Vec<String>,
    /// A move in flight (state `migrating`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::migration::MigrationProgress>,
    /// The disks a move would copy (those not declared `shared`), when there are any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_copies: Option<String>,
    /// What `ha.preferredHosts` asks of this VM, when it asks for a move: where to, and when or
    /// why not yet.
    #[serde(default)]
    pub placement: Option<String>,
}

impl VmStatus {
    /// A VM with no QEMU process.
    pub fn stopped(declared: bool) -> VmStatus {
        VmStatus {
            state: VmState::Stopped,
            state_reason: None,
            pid: None,
            fence_guard: None,
            uptime_seconds: None,
            declared,
            devices: Vec::new(),
            unplugging: Vec::new(),
            pending: Vec::new(),
            refused: Vec::new(),
            disks: BTreeMap::new(),
            last_error: None,
            held_down: None,
            restarts: 0,
            saved: None,
            unrestorable_saves: Vec::new(),
            migration: None,
            migration_copies: None,
            placement: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// QEMU's device id (`disk-data`, `nic-eth0`, `vcpu-1-0-0`, `mem0`, `port3`).
    pub id: String,
    /// `disk`, `nic`, `vcpu`, `memory`, `slot` (a PCIe root port) or `other`.
    pub kind: String,
    /// QEMU's device type (`virtio-blk-pci`, ...).
    pub qom_type: String,
}

/// A plugged disk: its image and the size QEMU reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    pub path: String,
    /// The image's virtual size, in MiB (rounded up).
    #[serde(rename = "sizeMiB")]
    pub size_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stranger {
    pub name: String,
    /// The PID its pidfile names, if any.
    pub pid: Option<u32>,
    pub reason: String,
}

impl Device {
    /// Whether a device of this QOM type is worth listing (PCIe root ports are plumbing).
    pub fn is_listed(qom_type: &str) -> bool {
        qom_type != "pcie-root-port"
    }

    pub fn from_qom(id: &str, qom_type: &str) -> Device {
        let kind = if ids::parse_disk_device(id).is_some() {
            "disk"
        } else if ids::parse_nic_device(id).is_some() {
            "nic"
        } else if id.starts_with("vcpu-") {
            "vcpu"
        } else if id == ids::VIRTIO_MEM_DEVICE {
            "memory"
        } else if qom_type == "pcie-root-port" {
            "slot"
        } else {
            "other"
        };
        Device {
            id: id.to_owned(),
            kind: kind.to_owned(),
            qom_type: qom_type.to_owned(),
        }
    }
}

/// The human view: one table row per VM, then what needs explaining under it.
pub fn render(status: &HostStatus) -> String {
    let mut out = String::new();
    if let Some(error) = &status.config.error {
        let _ = writeln!(
            out,
            "config {} refused (the agent keeps acting on the last valid one, if any; \
             running VMs are left as they are):\n{}\n",
            status.config.path,
            indent(error, "  ")
        );
    }
    if let Some(cordon) = &status.cordon {
        let _ = writeln!(
            out,
            "host CORDONED since {} ({}): no HA VM is failed over, migrated or started here; \
             `plasmavmc uncordon` opens it\n",
            cordon.since, cordon.by
        );
    }
    if let Some(evacuation) = &status.evacuation {
        let _ = writeln!(
            out,
            "evacuation started {}{}:\n{}",
            evacuation.started_at,
            if evacuation.finished {
                ", finished"
            } else {
                ""
            },
            evacuation.render()
        );
    }
    if status.vms.is_empty() {
        out.push_str("no VMs\n");
    } else {
        out.push_str(&table(status));
    }
    for stranger in &status.strangers {
        let pid = stranger
            .pid
            .map_or(String::new(), |pid| format!(" (pid {pid})"));
        let _ = writeln!(
            out,
            "stranger {}{pid}: {} (not touched)",
            stranger.name, stranger.reason
        );
    }
    out
}

fn table(status: &HostStatus) -> String {
    let header = [
        "NAME", "STATE", "PID", "UPTIME", "DISKS", "NICS", "VCPUS+", "PENDING",
    ];
    let rows: Vec<[String; 8]> = status
        .vms
        .iter()
        .map(|(name, vm)| {
            let of_kind = |kind: &str, parse: fn(&str) -> Option<&str>| {
                let names: Vec<&str> = vm
                    .devices
                    .iter()
                    .filter(|d| d.kind == kind)
                    .map(|d| parse(&d.id).unwrap_or(&d.id))
                    .collect();
                if names.is_empty() {
                    "-".to_owned()
                } else {
                    names.join(",")
                }
            };
            let hot_vcpus = vm.devices.iter().filter(|d| d.kind == "vcpu").count();
            [
                name.clone(),
                vm.state.as_str().to_owned(),
                vm.pid.map_or("-".into(), |pid| pid.to_string()),
                vm.uptime_seconds.map_or("-".into(), duration),
                of_kind("disk", ids::parse_disk_device),
                of_kind("nic", ids::parse_nic_device),
                hot_vcpus.to_string(),
                vm.pending.len().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &header);
    for (row, (_, vm)) in rows.iter().zip(&status.vms) {
        line(&mut out, &row.each_ref().map(String::as_str));
        out.push_str(&details(vm));
    }
    out
}

/// The lines under a VM's row: what an operator needs to know beyond the columns.
fn details(vm: &VmStatus) -> String {
    let mut out = String::new();
    if let Some(reason) = &vm.state_reason {
        let _ = writeln!(out, "  {}: {reason}", vm.state.as_str());
    }
    if !vm.declared {
        out.push_str("  no longer declared: being stopped\n");
    }
    if let Some(reason) = &vm.held_down {
        let _ = writeln!(out, "  kept down: {reason}");
    }
    if let Some(placement) = &vm.placement {
        let _ = writeln!(out, "  placement: {placement}");
    }
    if let Some(guard) = vm.fence_guard {
        let _ = writeln!(
            out,
            "  fence guard: pid {guard} (kills QEMU if the ChainFire lease is not renewed)"
        );
    }
    if vm.restarts > 0 {
        let _ = writeln!(
            out,
            "  restarted {} times by its restart policy",
            vm.restarts
        );
    }
    for device in &vm.unplugging {
        let _ = writeln!(
            out,
            "  unplugging {device}: waiting for the guest to release it (retried)"
        );
    }
    for change in &vm.pending {
        let _ = writeln!(
            out,
            "  pending {}: {} -> {} ({}; applied at the next start)",
            change.field, change.from, change.to, change.reason
        );
    }
    for (id, disk) in &vm.disks {
        let _ = writeln!(out, "  disk {id}: {} MiB, {}", disk.size_mib, disk.path);
    }
    for change in &vm.refused {
        let _ = writeln!(
            out,
            "  REFUSED {}: {} -> {} ({})",
            change.field, change.from, change.to, change.reason
        );
    }
    if let Some(save) = &vm.saved {
        let _ = writeln!(out, "  saved at {save}: its next start restores it");
    }
    for kept in &vm.unrestorable_saves {
        let _ = writeln!(
            out,
            "  unrestorable save (kept; remove it when no longer needed): {kept}"
        );
    }
    if let Some(error) = &vm.last_error {
        let _ = writeln!(out, "  last error: {error}");
    }
    out
}

/// `93784` → `1d2h03m`; `185` → `3m05s`.
pub fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h}h{m:02}m"),
    }
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|line| format!("{prefix}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(devices: &[(&str, &str)]) -> VmStatus {
        VmStatus {
            state: VmState::Running,
            pid: Some(4242),
            uptime_seconds: Some(185),
            devices: devices
                .iter()
                .map(|(id, t)| Device::from_qom(id, t))
                .collect(),
            ..VmStatus::stopped(true)
        }
    }

    #[test]
    fn device_kinds_follow_the_agent_ids() {
        let kinds: Vec<String> = [
            ("disk-data", "virtio-blk-pci"),
            ("nic-eth0", "virtio-net-pci"),
            ("vcpu-1-0-0", "qemu64-x86_64-cpu"),
            ("mem0", "virtio-mem-pci"),
            ("port2", "pcie-root-port"),
            ("serial0", "isa-serial"),
        ]
        .iter()
        .map(|(id, t)| Device::from_qom(id, t).kind)
        .collect();
        assert_eq!(kinds, ["disk", "nic", "vcpu", "memory", "slot", "other"]);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let mut status = HostStatus::default();
        status
            .vms
            .insert("web".into(), running(&[("disk-root", "virtio-blk-pci")]));
        let json = serde_json::to_value(&status).unwrap();
        let vm = &json["vms"]["web"];
        assert_eq!(vm["state"], "running");
        assert_eq!(vm["pid"], 4242);
        assert_eq!(vm["uptimeSeconds"], 185);
        assert_eq!(vm["devices"][0]["id"], "disk-root");
        assert_eq!(vm["devices"][0]["kind"], "disk");
        assert!(vm["pending"].as_array().unwrap().is_empty());
        assert!(vm["lastError"].is_null());
        let back: HostStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    #[test]
    fn table_lists_devices_and_explains_pending_errors_and_holds() {
        let mut web = running(&[
            ("disk-root", "virtio-blk-pci"),
            ("disk-data", "virtio-blk-pci"),
            ("nic-eth0", "virtio-net-pci"),
            ("vcpu-1-0-0", "x"),
            ("port0", "pcie-root-port"),
        ]);
        web.unplugging = vec!["disk-data".into()];
        web.pending = vec![PendingChange {
            vm: "web".into(),
            field: "machine".into(),
            from: "q35".into(),
            to: "pc".into(),
            reason: "boot-time setting".into(),
        }];
        web.disks.insert(
            "data".into(),
            DiskStatus {
                path: "/var/lib/vms/data.qcow2".into(),
                size_mib: 2048,
            },
        );
        web.refused = vec![PendingChange {
            vm: "web".into(),
            field: "disks.data.sizeMiB".into(),
            from: "2048".into(),
            to: "1024".into(),
            reason: "shrinking destroys data".into(),
        }];
        let mut db = running(&[]);
        db.state = VmState::Failed;
        db.pid = None;
        db.uptime_seconds = None;
        db.last_error = Some("QEMU exited unexpectedly".into());
        db.held_down = Some("restarting in 4s".into());
        let mut status = HostStatus::default();
        status.vms.insert("web".into(), web);
        status.vms.insert("db".into(), db);
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAME  STATE    PID   UPTIME  DISKS      NICS  VCPUS+  PENDING"
        );
        assert_eq!(
            lines[1],
            "db    failed   -     -       -          -     0       0"
        );
        assert_eq!(lines[2], "  kept down: restarting in 4s");
        assert_eq!(lines[3], "  last error: QEMU exited unexpectedly");
        assert_eq!(
            lines[4],
            "web   running  4242  3m05s   root,data  eth0  1       1"
        );
        assert!(text.contains("  unplugging disk-data: waiting for the guest"));
        assert!(text.contains(
            "  pending machine: q35 -> pc (boot-time setting; applied at the next start)"
        ));
        assert!(text.contains("  disk data: 2048 MiB, /var/lib/vms/data.qcow2\n"));
        assert!(
            text.contains("  REFUSED disks.data.sizeMiB: 2048 -> 1024 (shrinking destroys data)")
        );
    }

    #[test]
    fn a_refused_config_and_strangers_are_said_first_and_last() {
        let status = HostStatus {
            config: ConfigStatus {
                path: "/etc/plasmavmc/desired.json".into(),
                error: Some("vms.web.vcpus: must be at least 1".into()),
            },
            strangers: vec![Stranger {
                name: "old".into(),
                pid: Some(77),
                reason: "spec.json unreadable".into(),
            }],
            ..HostStatus::default()
        };
        let text = render(&status);
        assert!(text.starts_with("config /etc/plasmavmc/desired.json refused"));
        assert!(text.contains("  vms.web.vcpus: must be at least 1"));
        assert!(text.ends_with("stranger old (pid 77): spec.json unreadable (not touched)\n"));
    }

    #[test]
    fn a_cordoned_host_says_so_first() {
        let status = HostStatus {
            cordon: Some(Cordon {
                since: "2026-01-01T00:00:00Z".into(),
                by: "evacuate".into(),
            }),
            ..HostStatus::default()
        };
        let text = render(&status);
        assert!(
            text.starts_with("host CORDONED since 2026-01-01T00:00:00Z (evacuate)"),
            "{text}"
        );
        assert!(text.contains("plasmavmc uncordon"), "{text}");
    }

    #[test]
    fn a_saved_vm_says_where_and_unrestorable_saves_are_listed() {
        let vm = VmStatus {
            state: VmState::Saved,
            saved: Some("/var/lib/plasmavmc/saved/web".into()),
            unrestorable_saves: vec!["/var/lib/plasmavmc/saved/unrestorable/web-1: bad".into()],
            ..VmStatus::stopped(true)
        };
        let status = HostStatus {
            vms: [("web".to_owned(), vm)].into(),
            ..HostStatus::default()
        };
        let text = render(&status);
        assert!(text.contains("web   saved"), "{text}");
        assert!(text.contains("saved at /var/lib/plasmavmc/saved/web: its next start restores it"));
        assert!(text.contains("unrestorable save (kept; remove it when no longer needed): /var/lib/plasmavmc/saved/unrestorable/web-1: bad"));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(3720), "1h02m");
        assert_eq!(duration(93784), "1d2h03m");
    }
}
