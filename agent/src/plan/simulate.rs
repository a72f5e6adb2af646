//! Test-only fake of the QEMU shell: applies a plan's steps to observed state the way the real
//! shell would change what QEMU reports, and panics on steps the real one would fail (duplicate
//! ids, no free root port, out-of-range vCPU or memory).

use std::collections::BTreeMap;

use crate::action::{Action, Plan};
use crate::argv::root_port_count;
use crate::observed::{ObservedDisk, ObservedHost, ObservedNic, ObservedVm};
use crate::spec::{Machine, VmSpec};

use super::cpu_memory::{memory_live_range, vcpus_live_range};

/// What QEMU reports right after booting `spec`.
pub fn booted(name: &str, spec: &VmSpec) -> ObservedVm {
    ObservedVm::freshly_booted(name, spec, 1000)
}

pub fn apply(host: &mut ObservedHost, plan: &Plan) {
    for step in &plan.steps {
        let name = step.vm.as_str();
        match &step.action {
            Action::StartVm { spec } | Action::RestartVm { spec, .. } => {
                host.vms.insert(name.to_owned(), booted(name, spec));
            }
            Action::StopVm { .. } => {
                host.vms.remove(name).expect("stop a running VM");
            }
            action => apply_live(
                name,
                host.vms.get_mut(name).expect("live step on a running VM"),
                action,
            ),
        }
    }
}

fn apply_live(name: &str, vm: &mut ObservedVm, action: &Action) {
    match action {
        Action::AddDisk { id, disk } => {
            take_port(vm);
            let old = vm
                .disks
                .insert(id.clone(), ObservedDisk::from_spec(disk, false));
            assert!(old.is_none(), "disk {id} added twice");
        }
        Action::ResizeDisk {
            id,
            from_mib,
            to_mib,
        } => {
            let disk = vm.disks.get_mut(id).expect("resize a present disk");
            assert_eq!(disk.size_bytes.div_ceil(crate::devices::MIB), *from_mib);
            assert!(
                *to_mib * crate::devices::MIB > disk.size_bytes,
                "never shrink"
            );
            disk.size_bytes = to_mib * crate::devices::MIB;
        }
        Action::RemoveDisk { id, .. } => {
            vm.disks.remove(id).expect("remove a present disk");
            vm.unplugging.remove(&crate::ids::disk_device(id));
        }
        Action::AddNic { id, nic } => {
            take_port(vm);
            let old = vm
                .nics
                .insert(id.clone(), ObservedNic::from_spec(name, id, nic, false));
            assert!(old.is_none(), "NIC {id} added twice");
        }
        Action::RemoveNic { id } => {
            vm.nics.remove(id).expect("remove a present NIC");
            vm.unplugging.remove(&crate::ids::nic_device(id));
        }
        Action::RemoveOrphanBlockNode { node } => {
            assert!(
                vm.orphan_block_nodes.remove(node),
                "orphan node {node} exists"
            );
        }
        Action::RemoveOrphanNetdev { netdev } => {
            assert!(
                vm.orphan_netdevs.remove(netdev),
                "orphan netdev {netdev} exists"
            );
        }
        Action::SetVcpus { from, to } => {
            assert_eq!(*from, vm.vcpus);
            assert!(
                vcpus_live_range(&vm.boot_spec).contains(to),
                "vcpus {to} out of range"
            );
            vm.vcpus = *to;
        }
        Action::SetMemory { from_mib, to_mib } => {
            let live = memory_live_range(&vm.boot_spec).expect("virtio-mem present");
            assert_eq!(*from_mib, vm.memory.boot_mib + vm.memory.requested_mib);
            assert!(live.contains(to_mib), "memory {to_mib} out of range");
            vm.memory.requested_mib = to_mib - vm.memory.boot_mib;
            vm.memory.plugged_mib = vm.memory.requested_mib;
        }
        Action::SetLimits { from, to } => {
            assert_eq!(
                Some(*from),
                vm.limits,
                "limits changed from what was observed"
            );
            vm.limits = Some(*to);
        }
        Action::StartVm { .. } | Action::StopVm { .. } | Action::RestartVm { .. } => unreachable!(),
    }
}

/// On q35 a hotplug needs a root port without a device.
fn take_port(vm: &ObservedVm) {
    if vm.boot_spec.machine == Machine::Q35 {
        let used = vm.disks.len() + vm.nics.len();
        assert!(
            used < root_port_count(&vm.boot_spec) as usize,
            "no free root port"
        );
    }
}

/// Tiny deterministic PRNG for the property tests (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Keys of a map, for picking.
pub fn keys<V>(map: &BTreeMap<String, V>) -> Vec<String> {
    map.keys().cloned().collect()
}
