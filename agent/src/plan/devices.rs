//! Disks and NICs: add what is declared and missing, remove what is there and not declared,
//! replace (remove, then add with the same ids) what differs in a way QEMU cannot change on a
//! plugged device: for disks path, format, readOnly, cache or serial; for NICs the MAC, the tap
//! or the bridge.
//!
//! Disk sizes: a declared `sizeMiB` above what QEMU reports grows the image live (`ResizeDisk`);
//! one below it is refused (a shrink destroys data) and never applied. A disk no longer declared
//! is unplugged and its image kept, unless it was declared with `deleteOnRemove`.
//!
//! A device the guest has not released yet (`unplugging`) gets its removal retried and is not
//! added back in the same plan: the add waits until QEMU reports the old device gone.
//! On q35 each device needs a free root port: adds beyond the free ports (counting those the
//! removals free) are pending; the next boot gives every declared device its own port.

use crate::action::{Action, PendingChange, RefusedChange};
use crate::argv::root_port_count;
use crate::devices::{nic_tap, MIB};
use crate::ids;
use crate::observed::{ObservedDisk, ObservedNic, ObservedVm};
use crate::spec::{DiskSpec, Machine, NicSpec, VmSpec};

pub(super) fn plan(
    actions: &mut Vec<Action>,
    pending: &mut Vec<PendingChange>,
    refused: &mut Vec<RefusedChange>,
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
    let mut resizes = Vec::new();
    for (id, observed) in &vm.disks {
        let unplugging = is_unplugging(vm, || ids::disk_device(id));
        let declared = desired.disks.get(id);
        if unplugging || !declared.is_some_and(|disk| disk_matches(disk, observed)) {
            // Only a disk gone from the declaration loses its image; a replaced one keeps it.
            let delete_image =
                (declared.is_none() && observed.delete_on_remove).then(|| observed.path.clone());
            let remove = Action::RemoveDisk {
                id: id.clone(),
                delete_image,
            };
            diff.remove(remove, unplugging);
        }
        match declared {
            Some(disk) if !unplugging && !disk_matches(disk, observed) => {
                diff.replace(add_disk(id, disk))
            }
            Some(disk) if !unplugging => plan_size(&mut resizes, refused, name, id, disk, observed),
            _ => {}
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
    actions.extend(resizes);
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

/// A plugged disk whose declared size differs from its image: grow it, or refuse a shrink.
fn plan_size(
    resizes: &mut Vec<Action>,
    refused: &mut Vec<RefusedChange>,
    vm: &str,
    id: &str,
    declared: &DiskSpec,
    observed: &ObservedDisk,
) {
    let Some(to_mib) = declared.size_mib else {
        return;
    };
    let to_bytes = to_mib * MIB;
    let from_mib = observed.size_bytes.div_ceil(MIB);
    if to_bytes > observed.size_bytes {
        resizes.push(Action::ResizeDisk {
            id: id.to_owned(),
            from_mib,
            to_mib,
        });
    } else if to_bytes < observed.size_bytes {
        refused.push(shrink_refused(vm, id, observed.size_bytes, to_mib));
    }
}

/// Why a disk is not shrunk, and what the operator can do about it.
fn shrink_refused(vm: &str, id: &str, size_bytes: u64, to_mib: u64) -> RefusedChange {
    let from_mib = size_bytes.div_ceil(MIB);
    RefusedChange {
        vm: vm.to_owned(),
        field: format!("disks.{id}.sizeMiB"),
        from: from_mib.to_string(),
        to: to_mib.to_string(),
        reason: format!(
            "shrinking a disk destroys the data past the new end; refused, the image stays at \
             {from_mib} MiB (declare sizeMiB >= {from_mib}, or shrink the filesystem and image by hand)"
        ),
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
