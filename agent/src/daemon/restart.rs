//! Restart policy with exponential backoff: when a VM's QEMU exits, whether and when it runs
//! again. Pure bookkeeping; the daemon schedules the wake-ups.

use std::time::{Duration, Instant};

use crate::spec::RestartPolicy;

const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A VM that ran this long before exiting starts its backoff from scratch.
const STABLE_AFTER: Duration = Duration::from_secs(300);

/// Per VM: failures in a row and, while the VM is held down, why and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartTracker {
    failures: u32,
    /// Restarts done after an exit, for status.
    pub restarts: u32,
    down: Option<Down>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Down {
    reason: String,
    /// `None`: down until an operator `start` or a new spec.
    until: Option<Instant>,
}

/// `1 s, 2 s, 4 s, ...` capped at 60 s, for the `failures`-th failure in a row (from 1).
pub fn backoff(failures: u32) -> Duration {
    FIRST_DELAY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_DELAY)
}

impl RestartTracker {
    /// Records an exit (`clean`: the guest shut itself down) after running `ran_for`. Returns when
    /// to restart, if the policy says to.
    pub fn on_exit(
        &mut self,
        policy: RestartPolicy,
        clean: bool,
        ran_for: Duration,
        reason: String,
        now: Instant,
    ) -> Option<Duration> {
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !clean,
            RestartPolicy::Never => false,
        };
        if !restart {
            let policy_name = match policy {
                RestartPolicy::Always => "always",
                RestartPolicy::OnFailure => "on-failure",
                RestartPolicy::Never => "never",
            };
            self.down = Some(Down {
                reason: format!(
                    "{reason}; restartPolicy {policy_name} (plasmavmc start to run it)"
                ),
                until: None,
            });
            return None;
        }
        if ran_for >= STABLE_AFTER || clean {
            self.failures = 0;
        }
        self.failures += 1;
        let delay = if clean {
            FIRST_DELAY
        } else {
            backoff(self.failures)
        };
        self.down = Some(Down {
            reason: format!("{reason}; restarting after {delay:?}"),
            until: Some(now + delay),
        });
        Some(delay)
    }

    /// A start failed (bad disk path, QEMU refused an option): same policy as a crash.
    pub fn on_start_failed(
        &mut self,
        policy: RestartPolicy,
        error: &str,
        now: Instant,
    ) -> Option<Duration> {
        self.on_exit(
            policy,
            false,
            Duration::ZERO,
            format!("start failed: {error}"),
            now,
        )
    }

    /// Why the VM is held down at `now`, if it is.
    pub fn held_down(&self, now: Instant) -> Option<&str> {
        match &self.down {
            Some(Down { until: Some(t), .. }) if *t <= now => None,
            Some(down) => Some(&down.reason),
            None => None,
        }
    }

    /// The VM was started: an automatic restart if it was held down by a backoff.
    pub fn on_started(&mut self) {
        if self.down.take().is_some() {
            self.restarts += 1;
        }
    }

    /// An operator `start` or a new spec: a fresh chance, no backoff.
    pub fn forgive(&mut self) {
        self.failures = 0;
        self.down = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(1000), MAX_DELAY);
    }

    #[test]
    fn on_failure_restarts_crashes_not_clean_shutdowns() {
        let now = Instant::now();
        let mut t = RestartTracker::default();
        let delay = t.on_exit(
            RestartPolicy::OnFailure,
            false,
            Duration::ZERO,
            "died".into(),
            now,
        );
        assert_eq!(delay, Some(Duration::from_secs(1)));
        assert!(t.held_down(now).is_some());
        assert!(t.held_down(now + Duration::from_secs(1)).is_none());
        t.on_started();
        assert_eq!(t.restarts, 1);
        let second = t.on_exit(
            RestartPolicy::OnFailure,
            false,
            Duration::ZERO,
            "died".into(),
            now,
        );
        assert_eq!(second, Some(Duration::from_secs(2)));

        let mut clean = RestartTracker::default();
        assert_eq!(
            clean.on_exit(
                RestartPolicy::OnFailure,
                true,
                Duration::ZERO,
                "off".into(),
                now
            ),
            None
        );
        assert!(clean
            .held_down(now + MAX_DELAY)
            .unwrap()
            .contains("plasmavmc start"));
    }

    #[test]
    fn never_holds_down_until_forgiven_and_stable_runs_reset_backoff() {
        let now = Instant::now();
        let mut t = RestartTracker::default();
        assert_eq!(
            t.on_exit(
                RestartPolicy::Never,
                false,
                Duration::ZERO,
                "died".into(),
                now
            ),
            None
        );
        assert!(t.held_down(now + MAX_DELAY).is_some());
        t.forgive();
        assert!(t.held_down(now).is_none());

        for _ in 0..5 {
            t.on_exit(
                RestartPolicy::Always,
                false,
                Duration::ZERO,
                "died".into(),
                now,
            );
        }
        let after_long_run = t.on_exit(
            RestartPolicy::Always,
            false,
            STABLE_AFTER,
            "died".into(),
            now,
        );
        assert_eq!(after_long_run, Some(FIRST_DELAY));
    }
}
