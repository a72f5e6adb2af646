//! Evacuation (`plasmavmc evacuate`): which of this host's running VMs move where, which stay and
//! why, and how the moves went. Pure: the daemon supplies the cluster view and runs the moves.
//!
//! Rules:
//! - Only an HA VM can move (it is declared on other hosts too); a VM declared here only stays,
//!   and the host's shutdown takes it down as its `onHostShutdown` says.
//! - Its targets are the other hosts that are live, not cordoned and declare it: first those of
//!   its `ha.preferredHosts`, in order; then the others, least busy first (VMs running there,
//!   plus those this evacuation sends there), by host id on a tie.
//! - A target that refuses the VM before anything started (an incompatible QEMU, say) is
//!   skipped for the next one; a move abandoned midway leaves the VM here, failed.

pub mod ready;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::chainfire::{ClusterView, VmKey};
use crate::spec::VmSpec;

/// Where one running VM can go: its targets in order of preference, or why it stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Move { targets: Vec<String> },
    Stay { reason: String },
}

/// The route of every VM in `running` (name and declaration), leaving host `me`.
pub fn plan(me: &str, running: &[(&str, &VmSpec)], view: &ClusterView) -> BTreeMap<String, Route> {
    let mut load: BTreeMap<String, usize> = view
        .hosts
        .keys()
        .map(|host| {
            let busy = view
                .vms_on(host)
                .filter(|(_, vm)| vm.value.state == "running")
                .count();
            (host.clone(), busy)
        })
        .collect();
    let mut routes = BTreeMap::new();
    for (name, spec) in running {
        let route = if !spec.ha.enable {
            Route::Stay {
                reason: "declared on this host only (no ha.enable): it has no other host".into(),
            }
        } else {
            let key = VmKey::new(&spec.org_id, &spec.project_id, *name);
            let targets = targets(me, &key, &spec.ha.preferred_hosts, view, &load);
            match targets.first() {
                Some(first) => {
                    *load.entry(first.clone()).or_default() += 1;
                    Route::Move { targets }
                }
                None => Route::Stay {
                    reason: "no other live, uncordoned host declares it".into(),
                },
            }
        };
        routes.insert(name.to_string(), route);
    }
    routes
}

fn targets(
    me: &str,
    key: &VmKey,
    preferred: &[String],
    view: &ClusterView,
    load: &BTreeMap<String, usize>,
) -> Vec<String> {
    let eligible = |host: &str| host != me && !view.is_cordoned(host) && view.declares(host, key);
    let mut targets: Vec<String> = preferred.iter().filter(|h| eligible(h)).cloned().collect();
    let mut others: Vec<&String> = view
        .hosts
        .keys()
        .filter(|h| eligible(h) && !preferred.contains(h))
        .collect();
    others.sort_by_key(|h| (load.get(*h).copied().unwrap_or(0), h.as_str()));
    targets.extend(others.into_iter().cloned());
    targets
}

/// An evacuation as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evacuation {
    pub started_at: String,
    /// Every move has ended (moved, failed or staying).
    pub finished: bool,
    pub vms: BTreeMap<String, EvacuatedVm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvacuatedVm {
    pub state: MoveState,
    /// The host it moves (or moved) to.
    #[serde(default)]
    pub to: Option<String>,
    /// Why it stays or failed, or how the move went.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MoveState {
    Queued,
    Moving,
    Moved,
    Failed,
    Staying,
}

impl Evacuation {
    /// The evacuation `routes` describe, nothing moved yet.
    pub fn start(started_at: String, routes: &BTreeMap<String, Route>) -> Evacuation {
        let vms = routes
            .iter()
            .map(|(name, route)| {
                let vm = match route {
                    Route::Move { targets } => EvacuatedVm {
                        state: MoveState::Queued,
                        to: targets.first().cloned(),
                        note: None,
                    },
                    Route::Stay { reason } => EvacuatedVm {
                        state: MoveState::Staying,
                        to: None,
                        note: Some(reason.clone()),
                    },
                };
                (name.clone(), vm)
            })
            .collect();
        let mut evacuation = Evacuation {
            started_at,
            finished: false,
            vms,
        };
        evacuation.finished = !evacuation.in_flight();
        evacuation
    }

