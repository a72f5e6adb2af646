//! One QEMU per VM, whatever happens (issue 10): each fault is injected for real and the QEMU
//! processes are counted by scanning `/proc` (`procs`), never taken from `status`.
//!
//! - a stalled QEMU (SIGSTOP), before and across an agent restart, and another client holding
//!   `qmp.sock`: the agent stays up, answers `status` at once for the others, shows the VM
//!   `unresponsive`, starts no twin; `stop --force` kills it; the held one is adopted once free;
//! - `spec.json` corrupt or from a newer agent, the pidfile garbage or deleted, all in a run dir
//!   whose path has commas: `unresponsive`, left alone, never doubled, adopted once repaired;
//! - a start that fails after QEMU was launched (a full run dir at the pidfile write): QEMU
//!   killed, restart-policy retries never race it, exactly one QEMU once there is room;
//! - a second agent on the same run dir: refused, naming the first.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Well under the agent's 5 s QMP command timeout: a `status` this fast did not wait for it.
const FAST: Duration = Duration::from_secs(3);

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("kill");
}

/// `status --json` and how long it took.
fn timed_status(host: &Host) -> (Value, Duration) {
    let started = Instant::now();
    let status = host.status();
    (status, started.elapsed())
}

fn wait_state(host: &Host, vm: &str, state: &str) -> Value {
    host.wait_status(&format!("{vm} {state}"), AGENT, |s| {
        s["vms"][vm]["state"] == state
    })["vms"][vm]
        .clone()
}

fn reason(vm: &Value) -> String {
    vm["stateReason"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_stalled_or_held_qemu_never_takes_the_agent_down_nor_gets_a_twin() {
    let mut host = Host::new();
    // `held` ignores ACPI powerdown, for a stop that runs into its timeout at the end.
    let ignoring = guest::guest_cmdline_ignoring_powerdown();
    host.write_config(json!({
        "stall": host.vm(json!({})),
        "held": host.vm(json!({"cmdline": ignoring})),
    }));
    host.start_agent();
    let stall = host.wait_running("stall");
    let held = host.wait_running("held");

    // SIGSTOP under a running agent: status keeps answering fast, the agent stays up.
    signal(stall, Signal::SIGSTOP);
    for _ in 0..3 {
        let (status, took) = timed_status(&host);
        assert!(took < FAST, "status took {took:?}: {status:#}");
        assert_eq!(status["vms"]["held"]["state"], "running", "{status:#}");
    }
    let stalled = wait_state(&host, "stall", "unresponsive");
    assert!(reason(&stalled).contains("is stopped"), "{stalled:#}");
    let (_, took) = timed_status(&host);
    assert!(took < FAST, "status with a known-stalled VM took {took:?}");
    host.cli(&["reload"])
        .expect_code(0, "reload while a VM is stalled");
    assert_eq!(host.qemu_count("stall"), 1);
    assert_eq!(host.qemu_count("held"), 1);

    // Across an agent restart, while stalled and while another client holds `held`'s qmp.sock.
    host.kill_agent();
    let socket = host.run_dir.join("vms/held/qmp.sock");
    let mut monitor = UnixStream::connect(&socket).expect("a monitoring tool connects");
    let mut greeting = String::new();
    BufReader::new(&mut monitor)
        .read_line(&mut greeting)
        .expect("QMP greeting");
    assert!(greeting.contains("QMP"), "{greeting}");
    host.start_agent();
    let status = host.status();
    for (vm, pid) in [("stall", stall), ("held", held)] {
        assert_eq!(status["vms"][vm]["state"], "unresponsive", "{status:#}");
        assert_eq!(status["vms"][vm]["pid"], pid, "{status:#}");
    }
    assert!(
        reason(&status["vms"]["held"]).contains("another client"),
        "{status:#}"
    );
    host.cli(&["reload"]).expect_code(0, "reload");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        host.qemu_count("stall"),
        1,
        "never a second QEMU beside a stalled one"
    );
    assert_eq!(
        host.qemu_count("held"),
        1,
        "never a second QEMU beside a held one"
    );
    let human = host.cli(&["status"]).expect_code(0, "status");
    assert!(
        human.stdout.contains("stop --force stall"),
        "status tells what to do:\n{}",
        human.stdout
    );

    // The monitoring tool lets go: the same QEMU is adopted.
    drop(monitor);
    let adopted = wait_state(&host, "held", "running");
    assert_eq!(adopted["pid"], held, "{adopted:#}");

    // A stalled QEMU is only stopped by force, and then it is killed.
    let refused = host
        .cli(&["stop", "stall"])
        .expect_code(1, "stop of an unresponsive VM");
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    assert_eq!(host.qemu_count("stall"), 1);
    let forced = host
        .cli(&["stop", "--force", "--json", "stall"])
        .expect_code(0, "stop --force");
    let report: Value = serde_json::from_str(&forced.stdout).expect("stop --json");
    assert_eq!(report["how"], "killed", "{report:#}");
    assert_eq!(report["forceQuit"], true, "{report:#}");
    assert!(wait_dead(stall, AGENT));
    assert_eq!(host.qemu_count("stall"), 0);
    assert_eq!(host.vm_status("stall")["state"], "stopped");

    // A guest that ignores the ACPI powerdown: --timeout ends in a force-quit.
    let stopped = host
        .cli(&["stop", "--timeout", "1s", "held"])
        .expect_code(0, "stop --timeout");
    assert!(
        stopped
            .stdout
            .contains("held: force-quit: the guest did not shut down within 1s; QEMU quit"),
        "{}",
        stopped.stdout
    );
    assert_eq!(host.qemu_count("held"), 0);
}

#[test]
fn a_vm_whose_files_are_wrong_is_left_alone_never_doubled_and_adopted_once_repaired() {
    let mut host = Host::new();
    // QEMU reads `,,` as a comma; the identity check must too.
    let run_dir = host.use_run_dir("run,with,commas");
    host.write_config(json!({"web": host.vm(json!({}))}));
    host.start_agent();
    let pid = host.wait_running("web");
    host.kill_agent();
    host.start_agent();
    assert_eq!(
        host.wait_running("web"),
        pid,
        "adopted from a run dir with commas"
    );
    assert_eq!(host.qemu_count("web"), 1);

    let vm_dir = run_dir.join("vms/web");
    let (spec, pidfile) = (vm_dir.join("spec.json"), vm_dir.join("pid"));
    let good_spec = std::fs::read_to_string(&spec).unwrap();
    let mut newer: Value = serde_json::from_str(&good_spec).unwrap();
    newer["fieldFromTheFuture"] = json!(true);
    type Inject<'a> = Box<dyn Fn() + 'a>;
    let faults: [(&str, Inject, &str); 4] = [
        (
            "corrupt spec.json",
            Box::new(|| std::fs::write(&spec, "{\"vcpus\": 1, trunc").unwrap()),
            "not a VM spec this agent understands",
        ),
        (
            "spec.json from a newer agent",
            Box::new(|| std::fs::write(&spec, newer.to_string()).unwrap()),
            "written by a newer agent",
        ),
        (
            "garbage pidfile",
            Box::new(|| std::fs::write(&pidfile, "garbage\n").unwrap()),
            "is not a PID",
        ),
        (
            "deleted pidfile",
            Box::new(|| std::fs::remove_file(&pidfile).unwrap()),
            "is missing",
        ),
    ];
    for (fault, inject, why) in faults {
        host.kill_agent();
        inject();
        host.start_agent();
        let web = host.vm_status("web");
        assert_eq!(web["state"], "unresponsive", "{fault}: {web:#}");
        assert_eq!(web["pid"], pid, "{fault}: {web:#}");
        assert!(reason(&web).contains(why), "{fault}: {web:#}");
        host.cli(&["reload"]).expect_code(0, "reload");
        assert_eq!(host.qemu_count("web"), 1, "{fault}: never a second QEMU");
        assert!(is_alive(pid), "{fault}: the QEMU is left alone");

        // Repaired: the same QEMU is adopted, nothing restarted.
        host.kill_agent();
        std::fs::write(&spec, &good_spec).unwrap();
        std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
        host.start_agent();
        assert_eq!(
            host.wait_running("web"),
            pid,
            "{fault}: adopted once repaired"
        );
        assert_eq!(host.qemu_count("web"), 1, "{fault}");
    }
}

/// Free inodes of the filesystem at `path`, and all it has.
fn inodes(path: &std::path::Path) -> (u64, u64) {
    let stat = nix::sys::statvfs::statvfs(path).expect("statvfs");
    (stat.files_free() as u64, stat.files() as u64)
}

fn mount_tmpfs(dir: &std::path::Path, options: &str) {
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir)
        .status()
        .expect("mount");
    assert!(status.success(), "mount tmpfs on {}", dir.display());
}

