//! What the two agents of a move write to ChainFire, and the state machine each follows.
//!
//! ```text
//! /plasmavmc/migrations/{org}/{project}/{vm}  MigrationRecord: the source's, bound to its lease
//! /plasmavmc/incoming/{org}/{project}/{vm}    IncomingRecord: the target's, bound to its lease
//! ```
//!
//! Both keys die with their writer's lease: a source agent that dies takes its request with
//! it (the target discards its incoming QEMU), a target agent that dies takes its answer (the
//! source resumes). The HA lock moves in one transaction with the phase `switchover`, and only
//! while both keys are there.

use serde::{Deserialize, Serialize};

use super::running::RunningConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// The guest keeps running; the switchover pauses it for the downtime only.
    Live,
    /// The guest is paused for the whole copy (a cold move for VMs that cannot converge).
    Offline,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Offline => "offline",
        }
    }
}

/// Where a move stands, as the source records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// The source asked; the target prepares an incoming QEMU.
    Requested,
    /// The source's guest is paused at the switchover; the target confirms it is alive and
    /// receiving before the lock moves (a target whose agent died never gets the lock).
    Paused,
    /// The HA lock is the target's (written in the same transaction): the source never runs
    /// the guest again.
    Switchover,
}

/// The source's request, under `/plasmavmc/migrations/...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    /// One attempt: the target answers this id, so an old answer never serves a new request.
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub mode: Mode,
    pub phase: Phase,
    pub running: RunningConfig,
    pub requested_at: String,
}

/// The target's answer, under `/plasmavmc/incoming/...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingRecord {
    /// The request it answers.
    pub id: String,
    pub host: String,
    /// The target's lease: the HA lock is moved onto it.
    pub lease: i64,
    pub answer: Answer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum Answer {
    /// An incoming QEMU listens on `address:port`; disks to copy are exported over NBD on
    /// `nbd_port` (absent when every disk is shared).
    Ready {
        address: String,
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_port: Option<u16>,
    },
    /// Alive and receiving at the switchover (the answer to `Phase::Paused`).
    Confirmed,
    /// The guest runs on the target; since `at` (QEMU's `RESUME`, microseconds since the Unix
    /// epoch by the target's clock; absent from an agent that did not say).
    Resumed {
        #[serde(
            rename = "atUnixMicros",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        at: Option<u64>,
    },
    /// The target will not take the VM (not declared there, not HA there, cordoned, ...).
    Refused { reason: String },
    /// The target tried and failed (QEMU would not start, ...).
    Failed { reason: String },
}

/// What the source does when a move ends without completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Before the lock moved: cancel, resume the guest here, keep the lock.
    ResumeSource,
    /// After the lock moved: the target owns the VM; this QEMU quits and is never resumed.
    QuitSource,
}

pub fn recovery(lock_moved: bool) -> Recovery {
    if lock_moved {
        Recovery::QuitSource
    } else {
        Recovery::ResumeSource
    }
}

/// The target's next step with its incoming QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetStep {
    Wait,
    /// The source paused for the switchover: say this host is alive and receiving.
    Confirm,
    /// The stream is in and the lock is this host's: `cont`.
    Resume,
    /// Kill the incoming QEMU and forget the move (why, for the log).
    Discard(String),
}

