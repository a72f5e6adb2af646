//! Faults from outside the agent, injected for real against the real `plasmavmc` binary: block
//! devices as disks, a flood of idle control connections under a lowered fd limit, a FIFO as the
//! config file, a full state filesystem, a corrupt `operator.json`, the config's directory
//! removed and made again. Each test asserts exactly one QEMU process per VM (counted in
//! `/proc`), no VM restarted that should not be, and the agent alive and answering.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::guest::{Console, READY};
use harness::*;
use serde_json::json;

/// A loop device over a file of its own, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn new(backing: &Path) -> LoopDevice {
        std::fs::File::create(backing)
            .and_then(|f| f.set_len(16 << 20))
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().into())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A tmpfs of `size` mounted over `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_owned())
    }

    /// Fills it up to the last byte.
    fn fill(&self) {
        let mut filler = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while filler.write_all(&block).is_ok() {}
        while filler.write_all(&[0]).is_ok() {}
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// VM `name` has exactly one QEMU process, and it is `pid`.
fn assert_one_qemu(host: &Host, name: &str, pid: u32) {
    assert_eq!(
        harness::procs::qemu_pids(&host.run_dir, name),
        [pid],
        "{name}: exactly its one QEMU"
    );
}

#[test]
fn block_devices_are_disks_at_boot_and_hotplugged() {
    let mut host = Host::new();
    let at_boot = LoopDevice::new(&host.dir.path().join("boot.img"));
    let hotplugged = LoopDevice::new(&host.dir.path().join("hot.img"));
    let disk = |device: &LoopDevice, serial: &str| json!({"path": device.0, "format": "raw", "serial": serial});
    let base = host.vm(json!({"disks": {"lvboot": disk(&at_boot, "lvboot")}}));
    host.write_config(json!({ "web": base }));
    host.start_agent();
    let pid = host.wait_running("web");
    let console = Console::new(host.run_dir.join("vms/web/console.log"));
    console
        .wait_for(READY, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    console
        .wait_for_state(|s| s.blocks.values().any(|s| s == "lvboot"), BOOT)
        .unwrap_or_else(|e| panic!("the guest sees the boot-time block device: {e}"));

    let mut grown = base.clone();
    grown["disks"]["lvhot"] = disk(&hotplugged, "lvhot");
    host.write_config(json!({ "web": grown }));
    host.cli(&["reload", "--wait"])
        .expect_code(0, "hotplugging a block device");
    console
        .wait_for_state(|s| s.blocks.values().any(|s| s == "lvhot"), BOOT)
        .unwrap_or_else(|e| panic!("the guest sees the hotplugged block device: {e}"));
    assert_eq!(host.wait_running("web"), pid, "no restart for a hotplug");
    assert_one_qemu(&host, "web", pid);
}

/// Utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn idle_connections_beyond_the_fd_limit_neither_spin_nor_block_status_or_restarts() {
    let mut host = Host::new();
    host.write_config(json!({ "web": host.vm(json!({})) }));
    host.start_agent();
    let pid = host.wait_running("web");
    let agent = host.agent_pid().to_string();
    let limited = Command::new("prlimit")
        .args(["--pid", &agent, "--nofile=256:256"])
        .status()
        .unwrap();
    assert!(limited.success(), "prlimit");
    let socket = host.run_dir.join("control.sock");
    let log_before = host.agent_log_text().len();

    // Ten times the agent's descriptors, all connected and silent.
    let mut idle = Vec::new();
    for _ in 0..2560 {
        match UnixStream::connect(&socket) {
            Ok(stream) => idle.push(stream),
            Err(e) => panic!("connection {}: {e}", idle.len()),
        }
    }
    let started = Instant::now();
    let status = host.status();
    assert_eq!(status["vms"]["web"]["pid"], pid, "{status:#}");
    eprintln!(
        "status behind {} idle connections: {:?}",
        idle.len(),
        started.elapsed()
    );

    let agent_pid = host.agent_pid();
    let ticks = cpu_ticks(agent_pid);
    std::thread::sleep(Duration::from_secs(2));
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    let used = cpu_ticks(agent_pid) - ticks;
    assert!(
        used < per_second,
        "the agent used {used} ticks of CPU in 2 s while the clients sat idle: spinning"
    );

    // A crashed VM still restarts: descriptors are left for its new QEMU.
    kill_9(pid);
    let restarted = host.wait_status("web restarted", BOOT, |s| {
        s["vms"]["web"]["state"] == "running" && s["vms"]["web"]["pid"].as_u64() != Some(pid as u64)
    });
    let new_pid = restarted["vms"]["web"]["pid"].as_u64().unwrap() as u32;
    assert_one_qemu(&host, "web", new_pid);

    // An oversized request is refused with an answer, not read forever.
    let mut big = UnixStream::connect(&socket).unwrap();
    let _ = big.write_all(&vec![b' '; 2 << 20]);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.contains("at most 1048576 bytes"), "{answer}");

    let logged = host.agent_log_text().len() - log_before;
    assert!(
        logged < 64 << 10,
        "{logged} bytes of log for {} idle connections:\n{}",
        idle.len(),
        &host.agent_log_text()[log_before..]
    );
    drop(idle);
    assert_eq!(host.vm_status("web")["pid"], new_pid);
}

#[test]
fn client_commands_say_permission_denied_as_such() {
    let mut host = Host::new();
    host.write_config(json!({}));
    host.start_agent();
    // Only the socket's own mode (0600, root) keeps `nobody` out, not the temp dir's.
    std::fs::set_permissions(host.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_plasmavmc"))
        .args(["status", "--run-dir"])
        .arg(&host.run_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.starts_with("permission denied: "), "{stderr}");
    host.cli(&["status"]).expect_code(0, "status as root");
}

/// Replaces the config file by a FIFO, as `mkfifo` + `mv` would.
fn fifo_over(path: &Path) {
    let fifo = path.with_extension("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::fs::rename(&fifo, path).unwrap();
}

#[test]
fn a_fifo_as_config_is_refused_and_sigterm_still_stops_the_agent() {
    let mut host = Host::new();
    fifo_over(&host.config);
    host.start_agent();
    let status = host.status();
    let error = status["config"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not a regular file but a FIFO"),
        "{status:#}"
    );

    host.write_config(json!({ "web": host.vm(json!({})) }));
    let pid = host.wait_running("web");
    // Swapped in later: refused by the watch's look and by reload alike; nothing touched.
    fifo_over(&host.config);
    let reload = host.cli(&["reload"]).expect_code(2, "reload of a FIFO");
    assert!(reload.stderr.contains("FIFO"), "{}", reload.stderr);
    assert_eq!(host.vm_status("web")["pid"], pid);
    assert_one_qemu(&host, "web", pid);

    let agent = host.agent_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        wait_dead(agent, Duration::from_secs(10)),
        "SIGTERM stops the agent"
    );
    assert_one_qemu(&host, "web", pid);
}

#[test]
fn a_full_state_filesystem_never_stops_a_vm_behind_the_operators_back() {
    let mut host = Host::new();
    let state = Tmpfs::mount(&host.state_dir, "64k");
    host.write_config(json!({ "web": host.vm(json!({})) }));
    host.start_agent();
    let pid = host.wait_running("web");
    state.fill();

    let stop = host
        .cli(&["stop", "web"])
        .expect_code(1, "stop, not recorded");
    assert!(
        stop.stderr.contains("could not record") && stop.stderr.contains("No space left"),
        "{}",
        stop.stderr
    );
    let leftovers: Vec<_> = std::fs::read_dir(&host.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Not later, not after an agent restart.
    host.cli(&["reload"]).expect_code(0, "reload");
    host.kill_agent();
    host.start_agent();
    assert_eq!(host.wait_running("web"), pid);
    assert_one_qemu(&host, "web", pid);

    state.free();
    host.cli(&["stop", "web"]).expect_code(0, "stop, recorded");
    assert!(wait_dead(pid, AGENT), "stopped once recorded");
    host.kill_agent();
    host.start_agent();
    let status = host.vm_status("web");
    assert!(status["pid"].is_null(), "stays stopped: {status:#}");
    assert_eq!(harness::procs::qemu_count(&host.run_dir, "web"), 0);
}

#[test]
fn a_corrupt_operator_json_is_set_aside_and_the_agent_starts() {
    let mut host = Host::new();
    std::fs::write(host.state_dir.join("operator.json"), "").unwrap();
    host.write_config(json!({ "web": host.vm(json!({})) }));
    host.start_agent();
    let pid = host.wait_running("web");
    assert_one_qemu(&host, "web", pid);
    let aside: Vec<String> = std::fs::read_dir(&host.state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        aside.len() == 1 && aside[0].starts_with("operator.json.corrupt-"),
        "{aside:?}"
    );
    assert!(host.agent_log_text().contains("is corrupt"));
    // The next decision is recorded in a fresh file.
    host.cli(&["stop", "web"]).expect_code(0, "stop");
    assert!(host.state_dir.join("operator.json").exists());
}

#[test]
fn the_config_directory_removed_and_made_again_is_still_watched() {
    let mut host = Host::new();
    let conf = host.dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    host.config = conf.join("desired.json");
    host.write_config(json!({}));
    host.start_agent();

    std::fs::remove_dir_all(&conf).unwrap();
    std::fs::create_dir(&conf).unwrap();
    host.write_config(json!({ "web": host.vm(json!({})) }));
    let pid = host.wait_running("web");
    // And on: the new directory has its own watch.
    host.write_config(json!({ "web": host.vm(json!({})), "db": host.vm(json!({})) }));
    let db = host.wait_running("db");
    assert_one_qemu(&host, "web", pid);
    assert_one_qemu(&host, "db", db);
}
