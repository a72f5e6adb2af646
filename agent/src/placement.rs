//! Declarative placement (`ha.preferredHosts`): where an HA VM belongs, as a pure function of the
//! cluster as this host sees it. The holder asks; when the answer is another host, it moves the
//! VM there live (never by a restart).
//!
//! Rules:
//! - A host is *eligible* for a VM while it is live in ChainFire, not cordoned, and declares the
//!   VM. This host is eligible while it is not cordoned.
//! - The VM belongs on the first eligible host of its list. No listed host eligible: it stays
//!   where it runs (placement never moves a VM off the list's hosts to a host not on it).
//! - It moves only once that host has been eligible for `settle` without a break, as this agent
//!   saw it: a host that flaps, or comes back after a reboot, is not chased at once. (An agent
//!   that starts sees every host freshly eligible: it waits too.)

use std::collections::BTreeMap;
use std::time::Duration;

use crate::chainfire::clock::BootTime;
use crate::chainfire::{ClusterView, VmKey};

/// What the VM's holder should do about its placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// It is where it belongs (or nowhere better is eligible).
    Stay,
    /// Move it live to `to` now.
    Move { to: String },
    /// `to` is better but has not been eligible long enough: ask again at `until`.
    Wait { to: String, until: BootTime },
}

/// Since when each live, uncordoned host has been so without a break, as this agent saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Availability {
    since: BTreeMap<String, BootTime>,
}

impl Availability {
    /// Follows the cluster view read at `now`: hosts newly live and uncordoned start their
    /// count; hosts gone or cordoned lose it.
    pub fn update(&mut self, view: &ClusterView, now: BootTime) {
        self.since
            .retain(|host, _| view.hosts.contains_key(host) && !view.is_cordoned(host));
        for host in view.hosts.keys().filter(|h| !view.is_cordoned(h)) {
            self.since.entry(host.clone()).or_insert(now);
        }
    }

    /// The hosts eligible for VM `key` now, with since when (`me`: whenever it is uncordoned).
    pub fn eligible(
        &self,
        me: &str,
        key: &VmKey,
        view: &ClusterView,
    ) -> BTreeMap<String, BootTime> {
        self.since
            .iter()
            .filter(|(host, _)| *host == me || view.declares(host, key))
            .map(|(host, since)| (host.clone(), *since))
            .collect()
    }
}

