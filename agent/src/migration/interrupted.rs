//! A move whose agent died (kill -9, a crash) on one of its two hosts and came back on the same
//! host: what the new agent does with the QEMU of the move it adopted, from what it can read for
//! certain. The HA lock is the truth, because it moves in the same transaction as the phase
//! `switchover` (the point of no return).
//!
//! The source QEMU (still migrating, paused at the switchover, or paused after a migration):
//! - the lock is still this host's: the move never passed the point of no return. Cancel the
//!   migration if QEMU still migrates, resume the guest (`cont`), forget the request and the
//!   answer (the target discards its incoming QEMU once the request is gone).
//! - the lock is the target's: the guest belongs there. A QEMU still paused at the switchover
//!   sends the rest first (the target resumes the guest where it stopped), then quits; any other
//!   quits at once. Never resumed.
//! - the lock is another host's, or nobody's: this host may not run the guest. Quit.
//!
//! The incoming QEMU (QEMU says `inmigrate`, or `paused` with the stream complete) runs the guest
//! only with the stream complete *and* the lock this host's; while the lock is here and the
//! stream still arrives, it waits; in every other case it is discarded, never resumed.
//!
//! Either side: a lock that cannot be read is read again; nothing is done on a guess. A move
//! found recorded with no QEMU of that VM here: its records are forgotten, nothing else (the VM's
//! own rules start it where its lock is).

/// What the HA lock's record in the store says, read after the restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockSeen {
    /// Held by this host, under its lease.
    Here,
    /// Held by the move's target (another host).
    Target,
    /// Held by another host, or by none.
    Elsewhere,
    /// The store did not answer (or the record was unreadable).
    Unknown,
}

/// An adopted QEMU, as QMP says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedQemu {
    /// `query-migrate`'s status (`none` when it never migrated); on an incoming QEMU, how the
    /// stream arrives.
    pub migration: String,
    /// `query-status`'s `status`: `running`, `paused`, `inmigrate`, `finish-migrate`,
    /// `postmigrate`...
    pub run_state: String,
}

impl AdoptedQemu {
    fn running(&self) -> bool {
        self.run_state == "running"
    }

    /// A migration target's QEMU that never ran the guest: receiving, or received and paused
    /// (a source that completed says `postmigrate`).
    fn incoming(&self) -> bool {
        self.run_state == "inmigrate"
            || (self.run_state == "paused" && self.migration == "completed")
    }
}

/// What the new agent does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Read the lock again before anything else.
    ReadLockAgain,
    /// An incoming QEMU, the lock here, the stream still arriving: look again shortly.
    AwaitStream,
    /// The guest runs here: `cancel` the migration in flight (a source), `resume` the paused
    /// guest, then forget the move.
    KeepHere { cancel: bool, resume: bool },
    /// The guest belongs to the target, paused here at the switchover: let QEMU send the rest,
    /// then quit it and forget the move.
    FinishThenQuit,
    /// Quit this QEMU (never resume it), forget the move.
    Quit,
    /// No QEMU of the VM here: forget the move.
    Forget,
}

/// Statuses in which QEMU still migrates (`migrate_cancel` ends them on a source).
fn in_flight(migration: &str) -> bool {
    matches!(
        migration,
        "setup" | "active" | "pre-switchover" | "device" | "cancelling" | "wait-unplug"
    )
}

/// Whether an adopted QEMU is part of a move, or left paused by one: an incoming QEMU; a source
/// still migrating, or paused with a migration behind it (at the switchover, after it, or
/// cancelled and never resumed).
pub fn mid_move(qemu: &AdoptedQemu) -> bool {
    qemu.incoming() || in_flight(&qemu.migration) || (!qemu.running() && qemu.migration != "none")
}

