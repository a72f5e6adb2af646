//! Shared by the `qemu_*` integration tests: temp run dirs, minimal QEMU argvs, and a guard that
//! kills every QEMU a test started, even when the test fails.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use plasmavmc_agent::paths::{RunDir, VmDir};
use plasmavmc_agent::qemu::{QemuEvent, Qmp};
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

/// A guest-less, paused QEMU (`bare_argv`) for VM `name` in `run`, its QMP connection, and the
/// guard that kills it.
pub async fn launch_bare(run: &TempRun, name: &str) -> (u32, Qmp, KillOnDrop) {
    let vm = run.vm(name);
    let pid = launch_argv(name, &tiny_spec(), &vm, &bare_argv(name, &vm)).expect("launch");
    let guard = KillOnDrop(pid);
    let qmp = plasmavmc_agent::qemu::process::qmp_after_launch(pid, &vm, STARTUP)
        .await
        .expect("QMP");
    (pid, qmp, guard)
}

/// The next event QMP delivers, within `STARTUP`.
pub async fn next_event(events: &mut tokio::sync::broadcast::Receiver<QemuEvent>) -> QemuEvent {
    tokio::time::timeout(STARTUP, events.recv())
        .await
        .expect("an event in time")
        .expect("the event stream")
}

/// QEMU with `args`, detached, as the test's own user in its own cgroup, without a fence guard.
pub fn launch_argv(
    name: &str,
    spec: &VmSpec,
    vm_dir: &VmDir,
    args: &[String],
) -> anyhow::Result<u32> {
    plasmavmc_agent::qemu::Launcher {
        name,
        vm_dir,
        qemu: &qemu(),
        guard: None,
        confinement: &plasmavmc_agent::qemu::Confinement::none(),
    }
    .launch_confined(spec, args)
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

/// The host's Debian kernel (`linux-image-amd64`), for specs that need some kernel to name.
pub fn kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("a kernel in /boot (linux-image-amd64)")
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

/// Runs `test` on a fresh single-threaded runtime inside a new network namespace of this thread
/// (see `enter_netns`).
pub fn in_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    enter_netns();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test());
}

/// Moves this thread into a new network namespace (processes it starts, QEMU and `ip` and the
/// agent, inherit it), with `lo` up and an empty bridge `br0`: bridges and taps never touch the
/// host's network.
pub fn enter_netns() {
    // SAFETY: unshare only changes this thread's namespaces.
    let rc = unsafe { nix::libc::unshare(nix::libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", "br0", "type", "bridge"],
        &["link", "set", "br0", "up"],
    ] {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("ip");
        assert!(status.success(), "ip {args:?}");
    }
}

pub fn spec(json: serde_json::Value) -> VmSpec {
    serde_json::from_value(json).expect("test spec")
}

/// A raw or qcow2 image of `size_mib` in `dir`.
pub fn image(dir: &Path, name: &str, format: &str, size_mib: u32) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&path)
        .arg(format!("{size_mib}M"))
        .status()
        .expect("qemu-img");
    assert!(status.success());
    path
}

/// The unprivileged user confined QEMUs run as in tests (made here if missing; CI's
/// `scripts/install-deps.sh` makes it too).
pub const TEST_QEMU_USER: &str = "plasmavmc-test";

pub fn qemu_test_user() -> plasmavmc_agent::runas::RunAs {
    let exists = |_: ()| {
        std::process::Command::new("id")
            .arg(TEST_QEMU_USER)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !exists(()) {
        // A concurrent test may win the race; whoever made it, it exists afterwards.
        let _ = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(TEST_QEMU_USER)
            .status();
    }
    plasmavmc_agent::qemu::confine::resolve_user(TEST_QEMU_USER, None).expect("the test QEMU user")
}

/// A field of `/proc/PID/status` (`Uid`, `Gid`, `Seccomp`, ...), as the kernel prints it.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The value of the cgroup file holding `controller`'s limit for `pid`, read from the cgroup the
/// kernel says `pid` is in: the first of `files` that exists there (v2 name, then v1 name), with
/// the file's name and the cgroup's path.
pub fn cgroup_file(pid: u32, controller: &str, files: &[&'static str]) -> CgroupFile {
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut candidates = Vec::new();
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        for mount in mountinfo.lines() {
            let (left, right) = mount.split_once(" - ").unwrap();
            let point = left.split(' ').nth(4).unwrap();
            let fstype = right.split(' ').next().unwrap();
            let options = right.split(' ').nth(2).unwrap_or_default();
            let matches = if controllers.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup"
                    && controllers.split(',').any(|c| c == controller)
                    && options.split(',').any(|c| c == controller)
            };
            if matches {
                candidates.push((Path::new(point).join(path.trim_start_matches('/')), path));
            }
        }
    }
    for (dir, path) in &candidates {
        for file in files {
            if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                return CgroupFile {
                    file,
                    value: value.trim().to_owned(),
                    path: path.to_string(),
                };
            }
        }
    }
    panic!("none of {files:?} in the cgroups of {pid}: {candidates:?}");
}

pub struct CgroupFile {
    pub file: &'static str,
    pub value: String,
    /// The cgroup's path, as `/proc/PID/cgroup` gives it.
    pub path: String,
}
