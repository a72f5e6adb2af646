//! Managed save and host shutdown: the decisions, as pure functions.
//!
//! Rules:
//! - A save is QEMU's migration stream of a stopped guest, written under the state dir with the
//!   spec QEMU was booted with (`SavedRecord`). A restore launches QEMU from that same spec with
//!   `-incoming` and loads the stream, so the machine on both sides is the same by construction.
//! - So a save is refused for a VM changed live since it booted (vCPUs, memory, disks, NICs):
//!   its devices no longer match its boot command line, and the stream would not load.
//! - A save restores only while the declared VM could still be reached live from it: a declared
//!   change that only a boot can apply (machine, kernel, ceilings, ...) means the operator changed
//!   the VM's hardware while it was saved, so it boots fresh instead. Live differences (a disk, a
//!   NIC, vCPUs, memory) are applied after the restore by the usual plan.
//! - A save that is not restored is never deleted: it is kept aside as unrestorable, with why.
//! - A saved VM never also runs: the save is committed only after QEMU stopped the guest and
//!   wrote everything, QEMU is quit right after; a restore removes the save before the guest runs.

use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::observed::{ObservedHost, ObservedVm};
use crate::plan::{pending_changes, plan, RunIntent, RunIntents};
use crate::spec::{DesiredState, OnHostShutdown, VmSpec};

/// The layout version of `record.json` and the stream beside it.
pub const RECORD_FORMAT: u32 = 1;

/// What `<state-dir>/saved/NAME/record.json` says about the save beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedRecord {
    pub format: u32,
    /// The spec QEMU was booted with; the restore launches exactly this machine.
    pub spec: VmSpec,
    /// The QEMU that wrote the stream (`query-version`), for the operator when a restore fails.
    pub qemu_version: String,
    pub saved_at_unix: u64,
    /// Size of the stream.
    pub bytes: u64,
}

/// Why VM `name` (booted as `boot_spec`, observed as `observed`) cannot be saved now, if so.
pub fn save_blocker(name: &str, boot_spec: &VmSpec, observed: &ObservedVm) -> Option<String> {
    let steps = steps_from(name, boot_spec, observed);
    if steps.is_empty() && observed.unplugging.is_empty() {
        return None;
    }
    let mut changes: Vec<String> = steps.iter().map(live_change).collect();
    changes.extend(
        observed
            .unplugging
            .iter()
            .map(|d| format!("{d} being unplugged")),
    );
    Some(format!(
        "VM {name} was changed live since it booted ({}); a saved state loads only into the \
         machine it was booted as: restart the VM (plasmavmc stop, then start) before saving it",
        changes.join(", ")
    ))
}

/// Whether the save of VM `name` may be restored for the VM declared now; `Err` says why not.
pub fn restore_verdict(name: &str, saved: &SavedRecord, declared: &VmSpec) -> Result<(), String> {
    if let Some(why) = ha_blocker(name, declared) {
        return Err(why);
    }
    if saved.format != RECORD_FORMAT {
        return Err(format!(
            "saved in format {} by another agent version; this one reads format {RECORD_FORMAT}",
            saved.format
        ));
    }
    let boot_only = pending_changes(name, declared, &saved.spec);
    if boot_only.is_empty() {
        return Ok(());
    }
    let changes: Vec<String> = boot_only
        .iter()
        .map(|c| format!("{}: {} -> {}", c.field, c.from, c.to))
        .collect();
    Err(format!(
        "the declared VM changed since the save in settings only a boot applies ({})",
        changes.join("; ")
    ))
}

/// Why HA VM `name` is never saved: with a cluster, another host may start it meanwhile, and a
/// later restore here would run an older copy of the same VM.
pub fn ha_blocker(name: &str, spec: &VmSpec) -> Option<String> {
    spec.ha.enable.then(|| {
        format!(
            "VM {name} is an HA VM: it is never saved (another host may start it meanwhile, and \
             a restore here would then run an older copy of it)"
        )
    })
}

/// What a host shutdown does to one running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownStep {
    /// ACPI powerdown, `quit` after the timeout.
    Powerdown,
    /// Managed save; if the save fails, powerdown.
    Save,
    /// Live migration to another host (as `plasmavmc evacuate` picks it); if none takes the
    /// VM, powerdown (an HA VM is never saved).
    Migrate,
}

/// The step for a VM's `onHostShutdown` (`ha`: declared with `ha.enable`), and a note when it
/// stands in for another.
pub fn shutdown_step(policy: OnHostShutdown, ha: bool) -> (ShutdownStep, Option<&'static str>) {
    match (policy, ha) {
        (OnHostShutdown::Powerdown, _) => (ShutdownStep::Powerdown, None),
        (OnHostShutdown::Save, _) => (ShutdownStep::Save, None),
        (OnHostShutdown::Evacuate, true) => (ShutdownStep::Migrate, None),
        (OnHostShutdown::Evacuate, false) => (
            ShutdownStep::Save,
            Some("evacuate: declared on this host only (no ha.enable), it has no other host; saving instead"),
        ),
    }
}