/// Unmounts on drop; declared before the host, so the host's drop kills what ran there first.
struct Unmount(Option<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = Command::new("umount").arg("-l").arg(dir).status();
        }
    }
}

#[test]
fn a_start_failing_after_launch_kills_its_qemu_and_a_second_agent_is_refused() {
    let mut unmount = Unmount(None);
    let mut host = Host::new();
    let run_dir = host.use_run_dir("tmpfs");
    mount_tmpfs(&run_dir, "size=16m,nr_inodes=1000");
    unmount.0 = Some(run_dir.clone());
    host.write_config(json!({}));
    host.start_agent();

    // Room for the VM directory, spec.json and qemu.log, none for the pidfile.
    let (free, total) = inodes(&run_dir);
    let tight = format!("remount,nr_inodes={}", total - free + 3);
    mount_tmpfs(&run_dir, &tight);
    host.write_config(json!({"web": host.vm(json!({"restartPolicy": "always"}))}));
    let failed = host.wait_status("the start to fail", AGENT, |s| {
        s["vms"]["web"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("pid"))
    });
    // Restart-policy retries keep failing meanwhile; not one QEMU may be left behind.
    for _ in 0..10 {
        assert_eq!(host.qemu_count("web"), 0, "{failed:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        failed["vms"]["web"]["lastError"]
            .as_str()
            .unwrap()
            .contains("was killed again"),
        "{failed:#}"
    );

    // Room again: the next retry starts exactly one QEMU.
    mount_tmpfs(&run_dir, "remount,nr_inodes=1000");
    let pid = host.wait_running("web");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(host.qemu_count("web"), 1);

    // A second agent on the same run dir exits at once, naming the first, touching nothing.
    let second = host
        .agent_command()
        .env("RUST_LOG", "info")
        .output()
        .expect("second agent");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {}) already runs", host.agent_pid())),
        "{stderr}"
    );
    assert_eq!(
        host.vm_status("web")["pid"],
        pid,
        "the first agent still answers"
    );
    assert_eq!(host.qemu_count("web"), 1);
}
