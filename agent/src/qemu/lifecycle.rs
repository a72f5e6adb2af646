//! Stopping and resetting a VM's QEMU, and the host devices (taps) that live as long as it does.
//!
//! Stopping escalates: ask the guest (ACPI powerdown), then tell QEMU (`quit`), then SIGKILL.
//! Each step says which one it took, so status can explain a VM that did not shut down cleanly.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use qapi::qmp::ShutdownAction;
use tokio::sync::broadcast;

use super::process;
use super::qmp::{QemuEvent, Qmp};
use super::tap;
use crate::ids;
use crate::runas::RunAs;
use crate::spec::VmSpec;

/// How long QEMU gets to exit after `quit` or SIGKILL before the stop counts as failed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The process was gone before we started.
    AlreadyGone,
    /// The guest shut down after the ACPI powerdown.
    PoweredDown,
    /// The guest did not shut down in time (or there was no QMP); QEMU quit on request.
    Quit,
    /// QEMU did not answer `quit`; it was killed.
    Killed,
}

/// Stops the QEMU `pid`: powerdown and wait up to `powerdown_timeout`, then `quit`, then SIGKILL.
/// Without a QMP connection (lost, never made) only the signal is left.
pub async fn stop(qmp: Option<&Qmp>, pid: u32, powerdown_timeout: Duration) -> Result<StopOutcome> {
    if !process::is_alive(pid) {
        return Ok(StopOutcome::AlreadyGone);
    }
    if let Some(qmp) = qmp {
        match qmp.system_powerdown().await {
            Ok(()) if process::wait_for_exit(pid, powerdown_timeout).await => {
                return Ok(StopOutcome::PoweredDown)
            }
            Ok(()) => tracing::info!(pid, "guest ignored the powerdown; quitting QEMU"),
            Err(e) => tracing::warn!(pid, "powerdown failed ({e}); quitting QEMU"),
        }
    }
    force_quit(qmp, pid).await
}

/// Stops the QEMU `pid` without asking the guest: `quit`, then SIGKILL.
pub async fn force_quit(qmp: Option<&Qmp>, pid: u32) -> Result<StopOutcome> {
    if !process::is_alive(pid) {
        return Ok(StopOutcome::AlreadyGone);
    }
    if let Some(qmp) = qmp {
        match qmp.quit().await {
            Ok(()) if process::wait_for_exit(pid, EXIT_GRACE).await => {
                return Ok(StopOutcome::Quit)
            }
            Ok(()) => tracing::warn!(pid, "QEMU did not exit after quit; killing it"),
            Err(e) => tracing::warn!(pid, "quit failed ({e}); killing QEMU"),
        }
    }
    kill(pid)?;
    if process::wait_for_exit(pid, EXIT_GRACE).await {
        Ok(StopOutcome::Killed)
    } else {
        bail!("QEMU {pid} did not die on SIGKILL (stuck in the kernel?)")
    }
}

/// SIGKILL, no questions: for a QEMU that must be gone now (self-fencing).
pub fn kill(pid: u32) -> Result<StopOutcome> {
    use nix::sys::signal::{kill, Signal};
    match kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(StopOutcome::Killed),
        Err(e) => Err(e).with_context(|| format!("killing QEMU {pid}")),
    }
}

/// Hard reset: the guest reboots at once, like pressing the reset button.
pub async fn reset_hard(qmp: &Qmp) -> Result<()> {
    qmp.system_reset().await.context("system_reset")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The guest shut down on the ACPI request and was started again in the same QEMU.
    Soft,
    /// The guest did not shut down within the timeout; it was hard-reset instead.
    HardAfterTimeout,
}

/// Soft reset: ACPI powerdown, wait up to `timeout` for the guest to shut down, then start it
/// again in the same QEMU process (same PID, same QMP, same devices). While it runs, a guest
/// shutdown pauses QEMU instead of ending it; the usual "shutdown ends QEMU" is restored after.
pub async fn reset_soft(qmp: &Qmp, timeout: Duration) -> Result<ResetOutcome> {
    let mut events = qmp.subscribe();
    qmp.set_shutdown_action(ShutdownAction::pause)
        .await
        .context("set-action shutdown=pause")?;
    let outcome = soft_reset_paused(qmp, &mut events, timeout).await;
    let restored = qmp
        .set_shutdown_action(ShutdownAction::poweroff)
        .await
        .context("set-action shutdown=poweroff");
    let outcome = outcome?;
    restored?;
    Ok(outcome)
}

async fn soft_reset_paused(
    qmp: &Qmp,
    events: &mut broadcast::Receiver<QemuEvent>,
    timeout: Duration,
) -> Result<ResetOutcome> {
    qmp.system_powerdown().await.context("system_powerdown")?;
    let shut_down = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Ok(QemuEvent::Shutdown { .. }) => return true,
                Ok(QemuEvent::Disconnected { .. }) | Err(broadcast::error::RecvError::Closed) => {
                    return false
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    qmp.system_reset().await.context("system_reset")?;
    if !shut_down {
        return Ok(ResetOutcome::HardAfterTimeout);
    }
    qmp.cont().await.context("cont")?;
    Ok(ResetOutcome::Soft)
}

/// Creates the taps of `spec`'s bridged NICs (before launching QEMU, whose argv names them),
/// owned by the user QEMU runs as.
pub fn prepare_host_devices(vm: &str, spec: &VmSpec, run_as: Option<&RunAs>) -> Result<()> {
    for (nic, nic_spec) in &spec.nics {
        if let Some(bridge) = &nic_spec.bridge {
            tap::ensure_tap(&ids::agent_tap(vm, nic), bridge, run_as)
                .with_context(|| format!("VM {vm}, NIC {nic}"))?;
        }
    }
    Ok(())
}

/// Deletes the taps the agent made for `spec`'s bridged NICs (after QEMU exited).
pub fn release_host_devices(vm: &str, spec: &VmSpec) -> Result<()> {
    for (nic, nic_spec) in &spec.nics {
        if nic_spec.bridge.is_some() {
            tap::delete_tap(&ids::agent_tap(vm, nic))
                .with_context(|| format!("VM {vm}, NIC {nic}"))?;
        }
    }
    Ok(())
}
