//! The planner: a pure function from what is declared and what QEMU reports to the ordered
//! steps that make them match, plus what has to wait for a restart.
//!
//! Rules, per declared VM (VMs in name order, after the stops of VMs no longer declared):
//! - Lifecycle: the daemon says per VM whether it should run (`RunIntent`; absent = follow
//!   `autostart`). Run and no QEMU → `StartVm` with the declared spec. StayDown and a QEMU →
//!   `StopVm`. A QEMU whose VM is no longer declared → `StopVm`.
//! - Running VM: boot-time differences against the spec QEMU was booted with are pending
//!   (`pending_changes`). With `onRestartRequired = "restart"`, any pending change turns the
//!   VM's plan into a single `RestartVm`; otherwise the pending changes are reported and
//!   everything live is applied.
//! - Live steps, in order: orphan block nodes and netdevs (left by an interrupted apply; their ids
//!   may be reused by the adds below), removals (frees root ports), replacements, disk grows,
//!   adds, vCPUs, memory, cgroup limits. Disk shrinks are refused (`Plan::refused`), never
//!   planned.
//! - Disks and NICs: see `devices`. vCPUs and memory: see `cpu_memory`.
//!
//! `plan(desired, apply(plan(desired, observed)))` has no steps: every step moves observed state
//! exactly to what the next plan compares against (tested with a simulator in the tests).

mod cpu_memory;
mod devices;
mod pending;

use std::collections::BTreeMap;

use crate::action::{Action, Plan, Step};
use crate::observed::{ObservedHost, ObservedVm};
use crate::spec::{DesiredState, OnRestartRequired, VmSpec};

pub use pending::pending_changes;

/// Whether the daemon wants a declared VM running. It folds in `autostart`, operator
/// `start`/`stop`, and restart policy with backoff; the planner only obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunIntent {
    Run,
    /// Keep it (or take it) down; the reason goes into the `StopVm` step.
    StayDown {
        reason: String,
    },
}

/// Per declared VM name. A VM missing here follows its `autostart`.
pub type RunIntents = BTreeMap<String, RunIntent>;

/// The steps that move `observed` to `desired`, and the changes that wait for a restart.
pub fn plan(desired: &DesiredState, observed: &ObservedHost, intents: &RunIntents) -> Plan {
    let mut plan = Plan::default();
    for name in observed
        .vms
        .keys()
        .filter(|name| !desired.vms.contains_key(*name))
    {
        plan.steps.push(step(
            name,
            Action::StopVm {
                reason: "no longer declared".into(),
            },
        ));
    }
    for (name, spec) in &desired.vms {
        let wants_run = match intents.get(name) {
            Some(RunIntent::Run) => Ok(()),
            Some(RunIntent::StayDown { reason }) => Err(reason.as_str()),
            None if spec.autostart => Ok(()),
            None => Err("autostart is off"),
        };
        match (wants_run, observed.vms.get(name)) {
            (Ok(()), None) => plan.steps.push(step(
                name,
                Action::StartVm {
                    spec: Box::new(spec.clone()),
                },
            )),
            (Ok(()), Some(vm)) => plan_running(&mut plan, name, spec, vm),
            (Err(reason), Some(_)) => plan.steps.push(step(
                name,
                Action::StopVm {
                    reason: reason.to_owned(),
                },
            )),
            (Err(_), None) => {}
        }
    }
    plan
}

fn plan_running(plan: &mut Plan, name: &str, spec: &VmSpec, vm: &ObservedVm) {
    let mut pending = pending_changes(name, spec, &vm.boot_spec);
    let mut actions = Vec::new();
    let mut refused = Vec::new();
    devices::plan(&mut actions, &mut pending, &mut refused, name, spec, vm);
    cpu_memory::plan(&mut actions, spec, vm);
    cpu_memory::plan_limits(&mut actions, &mut pending, name, spec, vm);

    if !pending.is_empty() && spec.on_restart_required == OnRestartRequired::Restart {
        let fields: Vec<&str> = pending.iter().map(|change| change.field.as_str()).collect();
        let reason = format!("apply changes that need a restart: {}", fields.join(", "));
        actions = vec![Action::RestartVm {
            spec: Box::new(spec.clone()),
            reason,
        }];
    }
    plan.steps
        .extend(actions.into_iter().map(|action| step(name, action)));
    plan.pending.extend(pending);
    plan.refused.extend(refused);
}

fn step(vm: &str, action: Action) -> Step {
    Step {
        vm: vm.to_owned(),
        action,
    }
}

#[cfg(test)]
mod simulate;
#[cfg(test)]
mod tests;
