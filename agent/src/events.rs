//! What happens on this host, as `plasmavmc events` streams it: VMs started, stopped, failed,
//! restarted; devices added and removed; pending changes; HA locks gained and lost; fences.
//!
//! Plain data (one JSON object per line with `--json`) and its human rendering; which event a
//! step of a plan makes. Pure: the daemon stamps the time and sends them (`daemon/journal.rs`).
//! Events are for watching and scripting, not for state: `status` is the truth, and a client
//! that falls behind is told how many it missed.

use serde::{Deserialize, Serialize};

use crate::action::{Action, PendingChange};
use crate::ids;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// When the agent saw it (RFC 3339, UTC).
    pub time: String,
    /// The VM it is about (none for events of the host or the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "camelCase")]
pub enum What {
    /// A QEMU of the VM runs: `how` is `booted`, `restored` (from a managed save) or `adopted`
    /// (found running when the agent started).
    Started { pid: u32, how: String },
    /// Its QEMU is gone on purpose, or the guest shut itself down.
    Stopped { reason: String },
    /// Its QEMU died, or could not be started.
    Failed { reason: String },
    /// Started again: by its restart policy after an exit, or to apply pending changes.
    Restarted { reason: String },
    /// A disk or NIC was plugged (`device` is QEMU's id: `disk-NAME`, `nic-NAME`).
    DeviceAdded { device: String },
    /// A disk or NIC is gone from the guest.
    DeviceRemoved { device: String },
    /// The guest was asked to release a device and has not yet (it stays `unplugging`).
    UnplugWaiting { device: String },
    /// Something else changed live: vCPUs, memory, a disk's size, limits.
    Changed { what: String },
    /// The declared changes that wait for the VM's next start are now these (`field: from →
    /// to`), possibly none.
    PendingChanged { pending: Vec<String> },
    /// This host took the VM's HA lock (it may run it here).
    LockGained,
    /// This host no longer holds the VM's HA lock (a running QEMU of it is fenced).
    LockLost,
    /// The VM's QEMU was killed because this host lost its ChainFire lease.
    Fenced { reason: String },
    /// This client fell behind and `count` events were dropped for it.
    Missed { count: u64 },
}

impl Event {
    /// One line for people: `TIME VM what happened`.
    pub fn render(&self) -> String {
        let vm = self.vm.as_deref().unwrap_or("-");
        let what = match &self.what {
            What::Started { pid, how } => format!("started ({how}, QEMU pid {pid})"),
            What::Stopped { reason } => format!("stopped: {reason}"),
            What::Failed { reason } => format!("FAILED: {reason}"),
            What::Restarted { reason } => format!("restarted: {reason}"),
            What::DeviceAdded { device } => format!("device added: {device}"),
            What::DeviceRemoved { device } => format!("device removed: {device}"),
            What::UnplugWaiting { device } => {
                format!("device {device}: waiting for the guest to release it")
            }
            What::Changed { what } => format!("changed: {what}"),
            What::PendingChanged { pending } if pending.is_empty() => {
                "nothing pending any more".to_owned()
            }
            What::PendingChanged { pending } => {
                format!("pending until the next start: {}", pending.join("; "))
            }
            What::LockGained => "HA lock gained".to_owned(),
            What::LockLost => "HA lock LOST".to_owned(),
            What::Fenced { reason } => format!("FENCED: {reason}"),
            What::Missed { count } => format!("({count} events missed: this client fell behind)"),
        };
        format!("{} {vm} {what}", self.time)
    }
}

/// The event a step of a plan makes once done, or once it waits for the guest (`waiting`).
/// Starts and stops make theirs where they happen (they know how they went).
pub fn of_step(action: &Action, waiting: bool) -> Option<What> {
    Some(match action {
        Action::AddDisk { id, .. } => What::DeviceAdded {
            device: ids::disk_device(id),
        },
        Action::AddNic { id, .. } => What::DeviceAdded {
            device: ids::nic_device(id),
        },
        Action::RemoveDisk { id, .. } if waiting => What::UnplugWaiting {
            device: ids::disk_device(id),
        },
        Action::RemoveNic { id } if waiting => What::UnplugWaiting {
            device: ids::nic_device(id),
        },
        Action::RemoveDisk { id, .. } => What::DeviceRemoved {
            device: ids::disk_device(id),
        },
        Action::RemoveNic { id } => What::DeviceRemoved {
            device: ids::nic_device(id),
        },
        Action::ResizeDisk {
            id,
            from_mib,
            to_mib,
        } => What::Changed {
            what: format!("disk {id} grown from {from_mib} to {to_mib} MiB"),
        },
        Action::SetVcpus { from, to } => What::Changed {
            what: format!("vCPUs {from} → {to}"),
        },
        Action::SetMemory { from_mib, to_mib } => What::Changed {
            what: format!("memory {from_mib} → {to_mib} MiB"),
        },
        Action::SetLimits { .. } => What::Changed {
            what: "limits".to_owned(),
        },
        Action::RestartVm { reason, .. } => What::Restarted {
            reason: reason.clone(),
        },
        _ => return None,
    })
}

