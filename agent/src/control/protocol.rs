//! Request and response types of the control socket, serialized as one JSON object per line.

use serde::{Deserialize, Serialize};

use super::document::DesiredDocument;
use crate::action::{Action, PendingChange, Plan};
use crate::status::HostStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "camelCase")]
pub enum Request {
    /// Every VM as QEMU reports it now, plus strangers and the config's health.
    Status,
    /// Re-read the config file, apply it, answer with what was applied.
    Reload,
    /// What would change (read-only): against `desired` if given (validated exactly as the
    /// config file is), else against the config file as it is on disk now.
    Plan { desired: Option<DesiredDocument> },
    /// Operator start: run the VM and forget an operator stop or a restart backoff.
    Start { vm: String },
    /// Operator stop: take the VM down and keep it down (across agent restarts) until `Start`.
    Stop { vm: String },
    /// `system_reset`, or with `soft` an ACPI powerdown and start again in the same QEMU.
    Reset { vm: String, soft: bool },
    /// Every host's VMs as ChainFire has them (refused when the agent runs standalone).
    ClusterStatus,
    /// Attach to the VM's serial console. Answered with `ConsoleAttached` (or `Error`), then the
    /// connection carries raw bytes: console output to the client, and with `write` the
    /// client's bytes to the guest. The client detaches by closing it.
    Console {
        vm: String,
        /// Ask for the one writer seat (refused while another client holds it, unless `force`).
        write: bool,
        /// Take the writer seat over; the previous writer is told and detached.
        force: bool,
        /// Send the last `tail` lines of the console log first.
        tail: usize,
        /// The client's terminal, to tell a refused writer who holds the console.
        tty: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "camelCase")]
pub enum Response {
    Status {
        status: HostStatus,
    },
    Applied {
        report: ApplyReport,
    },
    Planned {
        plan: Plan,
    },
    Done {
        message: String,
    },
    /// The cluster view: `table` for people, `view` as JSON.
    Cluster {
        table: String,
        view: serde_json::Value,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// The console stream follows on this connection.
    ConsoleAttached {
        message: String,
    },
}

/// Why a request failed; decides the client's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The config file is invalid or unreadable; nothing was touched (exit 2).
    InvalidConfig,
    /// The request names something that does not exist, e.g. an undeclared VM (exit 2).
    BadRequest,
    /// The operation was attempted and failed (exit 1).
    Failed,
}

/// What a reconcile did: every step with its outcome, and what waits for a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub steps: Vec<StepReport>,
    pub pending: Vec<PendingChange>,
}

impl ApplyReport {
    pub fn any_failed(&self) -> bool {
        self.steps
            .iter()
            .any(|step| matches!(step.outcome, StepOutcome::Failed { .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepReport {
    pub vm: String,
    pub action: Action,
    pub outcome: StepOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum StepOutcome {
    Done,
    /// The guest has not released the device yet; it stays visible as `unplugging` and the
    /// removal is retried.
    Unplugging {
        device: String,
    },
    Failed {
        error: String,
    },
    /// Not attempted, e.g. the add half of a replacement whose removal did not complete.
    Skipped {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_camel_case_json() {
        let json = serde_json::to_string(&Request::Reset {
            vm: "web".into(),
            soft: true,
        })
        .unwrap();
        assert_eq!(json, r#"{"request":"reset","vm":"web","soft":true}"#);
        assert_eq!(
            serde_json::from_str::<Request>(&json).unwrap(),
            Request::Reset {
                vm: "web".into(),
                soft: true
            }
        );
    }

    #[test]
    fn any_failed_sees_only_failures() {
        let step = |outcome| StepReport {
            vm: "web".into(),
            action: Action::RemoveDisk { id: "d".into() },
            outcome,
        };
        let mut report = ApplyReport {
            steps: vec![
                step(StepOutcome::Done),
                step(StepOutcome::Unplugging {
                    device: "disk-d".into(),
                }),
            ],
            pending: vec![],
        };
        assert!(!report.any_failed());
        report.steps.push(step(StepOutcome::Failed {
            error: "boom".into(),
        }));
        assert!(report.any_failed());
    }
}
