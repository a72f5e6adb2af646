//! A move's downtime: from the source QEMU's pause (its `STOP` event) until the target QEMU runs
//! the guest again (its `RESUME` event). The two events are stamped by two hosts' clocks, which
//! agree only as well as NTP keeps them, so the figure is held within what the source knows for
//! certain on its own clock: the target cannot have resumed before the source sent the lock
//! transaction, and it has resumed by the time the source hears so.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The instants of one switchover (wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchoverClock {
    /// QEMU's `STOP` on the source: the guest's last instant running there.
    pub paused: SystemTime,
    /// When the source sent the transaction that moves the HA lock.
    pub lock_sent: SystemTime,
    /// When the source heard that the target runs the guest.
    pub heard_resumed: SystemTime,
    /// QEMU's `RESUME` on the target, by the target's clock (None: the target did not say).
    pub resumed_there: Option<SystemTime>,
}

impl SwitchoverClock {
    pub fn downtime(&self) -> Duration {
        let since_pause = |t: SystemTime| t.duration_since(self.paused).unwrap_or_default();
        let at_least = since_pause(self.lock_sent);
        let at_most = since_pause(self.heard_resumed).max(at_least);
        self.resumed_there
            .map_or(at_most, |t| since_pause(t).clamp(at_least, at_most))
    }
}

/// A wall-clock instant as it travels in a record: microseconds since the Unix epoch.
pub fn to_unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn from_unix_micros(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A switchover paused at 0; the other instants in ms after it (the target's may be before).
    fn clock(lock_sent: u64, heard: u64, there: Option<i64>) -> SwitchoverClock {
        let paused = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |ms: u64| paused + Duration::from_millis(ms);
        SwitchoverClock {
            paused,
            lock_sent: at(lock_sent),
            heard_resumed: at(heard),
            resumed_there: there.map(|ms| match u64::try_from(ms) {
                Ok(after) => at(after),
                Err(_) => paused - Duration::from_millis(ms.unsigned_abs()),
            }),
        }
    }

    #[test]
    fn the_targets_resume_is_the_end_of_the_downtime() {
        assert_eq!(clock(20, 60, Some(35)).downtime(), 35 * MS);
    }

    #[test]
    fn a_skewed_target_clock_is_held_within_what_the_source_saw() {
        assert_eq!(
            clock(20, 60, Some(5)).downtime(),
            20 * MS,
            "not before the lock moved"
        );
        assert_eq!(
            clock(20, 60, Some(-300)).downtime(),
            20 * MS,
            "a clock behind"
        );
        assert_eq!(
            clock(20, 60, Some(900)).downtime(),
            60 * MS,
            "not after it was heard"
        );
    }

    #[test]
    fn without_the_targets_word_the_downtime_lasts_until_the_source_heard() {
        assert_eq!(clock(20, 60, None).downtime(), 60 * MS);
        assert_eq!(
            clock(20, 10, None).downtime(),
            20 * MS,
            "heard early: still at least"
        );
    }

    #[test]
    fn unix_micros_round_trip() {
        let t = UNIX_EPOCH + Duration::from_micros(1_796_301_603_019_123);
        assert_eq!(from_unix_micros(to_unix_micros(t)), t);
    }
}
