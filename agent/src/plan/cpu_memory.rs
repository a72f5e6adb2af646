//! vCPUs and memory: live within what the VM was booted with, pending beyond it.
//!
//! vCPUs: the `-smp` boot CPUs have no device id and cannot be unplugged, so the live range is
//! [boot vcpus, boot maxVcpus]. Memory: boot memory is fixed; the virtio-mem device (present when
//! the boot spec had maxMemoryMiB above memoryMiB) covers [boot memory, boot maxMemoryMiB].
//! A declared value outside the live range is pending, and the VM moves live as far towards it
//! as it can (the nearest end of the range).
//! Memory is compared with what was *requested* from virtio-mem, not what the guest plugged: a
//! guest that lags behind (or lacks the driver) must not make every plan resize again; status
//! shows the plugged size.

use std::ops::RangeInclusive;

use crate::action::{Action, PendingChange};
use crate::observed::ObservedVm;
use crate::spec::VmSpec;

pub(super) fn vcpus_live_range(boot: &VmSpec) -> RangeInclusive<u32> {
    boot.vcpus..=boot.effective_max_vcpus()
}

/// `None` when the VM was booted without a virtio-mem device.
pub(super) fn memory_live_range(boot: &VmSpec) -> Option<RangeInclusive<u64>> {
    boot.max_memory_mib
        .filter(|&max| max > boot.memory_mib)
        .map(|max| boot.memory_mib..=max)
}

pub(super) fn plan(actions: &mut Vec<Action>, desired: &VmSpec, vm: &ObservedVm) {
    let vcpus = clamp(desired.vcpus, &vcpus_live_range(&vm.boot_spec));
    if vcpus != vm.vcpus {
        actions.push(Action::SetVcpus {
            from: vm.vcpus,
            to: vcpus,
        });
    }
    if let Some(live) = memory_live_range(&vm.boot_spec) {
        let requested = vm.memory.boot_mib + vm.memory.requested_mib;
        let memory = clamp(desired.memory_mib, &live);
        if memory != requested {
            actions.push(Action::SetMemory {
                from_mib: requested,
                to_mib: memory,
            });
        }
    }
}

fn clamp<T: Ord + Copy>(value: T, range: &RangeInclusive<T>) -> T {
    value.clamp(*range.start(), *range.end())
}

/// Cgroup limits: live whenever QEMU has a cgroup of its own; pending otherwise.
pub(super) fn plan_limits(
    actions: &mut Vec<Action>,
    pending: &mut Vec<PendingChange>,
    name: &str,
    desired: &VmSpec,
    vm: &ObservedVm,
) {
    let to = desired.limits.normalized();
    match vm.limits {
        Some(from) if from != to => actions.push(Action::SetLimits { from, to }),
        Some(_) => {}
        None if to != vm.boot_spec.limits.normalized() => pending.push(PendingChange {
            vm: name.to_owned(),
            field: "limits".to_owned(),
            from: vm.boot_spec.limits.normalized().to_string(),
            to: to.to_string(),
            reason: "QEMU has no cgroup of its own (started before plasmavmc made one per VM)"
                .to_owned(),
        }),
        None => {}
    }
}
