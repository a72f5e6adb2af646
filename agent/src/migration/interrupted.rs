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
//! The images of the disks the move copied, on the target (`images_after`): an incoming QEMU that
//! resumes makes the older copies set aside there (`PATH.before-migration-ID`) stale, so they
//! are removed. One discarded before the switchover leaves a partial image at each path: it is
//! removed and the older copy goes back. One discarded after it leaves whole images (the disk
//! copies end, in step, before the lock moves), which the lock holder boots from: they stay and
//! the older copies go. When it cannot be told which, both files stay (logged). Nothing else is
//! touched: a source's images, or those of a QEMU that ran the guest, are live.
//!
//! Either side: a lock that cannot be read is read again; nothing is done on a guess. A move
//! found recorded with no QEMU of that VM here: its records are forgotten, nothing else (the VM's
//! own rules start it where its lock is); the images of one that was arriving here are the
//! target's own record's business (`arrival`).

use super::Phase;

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

/// What the target does with the images of the disks its move copied, once settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Images {
    /// Nothing: this host was the source, the QEMU ran the guest, or it cannot be told whether
    /// the images are whole.
    Leave,
    /// The images are whole (the guest resumed here, or the move passed the switchover): the
    /// older copies set aside are stale, remove them.
    RemoveOlder,
    /// The incoming QEMU was discarded before the switchover: remove the partial images, put
    /// the older copies back.
    PutBackOlder,
}

/// How far a move got before its incoming QEMU was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    BeforeSwitchover,
    /// The lock moved here: the disk copies had ended, the images here are whole.
    Switchover,
    /// The store did not say.
    Unknown,
}

/// How far a move got, from what the store says once the target withdrew its answer (so the
/// lock can no longer move here): the request's phase (None: the source forgot the request)
/// and whether this host holds the lock. With the request gone and the lock here, the lock may
/// have come with the switchover or by a failover after the source's lease ended: unknown.
pub fn reached(request: Option<Phase>, lock_here: bool) -> Reached {
    match (request, lock_here) {
        (Some(Phase::Switchover), _) => Reached::Switchover,
        (Some(Phase::Requested | Phase::Paused), _) | (None, false) => Reached::BeforeSwitchover,
        (None, true) => Reached::Unknown,
    }
}

/// The fate of the copied disks' images after `settled` on the target (`source` false) of a
/// move, its QEMU last seen as `qemu`; `reached` matters only when the QEMU was discarded.
pub fn images_after(
    source: bool,
    qemu: &AdoptedQemu,
    settled: &Settle,
    reached: Reached,
) -> Images {
    if source || !qemu.incoming() {
        return Images::Leave;
    }
    match settled {
        Settle::KeepHere { .. } => Images::RemoveOlder,
        // AwaitStream, when acted on, is a wait that ran out: the QEMU is quit.
        Settle::Quit | Settle::AwaitStream => images_after_discard(reached),
        Settle::FinishThenQuit | Settle::ReadLockAgain | Settle::Forget => Images::Leave,
    }
}

/// The fate of the copied disks' images on a target that discarded its incoming QEMU (with or
/// without an agent restart), by how far the move got.
pub fn images_after_discard(reached: Reached) -> Images {
    match reached {
        Reached::BeforeSwitchover => Images::PutBackOlder,
        Reached::Switchover => Images::RemoveOlder,
        Reached::Unknown => Images::Leave,
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

    #[test]
    fn a_move_passed_the_switchover_only_when_its_request_says_so() {
        for lock_here in [false, true] {
            assert_eq!(
                reached(Some(Phase::Switchover), lock_here),
                Reached::Switchover
            );
            for phase in [Phase::Requested, Phase::Paused] {
                assert_eq!(
                    reached(Some(phase), lock_here),
                    Reached::BeforeSwitchover,
                    "{phase:?}: a lock here came by a failover, not with the move"
                );
            }
        }
        assert_eq!(
            reached(None, false),
            Reached::BeforeSwitchover,
            "abandoned: the source forgot the request and kept the lock"
        );
        assert_eq!(
            reached(None, true),
            Reached::Unknown,
            "with the switchover, or by a failover: cannot be told"
        );
    }

    #[test]
    fn a_discarded_qemus_images_give_way_only_before_the_switchover_and_stay_when_unsure() {
        assert_eq!(
            images_after_discard(Reached::BeforeSwitchover),
            Images::PutBackOlder
        );
        assert_eq!(
            images_after_discard(Reached::Switchover),
            Images::RemoveOlder,
            "the stream broke after the switchover: the lock holder boots from the whole copy"
        );
        assert_eq!(images_after_discard(Reached::Unknown), Images::Leave);
    }

    #[test]
    fn only_an_incoming_qemus_images_are_touched() {
        let reached = [
            Reached::BeforeSwitchover,
            Reached::Switchover,
            Reached::Unknown,
        ];
        for lock in LOCKS {
            for q in every_qemu() {
                let settled = settle(&lock, Some(&q));
                for r in reached {
                    assert_eq!(
                        images_after(true, &q, &settled, r),
                        Images::Leave,
                        "a source's images are live: {lock:?} {q:?}"
                    );
                    if !q.incoming() {
                        assert_eq!(
                            images_after(false, &q, &settled, r),
                            Images::Leave,
                            "a QEMU that ran the guest: {lock:?} {q:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn images_resumed_or_past_the_switchover_are_whole_and_the_older_copies_go() {
        let paused = qemu("completed", "paused");
        for r in [
            Reached::BeforeSwitchover,
            Reached::Switchover,
            Reached::Unknown,
        ] {
            let resumed = settle(&LockSeen::Here, Some(&paused));
            assert_eq!(
                images_after(false, &paused, &resumed, r),
                Images::RemoveOlder
            );
        }
        for q in [paused, qemu("failed", "inmigrate")] {
            assert_eq!(
                images_after(false, &q, &Settle::Quit, Reached::Switchover),
                Images::RemoveOlder,
                "the lock holder boots from the whole copy: {q:?}"
            );
        }
    }

    #[test]
    fn images_discarded_before_the_switchover_give_way_to_the_older_copies() {
        let receiving = qemu("active", "inmigrate");
        for (settled, why) in [
            (Settle::Quit, "the lock elsewhere"),
            (Settle::AwaitStream, "still receiving when the wait ran out"),
        ] {
            assert_eq!(
                images_after(false, &receiving, &settled, Reached::BeforeSwitchover),
                Images::PutBackOlder,
                "{why}"
            );
            assert_eq!(
                images_after(false, &receiving, &settled, Reached::Unknown),
                Images::Leave,
                "{why}, unknown whether the copies are whole: both kept"
            );
        }
    }
}
