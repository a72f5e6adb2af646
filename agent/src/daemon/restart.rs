//! Restart policy with exponential backoff: when a VM's QEMU exits, whether and when it runs
//! again. Pure bookkeeping; the daemon schedules the wake-ups.

use std::time::{Duration, Instant};

use crate::spec::RestartPolicy;

const FIRST_DELAY: Duration = Duration::from_secs(1);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A VM that ran this long before exiting starts its backoff from scratch.
const STABLE_AFTER: Duration = Duration::from_secs(300);
/// Failures in a row after which a host lets another one try an HA VM while it backs off.
const STEP_BACK_AFTER: u32 = 3;

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

    /// Whether this host should leave an HA VM to the other hosts at `now`: held down for good
    /// (its policy said no restart), or backing off after failing again and again here.
    pub fn steps_back(&self, now: Instant) -> bool {
        match &self.down {
            Some(Down { until: None, .. }) => true,
            Some(Down { until: Some(t), .. }) => *t > now && self.failures >= STEP_BACK_AFTER,
            None => false,
        }
    }

    /// The VM was started: an automatic restart (true) if it was held down by a backoff.
    pub fn on_started(&mut self) -> bool {
        let restarted = self.down.take().is_some();
        if restarted {
            self.restarts += 1;
        }
        restarted
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
        assert!(!t.steps_back(now), "one crash: restart here");
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
        assert!(t.steps_back(now + MAX_DELAY));
        t.forgive();
        assert!(t.held_down(now).is_none());
        assert!(!t.steps_back(now));

        for _ in 0..5 {
            t.on_exit(
                RestartPolicy::Always,
                false,
                Duration::ZERO,
                "died".into(),
                now,
            );
        }
        assert!(t.steps_back(now), "five failures in a row, backing off");
        assert!(
            !t.steps_back(now + MAX_DELAY),
            "the backoff is over: try again"
        );
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
