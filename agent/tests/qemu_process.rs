//! Launching QEMU detached, finding it again PID-reuse-safely, and the QMP connection's life
//! cycle, against the real QEMU (guest-less and paused: no boot needed for these).

#[path = "support/qemu_harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use plasmavmc_agent::qemu::process::{self, qmp_after_launch};
use plasmavmc_agent::qemu::{find_running, list_vm_dirs, QemuEvent, Qmp};

#[tokio::test]
async fn launched_qemu_is_found_again_and_reconnectable() {
    let run = TempRun::new();
    let vm = run.vm("web");
    let spec = tiny_spec();
    let pid = launch_argv("web", &spec, &vm, &bare_argv("web", &vm)).expect("launch");
    let _guard = KillOnDrop(pid);
    let qmp = qmp_after_launch(pid, &vm, STARTUP).await.expect("QMP up");
    let status = qmp.query_status().await.expect("query-status");
    assert!(!status.running, "started with -S");

    assert_eq!(mode_of(vm.dir()), 0o700);
    assert_eq!(
        mode_of(&vm.qmp_socket()),
        0o600,
        "QMP socket must be the agent's alone"
    );
    let found = find_running("web", &vm)
        .expect("find_running")
        .expect("found");
    assert_eq!(found.pid, pid);
    assert_eq!(found.boot_spec, spec);
    assert_eq!(list_vm_dirs(&run.run_dir).unwrap(), vec!["web".to_owned()]);
    // Same process, other VM name, or other run dir: not ours.
    assert!(find_running("db", &vm).unwrap().is_none());
    assert!(find_running("web", &TempRun::new().vm("web"))
        .unwrap()
        .is_none());

    // An agent restart: the old connection goes, a new one takes over the same QEMU.
    drop(qmp);
    let qmp = Qmp::connect(&vm.qmp_socket(), STARTUP)
        .await
        .expect("reconnect");
    assert!(qmp.query_status().await.is_ok());

    let mut events = qmp.subscribe();
    qmp.quit().await.expect("quit");
    let mut seen = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout(STARTUP, events.recv()).await {
        seen.push(event.clone());
        if matches!(event, QemuEvent::Disconnected { .. }) {
            break;
        }
    }
    assert!(
        matches!(seen.first(), Some(QemuEvent::Shutdown { guest_initiated: false, reason }) if reason == "host-qmp-quit"),
        "{seen:?}"
    );
    assert_eq!(
        seen.last(),
        Some(&QemuEvent::Disconnected {
            after_shutdown: true
        })
    );
    qmp.disconnected().await;
    assert!(!qmp.is_connected());
    assert!(
        qmp.query_status().await.is_err(),
        "commands fail once QEMU is gone"
    );
    wait_until_dead(pid).await;
    assert!(find_running("web", &vm).unwrap().is_none());
}

#[tokio::test]
async fn killed_qemu_disconnects_without_shutdown() {
    let run = TempRun::new();
    let (_pid, qmp, guard) = launch_bare(&run, "crash").await;
    let mut events = qmp.subscribe();
    drop(guard);
    assert_eq!(
        next_event(&mut events).await,
        QemuEvent::Disconnected {
            after_shutdown: false
        }
    );
}

#[tokio::test]
async fn a_reused_pid_is_never_adopted() {
    let run = TempRun::new();
    let vm = run.vm("web");
    std::fs::create_dir_all(vm.dir()).unwrap();
    std::fs::write(vm.boot_spec(), serde_json::to_vec(&tiny_spec()).unwrap()).unwrap();
    // The pidfile points at a live process that is not QEMU (as after a reboot or PID wrap).
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(vm.pidfile(), format!("{}\n", sleeper.id())).unwrap();
    let found = find_running("web", &vm);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(found.expect("no error").is_none());
    // A dead PID: nothing either.
    assert!(find_running("web", &vm).unwrap().is_none());
}

#[tokio::test]
async fn qemu_that_refuses_to_start_says_why() {
    let run = TempRun::new();
    let vm = run.vm("bad");
    let mut argv = bare_argv("bad", &vm);
    argv.extend([
        "-blockdev".into(),
        "driver=file,node-name=x,filename=/nonexistent/disk.img".into(),
    ]);
    let pid = launch_argv("bad", &tiny_spec(), &vm, &argv).expect("spawned");
    let _guard = KillOnDrop(pid);
    let err = qmp_after_launch(pid, &vm, STARTUP)
        .await
        .err()
        .expect("startup fails");
    let message = format!("{err:#}");
    assert!(message.contains("/nonexistent/disk.img"), "{message}");
}

async fn wait_until_dead(pid: u32) {
    for _ in 0..500 {
        if !process::is_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("QEMU {pid} still alive");
}