/// The devices the guest was asked to release that QEMU no longer has (`present` says which it
/// has): released after the step that asked had returned (`unplugWaiting`), so their
/// `deviceRemoved` comes from here. Leaves the others in `unplugging`.
pub fn released_late(
    unplugging: &mut std::collections::BTreeSet<String>,
    present: impl Fn(&str) -> bool,
) -> Vec<What> {
    let (still, released) = std::mem::take(unplugging)
        .into_iter()
        .partition(|device| present(device));
    *unplugging = still;
    released
        .into_iter()
        .map(|device| What::DeviceRemoved { device })
        .collect()
}

/// The pending changes as the event lists them.
pub fn pending_lines(pending: &[PendingChange]) -> Vec<String> {
    pending
        .iter()
        .map(|p| format!("{}: {} → {}", p.field, p.from, p.to))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(vm: Option<&str>, what: What) -> Event {
        Event {
            time: "2026-12-03T07:00:00.000Z".into(),
            vm: vm.map(str::to_owned),
            what,
        }
    }

    #[test]
    fn events_are_one_flat_json_object_each() {
        let started = event(
            Some("web"),
            What::Started {
                pid: 42,
                how: "booted".into(),
            },
        );
        let json = serde_json::to_value(&started).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"time": "2026-12-03T07:00:00.000Z", "vm": "web",
                "event": "started", "pid": 42, "how": "booted"})
        );
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, started);
        let missed = serde_json::to_value(event(None, What::Missed { count: 3 })).unwrap();
        assert_eq!(missed["event"], "missed");
        assert!(missed.get("vm").is_none());
        assert_eq!(
            serde_json::to_value(event(Some("ha"), What::LockLost)).unwrap()["event"],
            "lockLost"
        );
    }

    #[test]
    fn rendering_names_the_vm_and_what_happened() {
        let line = event(
            Some("web"),
            What::Failed {
                reason: "QEMU (pid 7) exited unexpectedly".into(),
            },
        )
        .render();
        assert_eq!(
            line,
            "2026-12-03T07:00:00.000Z web FAILED: QEMU (pid 7) exited unexpectedly"
        );
        let none = event(Some("web"), What::PendingChanged { pending: vec![] }).render();
        assert!(none.ends_with("web nothing pending any more"), "{none}");
        assert!(event(None, What::Missed { count: 2 })
            .render()
            .contains(" - (2 events missed"));
    }

    #[test]
    fn a_device_released_late_is_removed_then() {
        let mut unplugging: std::collections::BTreeSet<String> =
            ["disk-data", "nic-eth1"].map(String::from).into();
        let released = released_late(&mut unplugging, |device| device == "nic-eth1");
        assert_eq!(
            released,
            [What::DeviceRemoved {
                device: "disk-data".into()
            }]
        );
        assert_eq!(unplugging, ["nic-eth1".to_owned()].into());
        assert_eq!(released_late(&mut unplugging, |_| true), []);
        assert_eq!(unplugging.len(), 1);
    }

    #[test]
    fn steps_make_device_and_change_events() {
        let remove = Action::RemoveNic { id: "eth1".into() };
        assert_eq!(
            of_step(&remove, false),
            Some(What::DeviceRemoved {
                device: "nic-eth1".into()
            })
        );
        assert_eq!(
            of_step(&remove, true),
            Some(What::UnplugWaiting {
                device: "nic-eth1".into()
            })
        );
        assert_eq!(
            of_step(&Action::SetVcpus { from: 1, to: 2 }, false),
            Some(What::Changed {
                what: "vCPUs 1 → 2".into()
            })
        );
        assert_eq!(of_step(&Action::StopVm { reason: "x".into() }, false), None);
        assert_eq!(
            of_step(
                &Action::RemoveOrphanNetdev {
                    netdev: "net-x".into()
                },
                false
            ),
            None
        );
    }
}