/// What the target sees of a move it prepared for: the source's request (None: gone, its
/// lease with it), whether this host holds the lock now, the incoming QEMU's migration status
/// (`active`, `completed`, `failed`, ... or None when the QEMU is gone), and whether it has
/// confirmed the switchover already.
pub fn target_step(
    request: Option<Phase>,
    holds_lock: bool,
    incoming: Option<&str>,
    confirmed: bool,
) -> TargetStep {
    match (incoming, holds_lock, request) {
        // The source lets QEMU send the rest as it pauses: the stream may be in already.
        (Some("active" | "setup" | "none" | "completed"), false, Some(Phase::Paused))
            if !confirmed =>
        {
            TargetStep::Confirm
        }
        (None, _, _) => TargetStep::Discard("the incoming QEMU is gone".into()),
        (Some("failed" | "cancelled"), false, _) => {
            TargetStep::Discard("the incoming migration failed".into())
        }
        (Some("completed"), true, _) => TargetStep::Resume,
        // Lock ours but the stream broke after the switchover: the state never arrived whole,
        // this QEMU cannot run the guest. Dropped; the lock holder (us) boots it fresh.
        (Some("failed" | "cancelled"), true, _) => TargetStep::Discard(
            "the migration broke after the switchover; the VM boots fresh here".into(),
        ),
        // The source withdrew (cancelled, failed, or its agent and lease are gone) before the
        // stream was complete: whoever holds the lock now, this QEMU never runs the guest.
        (Some(status), _, None) if status != "completed" => TargetStep::Discard(
            "the source withdrew the request (cancelled, failed, or its agent is gone)".into(),
        ),
        _ => TargetStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_resumes_only_while_it_still_holds_the_lock() {
        assert_eq!(recovery(false), Recovery::ResumeSource);
        assert_eq!(recovery(true), Recovery::QuitSource);
    }

    #[test]
    fn the_target_resumes_only_with_the_stream_complete_and_the_lock() {
        use TargetStep::*;
        let requested = Some(Phase::Requested);
        let paused = Some(Phase::Paused);
        let switched = Some(Phase::Switchover);
        let step = |r, lock, q| target_step(r, lock, q, false);
        assert_eq!(step(requested, false, Some("active")), Wait);
        assert_eq!(step(paused, false, Some("active")), Confirm);
        assert_eq!(
            step(paused, false, Some("completed")),
            Confirm,
            "the rest may arrive before the confirmation"
        );
        assert_eq!(
            target_step(paused, false, Some("active"), true),
            Wait,
            "confirmed once"
        );
        assert!(
            matches!(step(paused, false, None), Discard(_)),
            "no confirm without a QEMU"
        );
        assert_eq!(
            step(switched, false, Some("completed")),
            Wait,
            "lock not seen yet"
        );
        assert_eq!(step(switched, true, Some("completed")), Resume);
        assert_eq!(
            step(None, true, Some("completed")),
            Resume,
            "source gone after the switch"
        );
        assert!(matches!(step(None, false, Some("active")), Discard(_)));
        assert!(
            matches!(step(None, true, Some("active")), Discard(_)),
            "the lock taken by failover is no licence for a half-received QEMU"
        );
        assert_eq!(
            step(None, false, Some("completed")),
            Wait,
            "the lock may lag"
        );
        assert!(matches!(step(requested, false, Some("failed")), Discard(_)));
        assert!(matches!(step(requested, false, None), Discard(_)));
        assert!(matches!(step(switched, true, Some("failed")), Discard(_)));
        assert_eq!(step(switched, true, Some("active")), Wait);
    }

    #[test]
    fn records_are_camel_case_json() {
        let answer = IncomingRecord {
            id: "h1-1".into(),
            host: "h2".into(),
            lease: 7,
            answer: Answer::Ready {
                address: "127.0.0.1".into(),
                port: 49152,
                nbd_port: None,
            },
        };
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["answer"]["state"], "ready");
        assert_eq!(json["answer"]["port"], 49152);
        assert_eq!(
            serde_json::from_value::<IncomingRecord>(json).unwrap(),
            answer
        );
        let resumed = serde_json::json!({"state": "resumed", "atUnixMicros": 5});
        assert_eq!(
            serde_json::from_value::<Answer>(resumed).unwrap(),
            Answer::Resumed { at: Some(5) }
        );
        let from_an_older_agent = serde_json::json!({"state": "resumed"});
        assert_eq!(
            serde_json::from_value::<Answer>(from_an_older_agent).unwrap(),
            Answer::Resumed { at: None }
        );
    }
}