/// The live steps between `boot_spec` (as if declared) and what QEMU has now.
fn steps_from(name: &str, boot_spec: &VmSpec, observed: &ObservedVm) -> Vec<Action> {
    let desired = DesiredState {
        version: crate::spec::SCHEMA_VERSION,
        vms: [(name.to_owned(), boot_spec.clone())].into(),
    };
    let host = ObservedHost {
        vms: [(name.to_owned(), observed.clone())].into(),
    };
    let intents: RunIntents = [(name.to_owned(), RunIntent::Run)].into();
    plan(&desired, &host, &intents)
        .steps
        .into_iter()
        .map(|step| step.action)
        .collect()
}

/// A live step away from the boot spec, read backwards: what changed since boot.
fn live_change(action: &Action) -> String {
    match action {
        Action::AddDisk { id, .. } => format!("disk {id} removed"),
        Action::RemoveDisk { id, .. } => format!("disk {id} added"),
        Action::AddNic { id, .. } => format!("NIC {id} removed"),
        Action::RemoveNic { id } => format!("NIC {id} added"),
        Action::SetVcpus { from, to } => format!("vCPUs {to} -> {from}"),
        Action::SetMemory { from_mib, to_mib } => format!("memory {to_mib} -> {from_mib} MiB"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> VmSpec {
        let mut doc = json!({"vcpus": 1, "maxVcpus": 2, "memoryMiB": 256, "kernel": "/k"});
        doc.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(doc).unwrap()
    }

    fn record(spec: VmSpec) -> SavedRecord {
        SavedRecord {
            format: RECORD_FORMAT,
            spec,
            qemu_version: "7.2.0".into(),
            saved_at_unix: 1,
            bytes: 10,
        }
    }

    #[test]
    fn a_vm_as_booted_can_be_saved() {
        let boot = spec(json!({}));
        let observed = ObservedVm::freshly_booted("web", &boot, 1);
        assert_eq!(save_blocker("web", &boot, &observed), None);
    }

    #[test]
    fn a_vm_changed_live_cannot_be_saved_and_says_what_changed() {
        let boot = spec(json!({}));
        let mut observed = ObservedVm::freshly_booted("web", &boot, 1);
        observed.vcpus = 2;
        let blocker = save_blocker("web", &boot, &observed).expect("blocked");
        assert!(blocker.contains("vCPUs 1 -> 2"), "{blocker}");
        assert!(blocker.contains("restart the VM"), "{blocker}");

        let mut unplugging = ObservedVm::freshly_booted("web", &boot, 1);
        unplugging.unplugging.insert("disk-data".into());
        let blocker = save_blocker("web", &boot, &unplugging).expect("blocked");
        assert!(blocker.contains("disk-data being unplugged"), "{blocker}");
    }

    #[test]
    fn live_differences_restore_boot_differences_boot_fresh() {
        let saved = record(spec(json!({})));
        assert_eq!(restore_verdict("web", &saved, &saved.spec), Ok(()));
        let more_vcpus = spec(json!({"vcpus": 2, "onHostShutdown": "save"}));
        assert_eq!(restore_verdict("web", &saved, &more_vcpus), Ok(()));

        let new_kernel = spec(json!({"kernel": "/k2"}));
        let why = restore_verdict("web", &saved, &new_kernel).unwrap_err();
        assert!(why.contains("kernel: /k -> /k2"), "{why}");
        let new_ceiling = spec(json!({"maxVcpus": 4}));
        assert!(restore_verdict("web", &saved, &new_ceiling)
            .unwrap_err()
            .contains("maxVcpus"));
    }

    #[test]
    fn ha_vms_are_never_saved_nor_restored() {
        let ha = spec(json!({"ha": {"enable": true}}));
        assert!(ha_blocker("web", &ha).unwrap().contains("HA VM"));
        assert_eq!(ha_blocker("web", &spec(json!({}))), None);
        let saved = record(spec(json!({})));
        assert!(restore_verdict("web", &saved, &ha).is_err());
    }

    #[test]
    fn a_record_of_another_format_is_not_restored() {
        let mut saved = record(spec(json!({})));
        saved.format = RECORD_FORMAT + 1;
        let spec = saved.spec.clone();
        assert!(restore_verdict("web", &saved, &spec)
            .unwrap_err()
            .contains("format 2"));
    }

    #[test]
    fn evacuate_moves_an_ha_vm_and_saves_one_declared_here_only_saying_so() {
        assert_eq!(
            shutdown_step(OnHostShutdown::Powerdown, true),
            (ShutdownStep::Powerdown, None)
        );
        assert_eq!(
            shutdown_step(OnHostShutdown::Save, false).0,
            ShutdownStep::Save
        );
        assert_eq!(
            shutdown_step(OnHostShutdown::Evacuate, true),
            (ShutdownStep::Migrate, None)
        );
        let (step, note) = shutdown_step(OnHostShutdown::Evacuate, false);
        assert_eq!(step, ShutdownStep::Save);
        assert!(note.unwrap().contains("no other host"));
    }
}
