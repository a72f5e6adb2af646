//! Request and response types of the control socket, serialized as one JSON object per line.

use serde::{Deserialize, Serialize};

use super::document::DesiredDocument;
use crate::action::{Action, PendingChange, Plan, RefusedChange};
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
    /// The guest gets `timeout_ms` (default: the agent's `--stop-timeout`) to shut down after an
    /// ACPI powerdown; `force` quits QEMU at once, and kills an `unresponsive` VM's QEMU.
    Stop {
        vm: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        #[serde(default)]
        force: bool,
    },
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
    /// Managed save: write the VM's state to the state dir, stop QEMU, keep the VM saved until
    /// `Start`, which restores it.
    Save { vm: String },
    /// Live migration of HA VM `vm` to host `to` (`offline`: paused for the whole copy);
    /// answered once it ran there (`Migrated`) or was abandoned. With `cancel`, ends the move
    /// of `vm` in flight instead.
    Migrate {
        vm: String,
        #[serde(default)]
        to: Option<String>,
        #[serde(default)]
        offline: bool,
        #[serde(default)]
        cancel: bool,
        /// Cap the stream at this many MiB/s (default: as fast as the link goes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bandwidth_mib: Option<u64>,
    },
    /// The host is going down: every running VM is powered down or saved as its
    /// `onHostShutdown` says, in parallel, powerdowns bounded by `timeout_seconds`; no VM starts
    /// afterwards.
    ShutdownHost { timeout_seconds: u64 },
    /// Close this host to HA VMs from elsewhere (published in ChainFire, kept across agent
    /// restarts and reboots): none is failed over, migrated or started here until `Uncordon`.
    /// VMs running here stay.
    Cordon,
    /// Open this host again.
    Uncordon,
    /// Follow this host's events. Answered with `EventsFollow`, then the connection carries one
    /// JSON `events::Event` per line, until the client closes it.
    Events,
    /// Cordon this host, then move every VM that can move to another live, uncordoned host
    /// that declares it (live, two at a time). Answered at once with the plan; `Status` follows
    /// the moves.
    Evacuate,
    /// How this agent's first apply since it started went, waiting up to `wait_ms` for it while
    /// it still runs (answered `Pending` after that).
    FirstApply { wait_ms: u64 },
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
    /// How an operator stop went.
    Stopped {
        stop: StopReport,
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
    /// Event lines follow on this connection.
    EventsFollow {
        message: String,
    },
    /// A move that completed: the VM runs on the target.
    Migrated {
        outcome: crate::migration::MigrationOutcome,
    },
    /// An evacuation as planned (or as far as it got, if one was running).
    Evacuation {
        evacuation: crate::evacuation::Evacuation,
    },
    FirstApply {
        first_apply: crate::first_apply::FirstApply,
    },
    /// The host's cordon state after `Cordon`/`Uncordon`, and whether the cluster knows it.
    Cordon {
        change: crate::cordon::CordonChange,
    },
}

/// Why a request failed; decides the client's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    /// The config file is invalid or unreadable; nothing was touched (exit 2).
    InvalidConfig,
    /// The request names something that does not exist, e.g. an undeclared VM, or is refused
    /// before anything is touched, e.g. a move to an incompatible host (exit 2).
    BadRequest,
    /// The operation was attempted and failed (exit 1).
    Failed,
}

/// How `plasmavmc stop` ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopReport {
    pub vm: String,
    pub how: StopHow,
    /// True unless the guest shut down on its own (or nothing ran).
    pub force_quit: bool,
    /// `--force` was given.
    pub forced: bool,
    /// How long the guest was given to shut down (`forced`: 0).
    pub timeout_seconds: f64,
    /// How long the stop took.
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StopHow {
    /// The guest shut down after the ACPI powerdown.
    ShutDown,
    /// QEMU was told to quit (the guest did not shut down in time, or `--force`).
    Quit,
    /// QEMU was killed (it did not answer `quit`, or was unresponsive and `--force` was given).
    Killed,
    /// Nothing ran.
    AlreadyStopped,
}

impl StopReport {
    /// The final line `plasmavmc stop` prints.
    pub fn render(&self) -> String {
        let vm = &self.vm;
        let took = format!("{:.1}s", self.seconds);
        match (self.how, self.forced) {
            (StopHow::ShutDown, _) => format!("{vm}: the guest shut down ({took})"),
            (StopHow::AlreadyStopped, _) => format!("{vm}: was not running"),
            (StopHow::Quit, true) => {
                format!("{vm}: force-quit (--force): QEMU quit without asking the guest ({took})")
            }
            (StopHow::Killed, true) => format!("{vm}: force-quit (--force): QEMU killed ({took})"),
            (how, false) => format!(
                "{vm}: force-quit: the guest did not shut down within {}s; QEMU {} ({took})",
                self.timeout_seconds,
                if how == StopHow::Quit {
                    "quit"
                } else {
                    "was killed"
                }
            ),
        }
    }
}

/// What a reconcile did: every step with its outcome, and what waits for a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub steps: Vec<StepReport>,
    pub pending: Vec<PendingChange>,
    /// Declared changes refused as destructive (a disk shrink); the reload counts as failed.
    #[serde(default)]
    pub refused: Vec<RefusedChange>,
}

impl ApplyReport {
    pub fn any_failed(&self) -> bool {
        !self.refused.is_empty()
            || self
                .steps
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
    fn a_stop_says_whether_the_guest_shut_down_or_was_force_quit() {
        let report = |how, forced| StopReport {
            vm: "web".into(),
            how,
            force_quit: !matches!(how, StopHow::ShutDown | StopHow::AlreadyStopped),
            forced,
            timeout_seconds: 60.0,
            seconds: 2.3,
        };
        assert_eq!(
            report(StopHow::ShutDown, false).render(),
            "web: the guest shut down (2.3s)"
        );
        assert_eq!(
            report(StopHow::Quit, false).render(),
            "web: force-quit: the guest did not shut down within 60s; QEMU quit (2.3s)"
        );
        assert_eq!(
            report(StopHow::Killed, true).render(),
            "web: force-quit (--force): QEMU killed (2.3s)"
        );
        let json = serde_json::to_value(report(StopHow::Quit, true)).unwrap();
        assert_eq!(json["how"], "quit");
        assert_eq!(json["forceQuit"], true);
        // An older client's stop request still parses.
        let old: Request = serde_json::from_str(r#"{"request":"stop","vm":"web"}"#).unwrap();
        assert_eq!(
            old,
            Request::Stop {
                vm: "web".into(),
                timeout_ms: None,
                force: false
            }
        );
    }

    #[test]
    fn any_failed_sees_only_failures() {
        let step = |outcome| StepReport {
            vm: "web".into(),
            action: Action::RemoveDisk {
                id: "d".into(),
                delete_image: None,
            },
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
            refused: vec![],
        };
        assert!(!report.any_failed());
        let mut refused = report.clone();
        refused.refused.push(PendingChange {
            vm: "web".into(),
            field: "disks.d.sizeMiB".into(),
            from: "2".into(),
            to: "1".into(),
            reason: "shrink".into(),
        });
        assert!(refused.any_failed(), "a refused change fails the reload");
        report.steps.push(step(StepOutcome::Failed {
            error: "boom".into(),
        }));
        assert!(report.any_failed());
    }
}