    /// The evacuation a restarted agent carries on: `self` as the previous agent kept it,
    /// `routes` planned now for the VMs still running here, which are queued (or stay) anew. A
    /// VM no longer running here keeps its outcome; one that was queued or moving when the agent
    /// died left while it restarted (its move settled with the HA lock on the target).
    pub fn resume(&self, routes: &BTreeMap<String, Route>) -> Evacuation {
        let mut resumed = Evacuation::start(self.started_at.clone(), routes);
        for (name, before) in &self.vms {
            if resumed.vms.contains_key(name) {
                continue;
            }
            let mut vm = before.clone();
            if matches!(vm.state, MoveState::Queued | MoveState::Moving) {
                vm.state = MoveState::Moved;
                vm.note =
                    Some("no longer runs here: its move settled while the agent restarted".into());
            }
            resumed.vms.insert(name.clone(), vm);
        }
        resumed.finished = !resumed.in_flight();
        resumed
    }

    pub fn in_flight(&self) -> bool {
        self.vms
            .values()
            .any(|vm| matches!(vm.state, MoveState::Queued | MoveState::Moving))
    }

    /// Whether every VM that could move did.
    pub fn succeeded(&self) -> bool {
        self.vms.values().all(|vm| vm.state != MoveState::Failed)
    }

    /// One line per VM, for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, vm) in &self.vms {
            let _ = writeln!(out, "{}", vm.render(name));
        }
        out
    }
}

