//! Whether an evacuation may start moving VMs now, and if not, the one wait that has not
//! ended (said to the operator when the wait times out). Pure: the daemon supplies what it
//! sees and waits for any of it to change.

use std::collections::BTreeSet;
use std::fmt;

use crate::chainfire::ClusterView;

/// What the daemon sees now, for [`not_ready`].
pub struct Seen<'a> {
    /// This host's id.
    pub me: &'a str,
    /// The moves the previous agent left unfinished are settled (`daemon::interrupted`).
    pub previous_moves_settled: bool,
    /// VMs arriving here (moves accepted before the cordon): they are evacuated once they run
    /// here.
    pub arriving: &'a BTreeSet<String>,
    /// The store holds this host cordoned (so no host sends a VM here meanwhile).
    pub cordon_published: bool,
    pub view: &'a ClusterView,
    /// VMs this agent is moving away now.
    pub outgoing: &'a BTreeSet<String>,
}

/// The wait that has not ended, first in the order they are waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The moves the previous agent left are still being settled.
    PreviousMovesUnsettled,
    /// These VMs are still arriving here.
    Arriving(Vec<String>),
    /// The store does not hold this host cordoned yet.
    CordonUnpublished,
    /// The cluster view does not have this host in it yet (nor, then, surely the others).
    NotInView { me: String },
    /// The view still holds a move from this host that this agent is not making (the previous
    /// agent's, forgotten in the store but not yet in the view): moving that VM would be
    /// refused as already in flight.
    MoveLeftBehind { vm: String, to: String, id: String },
}

/// None when the evacuation may start moving VMs; otherwise why not.
pub fn not_ready(seen: &Seen) -> Option<NotReady> {
    if !seen.previous_moves_settled {
        return Some(NotReady::PreviousMovesUnsettled);
    }
    if !seen.arriving.is_empty() {
        return Some(NotReady::Arriving(seen.arriving.iter().cloned().collect()));
    }
    if !seen.cordon_published {
        return Some(NotReady::CordonUnpublished);
    }
    if !seen.view.hosts.contains_key(seen.me) {
        return Some(NotReady::NotInView {
            me: seen.me.to_owned(),
        });
    }
    seen.view
        .migrations
        .values()
        .map(|m| &m.value)
        .find(|m| m.from == seen.me && !seen.outgoing.contains(&m.vm))
        .map(|m| NotReady::MoveLeftBehind {
            vm: m.vm.clone(),
            to: m.to.clone(),
            id: m.id.clone(),
        })
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::PreviousMovesUnsettled => write!(
                f,
                "the moves its previous agent left unfinished are not settled yet (the agent \
                 log says which, and why: most often ChainFire does not answer)"
            ),
            NotReady::Arriving(vms) => write!(
                f,
                "still arriving here: {} (a move accepted before the cordon; `plasmavmc \
                 status` shows its progress)",
                vms.join(", ")
            ),
            NotReady::CordonUnpublished => write!(
                f,
                "ChainFire does not hold this host cordoned yet (unreachable, or this agent has \
                 no lease): the other hosts are told of the cordon when the store is back"
            ),
            NotReady::NotInView { me } => write!(
                f,
                "the cluster view does not have this host ({me}) in it yet, so the other hosts \
                 are not known either (is ChainFire reachable?)"
            ),
            NotReady::MoveLeftBehind { vm, to, id } => write!(
                f,
                "the cluster view still holds a move of {vm} from this host to {to} (request \
                 {id}) that this agent is not making: ChainFire has not forgotten it yet"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::chainfire::records::HostRecord;
    use crate::chainfire::view::Stamped;
    use crate::chainfire::VmKey;
    use crate::migration::{MigrationRecord, Mode, Phase, RunningConfig};

    fn view_with(host: &str, move_from: Option<(&str, &str)>) -> ClusterView {
        let mut view = ClusterView::default();
        view.hosts.insert(
            host.into(),
            HostRecord::of(host, "t", false, &BTreeMap::new()),
        );
        if let Some((vm, from)) = move_from {
            let spec = serde_json::from_value(serde_json::json!({
                "vcpus": 1, "memoryMiB": 64, "kernel": "/k", "initrd": "/i"
            }))
            .unwrap();
            let record = MigrationRecord {
                id: "req-1".into(),
                vm: vm.into(),
                from: from.into(),
                to: "hv2".into(),
                mode: Mode::Live,
                phase: Phase::Requested,
                running: RunningConfig::booting(&spec),
                requested_at: "t".into(),
            };
            view.migrations.insert(
                VmKey::new("default", "default", vm),
                Stamped {
                    value: record,
                    revision: 1,
                },
            );
        }
        view
    }

    fn ready_seen<'a>(
        view: &'a ClusterView,
        arriving: &'a BTreeSet<String>,
        outgoing: &'a BTreeSet<String>,
    ) -> Seen<'a> {
        Seen {
            me: "me",
            previous_moves_settled: true,
            arriving,
            cordon_published: true,
            view,
            outgoing,
        }
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn ready_once_every_wait_ended() {
        let (view, none) = (view_with("me", None), names(&[]));
        assert_eq!(not_ready(&ready_seen(&view, &none, &none)), None);
    }

    #[test]
    fn each_unended_wait_is_the_reason_and_the_first_one_is_said() {
        let (view, none) = (view_with("me", None), names(&[]));
        let arriving = names(&["b", "a"]);
        let seen = Seen {
            previous_moves_settled: false,
            ..ready_seen(&view, &arriving, &none)
        };
        assert_eq!(not_ready(&seen), Some(NotReady::PreviousMovesUnsettled));
        let seen = Seen {
            cordon_published: false,
            ..ready_seen(&view, &arriving, &none)
        };
        let reason = not_ready(&seen).unwrap();
        assert_eq!(reason, NotReady::Arriving(vec!["a".into(), "b".into()]));
        assert!(reason.to_string().contains("still arriving here: a, b"));
        let seen = Seen {
            cordon_published: false,
            ..ready_seen(&view, &none, &none)
        };
        assert_eq!(not_ready(&seen), Some(NotReady::CordonUnpublished));
    }

    #[test]
    fn a_view_without_this_host_is_not_ready() {
        let (view, none) = (view_with("hv2", None), names(&[]));
        let reason = not_ready(&ready_seen(&view, &none, &none)).unwrap();
        assert_eq!(reason, NotReady::NotInView { me: "me".into() });
        assert!(reason.to_string().contains("(me)"));
    }

    #[test]
    fn a_move_from_here_this_agent_is_not_making_is_named() {
        let none = names(&[]);
        let view = view_with("me", Some(("web", "me")));
        let reason = not_ready(&ready_seen(&view, &none, &none)).unwrap();
        assert_eq!(
            reason,
            NotReady::MoveLeftBehind {
                vm: "web".into(),
                to: "hv2".into(),
                id: "req-1".into()
            }
        );
        assert!(reason
            .to_string()
            .contains("move of web from this host to hv2"));
        let making = names(&["web"]);
        assert_eq!(not_ready(&ready_seen(&view, &none, &making)), None);
        let elsewhere = view_with("me", Some(("web", "hv3")));
        assert_eq!(not_ready(&ready_seen(&elsewhere, &none, &none)), None);
    }
}
