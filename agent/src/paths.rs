//! Where things live on disk. Pure path arithmetic; nothing here touches the filesystem.
//!
//! `<run-dir>` (tmpfs, default `/run/plasmavmc`) holds what lives as long as the QEMU processes:
//! sockets, pidfiles and the spec each VM was booted with. `<state-dir>` (default
//! `/var/lib/plasmavmc`) holds what must survive a host reboot.

use std::path::{Path, PathBuf};

pub const DEFAULT_RUN_DIR: &str = "/run/plasmavmc";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/plasmavmc";
pub const DEFAULT_CONFIG: &str = "/etc/plasmavmc/desired.json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The agent's control socket, used by every client command.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// The lease trust fence guards and the next agent read (`chainfire::trust`).
    pub fn lease_trust(&self) -> PathBuf {
        self.root.join("lease.json")
    }

    /// Parent of every per-VM directory; its entries are how strangers are found.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm(&self, name: &str) -> VmDir {
        VmDir {
            dir: self.vms_dir().join(name),
        }
    }
}

/// `<run-dir>/vms/NAME/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir {
    dir: PathBuf,
}

impl VmDir {
    /// The VM directory at `dir` (a fence guard is handed its path).
    pub fn at(dir: impl Into<PathBuf>) -> VmDir {
        VmDir { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// QMP monitor socket (mode 0600); the agent is its only client.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The spec QEMU was booted with, written before launch.
    pub fn boot_spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }

    /// Every byte the guest printed on its serial console (QEMU writes it, attached or not).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The console log's previous part, after a rotation by size.
    pub fn console_log_rotated(&self) -> PathBuf {
        self.dir.join("console.log.1")
    }

    /// The serial console's socket; the agent is its only client and fans it out to
    /// `plasmavmc console`. Absent for a VM booted by an agent older than the interactive console.
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// Why the fence guard killed this VM's QEMU; written by the guard, read by the agent.
    pub fn fence_marker(&self) -> PathBuf {
        self.dir.join("fenced")
    }
}
