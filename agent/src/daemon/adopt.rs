//! Startup: find the QEMUs a previous agent left running and take them over without a restart.
//!
//! Identifiable ones (pidfile + `/proc` cmdline + readable boot spec + QMP answers) are adopted
//! whether declared or not: the first reconcile stops the undeclared ones properly (powerdown
//! first). A process of a VM that cannot be adopted (see `identity::judge`; QMP silent) is held
//! `unresponsive`: never duplicated, looked at again on every observe. A live QEMU of some other
//! VM named by a pidfile is a stranger: reported, never touched.

use std::sync::Arc;

use anyhow::Result;
use futures::future::join_all;

use super::supervisor::Daemon;
use super::vm::VmSlot;
use crate::paths::VmDir;
use crate::qemu::process::AlreadyRuns;
use crate::qemu::{list_vm_dirs, process, Found};
use crate::status::Stranger;

pub async fn adopt_running(daemon: &Daemon) -> Result<()> {
    let names = list_vm_dirs(&daemon.shell.run_dir)?;
    let found = join_all(names.into_iter().map(|name| adopt_one(daemon, name))).await;
    let adopted = found.iter().filter(|adopted| **adopted).count();
    tracing::info!(adopted, "adoption done");
    Ok(())
}

/// True if a QEMU was adopted.
async fn adopt_one(daemon: &Daemon, name: String) -> bool {
    let vm_dir = daemon.shell.run_dir.vm(&name);
    let found = {
        let (name, vm_dir) = (name.clone(), vm_dir.clone());
        tokio::task::spawn_blocking(move || process::find(&name, &vm_dir)).await
    };
    let running = match found {
        Ok(Found::Running(running)) => running,
        Ok(Found::Absent) => {
            if let Some(reason) = process::take_fence_marker(&vm_dir) {
                // Its guard fenced it while no agent was there to see.
                daemon.explain_gone(&name, reason);
            }
            if let Some(pid) = foreign_qemu(&vm_dir) {
                daemon.add_stranger(Stranger {
                    name,
                    pid: Some(pid),
                    reason:
                        "the pidfile names a live QEMU that is not this VM's (other name or socket)"
                            .into(),
                });
            }
            return false;
        }
        Ok(Found::Untouchable(already)) => {
            hold_untouchable(daemon, &name, already).await;
            return false;
        }
        Err(e) => {
            tracing::error!(vm = %name, "scanning for its processes: {e}");
            return false;
        }
    };
    let pid = running.pid;
    let slot = VmSlot::new(&name, false);
    match slot.adopt(&daemon.shell, running).await {
        Ok(()) => {
            tracing::info!(vm = %name, pid, "adopted running QEMU");
            slot.settle_save(&daemon.shell).await;
            daemon.insert_adopted(Arc::clone(&slot));
            true
        }
        Err(e) => {
            let reason = format!("{e:#}");
            hold_untouchable(daemon, &name, AlreadyRuns { pid, reason }).await;
            false
        }
    }
}

async fn hold_untouchable(daemon: &Daemon, name: &str, already: AlreadyRuns) {
    let slot = VmSlot::new(name, false);
    slot.hold_untouchable(already).await;
    daemon.insert_adopted(slot);
}

fn pidfile_pid(vm_dir: &VmDir) -> Option<u32> {
    std::fs::read_to_string(vm_dir.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A live QEMU named by the pidfile that failed the identity check.
fn foreign_qemu(vm_dir: &VmDir) -> Option<u32> {
    let pid = pidfile_pid(vm_dir)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let binary = cmdline.split(|&b| b == 0).next()?;
    let is_qemu = std::path::Path::new(std::str::from_utf8(binary).ok()?)
        .file_name()?
        .to_str()?
        .starts_with("qemu-system-");
    (is_qemu && process::is_alive(pid)).then_some(pid)
}
