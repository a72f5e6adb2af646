//! Live migration end to end: two real agents (hosts `a` and `b`, their own run dirs and host
//! ids; `b` in a mount namespace of its own, where the local disk's directory is another one)
//! against a real etcd, one real HA guest with a shared disk and a local one (copied by every
//! move), moved back and forth and broken mid-move in every way the issue names, the agents
//! of either side killed -9 mid-move and started again among them. One booted guest serves
//! every check.
//!
//! A watcher samples both hosts every 20 ms all along and fails the test the moment two copies
//! run: it counts the VM's QEMU processes (by `/proc`, never by status: at most two, the source
//! and an incoming one, during a move) and reads the guest's heartbeat on both consoles. The
//! guest prints its own uptime every 0.2 s; two copies running at once would both print, so the
//! consoles' heartbeats would interleave in guest time. Ordered by guest uptime, the heartbeats
//! change host at most once per move started.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/agent.rs"]
mod harness;
#[path = "support/local_etcd.rs"]
mod local_etcd;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::io::Write;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use etcd::CutProxy;
use guest::HEARTBEAT;
use harness::watcher::Watcher;
use harness::*;
use serde_json::{json, Value};

const VM: &str = "mig1";
/// `a`'s migration ports.
const A_PORTS: &str = "18381-18382";
/// `b`'s migration ports (the stream, then the disk copies): its incoming QEMU listens on
/// 127.0.0.2, a proxy on 127.0.0.1 for each (the stream's is the one the test cuts).
const B_PORT: u16 = 18391;
/// A bandwidth cap (MiB/s) that keeps a move in flight long enough to break it.
const SLOW: &str = "1";

fn flags(endpoint: &str, host_id: &str) -> Vec<String> {
    // a: room to restart its agent mid-move before its fence guards fire (10 s: a loaded
    // 2-core machine; 6 s: a renewal can come 2.3 s late there).
    let lease_ttl = if host_id == "a" { 10 } else { 6 };
    let mut flags = cluster_agent_flags(endpoint, host_id, lease_ttl);
    if host_id == "b" {
        flags.extend(migration_flags(&format!("{B_PORT}-{}", B_PORT + 1)));
        flags.extend(["--migration-listen".into(), "127.0.0.2".into()]);
    } else {
        flags.extend(migration_flags(A_PORTS));
    }
    flags
}

fn start(host: &mut Host, endpoint: &str, id: &str) {
    host.start_agent_with(&flags(endpoint, id));
}

/// The VM as both hosts declare it: HA, a shared disk and a local one (copied by every move),
/// room for one more vCPU and one more disk.
fn declaration(host: &Host, shared: &PathBuf, local: &PathBuf) -> Value {
    host.vm(json!({
        "ha": {"enable": true},
        "maxVcpus": 2,
        "hotplugSlots": 2,
        "disks": {
            "shared1": {"path": shared, "format": "qcow2", "serial": "shared1", "shared": true},
            "local1": {"path": local, "format": "qcow2", "serial": "local1", "sizeMiB": 16, "create": {}},
        },
    }))
}

/// Heartbeats `host`'s console has shown.
fn beats(host: &Host) -> usize {
    host.console(VM).matches(HEARTBEAT).count()
}

