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

/// Asks the guest to release `device` (an id, or a QOM path for devices without one) and waits
/// up to `timeout` for its `DEVICE_DELETED`. Asking again while an earlier request is pending is
/// fine: QEMU refuses the duplicate and we keep waiting for the first one.
pub(super) async fn unplug(
    qmp: &Qmp,
    device: &str,
    qom_path: &str,
    timeout: Duration,
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
    // The `.../virtio-backend` child is deleted first (no id); only the device's own event counts.
    let ours = |id: &Option<String>, path: &str| id.as_deref() == Some(device) || path == qom_path;
    let wait = async {
        loop {
            match events.recv().await {
                Ok(QemuEvent::DeviceDeleted { device: id, path }) if ours(&id, &path) => {
                    return Ok(Unplugged::Gone)
                }
                Ok(QemuEvent::DeviceUnplugGuestError { device: id, path }) if ours(&id, &path) => {
                    return Err(LiveError::GuestRefused {
                        device: device.to_owned(),
                    })
                }
                Ok(QemuEvent::Disconnected { .. }) | Err(RecvError::Closed) => {
                    return Err(LiveError::Disconnected {
                        what: format!("the unplug of {device}"),
                    })
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        device,
                        missed,
                        "missed QMP events while waiting for an unplug"
                    )
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
