//! The fence guard (`plasmavmc fence-guard`, the real binary) over a real QEMU, with a real lease
//! trust file and no etcd: the test plays the agent, renewing the file or not.

#[path = "support/qemu_harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_agent::chainfire::clock::{self, BootTime};
use plasmavmc_agent::chainfire::fence::LeaseStatus;
use plasmavmc_agent::chainfire::trust::{self, LeaseTrust};
use plasmavmc_agent::paths::VmDir;
use plasmavmc_agent::qemu::confine::prepare_run_dir;
use plasmavmc_agent::qemu::guard::guard_of;
use plasmavmc_agent::qemu::process::{self, is_alive, qmp_after_launch, Launcher};
use plasmavmc_agent::qemu::{Confinement, Guard};

const LEASE: i64 = 7;
/// A 3 s lease: the agent trusts it for 2 s after a keep-alive, the guard for 2.5 s.
const TTL: Duration = Duration::from_secs(3);

struct Guarded {
    _run: TempRun,
    vm: VmDir,
    trust_file: PathBuf,
    confinement: Confinement,
}

impl Guarded {
    fn new() -> Self {
        let run = TempRun::new();
        let vm = run.vm("ha1");
        let trust_file = run.run_dir.lease_trust();
        Guarded {
            _run: run,
            vm,
            trust_file,
            confinement: Confinement::none(),
        }
    }

    /// QEMU as the unprivileged test user, dropped to by the guard.
    fn confined() -> Self {
        let mut host = Guarded::new();
        let run_as = qemu_test_user();
        prepare_run_dir(&host._run.run_dir, Some(&run_as)).expect("run dir");
        host.confinement.run_as = Some(run_as);
        host
    }

    /// What the agent writes after an acknowledged keep-alive of `lease`, sent now.
    fn renew(&self, lease: i64) {
        let status = LeaseStatus {
            id: lease,
            ttl: TTL,
            last_acked_sent: BootTime::now(),
        };
        let trust = LeaseTrust::new("h1", &clock::boot_id(), &status, &Default::default());
        trust::write(&self.trust_file, &trust).unwrap();
    }

    /// A guarded QEMU, up on QMP: its PID, its guard's PID, and what kills it at the end.
    async fn running(&self) -> (u32, u32, KillOnDrop) {
        self.renew(LEASE);
        let pid = self.launch().expect("guarded launch");
        let kill = KillOnDrop(pid);
        qmp_after_launch(pid, &self.vm, STARTUP)
            .await
            .expect("QMP up");
        let guard = guard_of(pid, &self.vm).expect("QEMU is its guard's child");
        (pid, guard, kill)
    }

    fn launch(&self) -> anyhow::Result<u32> {
        let guard = Guard {
            exe: env!("CARGO_BIN_EXE_plasmavmc").into(),
            trust_file: self.trust_file.clone(),
            lease: LEASE,
        };
        let argv = bare_argv("ha1", &self.vm);
        let spec = spec(serde_json::json!({"vcpus": 1, "memoryMiB": 64, "accel": "tcg"}));
        Launcher {
            name: "ha1",
            vm_dir: &self.vm,
            qemu: &qemu(),
            guard: Some(&guard),
            confinement: &self.confinement,
        }
        .launch_confined(&spec, &argv)
    }
}

async fn dead_within(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while is_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test]
async fn the_guard_kills_its_qemu_once_the_lease_is_not_renewed_and_says_why() {
    let host = Guarded::new();
    let (pid, guard, _kill) = host.running().await;

    // Renewed twice a second for 4 s (longer than one guard deadline): QEMU lives.
    for _ in 0..8 {
        host.renew(LEASE);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(is_alive(pid), "fenced although renewed");
    }
    host.renew(LEASE);
    let last_renewal = Instant::now();
    assert!(
        dead_within(pid, Duration::from_secs(10)).await,
        "never fenced"
    );
    let fenced_after = last_renewal.elapsed();
    eprintln!("fenced {fenced_after:?} after the last renewal");
    // The server could expire the lease 3 s after the keep-alive: the guard must be quicker.
    assert!(fenced_after < TTL, "fenced after {fenced_after:?}");
    assert!(
        fenced_after >= Duration::from_secs(2),
        "fenced early: {fenced_after:?}"
    );

    let why = process::take_fence_marker(&host.vm).expect("the guard says why");
    assert!(why.starts_with("fenced by its guard at "), "{why}");
    assert!(why.contains("lease 7 was last renewed"), "{why}");
    assert!(
        dead_within(guard, Duration::from_secs(5)).await,
        "the guard exits after fencing"
    );
}

#[tokio::test]
async fn the_guard_refuses_to_start_qemu_without_a_trusted_lease() {
    let host = Guarded::new();
    let error = format!("{:#}", host.launch().unwrap_err());
    assert!(
        error.contains("refusing to start QEMU") && error.contains("cannot be confirmed"),
        "{error}"
    );
    host.renew(LEASE + 1);
    let error = format!("{:#}", host.launch().unwrap_err());
    assert!(error.contains("no longer holds lease 7"), "{error}");
    assert!(process::find_running("ha1", &host.vm).unwrap().is_none());
}

/// Confined: the guard stays root and QEMU runs as the QEMU user, which must not cost the
/// parent-death signal (a change of credentials clears it).
#[tokio::test]
async fn qemu_dies_with_its_guard_but_not_by_a_stop_signal_sent_to_the_guard() {
    let host = Guarded::confined();
    let (pid, guard, _kill) = host.running().await;
    let user = host.confinement.run_as.clone().unwrap();
    assert_eq!(
        proc_status(pid, "Uid").split_whitespace().next(),
        Some(user.uid.to_string().as_str())
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(
        proc_status(guard, "Uid").split_whitespace().next(),
        Some("0"),
        "the guard stays root"
    );
    let signal = |pid: u32, signal| kill(Pid::from_raw(pid as i32), signal).unwrap();

    signal(guard, Signal::SIGTERM);
    signal(guard, Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        is_alive(guard) && is_alive(pid),
        "the guard ignores stop signals"
    );

    signal(guard, Signal::SIGKILL);
    assert!(
        dead_within(pid, Duration::from_secs(5)).await,
        "QEMU outlived its guard"
    );
    assert_eq!(
        process::take_fence_marker(&host.vm),
        None,
        "no fence, a death"
    );
}

#[tokio::test]
async fn a_stop_signal_to_qemu_stops_it_and_its_guard_follows() {
    let host = Guarded::new();
    let (pid, guard, _kill) = host.running().await;
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    assert!(
        dead_within(pid, Duration::from_secs(10)).await,
        "QEMU ignored SIGTERM"
    );
    assert!(dead_within(guard, Duration::from_secs(5)).await);
}
