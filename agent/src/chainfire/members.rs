//! Which store member a connection goes to: one member per connection, the next one after a
//! connection failed.
//!
//! Why not etcd-client's client over all endpoints: its tonic balanced channel keeps handing
//! requests to a member that died, each failing at once (tonic's lazily reconnecting endpoint
//! says it is ready after a failed connect, so the balancer never routes around it:
//! grpc/grpc-rust#2839). With one of three members down, a session failed about one request in
//! three, reconnected, backed off, and went many seconds without publishing or renewing its lease.

/// The order in which one task (the publisher, the keep-alive loop, one move) tries members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    count: usize,
    next: usize,
}

impl Members {
    /// Starts at a member picked by the host id, so hosts spread over the cluster.
    pub fn new(count: usize, host_id: &str) -> Self {
        let spread = host_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        Members {
            count,
            next: spread.checked_rem(count).unwrap_or(0),
        }
    }

    /// The members to try for the next connection: each once, from where the last one left off.
    pub fn order(&self) -> impl Iterator<Item = usize> {
        let (count, next) = (self.count, self.next);
        (0..count).map(move |i| (next + i) % count)
    }

    /// `member` answered. A task connects again only because its connection failed, so the
    /// connection after this one tries the member after it first.
    pub fn connected(&mut self, member: usize) {
        self.next = (member + 1).checked_rem(self.count).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_is_tried_once_and_a_failed_one_goes_last() {
        let mut members = Members::new(3, "h1");
        let first: Vec<_> = members.order().collect();
        assert_eq!(first.len(), 3);
        assert_eq!(
            first
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [0, 1, 2].into()
        );
        members.connected(first[0]);
        let second: Vec<_> = members.order().collect();
        assert_eq!(second[2], first[0], "{second:?} after {first:?}");
        members.connected(2);
        assert_eq!(members.order().collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn hosts_start_on_different_members() {
        let starts: std::collections::BTreeSet<_> = ["hv1", "hv2", "hv3", "hv4"]
            .iter()
            .map(|h| Members::new(3, h).order().next().unwrap())
            .collect();
        assert!(starts.len() > 1, "{starts:?}");
    }

    #[test]
    fn a_single_member_is_always_the_one() {
        let mut members = Members::new(1, "h");
        members.connected(0);
        assert_eq!(members.order().collect::<Vec<_>>(), [0]);
        assert_eq!(Members::new(0, "h").order().count(), 0);
    }
}
