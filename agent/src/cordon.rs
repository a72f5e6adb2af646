//! What `plasmavmc cordon` and `uncordon` answer: the host's new cordon state, and whether the
//! cluster knows it yet. Pure: the daemon waits for the store and fills it in.
//!
//! The answer waits (up to [`PUBLISH_WAIT`]) until the store holds the new state, so another
//! host that reads the store afterwards sees it (`migrate --to` this host right after
//! `uncordon`). A store out of reach does not block the change: the host is cordoned (or open)
//! here at once, and the answer says the cluster is told when the store is back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long `cordon`/`uncordon` (and `evacuate`'s cordon) wait for the store to hold the new
/// state: a connected session writes it in milliseconds; a few seconds also cover a reconnect.
pub const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// Whether the cluster knows the host's cordon state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClusterKnows {
    /// The store holds it: every host that reads the store from now on sees it.
    Published,
    /// Not written yet (store unreachable, or no lease yet): this host acts on it already; the
    /// session writes it when the store is back.
    NotYet,
    /// No ChainFire (`--chainfire` not given): there is no cluster to tell.
    Standalone,
}

impl ClusterKnows {
    /// From what the session last wrote (`published`, None for nothing or standalone).
    pub fn of(wanted: bool, standalone: bool, published: Option<bool>) -> ClusterKnows {
        match (standalone, published) {
            (true, _) => ClusterKnows::Standalone,
            (false, Some(written)) if written == wanted => ClusterKnows::Published,
            (false, _) => ClusterKnows::NotYet,
        }
    }
}

/// The answer to `cordon`/`uncordon` (`--json` prints it as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CordonChange {
    /// The host's state now, here.
    pub cordoned: bool,
    pub cluster: ClusterKnows,
    /// For people: what happened here, and what the cluster knows.
    pub message: String,
}

impl CordonChange {
    /// `what`: what happened here (e.g. "host uncordoned ...").
    pub fn new(cordoned: bool, what: &str, cluster: ClusterKnows) -> CordonChange {
        let state = if cordoned { "cordoned" } else { "open" };
        let cluster_line = match cluster {
            ClusterKnows::Published => {
                format!("\nChainFire has it: every host now sees this host {state}")
            }
            ClusterKnows::NotYet => format!(
                "\nChainFire does NOT know yet (the store did not take it within {}s: unreachable, \
                 or this agent holds no lease yet); this host acts on it already, and the \
                 cluster is told as soon as the store is back; until then other hosts may still \
                 see it {}",
                PUBLISH_WAIT.as_secs(),
                if cordoned { "open" } else { "cordoned" }
            ),
            ClusterKnows::Standalone => String::new(), // no cluster to speak of
        };
        CordonChange {
            cordoned,
            cluster,
            message: format!("{what}{cluster_line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_knows_only_what_the_session_wrote() {
        assert_eq!(
            ClusterKnows::of(false, false, Some(false)),
            ClusterKnows::Published
        );
        assert_eq!(
            ClusterKnows::of(false, false, Some(true)),
            ClusterKnows::NotYet,
            "the store still has the old state"
        );
        assert_eq!(ClusterKnows::of(true, false, None), ClusterKnows::NotYet);
        assert_eq!(ClusterKnows::of(true, true, None), ClusterKnows::Standalone);
    }

    #[test]
    fn the_answer_says_what_the_cluster_knows() {
        let published = CordonChange::new(false, "host uncordoned", ClusterKnows::Published);
        assert!(published.message.starts_with("host uncordoned\n"));
        assert!(published
            .message
            .contains("every host now sees this host open"));
        let pending = CordonChange::new(false, "host uncordoned", ClusterKnows::NotYet);
        assert!(
            pending.message.contains("does NOT know yet")
                && pending.message.contains("still see it cordoned"),
            "{}",
            pending.message
        );
        let json = serde_json::to_value(&pending).unwrap();
        assert_eq!(json["cluster"], "notYet");
        assert_eq!(json["cordoned"], false);
        let cordoned = CordonChange::new(true, "host cordoned", ClusterKnows::NotYet);
        assert!(cordoned.message.contains("still see it open"));
        let alone = CordonChange::new(true, "host cordoned", ClusterKnows::Standalone);
        assert_eq!(alone.message, "host cordoned");
    }
}
