//! Stop escalation and resets against a real QEMU whose guest never answers ACPI (paused, `-S`):
//! the fallbacks must kick in and say which one happened.

#[path = "support/qemu_harness.rs"]
mod harness;

use std::time::Duration;

use harness::*;
use plasmavmc_agent::qemu::lifecycle::{self, ResetOutcome, StopOutcome};
use plasmavmc_agent::qemu::process::is_alive;
use plasmavmc_agent::qemu::QemuEvent;

#[tokio::test]
async fn stop_quits_qemu_when_the_guest_ignores_the_powerdown() {
    let run = TempRun::new();
    let (pid, qmp, _guard) = launch_bare(&run, "a").await;
    let outcome = lifecycle::stop(Some(&qmp), pid, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(outcome, StopOutcome::Quit);
    assert!(!is_alive(pid));
    let again = lifecycle::stop(Some(&qmp), pid, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(again, StopOutcome::AlreadyGone);
}

#[tokio::test]
async fn stop_without_qmp_kills() {
    let run = TempRun::new();
    let (pid, qmp, _guard) = launch_bare(&run, "b").await;
    let mut events = qmp.subscribe();
    let outcome = lifecycle::stop(None, pid, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    assert_eq!(
        next_event(&mut events).await,
        QemuEvent::Disconnected {
            after_shutdown: false
        }
    );
}

#[tokio::test]
async fn soft_reset_falls_back_to_hard_and_says_so() {
    let run = TempRun::new();
    let (pid, qmp, _guard) = launch_bare(&run, "c").await;
    let mut events = qmp.subscribe();
    let outcome = lifecycle::reset_soft(&qmp, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(outcome, ResetOutcome::HardAfterTimeout);
    let mut saw_reset = false;
    while let Ok(event) = events.try_recv() {
        saw_reset |= matches!(
            event,
            QemuEvent::Reset {
                guest_initiated: false,
                ..
            }
        );
    }
    assert!(saw_reset, "a hard reset happened");
    lifecycle::reset_hard(&qmp).await.unwrap();
    assert!(is_alive(pid), "resets keep the same QEMU");
}