/// Where the VM running on `me` belongs, given its `preferred` hosts and the `eligible` ones.
pub fn decide(
    me: &str,
    preferred: &[String],
    eligible: &BTreeMap<String, BootTime>,
    now: BootTime,
    settle: Duration,
) -> Placement {
    let Some((best, since)) = preferred
        .iter()
        .find_map(|host| eligible.get(host).map(|since| (host, *since)))
    else {
        return Placement::Stay;
    };
    if best == me {
        return Placement::Stay;
    }
    let until = since + settle;
    if now >= until {
        Placement::Move { to: best.clone() }
    } else {
        Placement::Wait {
            to: best.clone(),
            until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chainfire::records::HostRecord;
    use crate::chainfire::StateEvent;
    use crate::chainfire::StateSink;

    const SETTLE: Duration = Duration::from_secs(30);

    fn t(secs: u64) -> BootTime {
        BootTime::from_millis(secs * 1000)
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| h.to_string()).collect()
    }

    fn eligible(list: &[(&str, u64)]) -> BTreeMap<String, BootTime> {
        list.iter().map(|(h, s)| (h.to_string(), t(*s))).collect()
    }

    #[test]
    fn the_first_eligible_preferred_host_wins_once_settled() {
        let prefs = hosts(&["hv1", "hv2", "hv3"]);
        let all = eligible(&[("hv1", 0), ("hv2", 0), ("hv3", 0)]);
        // On the first: stay. On the second with the first settled: move there.
        assert_eq!(decide("hv1", &prefs, &all, t(100), SETTLE), Placement::Stay);
        assert_eq!(
            decide("hv2", &prefs, &all, t(100), SETTLE),
            Placement::Move { to: "hv1".into() }
        );
        // The first came back 10 s ago: wait until it has been eligible for the settle time.
        let back = eligible(&[("hv1", 90), ("hv2", 0)]);
        assert_eq!(
            decide("hv2", &prefs, &back, t(100), SETTLE),
            Placement::Wait {
                to: "hv1".into(),
                until: t(120)
            }
        );
        assert_eq!(
            decide("hv2", &prefs, &back, t(120), SETTLE),
            Placement::Move { to: "hv1".into() }
        );
    }

    #[test]
    fn ineligible_hosts_are_skipped_and_nowhere_better_means_stay() {
        let prefs = hosts(&["hv1", "hv2"]);
        // hv1 not eligible (down, cordoned or not declaring): hv2 is where it belongs.
        let some = eligible(&[("hv2", 0), ("hv9", 0)]);
        assert_eq!(
            decide("hv2", &prefs, &some, t(100), SETTLE),
            Placement::Stay
        );
        assert_eq!(
            decide("hv9", &prefs, &some, t(100), SETTLE),
            Placement::Move { to: "hv2".into() },
            "off the list, onto the first eligible listed host"
        );
        // No listed host eligible: stay, even off the list; an empty list never moves.
        let none = eligible(&[("hv9", 0)]);
        assert_eq!(
            decide("hv9", &prefs, &none, t(100), SETTLE),
            Placement::Stay
        );
        assert_eq!(decide("hv9", &[], &some, t(100), SETTLE), Placement::Stay);
        // This host cordoned (not eligible itself): the next listed host.
        let me_cordoned = eligible(&[("hv2", 0)]);
        assert_eq!(
            decide("hv1", &prefs, &me_cordoned, t(100), SETTLE),
            Placement::Move { to: "hv2".into() }
        );
    }

    fn host_up(view: &mut ClusterView, host: &str, cordoned: bool, ha_vms: &[&str]) {
        view.apply(&StateEvent::HostUp {
            host_id: host.into(),
            record: HostRecord {
                cordoned,
                ha_vms: ha_vms.iter().map(|k| k.to_string()).collect(),
                ..HostRecord::of(host, "t", false, &BTreeMap::new())
            },
        });
    }

    #[test]
    fn availability_counts_from_when_a_host_was_last_seen_live_and_uncordoned() {
        let key = VmKey::new("o", "p", "vm");
        let mut view = ClusterView::default();
        let mut seen = Availability::default();
        host_up(&mut view, "me", false, &[]);
        host_up(&mut view, "hv1", false, &["o/p/vm"]);
        host_up(&mut view, "hv2", false, &["o/p/other"]);
        seen.update(&view, t(1));
        seen.update(&view, t(5));
        assert_eq!(
            seen.eligible("me", &key, &view),
            eligible(&[("me", 1), ("hv1", 1)]),
            "hv2 does not declare the VM; counts start at the first sighting"
        );
        // hv1 cordoned, then open again: its count starts over.
        host_up(&mut view, "hv1", true, &["o/p/vm"]);
        seen.update(&view, t(10));
        assert_eq!(seen.eligible("me", &key, &view), eligible(&[("me", 1)]));
        host_up(&mut view, "hv1", false, &["o/p/vm"]);
        seen.update(&view, t(20));
        // hv1 lost its lease, and back.
        assert_eq!(seen.eligible("me", &key, &view)["hv1"], t(20));
        view.apply(&StateEvent::HostDown {
            host_id: "hv1".into(),
        });
        seen.update(&view, t(25));
        host_up(&mut view, "hv1", false, &["o/p/vm"]);
        seen.update(&view, t(26));
        assert_eq!(seen.eligible("me", &key, &view)["hv1"], t(26));
    }
}
