//! Faults of issue 10 injected into a real agent with real guests, each checked by counting QEMU
//! processes in `/proc` (never from `status`):
//!
//! - a hung state filesystem (ext4 on a loop device, frozen with `fsfreeze`): the operator `stop`
//!   that must write to it waits, `status` and the VMs do not;
//! - an agent bug, a panic while applying steps to one VM (`PLASMAVMC_TEST_PANIC_IN_VM`), with
//!   that VM's QEMU running: that VM's steps are lost, nothing else (no QEMU lost or doubled);
//! - the agent out of file descriptors (`prlimit`) at every point of a start: each failed start
//!   leaves no QEMU behind, restart-policy retries never race one, and with descriptors again
//!   exactly one QEMU runs.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

/// Well under the client's 30 s: a `status` this fast did not wait for the stuck write.
const FAST: Duration = Duration::from_secs(3);

/// An ext4 filesystem on a loop device mounted on a directory; thawed and unmounted on drop.
struct Ext4 {
    dir: PathBuf,
}

impl Ext4 {
    fn mount(dir: &Path, image: &Path) -> Ext4 {
        std::fs::File::create(image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        run("mkfs.ext4", &["-q", "-F", path_str(image)]);
        run("mount", &["-o", "loop", path_str(image), path_str(dir)]);
        Ext4 {
            dir: dir.to_owned(),
        }
    }

    /// `fsfreeze --freeze`: every write to it blocks until `thaw`, as on stuck storage.
    fn freeze(&self) {
        run("fsfreeze", &["--freeze", path_str(&self.dir)]);
    }

    fn thaw(&self) {
        run("fsfreeze", &["--unfreeze", path_str(&self.dir)]);
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Thawed already unless the test failed while frozen ("Invalid argument" otherwise).
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze", path_str(&self.dir)])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect(program);
    assert!(status.success(), "{program} {args:?}");
}

fn timed_status(host: &Host) -> (Value, Duration) {
    let started = Instant::now();
    let status = host.status();
    (status, started.elapsed())
}

#[test]
fn a_hung_state_filesystem_holds_up_only_the_stop_that_writes_to_it() {
    let mut host = Host::new();
    let state = Ext4::mount(&host.state_dir, &host.dir.path().join("state.ext4"));
    host.write_config(json!({"web": host.vm(json!({})), "db": host.vm(json!({}))}));
    host.start_agent();
    let web = host.wait_running("web");
    let db = host.wait_running("db");

    state.freeze();
    // The stop must record the operator's decision on the frozen filesystem before it acts.
    let mut stop = plasmavmc()
        .args(["stop", "web", "--run-dir"])
        .arg(&host.run_dir)
        .spawn()
        .expect("plasmavmc stop");
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..3 {
        let (status, took) = timed_status(&host);
        assert!(took < FAST, "status took {took:?} behind the hung write");
        assert_eq!(status["vms"]["web"]["pid"], web, "{status:#}");
        assert_eq!(status["vms"]["db"]["pid"], db, "{status:#}");
    }
    assert!(
        stop.try_wait().unwrap().is_none(),
        "the stop waits for its decision to be written"
    );
    assert_eq!(
        host.qemu_count("web"),
        1,
        "nothing stopped before it is recorded"
    );
    assert_eq!(host.qemu_count("db"), 1);

    state.thaw();
    assert!(
        stop.wait().unwrap().success(),
        "the stop goes on once written"
    );
    assert!(wait_dead(web, AGENT), "web stopped");
    assert_eq!(host.qemu_count("web"), 0);
    assert_eq!(host.vm_status("db")["pid"], db, "db untouched");
    assert_eq!(host.qemu_count("db"), 1);
}

#[test]
fn a_panic_while_applying_to_one_vm_costs_that_vms_steps_and_nothing_else() {
    let mut host = Host::new();
    let vms = |host: &Host, extra_disk: Option<&Path>| {
        let bad = match extra_disk {
            Some(image) => json!({"disks": {"extra": {"path": image, "format": "qcow2"}}}),
            None => json!({}),
        };
        json!({"good": host.vm(json!({})), "bad": host.vm(bad)})
    };
    host.write_config(vms(&host, None));
    host.start_agent();
    let good = host.wait_running("good");
    let bad = host.wait_running("bad");

    // An agent with the bug adopts both, then panics applying a disk add to `bad`.
    host.kill_agent();
    let image = host.image("extra.qcow2");
    host.write_config(vms(&host, Some(&image)));
    // daemon::vm::PANIC_IN_VM_ENV (the daemon's modules are private).
    let hook = ("PLASMAVMC_TEST_PANIC_IN_VM", "bad");
    host.start_agent_with_env(&["--stop-timeout", "2"], &[hook]);
    let status = host.wait_status("the panic in bad's steps", AGENT, |s| {
        s["vms"]["bad"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("injected panic"))
    });
    assert!(
        status["vms"]["bad"]["lastError"]
            .as_str()
            .unwrap()
            .starts_with("agent bug while reconciling"),
        "{status:#}"
    );
    for _ in 0..3 {
        host.cli(&["reload", "--wait"]).expect_code(0, "reload");
        let (status, took) = timed_status(&host);
        assert!(took < FAST, "status took {took:?}");
        assert_eq!(status["vms"]["good"]["pid"], good, "{status:#}");
        assert_eq!(status["vms"]["bad"]["pid"], bad, "{status:#}");
        assert_eq!(host.qemu_count("good"), 1);
        assert_eq!(
            host.qemu_count("bad"),
            1,
            "a panic never loses or doubles a QEMU"
        );
    }

    // The bug gone (a fixed agent): the change is applied to the same QEMU.
    host.kill_agent();
    host.start_agent();
    let applied = host.wait_status("bad's extra disk", AGENT, |s| {
        s["vms"]["bad"]["disks"]["extra"].is_object()
    });
    assert_eq!(applied["vms"]["bad"]["pid"], bad, "{applied:#}");
    assert_eq!(applied["vms"]["good"]["pid"], good, "{applied:#}");
    assert_eq!(host.qemu_count("bad"), 1);
    assert_eq!(host.qemu_count("good"), 1);
}

/// The agent's soft `RLIMIT_NOFILE` set so that exactly `free` descriptor numbers are free
/// below it (a new descriptor takes the lowest free number and must be under the limit).
fn leave_free_descriptors(agent: u32, free: usize) {
    let open: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut left = free;
    let limit = (0..)
        .find(|n| {
            if !open.contains(n) {
                left -= 1;
            }
            left == 0
        })
        .unwrap()
        + 1;
    set_fd_limit(agent, limit);
}

fn set_fd_limit(agent: u32, soft: usize) {
    run(
        "prlimit",
        &["--pid", &agent.to_string(), &format!("--nofile={soft}:")],
    );
}

fn web_start_ended(status: &Value) -> bool {
    let web = &status["vms"]["web"];
    web["state"] == "running"
        || web["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files"))
}

#[test]
fn out_of_file_descriptors_a_start_fails_cleanly_and_the_retry_makes_one_qemu() {
    let mut host = Host::new();
    host.write_config(json!({}));
    host.start_agent();
    let agent = host.agent_pid();
    let web = |policy: &str| json!({"web": host.vm(json!({"restartPolicy": policy}))});

    // One more descriptor each time, until a start gets through: each start that ran out of
    // them (qemu-img, the QEMU process, its pidfile or QMP socket) leaves no QEMU behind.
    let mut failed = 0;
    for free in 1.. {
        assert!(free < 64, "starts still fail with {free} descriptors free");
        leave_free_descriptors(agent, free);
        host.write_config(web("never"));
        let status = host.wait_status("web's start to end", AGENT, web_start_ended);
        set_fd_limit(agent, 1024);
        if status["vms"]["web"]["state"] == "running" {
            assert_eq!(host.qemu_count("web"), 1);
            break;
        }
        failed += 1;
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(host.qemu_count("web"), 0, "{free} free: {status:#}");
        host.write_config(json!({}));
        host.wait_status("web gone", AGENT, |s| s["vms"]["web"].is_null());
        assert_eq!(host.qemu_count("web"), 0);
    }
    assert!(failed > 0, "the first start had descriptors enough");

    // Restart-policy retries while descriptors are short: none leaves a QEMU, and once there
    // are descriptors again exactly one runs.
    host.write_config(json!({}));
    host.wait_status("web gone", AGENT, |s| s["vms"]["web"].is_null());
    leave_free_descriptors(agent, 1);
    host.write_config(web("always"));
    host.wait_status("web's start to fail", AGENT, web_start_ended);
    for _ in 0..20 {
        assert_eq!(host.qemu_count("web"), 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    set_fd_limit(agent, 1024);
    let pid = host.wait_running("web");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(harness::procs::qemu_pids(&host.run_dir, "web"), [pid]);
}
