//! `device_del` and the wait for the guest's answer.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::{is_not_found, LiveError};
use crate::qemu::qmp::{QemuEvent, Qmp};

pub(super) enum Unplugged {
    /// The device is gone (now, or it already was).
    Gone,
    /// The guest has not answered within the timeout; the device is still there.
    Pending,
}

/// How the wait learns that a device is gone.
#[derive(Clone, Copy)]
pub(super) enum GoneWhen {
    /// Its own `DEVICE_DELETED`: QEMU has freed it, so what it held (block nodes, netdevs) can go.
    Deleted,
    /// Its own `DEVICE_DELETED`, or its absence from QEMU's device tree (checked every
    /// `ABSENCE_POLL`), whichever comes first. For vCPUs: QEMU 7.2 reports only their `.../lapic`
    /// child's deletion, never the vCPU's own, though it leaves the tree as soon as the guest
    /// ejects it.
    DeletedOrAbsent,
}

const ABSENCE_POLL: Duration = Duration::from_millis(200);

/// Asks the guest to release `device` (an id, or a QOM path for devices without one) and waits
/// up to `timeout` until it is gone (see `GoneWhen`). Asking again while an earlier request is
/// pending is fine: QEMU refuses the duplicate and we keep waiting for the first one.
pub(super) async fn unplug(
    qmp: &Qmp,
    device: &str,
    qom_path: &str,
    timeout: Duration,
    gone_when: GoneWhen,
) -> Result<Unplugged, LiveError> {
    let mut events = qmp.subscribe();
    match qmp.device_del(device).await {
        Ok(()) => {}
        Err(e) if is_not_found(&e) => return Ok(Unplugged::Gone),
        Err(e) if is_unplug_in_progress(&e) => {
            tracing::debug!(device, "unplug already requested; waiting for the guest")
        }
        Err(e) => return Err(e.into()),
    }
    let poll_absence = matches!(gone_when, GoneWhen::DeletedOrAbsent);
    let wait = async {
        let mut poll = tokio::time::interval(ABSENCE_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => match verdict(&event, device, qom_path) {
                        Some(Verdict::Gone) => return Ok(Unplugged::Gone),
                        Some(Verdict::Refused) => {
                            return Err(LiveError::GuestRefused { device: device.to_owned() })
                        }
                        Some(Verdict::Disconnected) => return Err(disconnected(device)),
                        None => {}
                    },
                    Err(RecvError::Closed) => return Err(disconnected(device)),
                    Err(RecvError::Lagged(missed)) => tracing::warn!(
                        device,
                        missed,
                        "missed QMP events while waiting for an unplug"
                    ),
                },
                _ = poll.tick(), if poll_absence => {
                    if !exists(qmp, qom_path).await? {
                        return Ok(Unplugged::Gone);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(result) => result,
        // Events may have been missed (lag): QEMU's device tree has the last word.
        Err(_) if exists(qmp, qom_path).await? => Ok(Unplugged::Pending),
        Err(_) => Ok(Unplugged::Gone),
    }
}

/// What a QMP event means for the unplug of `device` (at `qom_path`), if anything.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Gone,
    Refused,
    Disconnected,
}

fn verdict(event: &QemuEvent, device: &str, qom_path: &str) -> Option<Verdict> {
    // Children (a virtio `.../virtio-backend`, a vCPU's `.../lapic`) are deleted with no id and
    // their own path: only the device's own event counts.
    let ours = |id: &Option<String>, path: &str| id.as_deref() == Some(device) || path == qom_path;
    match event {
        QemuEvent::DeviceDeleted { device: id, path } if ours(id, path) => Some(Verdict::Gone),
        QemuEvent::DeviceUnplugGuestError { device: id, path } if ours(id, path) => {
            Some(Verdict::Refused)
        }
        QemuEvent::Disconnected { .. } => Some(Verdict::Disconnected),
        _ => None,
    }
}

fn disconnected(device: &str) -> LiveError {
    LiveError::Disconnected {
        what: format!("the unplug of {device}"),
    }
}

pub(super) async fn exists(qmp: &Qmp, qom_path: &str) -> Result<bool, LiveError> {
    match qmp.qom_get::<String>(qom_path, "type").await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn is_unplug_in_progress(e: &crate::qemu::qmp::QmpError) -> bool {
    e.to_string().contains("in the process of unplug")
        || e.to_string().contains("already in progress")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deleted(device: Option<&str>, path: &str) -> QemuEvent {
        QemuEvent::DeviceDeleted {
            device: device.map(str::to_owned),
            path: path.to_owned(),
        }
    }

    #[test]
    fn only_the_devices_own_deletion_counts() {
        let (id, path) = ("vcpu-0-2-0", "/machine/peripheral/vcpu-0-2-0");
        // What QEMU 7.2 sends when a guest ejects a hotplugged vCPU: its lapic child only.
        let lapic = deleted(None, "/machine/peripheral/vcpu-0-2-0/lapic");
        assert_eq!(verdict(&lapic, id, path), None);
        let backend = deleted(None, "/machine/peripheral/nic-a/virtio-backend");
        assert_eq!(
            verdict(&backend, "nic-a", "/machine/peripheral/nic-a"),
            None
        );
        assert_eq!(
            verdict(&deleted(Some(id), path), id, path),
            Some(Verdict::Gone)
        );
        // A boot vCPU has no id: its path is what identifies it.
        let boot = "/machine/unattached/device[1]";
        assert_eq!(
            verdict(&deleted(None, boot), boot, boot),
            Some(Verdict::Gone)
        );
        assert_eq!(
            verdict(
                &deleted(Some("other"), "/machine/peripheral/other"),
                id,
                path
            ),
            None
        );
    }

    #[test]
    fn a_refusal_or_a_lost_connection_ends_the_wait() {
        let (id, path) = ("disk-a", "/machine/peripheral/disk-a");
        let refused = QemuEvent::DeviceUnplugGuestError {
            device: Some(id.to_owned()),
            path: path.to_owned(),
        };
        assert_eq!(verdict(&refused, id, path), Some(Verdict::Refused));
        let gone = QemuEvent::Disconnected {
            after_shutdown: false,
        };
        assert_eq!(verdict(&gone, id, path), Some(Verdict::Disconnected));
        let stopped = QemuEvent::Stop {
            at: std::time::SystemTime::UNIX_EPOCH,
        };
        assert_eq!(verdict(&stopped, id, path), None);
    }
}
