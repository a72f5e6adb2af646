//! How the first apply of an agent process went: what `plasmavmc first-apply` reports and the
//! READY status line says. It is about the start of one agent process (a switch that restarted
//! the agent, a boot, `systemctl restart plasmavmc`); a later reload does not change it (the
//! reload's own exit code and `status` say how that went).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::protocol::{ApplyReport, ErrorKind, StepOutcome};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum FirstApply {
    /// Still running.
    Pending,
    /// Every step went through (`steps` of them; 0 when nothing had to change).
    Done { steps: usize },
    /// These VMs failed, each with why; every other VM was applied.
    Failed {
        steps: usize,
        vms: BTreeMap<String, String>,
    },
    /// Nothing was applied: no valid config (`invalidConfig`), or the apply itself broke down.
    NotApplied { kind: ErrorKind, message: String },
}

impl FirstApply {
    /// The outcome of the first reconcile's report: a step that failed or a change refused as
    /// destructive fails its VM (as they fail a reload).
    pub fn from_report(report: &ApplyReport) -> FirstApply {
        let mut vms: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for step in &report.steps {
            if let StepOutcome::Failed { error } = &step.outcome {
                vms.entry(step.vm.clone()).or_default().push(error.clone());
            }
        }
        for refused in &report.refused {
            vms.entry(refused.vm.clone()).or_default().push(format!(
                "refused, never applied: {}: {} -> {} ({})",
                refused.field, refused.from, refused.to, refused.reason
            ));
        }
        let steps = report.steps.len();
        if vms.is_empty() {
            FirstApply::Done { steps }
        } else {
            let vms = vms
                .into_iter()
                .map(|(vm, errors)| (vm, errors.join("; ")))
                .collect();
            FirstApply::Failed { steps, vms }
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(self, FirstApply::Pending)
    }

    /// One line: the READY status text, and the headline `plasmavmc first-apply` prints.
    pub fn summary(&self) -> String {
        match self {
            FirstApply::Pending => "first apply still running".to_owned(),
            FirstApply::Done { steps } => format!("first apply done ({steps} steps)"),
            FirstApply::Failed { vms, .. } => format!(
                "first apply FAILED for {} (plasmavmc first-apply and status say why)",
                vms.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            FirstApply::NotApplied { message, .. } => format!(
                "first apply refused: {}",
                message.lines().next().unwrap_or_default()
            ),
        }
    }

    /// What `plasmavmc first-apply` prints: the summary, then each failed VM and why (or the
    /// whole refusal).
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.summary());
        match self {
            FirstApply::Failed { vms, .. } => {
                for (vm, why) in vms {
                    out.push_str(&format!("{vm}: {why}\n"));
                }
            }
            FirstApply::NotApplied { message, .. } if message.lines().nth(1).is_some() => {
                out.push_str(message);
                out.push('\n');
            }
            _ => {}
        }
        out
    }

    /// Why it counts as failed, if it does: decides the exit code (`InvalidConfig`: nothing
    /// was touched). Pending is not a failure yet.
    pub fn failure(&self) -> Option<ErrorKind> {
        match self {
            FirstApply::Pending | FirstApply::Done { .. } => None,
            FirstApply::Failed { .. } => Some(ErrorKind::Failed),
            FirstApply::NotApplied { kind, .. } => Some(*kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{Action, RefusedChange};
    use crate::control::protocol::StepReport;

    fn step(vm: &str, outcome: StepOutcome) -> StepReport {
        StepReport {
            vm: vm.into(),
            action: Action::RemoveNic { id: "n".into() },
            outcome,
        }
    }

    fn failed(error: &str) -> StepOutcome {
        StepOutcome::Failed {
            error: error.into(),
        }
    }

    #[test]
    fn every_step_done_or_still_unplugging_is_done() {
        let report = ApplyReport {
            steps: vec![
                step("a", StepOutcome::Done),
                step("b", StepOutcome::Unplugging { device: "n".into() }),
            ],
            ..ApplyReport::default()
        };
        let outcome = FirstApply::from_report(&report);
        assert_eq!(outcome, FirstApply::Done { steps: 2 });
        assert_eq!(outcome.failure(), None);
        assert_eq!(outcome.summary(), "first apply done (2 steps)");
        assert_eq!(
            FirstApply::from_report(&ApplyReport::default()).summary(),
            "first apply done (0 steps)"
        );
    }

    #[test]
    fn failed_steps_and_refused_changes_name_their_vm_and_why() {
        let report = ApplyReport {
            steps: vec![
                step("web", failed("starting web: could not open /x.qcow2")),
                step("web", failed("adding disk d: no such file")),
                step("web", StepOutcome::Skipped { reason: "r".into() }),
                step("db", StepOutcome::Done),
            ],
            refused: vec![RefusedChange {
                vm: "cache".into(),
                field: "disks.d.sizeMiB".into(),
                from: "200".into(),
                to: "100".into(),
                reason: "shrinking loses data".into(),
            }],
            ..ApplyReport::default()
        };
        let outcome = FirstApply::from_report(&report);
        assert_eq!(outcome.failure(), Some(ErrorKind::Failed));
        assert_eq!(
            outcome.render(),
            "first apply FAILED for cache, web (plasmavmc first-apply and status say why)\n\
             cache: refused, never applied: disks.d.sizeMiB: 200 -> 100 (shrinking loses data)\n\
             web: starting web: could not open /x.qcow2; adding disk d: no such file\n"
        );
    }

    #[test]
    fn a_refused_config_says_its_first_line_and_then_all_of_it() {
        let outcome = FirstApply::NotApplied {
            kind: ErrorKind::InvalidConfig,
            message: "no valid config yet; VMs are left as they are\nvms.a.vcpus: 0".into(),
        };
        assert_eq!(outcome.failure(), Some(ErrorKind::InvalidConfig));
        assert_eq!(
            outcome.render(),
            "first apply refused: no valid config yet; VMs are left as they are\n\
             no valid config yet; VMs are left as they are\nvms.a.vcpus: 0\n"
        );
    }

    #[test]
    fn pending_is_no_failure_yet_and_serializes_tagged() {
        assert_eq!(FirstApply::Pending.failure(), None);
        assert_eq!(
            serde_json::to_value(FirstApply::Pending).unwrap(),
            serde_json::json!({"state": "pending"})
        );
        let failed = FirstApply::Failed {
            steps: 1,
            vms: [("a".to_owned(), "why".to_owned())].into(),
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            serde_json::json!({"state": "failed", "steps": 1, "vms": {"a": "why"}})
        );
    }
}
