//! What an operator expects of a reload, through the real `plasmavmc` binary and real guests: a
//! disk moved from one VM to another in one reload reaches the second guest and leaves the first;
//! a failed live change is the VM's `lastError` until a later one succeeds; an operator `start`
//! does not outlive its VM's declaration; two unplugs the guest ignores cost one timeout, not
//! two; a `plan` request's document is validated like the file (one image reached through a
//! symlink or `..` from two VMs included: paths resolved on the host, as a reload does); logs carry
//! no colour codes.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use harness::guest::{guest_cmdline, Console, GuestState, READY};
use harness::*;
use serde_json::{json, Value};

const GUEST: Duration = Duration::from_secs(90);

fn guest(host: &Host, vm: &str) -> Console {
    Console::new(host.run_dir.join("vms").join(vm).join("console.log"))
}

fn wait_guest(host: &Host, vm: &str, done: impl Fn(&GuestState) -> bool) -> GuestState {
    guest(host, vm)
        .wait_for_state(done, GUEST)
        .unwrap_or_else(|e| panic!("{vm}: {e}"))
}

fn has_serial(state: &GuestState, serial: &str) -> bool {
    state.blocks.values().any(|s| s == serial)
}

#[test]
fn a_disk_moves_between_vms_and_operator_starts_end_with_the_declaration() {
    let mut host = Host::new();
    let moved = host.image("moved.qcow2");
    let disk = json!({"path": moved, "format": "qcow2", "serial": "moved"});
    let a = host.vm(json!({}));
    let b = host.vm(json!({"autostart": false}));
    let with = |vm: &Value, disks: Value| {
        let mut vm = vm.clone();
        vm["disks"] = disks;
        vm
    };
    host.write_config(json!({"a": with(&a, json!({"data": disk})), "b": b}));
    host.start_agent();
    let pid_a = host.wait_running("a");
    host.cli(&["start", "b"])
        .expect_code(0, "operator start of b");
    let pid_b = host.wait_running("b");
    for vm in ["a", "b"] {
        guest(&host, vm)
            .wait_for(READY, BOOT)
            .unwrap_or_else(|e| panic!("{vm}: {e}"));
    }
    wait_guest(&host, "a", |s| has_serial(s, "moved"));

    // One reload moves the disk: a lets go before b opens the image.
    host.write_config(json!({"a": a, "b": with(&b, json!({"data": disk}))}));
    let out = host
        .cli(&["reload", "--wait"])
        .expect_code(0, "reload moving a disk from a to b");
    assert!(!out.stdout.contains("FAILED"), "{}", out.stdout);
    wait_guest(&host, "b", |s| has_serial(s, "moved"));
    wait_guest(&host, "a", |s| !has_serial(s, "moved"));
    assert_eq!(
        host.wait_running("a"),
        pid_a,
        "a live change, not a restart"
    );
    assert_eq!(
        host.wait_running("b"),
        pid_b,
        "a live change, not a restart"
    );

    // A failed live change is a's last error until a later change goes through.
    let late = host.dir.path().join("late.qcow2");
    let late_disk = json!({"late": {"path": late, "format": "qcow2"}});
    host.write_config(
        json!({"a": with(&a, late_disk.clone()), "b": with(&b, json!({"data": disk}))}),
    );
    host.cli(&["reload", "--wait"])
        .expect_code(1, "reload adding a disk whose image is missing");
    let error = host.vm_status("a")["lastError"].clone();
    assert!(error.to_string().contains("late"), "lastError: {error}");
    qemu_harness::image(host.dir.path(), "late.qcow2", "qcow2", 16);
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload once the image is there");
    let a_now = host.vm_status("a");
    assert!(
        a_now["lastError"].is_null(),
        "cleared by the success: {a_now:#}"
    );

    // b's operator start ends with its declaration: declared again with autostart off, it stays down.
    host.write_config(json!({"a": with(&a, late_disk.clone())}));
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload undeclaring b");
    assert!(wait_dead(pid_b, AGENT), "b's QEMU stopped");
    host.write_config(json!({"a": with(&a, late_disk), "b": b}));
    host.cli(&["reload", "--wait"])
        .expect_code(0, "reload declaring b again");
    let b_now = host.vm_status("b");
    assert!(
        b_now["pid"].is_null() && b_now["state"] != "running",
        "b stays down: {b_now:#}"
    );
    assert_eq!(host.wait_running("a"), pid_a);
}

