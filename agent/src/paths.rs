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

    /// The unix socket a save or restore streams QEMU's migration data through.
    pub fn migration_socket(&self) -> PathBuf {
        self.dir.join("migration.sock")
    }
}

/// `<state-dir>/saved/`: managed saves, which outlive the QEMU process and the host's boot.
///
/// - `NAME/` (committed): `state` (QEMU's migration stream) and `record.json` (`save::SavedRecord`).
/// - `NAME.partial/`: a save under way, or one interrupted before it was committed.
/// - `unrestorable/NAME-<unix-seconds>/`: a save that could not be restored, with `reason.txt`;
///   kept until the operator removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDir {
    root: PathBuf,
}

impl SavedDir {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("saved"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The committed save of VM `name`.
    pub fn committed(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Where a save of VM `name` is written before it is committed (renamed to `committed`).
    pub fn partial(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.partial"))
    }

    pub fn unrestorable_root(&self) -> PathBuf {
        self.root.join("unrestorable")
    }

    /// Where a save of VM `name` that could not be restored is kept (`stamp`: unix seconds).
    pub fn unrestorable(&self, name: &str, stamp: u64) -> PathBuf {
        self.unrestorable_root().join(format!("{name}-{stamp}"))
    }
}

/// Inside a save's directory: QEMU's migration stream.
pub fn saved_state(save: &Path) -> PathBuf {
    save.join("state")
}

/// Inside a save's directory: what was saved (`save::SavedRecord`).
pub fn saved_record(save: &Path) -> PathBuf {
    save.join("record.json")
}

/// Inside an unrestorable save's directory: why it could not be restored.
pub fn unrestorable_reason(save: &Path) -> PathBuf {
    save.join("reason.txt")
}