/// What to do with a move found recorded (by this host as its source or target), or a QEMU
/// found `mid_move` (`qemu` None: no QEMU of the VM here).
pub fn settle(lock: &LockSeen, qemu: Option<&AdoptedQemu>) -> Settle {
    let Some(qemu) = qemu else {
        return Settle::Forget;
    };
    match lock {
        LockSeen::Unknown => Settle::ReadLockAgain,
        LockSeen::Here if qemu.incoming() => match qemu.migration.as_str() {
            "completed" => Settle::KeepHere {
                cancel: false,
                resume: true,
            },
            status if in_flight(status) => Settle::AwaitStream,
            _ => Settle::Quit,
        },
        LockSeen::Here => Settle::KeepHere {
            cancel: in_flight(&qemu.migration),
            resume: !qemu.running(),
        },
        LockSeen::Target if qemu.migration == "pre-switchover" && !qemu.incoming() => {
            Settle::FinishThenQuit
        }
        LockSeen::Target | LockSeen::Elsewhere => Settle::Quit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUSES: [&str; 10] = [
        "none",
        "setup",
        "active",
        "pre-switchover",
        "device",
        "cancelling",
        "wait-unplug",
        "completed",
        "failed",
        "cancelled",
    ];
    const RUN_STATES: [&str; 6] = [
        "running",
        "paused",
        "inmigrate",
        "finish-migrate",
        "postmigrate",
        "prelaunch",
    ];
    const LOCKS: [LockSeen; 4] = [
        LockSeen::Here,
        LockSeen::Target,
        LockSeen::Elsewhere,
        LockSeen::Unknown,
    ];

    fn every_qemu() -> Vec<AdoptedQemu> {
        let mut all = Vec::new();
        for migration in STATUSES {
            for run_state in RUN_STATES {
                all.push(AdoptedQemu {
                    migration: migration.into(),
                    run_state: run_state.into(),
                });
            }
        }
        all
    }

    fn qemu(migration: &str, run_state: &str) -> AdoptedQemu {
        AdoptedQemu {
            migration: migration.into(),
            run_state: run_state.into(),
        }
    }

    #[test]
    fn held_as_mid_move_incoming_qemus_and_sources_a_migration_holds_or_left_paused() {
        for q in every_qemu() {
            let incoming = q.run_state == "inmigrate"
                || (q.run_state == "paused" && q.migration == "completed");
            let expected = incoming
                || match (q.migration.as_str(), q.run_state.as_str()) {
                    ("none", _) => false,
                    ("completed" | "failed" | "cancelled", run_state) => run_state != "running",
                    _ => true,
                };
            assert_eq!(mid_move(&q), expected, "{q:?}");
        }
        assert!(!mid_move(&qemu("none", "running")), "a VM that never moved");
        assert!(
            !mid_move(&qemu("completed", "running")),
            "a VM that arrived here and runs"
        );
        assert!(
            !mid_move(&qemu("cancelled", "running")),
            "a move abandoned long ago"
        );
    }

    #[test]
    fn an_unknown_lock_is_read_again_before_anything_is_done() {
        for q in every_qemu() {
            assert_eq!(
                settle(&LockSeen::Unknown, Some(&q)),
                Settle::ReadLockAgain,
                "{q:?}"
            );
        }
    }

    #[test]
    fn with_no_qemu_here_only_the_records_go() {
        for lock in LOCKS {
            assert_eq!(settle(&lock, None), Settle::Forget, "{lock:?}");
        }
    }

    #[test]
    fn a_source_whose_lock_is_still_here_keeps_the_guest_cancelling_and_resuming_as_needed() {
        for q in every_qemu().into_iter().filter(|q| !q.incoming()) {
            let cancel = !matches!(
                q.migration.as_str(),
                "none" | "completed" | "failed" | "cancelled"
            );
            assert_eq!(
                settle(&LockSeen::Here, Some(&q)),
                Settle::KeepHere {
                    cancel,
                    resume: q.run_state != "running"
                },
                "{q:?}"
            );
        }
        assert_eq!(
            settle(
                &LockSeen::Here,
                Some(&qemu("pre-switchover", "finish-migrate"))
            ),
            Settle::KeepHere {
                cancel: true,
                resume: true
            },
            "paused at the switchover, the lock not moved"
        );
        assert_eq!(
            settle(&LockSeen::Here, Some(&qemu("active", "running"))),
            Settle::KeepHere {
                cancel: true,
                resume: false
            },
            "killed mid-transfer"
        );
    }

    #[test]
    fn a_guest_whose_lock_left_is_never_resumed_here() {
        for lock in [LockSeen::Target, LockSeen::Elsewhere] {
            for q in every_qemu() {
                let settled = settle(&lock, Some(&q));
                let expected =
                    if lock == LockSeen::Target && q.migration == "pre-switchover" && !q.incoming()
                    {
                        Settle::FinishThenQuit
                    } else {
                        Settle::Quit
                    };
                assert_eq!(settled, expected, "{lock:?} {q:?}");
            }
        }
    }

    #[test]
    fn an_incoming_qemu_resumes_only_with_the_stream_complete_and_the_lock_here() {
        for q in every_qemu().into_iter().filter(|q| q.incoming()) {
            let expected = match q.migration.as_str() {
                "completed" => Settle::KeepHere {
                    cancel: false,
                    resume: true,
                },
                status if in_flight(status) => Settle::AwaitStream,
                _ => Settle::Quit,
            };
            assert_eq!(settle(&LockSeen::Here, Some(&q)), expected, "{q:?}");
            for lock in [LockSeen::Target, LockSeen::Elsewhere] {
                assert_eq!(settle(&lock, Some(&q)), Settle::Quit, "{lock:?} {q:?}");
            }
        }
        assert_eq!(
            settle(&LockSeen::Here, Some(&qemu("active", "inmigrate"))),
            Settle::AwaitStream
        );
        assert_eq!(
            settle(&LockSeen::Elsewhere, Some(&qemu("active", "inmigrate"))),
            Settle::Quit,
            "receiving without the lock: discarded"
        );
        assert_eq!(
            settle(&LockSeen::Here, Some(&qemu("failed", "inmigrate"))),
            Settle::Quit,
            "the stream broke: this QEMU never runs the guest"
        );
    }
}
