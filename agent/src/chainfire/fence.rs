//! Self-fencing: which HA VMs this host may run right now, and until when.
//!
//! The server expires a lease TTL after the last keep-alive it received; that is never earlier
//! than TTL after the holder *sent* its last acknowledged keep-alive. So the holder's agent gives
//! up its locks once `now - last_acked_sent > TTL - margin`, and the fence guard of each HA VM (a
//! process of its own, for when the agent is gone) kills its QEMU at `TTL - margin / 2`: both
//! happen before the server can expire the lease, so before any other host can take the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::clock::BootTime;
use super::keys::VmKey;

/// The session's lease as the keep-alive loop last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    pub id: i64,
    /// The TTL the server gave the lease (it may raise what was asked to its own minimum).
    pub ttl: Duration,
    /// When the last keep-alive (or the grant) that the server acknowledged was sent.
    pub last_acked_sent: BootTime,
}

/// How long before the server could expire a lease of `ttl` its holder stops trusting it.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_secs(1))
}

impl LeaseStatus {
    /// Until when the agent may trust its lease (exclusive): its own fencing deadline.
    pub fn trusted_until(&self) -> BootTime {
        self.last_acked_sent + self.ttl.saturating_sub(margin(self.ttl))
    }

    /// When a fence guard kills its QEMU unless the lease was renewed: after the agent's own
    /// deadline (a live agent fences first, and says why), still before the server's.
    pub fn guard_deadline(&self) -> BootTime {
        self.last_acked_sent + self.ttl.saturating_sub(margin(self.ttl) / 2)
    }
}

/// Locks held under the current, still trusted lease. `held` maps each lock this host wrote to
/// the lease it is bound to; locks of an older lease never count.
pub fn may_run(
    held: &BTreeMap<VmKey, i64>,
    lease: Option<&LeaseStatus>,
    now: BootTime,
) -> BTreeSet<VmKey> {
    match lease {
        Some(lease) if now < lease.trusted_until() => held
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

    fn held() -> BTreeMap<VmKey, i64> {
        [
            (VmKey::new("a", "b", "old"), 1),
            (VmKey::new("a", "b", "vm"), 2),
        ]
        .into()
    }

    fn lease_acked_at(t0: BootTime) -> LeaseStatus {
        LeaseStatus {
            id: 2,
            ttl: TTL,
            last_acked_sent: t0,
        }
    }

    #[test]
    fn fresh_lease_runs_only_its_own_locks() {
        let t0 = BootTime::from_millis(10_000);
        let lease = lease_acked_at(t0);
        let set = may_run(&held(), Some(&lease), t0 + Duration::from_millis(1999));
        assert_eq!(set, [VmKey::new("a", "b", "vm")].into());
    }

    #[test]
    fn stale_or_missing_lease_runs_nothing() {
        let t0 = BootTime::from_millis(10_000);
        let lease = lease_acked_at(t0);
        assert!(may_run(&held(), Some(&lease), t0 + Duration::from_secs(2)).is_empty());
        assert!(may_run(&held(), None, t0).is_empty());
    }

    #[test]
    fn the_agent_fences_first_the_guard_next_both_before_the_server_can_expire() {
        for secs in [2, 3, 9, 30] {
            let ttl = Duration::from_secs(secs);
            let t0 = BootTime::from_millis(5_000);
            let lease = LeaseStatus {
                ttl,
                ..lease_acked_at(t0)
            };
            let server_expiry = t0 + ttl;
            assert!(lease.trusted_until() < lease.guard_deadline(), "TTL {secs}");
            assert!(
                lease.guard_deadline() + Duration::from_millis(500) <= server_expiry,
                "TTL {secs}: the guard has at least 0.5 s to kill"
            );
        }
    }
}
