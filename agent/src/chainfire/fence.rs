//! Self-fencing: which HA VMs this host may run right now, from its own monotonic clock.
//!
//! The server expires a lease TTL after the last keep-alive it received; that is never earlier
//! than TTL after the holder *sent* its last acknowledged keep-alive. So the holder gives up its
//! locks once `now - last_acked_sent > TTL - margin`: it is down before any other host can take
//! the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::keys::VmKey;

/// The session's lease as the keep-alive loop last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    pub id: i64,
    /// When the last keep-alive (or the grant) that the server acknowledged was sent.
    pub last_acked_sent: Instant,
}

/// Until when the holder may trust its lease (exclusive).
pub fn trusted_until(lease: &LeaseStatus, ttl: Duration, margin: Duration) -> Instant {
    lease.last_acked_sent + ttl.saturating_sub(margin)
}

/// Locks held under the current, still trusted lease. `held` maps each lock this host wrote to
/// the lease it is bound to; locks of an older lease never count.
pub fn may_run(
    held: &BTreeMap<VmKey, i64>,
    lease: Option<&LeaseStatus>,
    ttl: Duration,
    margin: Duration,
    now: Instant,
) -> BTreeSet<VmKey> {
    match lease {
        Some(lease) if now < trusted_until(lease, ttl, margin) => held
            .iter()
            .filter(|(_, bound_to)| **bound_to == lease.id)
            .map(|(key, _)| key.clone())
            .collect(),
        _ => BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_secs(1);

    fn held() -> BTreeMap<VmKey, i64> {
        [
            (VmKey::new("a", "b", "old"), 1),
            (VmKey::new("a", "b", "vm"), 2),
        ]
        .into()
    }

    #[test]
    fn fresh_lease_runs_only_its_own_locks() {
        let t0 = Instant::now();
        let lease = LeaseStatus {
            id: 2,
            last_acked_sent: t0,
        };
        let set = may_run(
            &held(),
            Some(&lease),
            TTL,
            MARGIN,
            t0 + Duration::from_millis(1999),
        );
        assert_eq!(set, [VmKey::new("a", "b", "vm")].into());
    }

    #[test]
    fn stale_or_missing_lease_runs_nothing() {
        let t0 = Instant::now();
        let lease = LeaseStatus {
            id: 2,
            last_acked_sent: t0,
        };
        assert!(may_run(
            &held(),
            Some(&lease),
            TTL,
            MARGIN,
            t0 + Duration::from_secs(2)
        )
        .is_empty());
        assert!(may_run(&held(), None, TTL, MARGIN, t0).is_empty());
    }
}