/// Waits until the guest beats on `host` (it runs there).
fn wait_beating(host: &Host, what: &str) {
    let before = beats(host);
    let deadline = Instant::now() + AGENT;
    while beats(host) < before + 2 {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest does not run; console:\n{}\nagent log:\n{}",
            host.console(VM),
            host.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's uptime (seconds), as the guest says.
fn guest_uptime(host: &Host) -> f64 {
    let out = host.in_guest(VM, "read up rest < /proc/uptime; echo \"UP\"\"TIME=$up\"\n");
    out.split("UPTIME=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no uptime in the console output:\n{out}"))
}

/// `plasmavmc migrate` on `from`, in the background.
fn migrate_in_background(from: &Host, args: &[&str]) -> Child {
    from.cli_in_background(&[&["migrate", VM][..], args].concat())
}

/// Waits until `host`'s move of the VM has sent some memory: the move is in flight.
fn wait_mid_move(host: &Host) {
    host.wait_status("a move in flight", AGENT, |s| {
        s["vms"][VM]["migration"]["ramTransferredBytes"]
            .as_u64()
            .is_some_and(|bytes| bytes > 256 << 10)
    });
}

/// The move was abandoned: exit 1, the VM runs on `source` as before (same QEMU, the guest
/// beating), nothing of it on `target`.
fn assert_abandoned(move_: Cli, source: &Host, target: &Host, source_pid: u32, what: &str) {
    assert_eq!(move_.code, 1, "{what}: {move_:?}");
    assert!(
        move_.stderr.contains("runs here as before"),
        "{what}: says the VM stays: {move_:?}"
    );
    let status = source.wait_status(&format!("{what}: {VM} running again"), AGENT, |s| {
        s["vms"][VM]["state"] == "running"
    });
    assert_eq!(
        status["vms"][VM]["pid"], source_pid,
        "{what}: the same QEMU"
    );
    wait_beating(source, what);
    let deadline = Instant::now() + AGENT;
    while target.qemu_count(VM) != 0 {
        assert!(Instant::now() < deadline, "{what}: the incoming QEMU stays");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// After a source agent restarted mid-move: the VM runs on `source` as before (same QEMU
/// `pid`, the guest beating, its uptime past `uptime_before`), the new agent says why, nothing
/// of it on `target`.
fn assert_kept_after_restart(
    source: &Host,
    target: &Host,
    pid: u32,
    uptime_before: f64,
    what: &str,
) {
    let status = source.wait_status(&format!("{what}: the move settled"), AGENT, |s| {
        s["vms"][VM]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("interrupted by an agent restart"))
            && s["vms"][VM]["state"] == "running"
    });
    assert_eq!(status["vms"][VM]["pid"], pid, "{what}: the same QEMU");
    wait_beating(source, what);
    let deadline = Instant::now() + AGENT;
    while target.qemu_count(VM) != 0 {
        assert!(Instant::now() < deadline, "{what}: the incoming QEMU stays");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        guest_uptime(source) > uptime_before,
        "{what}: the guest's uptime goes on"
    );
}

/// The older copies a move set aside in `dir` (`PATH.before-migration-ID`).
fn set_aside(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains(".before-migration-"))
        .collect()
}

/// With `host`'s agent dead (its QMP socket free): lifts the source QEMU's bandwidth cap and
/// waits until it pauses at the switchover (`pause-before-switchover`), where it stays.
fn speed_to_switchover(host: &Host) {
    use std::io::BufRead;
    let socket = host.run_dir.join("vms").join(VM).join("qmp.sock");
    let stream = std::os::unix::net::UnixStream::connect(&socket).expect("the QMP socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    // Skips the greeting and events: the reply to `command`.
    let mut execute = |command: Value| -> Value {
        writeln!(writer, "{command}").unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("QMP answers");
            let reply: Value = serde_json::from_str(&line).expect("QMP speaks JSON");
            if reply.get("return").is_some() || reply.get("error").is_some() {
                return reply;
            }
        }
    };
    execute(json!({"execute": "qmp_capabilities"}));
    let lifted = execute(json!({"execute": "migrate-set-parameters",
        "arguments": {"max-bandwidth": 1u64 << 30}}));
    assert!(lifted.get("return").is_some(), "{lifted}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = execute(json!({"execute": "query-migrate"}));
        if status["return"]["status"] == "pre-switchover" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the source never paused at the switchover: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn live_moves_carry_the_running_guest_and_every_fault_leaves_exactly_one_copy() {
    let etcd = etcd::single();
    let endpoint = etcd.endpoint(0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(CutProxy::start_at(
        &format!("127.0.0.1:{B_PORT}"),
        format!("127.0.0.2:{B_PORT}"),
    ));
    let nbd_port = B_PORT + 1;
    let _nbd_proxy = runtime.block_on(CutProxy::start_at(
        &format!("127.0.0.1:{nbd_port}"),
        format!("127.0.0.2:{nbd_port}"),
    ));
    let mut a = Host::new();
    let mut b = Host::another(&a);
    let shared = a.image("shared.qcow2");
    // The local disk's directory: on b (its own mount namespace) the same path is b's directory.
    let (a_local, b_local) = (a.dir.path().join("local"), b.dir.path().join("local"));
    std::fs::create_dir_all(&a_local).unwrap();
    std::fs::create_dir_all(&b_local).unwrap();
    let template = declaration(&a, &shared, &a_local.join("local1.qcow2"));
    let declared = |extra: Value| {
        let mut vm = template.clone();
        for (key, value) in extra.as_object().unwrap() {
            vm[key] = value.clone();
        }
        json!({ VM: vm })
    };
    for host in [&a, &b] {
        host.write_config(declared(json!({})));
    }
    start(&mut a, &endpoint, "a");
    a.wait_running(VM);
    a.wait_boot(VM);
    let b_flags = flags(&endpoint, "b");
    b.start_agent_with_mount(&b_local, &a_local, &b_flags);
    b.wait_status("b standing by", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (a)"
    });
    let watcher = Watcher::start(&[&a, &b], &[VM], 2);

    // Live changes since boot (a vCPU, a disk) and one that waits for a boot (cmdline).
    let hot = a.image("hot.qcow2");
    let changed = declared(json!({
        "vcpus": 2,
        "cmdline": format!("{} plasmavmc.pending=1", guest::guest_cmdline(false)),
    }));
    let mut changed_vm = changed[VM].clone();
    changed_vm["disks"]["hot1"] =
        json!({"path": hot, "format": "qcow2", "serial": "hot1", "shared": true});
    let changed = json!({ VM: changed_vm });
    b.write_config(changed.clone());
    a.write_config(changed);
    a.cli(&["reload"]).expect_code(0, "live changes on a");
    let before = a.wait_status("vCPU and disk plugged", AGENT, |s| {
        let devices = device_ids(&s["vms"][VM]);
        devices.contains(&"disk-hot1".to_owned()) && devices.iter().any(|d| d.starts_with("vcpu-"))
    });
    assert_eq!(
        before["vms"][VM]["pending"][0]["field"], "cmdline",
        "{before:#}"
    );
    b.cli(&["reload"])
        .expect_code(0, "b reloads its declaration");

    // The guest beats, and leaves a mark on the shared disk.
    a.in_guest(
        VM,
        "(while true; do read up rest < /proc/uptime; echo \"H\"\"B:$up\"; sleep 0.2; done) &\n\
         dev() { for d in /sys/block/vd*; do read s < $d/serial; [ \"$s\" = $1 ] && echo /dev/${d##*/}; done; }\n\
         echo MIGRATION-MARK-42 | dd of=$(dev shared1) bs=512 count=1 conv=fsync 2>/dev/null\n\
         echo LOCAL-MARK-777777 | dd of=$(dev local1) bs=512 count=1 conv=fsync 2>/dev/null",
    );
    wait_beating(&a, "heartbeat on a");
    let uptime_before = guest_uptime(&a);

    // 1. A live move a -> b (through the proxy in front of b's listener).
    watcher.move_starts(VM);
    let moved = a
        .cli(&["migrate", VM, "--to", "b", "--json"])
        .expect_code(0, "live move a -> b");
    let outcome: Value = serde_json::from_str(moved.stdout.trim()).unwrap();
    assert_eq!(
        (
            &outcome["vm"],
            &outcome["from"],
            &outcome["to"],
            &outcome["mode"]
        ),
        (&json!(VM), &json!("a"), &json!("b"), &json!("live")),
        "{outcome}"
    );
    assert!(
        outcome["transferredBytes"].as_u64().unwrap() > 0,
        "{outcome}"
    );
    assert!(outcome["downtimeMs"].as_u64().unwrap() < outcome["totalMs"].as_u64().unwrap());
    eprintln!("live move a -> b: {outcome}");
    watcher.check();
    assert_eq!(a.qemu_count(VM), 0, "the source QEMU is gone");
    assert_eq!(b.qemu_count(VM), 1);
    let on_b = b.wait_running(VM);
    wait_beating(&b, "heartbeat on b");
    assert!(
        !b.console(VM).contains(guest::READY),
        "no second boot on b:\n{}",
        b.console(VM)
    );
    assert!(
        guest_uptime(&b) > uptime_before,
        "the guest's uptime goes on"
    );
    let read = b.in_guest(
        VM,
        "echo 3 > /proc/sys/vm/drop_caches; dd if=$(dev shared1) bs=17 count=1 2>/dev/null; echo\n\
         dd if=$(dev local1) bs=17 count=1 2>/dev/null; echo",
    );
    assert!(
        read.contains("MIGRATION-MARK-42"),
        "the mark is there: {read}"
    );
    assert!(
        read.contains("LOCAL-MARK-777777"),
        "the local disk was copied: {read}"
    );
    assert!(
        b_local.join("local1.qcow2").is_file(),
        "b's own copy, in b's directory"
    );
    let on_b_status = b.vm_status(VM);
    let devices = device_ids(&on_b_status);
    assert!(
        devices.contains(&"disk-hot1".to_owned()) && devices.iter().any(|d| d.starts_with("vcpu-")),
        "the hotplugged disk and vCPU came along: {devices:?}"
    );
    assert_eq!(
        on_b_status["pending"][0]["field"], "cmdline",
        "pending stays pending: {on_b_status:#}"
    );
    let cluster = b
        .cli(&["status", "--cluster"])
        .expect_code(0, "cluster status");
    let line = cluster
        .stdout
        .lines()
        .find(|l| l.contains(VM))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.starts_with('b') && line.contains("running"),
        "{}",
        cluster.stdout
    );
    let a_status = a.vm_status(VM);
    assert_eq!(
        a_status["heldDown"], "HA: another host holds it (b)",
        "{a_status:#}"
    );

    // 2. `--cancel` mid-move (b -> a): the VM stays on b.
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&b, &["--to", "a", "--bandwidth", SLOW]);
    wait_mid_move(&b);
    b.cli(&["migrate", VM, "--cancel"]).expect_code(0, "cancel");
    assert_abandoned(finished(move_), &b, &a, on_b, "cancel");
    watcher.check();

    // 3. The target's QEMU killed -9 mid-move (b -> a).
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&b, &["--to", "a", "--bandwidth", SLOW]);
    wait_mid_move(&b);
    let incoming = procs::qemu_pids(&a.run_dir, VM);
    assert_eq!(incoming.len(), 1, "one incoming QEMU on a");
    kill_9(incoming[0]);
    assert_abandoned(finished(move_), &b, &a, on_b, "target QEMU killed");
    watcher.check();

    // 4. The target's agent killed -9 mid-move (b -> a); its fence guard takes the incoming
    // QEMU down, the source resumes and forgets the move. a set its older copy of the local disk
    // aside for the move: started again, its agent finds its own record of the move (in its
    // state dir, never confirmed: the lock never came) and puts the older copy back over the
    // partial image, byte for byte, before it serves anything.
    let a_image = a_local.join("local1.qcow2");
    let a_older = std::fs::read(&a_image).expect("a keeps its older copy of the local disk");
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&b, &["--to", "a", "--bandwidth", SLOW]);
    wait_mid_move(&b);
    assert_eq!(
        set_aside(&a_local).len(),
        1,
        "a set its older copy aside for the move: {:?}",
        set_aside(&a_local)
    );
    a.kill_agent();
    assert_abandoned(finished(move_), &b, &a, on_b, "target agent killed");
    watcher.check();
    assert_ne!(
        std::fs::read(&a_image).ok(),
        Some(a_older.clone()),
        "the partial image is at the disk's path while a's agent is down"
    );
    start(&mut a, &endpoint, "a");
    a.wait_status("a standing by again, its incoming QEMU gone", AGENT, |s| {
        s["vms"][VM]["heldDown"] == "HA: another host holds it (b)" && s["vms"][VM]["pid"].is_null()
    });
    let what = "target agent back after its lease";
    assert_eq!(
        set_aside(&a_local),
        Vec::<String>::new(),
        "{what}: no older copy left aside; a's log:\n{}",
        a.agent_log_text()
    );
    assert!(
        std::fs::read(&a_image).ok() == Some(a_older),
        "{what}: a's older copy is back at the disk's path, byte for byte; a's log:\n{}",
        a.agent_log_text()
    );
    assert!(
        a.agent_log_text().contains("it never arrived"),
        "{what}: the log says why"
    );
    let arriving = a.state_dir.join("arriving");
    assert!(
        std::fs::read_dir(&arriving).map_or(true, |mut d| d.next().is_none()),
        "{what}: the move's record is gone from {}",
        arriving.display()
    );

    // 5. Back to a, live.
    watcher.move_starts(VM);
    let back = b
        .cli(&["migrate", VM, "--to", "a"])
        .expect_code(0, "live move b -> a");
    assert!(back.stdout.contains("moved live from b to a"), "{back:?}");
    let on_a = a.wait_running(VM);
    wait_beating(&a, "heartbeat back on a");
    assert_eq!(b.qemu_count(VM), 0);
    watcher.check();

    // 6. The migration connection cut mid-move (a -> b, through the proxy).
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&a, &["--to", "b", "--bandwidth", SLOW]);
    wait_mid_move(&a);
    proxy.cut();
    assert_abandoned(finished(move_), &a, &b, on_a, "connection cut");
    proxy.heal();
    watcher.check();

    // 7. The source's agent killed -9 mid-move (a -> b) and started again at once: its lease
    // and the HA lock are still its own, so the new agent abandons the move it finds (cancels
    // it); the same QEMU runs the guest on, the incoming QEMU goes.
    // 8. The same, but the source QEMU, its agent gone, goes on to the switchover and waits
    // there, paused (the test lifts its bandwidth cap over QMP): the lock never moved, so the
    // restarted agent cancels the move and resumes the guest.
    for (at_switchover, what) in [
        (false, "source agent restarted mid-transfer"),
        (true, "source agent restarted at the switchover"),
    ] {
        let uptime_before = guest_uptime(&a);
        watcher.move_starts(VM);
        let move_ = migrate_in_background(&a, &["--to", "b", "--bandwidth", SLOW]);
        wait_mid_move(&a);
        a.kill_agent();
        drop(finished(move_));
        if at_switchover {
            speed_to_switchover(&a);
        }
        start(&mut a, &endpoint, "a");
        assert_kept_after_restart(&a, &b, on_a, uptime_before, what);
        watcher.check();
    }

    // 9. The target's agent killed -9 mid-move (a -> b) and started again at once: it finds
    // the incoming QEMU without the lock and discards it, never resumes it; the source resumes.
    // b set aside its older copy of the local disk (from when the VM last ran there) for the
    // move: the new agent removes the partial image and puts the older copy back.
    let b_image = b_local.join("local1.qcow2");
    let b_older = std::fs::read(&b_image).expect("b keeps its older copy of the local disk");
    let uptime_before = guest_uptime(&a);
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&a, &["--to", "b", "--bandwidth", SLOW]);
    wait_mid_move(&a);
    assert!(
        set_aside(&b_local).len() == 1,
        "b set its older copy aside for the move: {:?}",
        set_aside(&b_local)
    );
    b.kill_agent();
    b.start_agent_with_mount(&b_local, &a_local, &b_flags);
    let what = "target agent restarted mid-transfer";
    assert_abandoned(finished(move_), &a, &b, on_a, what);
    assert!(
        guest_uptime(&a) > uptime_before,
        "{what}: the uptime goes on"
    );
    let deadline = Instant::now() + AGENT;
    while !set_aside(&b_local).is_empty() || std::fs::read(&b_image).ok() != Some(b_older.clone()) {
        assert!(
            Instant::now() < deadline,
            "{what}: b's older copy is not back (set aside: {:?}); b's log:\n{}",
            set_aside(&b_local),
            b.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    watcher.check();

    // ... and the next move there copies the disk as usual (then the VM comes back to a).
    for (from, to, name) in [(&a, &b, "b"), (&b, &a, "a")] {
        watcher.move_starts(VM);
        from.cli(&["migrate", VM, "--to", name])
            .expect_code(0, &format!("{what}: the next move to {name}"));
        wait_beating(to, &format!("{what}: heartbeat on {name}"));
    }
    let read = a.in_guest(
        VM,
        "echo 3 > /proc/sys/vm/drop_caches; dd if=$(dev local1) bs=17 count=1 2>/dev/null; echo",
    );
    assert!(
        read.contains("LOCAL-MARK-777777"),
        "{what}: the local disk is whole: {read}"
    );
    for local in [&a_local, &b_local] {
        assert!(
            set_aside(local).is_empty(),
            "{what}: {:?}",
            set_aside(local)
        );
    }
    watcher.check();

    // 10. The source's agent killed -9 mid-move (a -> b), not started again: HA failover. a's guard fences its
    // copy, the incoming QEMU never resumes without the lock, b boots the VM afresh.
    watcher.move_starts(VM);
    let move_ = migrate_in_background(&a, &["--to", "b", "--bandwidth", SLOW]);
    wait_mid_move(&a);
    a.kill_agent();
    drop(finished(move_));
    let deadline = Instant::now() + BOOT;
    loop {
        let (on_a, on_b) = (a.qemu_count(VM), b.qemu_count(VM));
        let status = b.vm_status(VM);
        if on_a == 0 && on_b == 1 && status["state"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never took the VM over (a {on_a}, b {on_b}):\n{status:#}\n{}",
            b.agent_log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.wait_boot(VM);
    watcher.check();
    drop(watcher);
}
