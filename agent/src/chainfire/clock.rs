//! The clock fencing runs on: `CLOCK_BOOTTIME`, shared by every process on the host and still
//! ticking while the host is suspended. A host that slept through its lease's expiry must find
//! its deadlines passed when it wakes up, which a monotonic clock (paused in suspend) would hide.

use std::ops::{Add, Sub};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point on `CLOCK_BOOTTIME`, in milliseconds since boot: the same number in the agent and
/// in every fence guard, so deadlines can be handed from one to the other in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BootTime(u64);

impl BootTime {
    pub fn now() -> BootTime {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .expect("CLOCK_BOOTTIME is always readable on Linux");
        BootTime::from(Duration::from(now))
    }

    pub fn from_millis(millis: u64) -> BootTime {
        BootTime(millis)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// How long from `self` until `later` (zero if `later` is not later).
    pub fn until(self, later: BootTime) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0))
    }
}

impl From<Duration> for BootTime {
    fn from(since_boot: Duration) -> BootTime {
        BootTime(since_boot.as_millis() as u64)
    }
}

impl Add<Duration> for BootTime {
    type Output = BootTime;
    fn add(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_add(d.as_millis() as u64))
    }
}

impl Sub<Duration> for BootTime {
    type Output = BootTime;
    fn sub(self, d: Duration) -> BootTime {
        BootTime(self.0.saturating_sub(d.as_millis() as u64))
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): boot times of another boot mean nothing.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_moves_forward_and_does_arithmetic_in_millis() {
        let a = BootTime::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = BootTime::now();
        assert!(a.until(b) >= Duration::from_millis(19), "{a:?} {b:?}");
        assert_eq!(b.until(a), Duration::ZERO);
        let t = BootTime::from_millis(1000);
        assert_eq!((t + Duration::from_millis(1500)).as_millis(), 2500);
        assert_eq!((t - Duration::from_secs(2)).as_millis(), 0);
        assert!(!boot_id().is_empty());
    }
}
