//! No-op plan time: the planner run over N declared VMs that already match what QEMU reports.
//! This is the work every reconcile does when nothing changed, so it bounds the agent's idle cost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use plasmavmc_agent::observed::{ObservedHost, ObservedVm};
use plasmavmc_agent::plan::{plan, RunIntents};
use plasmavmc_agent::spec::{DesiredState, VmSpec, SCHEMA_VERSION};
use plasmavmc_agent::validate::parse_desired_state;

use crate::stats::Summary;

/// Two disks and one bridged NIC per VM, like a typical server.
fn declared(vms: usize) -> DesiredState {
    let vms: serde_json::Map<String, serde_json::Value> = (0..vms)
        .map(|i| {
            let vm = serde_json::json!({
                "vcpus": 2, "maxVcpus": 8, "memoryMiB": 2048, "maxMemoryMiB": 8192,
                "bootDisk": "root",
                "disks": {
                    "root": {"path": format!("/var/lib/vms/vm{i}-root.qcow2"), "format": "qcow2"},
                    "data": {"path": format!("/var/lib/vms/vm{i}-data.raw"), "format": "raw", "serial": format!("data{i}")},
                },
                "nics": {"eth0": {"mac": format!("52:54:00:{:02x}:{:02x}:{:02x}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff), "bridge": "br0"}},
            });
            (format!("vm{i}"), vm)
        })
        .collect();
    let doc = serde_json::json!({"version": SCHEMA_VERSION, "vms": vms});
    parse_desired_state(&doc.to_string()).expect("the bench's own desired state is valid")
}

fn observed_matching(desired: &DesiredState) -> ObservedHost {
    let vms: BTreeMap<String, ObservedVm> = desired
        .vms
        .iter()
        .zip(1000u32..)
        .map(|((name, spec), pid): ((&String, &VmSpec), u32)| {
            (name.clone(), ObservedVm::freshly_booted(name, spec, pid))
        })
        .collect();
    ObservedHost { vms }
}

pub fn run(vms: usize, iterations: usize) -> Summary {
    let desired = declared(vms);
    let observed = observed_matching(&desired);
    let intents = RunIntents::new();
    let first = plan(&desired, &observed, &intents);
    assert!(
        first.steps.is_empty() && first.pending.is_empty(),
        "bench setup is wrong: a matching host must plan nothing, got {first:?}"
    );
    let samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            let plan = plan(&desired, &observed, &intents);
            let took = start.elapsed();
            std::hint::black_box(plan);
            took
        })
        .collect();
    Summary::of(samples)
}
