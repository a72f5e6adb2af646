//! Disk images moving between VMs in one reconcile. VMs are reconciled in parallel, so a disk
//! moved from VM `a` to VM `b` could be added to `b` while `a`'s QEMU still has the image open:
//! two QEMUs on one image, or an add that fails on QEMU's image lock. Rule: a VM that is about to
//! take an image another VM holds does its own removals, then waits until the holder has done its
//! removals and stops, then adds. Every VM releases before it waits, so swaps and chains finish.
//! VMs that take nothing from another wait for nobody.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use tokio::sync::watch;

use crate::spec::DesiredState;

/// Which VMs each VM must wait for: the other holders of the images it declares and does not
/// hold itself. `held` is what each VM's QEMU had attached when last observed.
pub fn givers(
    held: &BTreeMap<String, BTreeSet<PathBuf>>,
    desired: &DesiredState,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut givers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let none = BTreeSet::new();
    for (taker, spec) in &desired.vms {
        let has = held.get(taker).unwrap_or(&none);
        for disk in spec.disks.values().filter(|d| !has.contains(&d.path)) {
            for (holder, images) in held {
                if holder != taker && images.contains(&disk.path) {
                    givers
                        .entry(taker.clone())
                        .or_default()
                        .insert(holder.clone());
                }
            }
        }
    }
    givers
}

/// One reconcile's handover: who waits for whom, and who is done releasing.
pub struct Handover {
    givers: BTreeMap<String, BTreeSet<String>>,
    released: BTreeMap<String, watch::Sender<bool>>,
}

impl Handover {
    /// For the VMs `vms` reconciled together.
    pub fn new(vms: &[String], givers: BTreeMap<String, BTreeSet<String>>) -> Self {
        Self {
            givers,
            released: vms
                .iter()
                .map(|vm| (vm.clone(), watch::channel(false).0))
                .collect(),
        }
    }

    /// VM `vm` has released what it gives up (or will not touch anything: it also says so when
    /// the returned guard is dropped, so a VM whose reconcile ends early never blocks another).
    pub fn releasing(&self, vm: &str) -> Released<'_> {
        Released(self.released.get(vm))
    }

    /// Waits until every VM that holds an image `vm` takes has released.
    pub async fn wait_for_givers(&self, vm: &str) {
        let Some(givers) = self.givers.get(vm) else {
            return;
        };
        for giver in givers {
            if let Some(sender) = self.released.get(giver) {
                tracing::debug!(vm, giver = %giver, "waiting for the VM that holds an image this VM takes");
                let _ = sender.subscribe().wait_for(|done| *done).await;
            }
        }
    }
}

/// Says "released" when told or when dropped.
pub struct Released<'a>(Option<&'a watch::Sender<bool>>);

impl Released<'_> {
    pub fn done(&self) {
        if let Some(sender) = self.0 {
            sender.send_replace(true);
        }
    }
}

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desired(vms: serde_json::Value) -> DesiredState {
        let mut doc = json!({"version": 1, "vms": {}});
        for (name, disks) in vms.as_object().unwrap() {
            let disks: serde_json::Map<_, _> = disks
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, path)| (format!("d{i}"), json!({"path": path, "format": "raw"})))
                .collect();
            doc["vms"][name] = json!({"vcpus": 1, "memoryMiB": 64, "kernel": "/k", "disks": disks});
        }
        serde_json::from_value(doc).unwrap()
    }

    fn held(vms: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<PathBuf>> {
        vms.iter()
            .map(|(vm, paths)| (vm.to_string(), paths.iter().map(PathBuf::from).collect()))
            .collect()
    }

    fn waits(givers: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
        givers
            .iter()
            .flat_map(|(taker, from)| from.iter().map(move |giver| format!("{taker}<-{giver}")))
            .collect()
    }

    #[test]
    fn a_moved_disk_makes_its_taker_wait_for_its_holder() {
        let now = held(&[("a", &["/x", "/y"]), ("b", &[])]);
        let then = desired(json!({"a": ["/y"], "b": ["/x"]}));
        assert_eq!(waits(&givers(&now, &then)), ["b<-a"]);
    }

    #[test]
    fn swaps_wait_both_ways_and_unchanged_vms_wait_for_nobody() {
        let now = held(&[("a", &["/x"]), ("b", &["/y"]), ("c", &["/z"])]);
        let then = desired(json!({"a": ["/y"], "b": ["/x"], "c": ["/z"]}));
        assert_eq!(waits(&givers(&now, &then)), ["a<-b", "b<-a"]);
    }

    #[test]
    fn an_undeclared_holder_is_waited_for() {
        let now = held(&[("old", &["/x"])]);
        let then = desired(json!({"new": ["/x"]}));
        assert_eq!(waits(&givers(&now, &then)), ["new<-old"]);
    }

    #[tokio::test]
    async fn a_swap_finishes_because_each_releases_before_it_waits() {
        let now = held(&[("a", &["/x"]), ("b", &["/y"])]);
        let then = desired(json!({"a": ["/y"], "b": ["/x"]}));
        let handover = Handover::new(&["a".into(), "b".into()], givers(&now, &then));
        let vm = |name: &'static str| {
            let handover = &handover;
            async move {
                handover.releasing(name).done();
                handover.wait_for_givers(name).await;
            }
        };
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            futures::future::join(vm("a"), vm("b")),
        )
        .await
        .expect("no deadlock");
    }

    #[tokio::test]
    async fn a_dropped_guard_releases() {
        let now = held(&[("a", &["/x"])]);
        let then = desired(json!({"b": ["/x"]}));
        let handover = Handover::new(&["a".into(), "b".into()], givers(&now, &then));
        drop(handover.releasing("a"));
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            handover.wait_for_givers("b"),
        )
        .await
        .expect("released by the drop");
    }
}
