//! Shared by the `qemu_*` integration tests: temp run dirs, minimal QEMU argvs, and a guard that
//! kills every QEMU a test started, even when the test fails.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use plasmavmc_agent::paths::{RunDir, VmDir};
use plasmavmc_agent::spec::VmSpec;

/// Time for a QEMU to come up under TCG on a loaded 2-core machine.
pub const STARTUP: Duration = Duration::from_secs(30);

pub struct TempRun {
    pub dir: tempfile::TempDir,
    pub run_dir: RunDir,
}

impl TempRun {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pv-qemu-")
            .tempdir()
            .expect("temp dir");
        let run_dir = RunDir::new(dir.path());
        TempRun { dir, run_dir }
    }

    pub fn vm(&self, name: &str) -> VmDir {
        self.run_dir.vm(name)
    }
}

/// Kills the QEMU with this PID on drop (if still alive).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

pub fn qemu() -> PathBuf {
    plasmavmc_agent::qemu::process::qemu_binary(None)
}

/// A guest-less, paused QEMU that carries the identity markers `find_running` checks.
pub fn bare_argv(name: &str, vm_dir: &VmDir) -> Vec<String> {
    [
        "-name".to_owned(),
        format!("guest={name},debug-threads=on"),
        "-machine".to_owned(),
        "q35,accel=tcg".to_owned(),
        "-nodefaults".to_owned(),
        "-no-user-config".to_owned(),
        "-display".to_owned(),
        "none".to_owned(),
        "-S".to_owned(),
        "-m".to_owned(),
        "64".to_owned(),
        "-chardev".to_owned(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            vm_dir.qmp_socket().display()
        ),
        "-mon".to_owned(),
        "chardev=qmp,mode=control".to_owned(),
    ]
    .into()
}

/// The smallest spec that validates: used where the spec only needs to round-trip.
pub fn tiny_spec() -> VmSpec {
    serde_json::from_str(
        r#"{"vcpus": 1, "memoryMiB": 64, "accel": "tcg", "kernel": "/boot/vmlinuz"}"#,
    )
    .expect("tiny spec")
}

pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}