#[test]
fn two_unplugs_the_guest_ignores_take_one_timeout() {
    const UNPLUG_TIMEOUT: u64 = 8;
    let mut host = Host::new();
    let disks = json!({
        "one": {"path": host.image("one.qcow2"), "format": "qcow2"},
        "two": {"path": host.image("two.qcow2"), "format": "qcow2"},
    });
    let web = host.vm(json!({"cmdline": guest_cmdline(true), "disks": disks}));
    host.write_config(json!({ "web": web }));
    host.start_agent_with(&[
        "--stop-timeout",
        "2",
        "--unplug-timeout",
        &UNPLUG_TIMEOUT.to_string(),
    ]);
    host.wait_running("web");
    guest(&host, "web")
        .wait_for(READY, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));

    let mut without = web.clone();
    without["disks"] = json!({});
    host.write_config(json!({ "web": without }));
    let started = Instant::now();
    let out = host.cli(&["reload", "--wait"]);
    let took = started.elapsed();
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("disk-one") && said.contains("disk-two") && said.contains("unplugging"),
        "both removals wait for the guest:\n{said}"
    );
    let timeout = Duration::from_secs(UNPLUG_TIMEOUT);
    assert!(
        took >= timeout && took < 2 * timeout,
        "the two unplug waits overlap: the reload took {took:?} with a {timeout:?} unplug timeout"
    );
}

/// Sends one raw request line to the agent's control socket and returns the response.
fn request(host: &Host, line: &str) -> Value {
    let mut socket = UnixStream::connect(host.run_dir.join("control.sock")).unwrap();
    socket.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    BufReader::new(socket).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn a_plan_request_is_validated_like_the_file_and_logs_have_no_colours() {
    let mut host = Host::new();
    host.write_config(json!({}));
    host.start_agent();
    let web = |extra: &str| {
        format!(
            r#"{{"vcpus":1,"memoryMiB":64,"kernel":"/k"{extra},"disks":{{"a":{{"path":"/i","format":"raw","serial":"s"}},"b":{{"path":"/j","format":"raw","serial":"s"}}}}}}"#
        )
    };
    let plan = |desired: String| {
        request(
            &host,
            &format!(r#"{{"request":"plan","desired":{desired}}}"#),
        )
    };

    let answer = plan(format!(
        r#"{{"version":1,"vms":{{"db":{{"vcpus":1,"vcpus":2,"memoryMiB":64,"kernel":"/k"}},"web":{}}}}}"#,
        web(&format!(r#","cmdline":"{}""#, "x".repeat(3000)))
    ));
    assert_eq!(answer["kind"], "invalidConfig", "{answer:#}");
    let message = answer["message"].as_str().unwrap();
    for expected in [
        "vms.db.vcpus: key given twice",
        "vms.web.cmdline: 3000 bytes",
        "vms.web.disks.b.serial: also the serial of vms.web.disks.a",
    ] {
        assert!(message.contains(expected), "{expected:?} in:\n{message}");
    }

    let answer = plan(r#"{"version":1}"#.into());
    assert_eq!(answer["response"], "planned", "{answer:#}");

    // One image reached through a symlink and through `..` from two VMs: the plan request
    // resolves the paths on this host as a reload of the file does, and both refuse it.
    let image = host.image("shared.qcow2");
    let link = host.dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&image, &link).unwrap();
    let dotted = host.dir.path().join("sub/../shared.qcow2");
    std::fs::create_dir(host.dir.path().join("sub")).unwrap();
    let with_disk = |path: &std::path::Path| {
        host.vm(json!({"disks": {"data": {"path": path, "format": "qcow2"}}}))
    };
    let shared = json!({
        "web": with_disk(&image),
        "db": with_disk(&link),
        "cache": with_disk(&dotted),
    });
    let answer = plan(json!({"version": 1, "vms": shared}).to_string());
    assert_eq!(answer["kind"], "invalidConfig", "{answer:#}");
    let message = answer["message"].as_str().unwrap();
    for expected in [
        "vms.db.disks.data.path: image also used by vms.cache.disks.data",
        "vms.web.disks.data.path: image also used by vms.cache.disks.data",
    ] {
        assert!(message.contains(expected), "{expected:?} in:\n{message}");
    }
    host.write_config(shared);
    let reload = host
        .cli(&["reload"])
        .expect_code(2, "reload of one image twice");
    assert!(
        reload.stderr.contains("image also used by"),
        "{}",
        reload.stderr
    );

    let log = host.agent_log_text();
    assert!(log.contains("config loaded"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a log file:\n{log}"
    );
}
