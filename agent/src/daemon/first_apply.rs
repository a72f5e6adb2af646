//! The agent's first apply: run once at start, its outcome kept for `plasmavmc first-apply`
//! (which the NixOS unit `plasmavmc-first-apply.service` runs after every agent start, so a
//! switch that restarts the agent fails when this apply does). Later reloads leave it as it was.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::supervisor::Daemon;
use crate::control::protocol::ErrorKind;
use crate::first_apply::FirstApply;

/// The first apply's outcome: `Pending` until it has ended, then fixed for this process's life.
pub struct FirstApplyOutcome(watch::Sender<FirstApply>);

impl Default for FirstApplyOutcome {
    fn default() -> Self {
        Self(watch::Sender::new(FirstApply::Pending))
    }
}

impl FirstApplyOutcome {
    /// The outcome once it is known, or `Pending` if it is not within `wait`.
    pub async fn wait(&self, wait: Duration) -> FirstApply {
        let mut outcome = self.0.subscribe();
        let known = tokio::time::timeout(wait, outcome.wait_for(|o| !o.is_pending())).await;
        match known {
            Ok(Ok(known)) => known.clone(),
            _ => self.0.borrow().clone(),
        }
    }

    fn set(&self, outcome: FirstApply) {
        self.0.send_replace(outcome);
    }
}

/// Runs the first reconcile in a task of its own, records its outcome when it ends, and
/// returns it once known or after `wait` (`Pending` then: the apply goes on).
pub async fn run(daemon: &Arc<Daemon>, wait: Duration) -> FirstApply {
    let reconcile = tokio::spawn({
        let daemon = Arc::clone(daemon);
        async move { daemon.reconcile(false).await }
    });
    tokio::spawn({
        let daemon = Arc::clone(daemon);
        async move {
            let outcome = match reconcile.await {
                Ok(Ok(report)) => FirstApply::from_report(&report),
                Ok(Err((kind, message))) => FirstApply::NotApplied { kind, message },
                Err(e) => FirstApply::NotApplied {
                    kind: ErrorKind::Failed,
                    message: format!("the first apply crashed: {e}"),
                },
            };
            match outcome.failure() {
                Some(_) => tracing::error!("{}", outcome.render().trim_end()),
                None => tracing::info!("{}", outcome.summary()),
            }
            daemon.first_apply.set(outcome);
        }
    });
    daemon.first_apply.wait(wait).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The case READY does not wait for: an apply still running when asked, that ends later.
    #[tokio::test]
    async fn a_waiter_gets_an_outcome_set_after_it_asked_and_pending_past_its_wait() {
        let outcome = Arc::new(FirstApplyOutcome::default());
        let early = outcome.wait(Duration::from_millis(10)).await;
        assert_eq!(early, FirstApply::Pending);
        let waiter = tokio::spawn({
            let outcome = Arc::clone(&outcome);
            async move { outcome.wait(Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        outcome.set(FirstApply::Done { steps: 1 });
        assert_eq!(waiter.await.unwrap(), FirstApply::Done { steps: 1 });
        let later = outcome.wait(Duration::ZERO).await;
        assert_eq!(later, FirstApply::Done { steps: 1 });
    }
}
