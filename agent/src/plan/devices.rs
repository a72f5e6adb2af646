//! Disks and NICs: add what is declared and missing, remove what is there and not declared,
//! replace (remove, then add with the same ids) what differs in a way QEMU cannot change on a
//! plugged device: for disks path, format, readOnly, cache or serial; for NICs the MAC, the tap
//! or the bridge.
//!
//! A device the guest has not released yet (`unplugging`) gets its removal retried and is not
//! added back in the same plan: the add waits until QEMU reports the old device gone.
//! On q35 each device needs a free root port: adds beyond the free ports (counting those the
//! removals free) are pending; the next boot gives every declared device its own port.

use crate::action::{Action, PendingChange};
use crate::argv::root_port_count;
use crate::devices::nic_tap;
use crate::ids;
use crate::observed::{ObservedDisk, ObservedNic, ObservedVm};
use crate::spec::{DiskSpec, Machine, NicSpec, VmSpec};

pub(super) fn plan(
    actions: &mut Vec<Action>,
    pending: &mut Vec<PendingChange>,
    name: &str,
    desired: &VmSpec,
    vm: &ObservedVm,
) {
    for node in &vm.orphan_block_nodes {
        actions.push(Action::RemoveOrphanBlockNode { node: node.clone() });
    }
    for netdev in &vm.orphan_netdevs {
        actions.push(Action::RemoveOrphanNetdev {
            netdev: netdev.clone(),
        });
    }

    let mut diff = Diff::default();
    for (id, observed) in &vm.disks {
        let unplugging = is_unplugging(vm, || ids::disk_device(id));
        let declared = desired.disks.get(id);
        if unplugging || !declared.is_some_and(|disk| disk_matches(disk, observed)) {
            diff.remove(Action::RemoveDisk { id: id.clone() }, unplugging);
        }
        if let Some(disk) = declared.filter(|disk| !unplugging && !disk_matches(disk, observed)) {
            diff.replace(add_disk(id, disk));
        }
    }
    for (id, disk) in desired
        .disks
        .iter()
        .filter(|(id, _)| !vm.disks.contains_key(*id))
    {
        diff.add(id, disk.path.display().to_string(), add_disk(id, disk));
    }

    for (id, observed) in &vm.nics {
        let unplugging = is_unplugging(vm, || ids::nic_device(id));
        let declared = desired.nics.get(id);
        let matches = |nic: &NicSpec| nic_matches(name, id, nic, observed);
        if unplugging || !declared.is_some_and(matches) {
            diff.remove(Action::RemoveNic { id: id.clone() }, unplugging);
        }
        if let Some(nic) = declared.filter(|nic| !unplugging && !matches(nic)) {
            diff.replace(add_nic(id, nic));
        }
    }
    for (id, nic) in desired
        .nics
        .iter()
        .filter(|(id, _)| !vm.nics.contains_key(*id))
    {
        diff.add(id, nic.mac.clone(), add_nic(id, nic));
    }

    let free_ports = match vm.boot_spec.machine {
        Machine::Q35 => {
            let ports = root_port_count(&vm.boot_spec) as usize;
            let used = vm.disks.len() + vm.nics.len();
            ports.saturating_sub(used) + diff.freed_ports
        }
        Machine::Pc => usize::MAX,
    };
    actions.extend(diff.removals);
    // A replacement reuses the port its removal frees, so only new devices can run out.
    let free_ports = free_ports.saturating_sub(diff.replacements.len());
    actions.extend(diff.replacements);
    for (index, add) in diff.adds.into_iter().enumerate() {
        if index < free_ports {
            actions.push(add.action);
        } else {
            pending.push(PendingChange {
                vm: name.to_owned(),
                field: add.field,
                from: "absent".into(),
                to: add.to,
                reason: format!(
                    "no free hotplug slot (hotplugSlots = {}); plugged at next boot",
                    vm.boot_spec.hotplug_slots
                ),
            });
        }
    }
}

#[derive(Default)]
struct Diff {
    removals: Vec<Action>,
    /// Root ports the removals free: not those of devices the guest is already ignoring.
    freed_ports: usize,
    /// Re-adds of replaced devices; they go first.
    replacements: Vec<Action>,
    /// Devices not present at all, disks then NICs, by id.
    adds: Vec<Add>,
}

struct Add {
    /// `disks.<id>` / `nics.<id>`, for a pending change if no slot is free.
    field: String,
    to: String,
    action: Action,
}

impl Diff {
    fn remove(&mut self, action: Action, unplugging: bool) {
        self.removals.push(action);
        self.freed_ports += usize::from(!unplugging);
    }

    fn replace(&mut self, action: Action) {
        self.replacements.push(action);
    }

    fn add(&mut self, id: &str, to: String, action: Action) {
        let kind = match action {
            Action::AddDisk { .. } => "disks",
            _ => "nics",
        };
        self.adds.push(Add {
            field: format!("{kind}.{id}"),
            to,
            action,
        });
    }
}

fn add_disk(id: &str, disk: &DiskSpec) -> Action {
    Action::AddDisk {
        id: id.to_owned(),
        disk: disk.clone(),
    }
}

fn add_nic(id: &str, nic: &NicSpec) -> Action {
    Action::AddNic {
        id: id.to_owned(),
        nic: nic.clone(),
    }
}

/// Builds the device id only when something is unplugging: the no-op plan stays allocation-light.
fn is_unplugging(vm: &ObservedVm, device: impl FnOnce() -> String) -> bool {
    !vm.unplugging.is_empty() && vm.unplugging.contains(&device())
}

fn disk_matches(declared: &DiskSpec, observed: &ObservedDisk) -> bool {
    declared.path == observed.path
        && declared.format == observed.format
        && declared.read_only == observed.read_only
        && declared.cache == observed.cache
        && declared.serial == observed.serial
}

fn nic_matches(vm: &str, id: &str, declared: &NicSpec, observed: &ObservedNic) -> bool {
    declared.mac.eq_ignore_ascii_case(&observed.mac)
        && nic_tap(vm, id, declared) == observed.tap
        && (declared.bridge.is_none() || declared.bridge == observed.bridge)
}