impl EvacuatedVm {
    /// `  NAME: what happened[: note]`.
    pub fn render(&self, name: &str) -> String {
        let to = self.to.as_deref().unwrap_or("-");
        let what = match self.state {
            MoveState::Queued => format!("queued, to {to}"),
            MoveState::Moving => format!("moving live to {to}"),
            MoveState::Moved => format!("moved to {to}"),
            MoveState::Failed => format!("FAILED, stays here (tried {to})"),
            MoveState::Staying => "stays here".to_owned(),
        };
        let note = self
            .note
            .as_deref()
            .map_or(String::new(), |n| format!(": {n}"));
        format!("  {name}: {what}{note}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chainfire::records::{HostRecord, VmRecord};
    use crate::chainfire::{StateEvent, StateSink};

    fn spec(ha: bool, preferred: &[&str]) -> VmSpec {
        let mut spec: VmSpec = serde_json::from_value(serde_json::json!({
            "vcpus": 1, "memoryMiB": 64, "kernel": "/k", "initrd": "/i"
        }))
        .unwrap();
        spec.ha.enable = ha;
        spec.ha.preferred_hosts = preferred.iter().map(|h| h.to_string()).collect();
        spec
    }

    fn host(view: &mut ClusterView, id: &str, cordoned: bool, declares: &[&str]) {
        view.apply(&StateEvent::HostUp {
            host_id: id.into(),
            record: HostRecord {
                cordoned,
                ha_vms: declares
                    .iter()
                    .map(|vm| format!("default/default/{vm}"))
                    .collect(),
                ..HostRecord::of(id, "t", false, &BTreeMap::new())
            },
        });
    }

    fn running_on(view: &mut ClusterView, vm: &str, id: &str) {
        let key = VmKey::new("default", "default", vm);
        let mut record = VmRecord::for_test(&key, id, "running");
        record.spec.ha = true;
        view.apply(&StateEvent::VmUpdated {
            key,
            record,
            revision: 1,
        });
    }

    fn moves(targets: &[&str]) -> Route {
        Route::Move {
            targets: targets.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn vms_go_to_preferred_hosts_first_then_to_the_least_busy_declaring_host() {
        let mut view = ClusterView::default();
        host(&mut view, "me", true, &["a", "b", "c", "d"]);
        host(&mut view, "hv1", false, &["a", "b", "c"]);
        host(&mut view, "hv2", false, &["a", "b", "c", "d"]);
        host(&mut view, "hv3", true, &["a", "b", "c", "d"]);
        running_on(&mut view, "busy", "hv1");
        let (a, b, c, d) = (
            spec(true, &["hv2"]),
            spec(true, &[]),
            spec(true, &[]),
            spec(true, &["hv3", "hv1"]),
        );
        let local = spec(false, &[]);
        let routes = plan(
            "me",
            &[
                ("a", &a),
                ("b", &b),
                ("c", &c),
                ("d", &d),
                ("local", &local),
            ],
            &view,
        );
        // a: its preferred hv2 first. b: hv1 runs one VM, hv2 has a now: by id, hv1.
        // c: hv1 and hv2 now run two and one: hv2. d: its preferred hv3 is cordoned, hv1 does
        // not declare it: hv2.
        assert_eq!(routes["a"], moves(&["hv2", "hv1"]));
        assert_eq!(routes["b"], moves(&["hv1", "hv2"]));
        assert_eq!(routes["c"], moves(&["hv2", "hv1"]));
        assert_eq!(routes["d"], moves(&["hv2"]));
        assert!(
            matches!(&routes["local"], Route::Stay { reason } if reason.contains("no ha.enable"))
        );
    }

    #[test]
    fn an_ha_vm_no_other_host_can_take_stays_and_says_why() {
        let mut view = ClusterView::default();
        host(&mut view, "me", true, &["a"]);
        host(&mut view, "hv1", true, &["a"]);
        host(&mut view, "hv2", false, &[]);
        let a = spec(true, &[]);
        let routes = plan("me", &[("a", &a)], &view);
        assert_eq!(
            routes["a"],
            Route::Stay {
                reason: "no other live, uncordoned host declares it".into()
            }
        );
    }

    #[test]
    fn an_evacuation_is_finished_when_nothing_is_queued_or_moving() {
        let routes = BTreeMap::from([
            ("a".to_owned(), moves(&["hv1"])),
            (
                "b".to_owned(),
                Route::Stay {
                    reason: "why".into(),
                },
            ),
        ]);
        let mut evacuation = Evacuation::start("t0".into(), &routes);
        assert!(!evacuation.finished && evacuation.in_flight());
        assert_eq!(
            evacuation.render(),
            "  a: queued, to hv1\n  b: stays here: why\n"
        );
        evacuation.vms.get_mut("a").unwrap().state = MoveState::Failed;
        assert!(!evacuation.in_flight() && !evacuation.succeeded());
        let nothing = Evacuation::start("t0".into(), &BTreeMap::new());
        assert!(nothing.finished && nothing.succeeded());
    }

    #[test]
    fn a_resumed_evacuation_requeues_what_still_runs_here_and_keeps_what_left() {
        let routes = BTreeMap::from([
            ("moved".to_owned(), moves(&["hv1"])),
            ("moving".to_owned(), moves(&["hv1"])),
            ("abandoned".to_owned(), moves(&["hv2"])),
            ("queued".to_owned(), moves(&["hv2"])),
        ]);
        let mut before = Evacuation::start("t0".into(), &routes);
        before.vms.get_mut("moved").unwrap().state = MoveState::Moved;
        before.vms.get_mut("moving").unwrap().state = MoveState::Moving;
        before.vms.get_mut("abandoned").unwrap().state = MoveState::Moving;
        // After the restart "abandoned" (its move undone) and "queued" still run here.
        let now = BTreeMap::from([
            ("abandoned".to_owned(), moves(&["hv1"])),
            ("queued".to_owned(), moves(&["hv2"])),
        ]);
        let resumed = before.resume(&now);
        assert_eq!(resumed.started_at, "t0", "the same evacuation");
        assert!(!resumed.finished);
        assert_eq!(resumed.vms["moved"], before.vms["moved"]);
        assert_eq!(resumed.vms["moving"].state, MoveState::Moved);
        assert!(resumed.vms["moving"]
            .note
            .as_deref()
            .unwrap()
            .contains("restarted"));
        assert_eq!(resumed.vms["abandoned"].state, MoveState::Queued);
        assert_eq!(resumed.vms["abandoned"].to.as_deref(), Some("hv1"));
        assert_eq!(resumed.vms["queued"].state, MoveState::Queued);
        let nothing_left = before.resume(&BTreeMap::new());
        assert!(nothing_left.finished && nothing_left.succeeded());
    }
}
