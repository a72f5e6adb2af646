use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::simulate::{apply, booted, keys, Rng};
use super::*;
use crate::action::PendingChange;
use crate::ids;
use crate::observed::{ObservedDisk, ObservedNic};
use crate::spec::{DiskCache, DiskFormat, DiskSpec, Limits, Machine, NicSpec};

fn spec(extra: Value) -> VmSpec {
    let mut doc = json!({"vcpus": 2, "memoryMiB": 512, "kernel": "/k/vmlinuz", "accel": "tcg"});
    doc.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(doc).unwrap()
}

fn desired(vms: &[(&str, &VmSpec)]) -> DesiredState {
    DesiredState {
        version: 1,
        vms: vms
            .iter()
            .map(|(name, spec)| (name.to_string(), (*spec).clone()))
            .collect(),
    }
}

fn host(vms: Vec<(&str, ObservedVm)>) -> ObservedHost {
    ObservedHost {
        vms: vms
            .into_iter()
            .map(|(name, vm)| (name.to_owned(), vm))
            .collect(),
    }
}

fn no_intents() -> RunIntents {
    RunIntents::new()
}

/// Plans one declared VM `web` against its observed state.
fn plan_web(declared: &VmSpec, observed: ObservedVm) -> Plan {
    plan(
        &desired(&[("web", declared)]),
        &host(vec![("web", observed)]),
        &no_intents(),
    )
}

fn actions(plan: &Plan) -> Vec<&Action> {
    plan.steps.iter().map(|step| &step.action).collect()
}

fn fields(plan: &Plan) -> Vec<&str> {
    plan.pending
        .iter()
        .map(|change| change.field.as_str())
        .collect()
}

fn disk(path: &str) -> DiskSpec {
    DiskSpec {
        path: path.into(),
        format: DiskFormat::Qcow2,
        read_only: false,
        cache: DiskCache::Writeback,
        serial: None,
        size_mib: None,
        create: None,
        delete_on_remove: false,
        shared: false,
    }
}

fn bridged(mac: &str, bridge: &str) -> NicSpec {
    NicSpec {
        mac: mac.into(),
        bridge: Some(bridge.into()),
        tap: None,
    }
}

fn with_disks(mut spec: VmSpec, disks: &[(&str, DiskSpec)]) -> VmSpec {
    spec.disks = disks
        .iter()
        .map(|(id, d)| (id.to_string(), d.clone()))
        .collect();
    spec
}

fn with_nics(mut spec: VmSpec, nics: &[(&str, NicSpec)]) -> VmSpec {
    spec.nics = nics
        .iter()
        .map(|(id, n)| (id.to_string(), n.clone()))
        .collect();
    spec
}

fn add_disk(id: &str, d: &DiskSpec) -> Action {
    Action::AddDisk {
        id: id.into(),
        disk: d.clone(),
    }
}

fn remove_disk(id: &str) -> Action {
    Action::RemoveDisk {
        id: id.into(),
        delete_image: None,
    }
}

// ---- lifecycle ----

#[test]
fn a_vm_running_as_declared_needs_nothing() {
    let s = with_nics(
        with_disks(
            spec(json!({"maxVcpus": 4, "maxMemoryMiB": 1024})),
            &[("a", disk("/a"))],
        ),
        &[("eth0", bridged("52:54:00:AA:00:01", "br0"))],
    );
    assert_eq!(plan_web(&s, booted("web", &s)), Plan::default());
}

#[test]
fn declared_vms_start_per_intent_and_autostart() {
    let on = spec(json!({}));
    let off = spec(json!({"autostart": false}));
    let state = desired(&[("on", &on), ("off", &off), ("held", &on), ("forced", &off)]);
    let mut intents = RunIntents::new();
    intents.insert(
        "held".into(),
        RunIntent::StayDown {
            reason: "stopped by operator".into(),
        },
    );
    intents.insert("forced".into(), RunIntent::Run);
    let p = plan(&state, &ObservedHost::default(), &intents);
    let started: Vec<&str> = p
        .steps
        .iter()
        .filter(|s| matches!(s.action, Action::StartVm { .. }))
        .map(|s| s.vm.as_str())
        .collect();
    assert_eq!(started, ["forced", "on"]);
    assert_eq!(p.steps.len(), 2);
    assert_eq!(p.steps[1].action, Action::StartVm { spec: Box::new(on) });
}

#[test]
fn stay_down_stops_a_running_vm_with_the_reason() {
    let s = spec(json!({}));
    let mut intents = RunIntents::new();
    intents.insert(
        "web".into(),
        RunIntent::StayDown {
            reason: "stopped by operator".into(),
        },
    );
    let p = plan(
        &desired(&[("web", &s)]),
        &host(vec![("web", booted("web", &s))]),
        &intents,
    );
    assert_eq!(
        actions(&p),
        [&Action::StopVm {
            reason: "stopped by operator".into()
        }]
    );

    let off = spec(json!({"autostart": false}));
    let p = plan(
        &desired(&[("web", &off)]),
        &host(vec![("web", booted("web", &off))]),
        &no_intents(),
    );
    assert_eq!(
        actions(&p),
        [&Action::StopVm {
            reason: "autostart is off".into()
        }]
    );
}

#[test]
fn undeclared_vms_are_stopped_first() {
    let s = spec(json!({}));
    let p = plan(
        &desired(&[("a", &s)]),
        &host(vec![("z", booted("z", &s))]),
        &no_intents(),
    );
    assert_eq!(p.steps[0].vm, "z");
    assert_eq!(
        p.steps[0].action,
        Action::StopVm {
            reason: "no longer declared".into()
        }
    );
    assert_eq!(p.steps[1].vm, "a");
    assert!(matches!(p.steps[1].action, Action::StartVm { .. }));
}

// ---- disks and NICs ----

#[test]
fn disks_are_added_and_removed() {
    let boot = with_disks(spec(json!({})), &[("old", disk("/old"))]);
    let declared = with_disks(spec(json!({})), &[("new", disk("/new"))]);
    let p = plan_web(&declared, booted("web", &boot));
    assert_eq!(
        actions(&p),
        [&remove_disk("old"), &add_disk("new", &disk("/new"))]
    );
    assert!(p.pending.is_empty());
}

#[test]
fn a_disk_whose_backing_changes_is_replaced_remove_first() {
    let boot = with_disks(spec(json!({})), &[("a", disk("/a"))]);
    let mut changes: Vec<DiskSpec> = Vec::new();
    changes.push(disk("/other"));
    changes.push(DiskSpec {
        format: DiskFormat::Raw,
        ..disk("/a")
    });
    changes.push(DiskSpec {
        read_only: true,
        ..disk("/a")
    });
    changes.push(DiskSpec {
        cache: DiskCache::None,
        ..disk("/a")
    });
    changes.push(DiskSpec {
        serial: Some("S".into()),
        ..disk("/a")
    });
    for changed in changes {
        let declared = with_disks(spec(json!({})), &[("a", changed.clone())]);
        let p = plan_web(&declared, booted("web", &boot));
        assert_eq!(
            actions(&p),
            [&remove_disk("a"), &add_disk("a", &changed)],
            "{changed:?}"
        );
    }
}

#[test]
fn nics_are_replaced_on_mac_bridge_or_tap_change_and_mac_case_is_ignored() {
    let boot = with_nics(
        spec(json!({})),
        &[("eth0", bridged("52:54:00:aa:00:01", "br0"))],
    );
    let same = with_nics(
        spec(json!({})),
        &[("eth0", bridged("52:54:00:AA:00:01", "br0"))],
    );
    assert!(plan_web(&same, booted("web", &boot)).steps.is_empty());

    for changed in [
        bridged("52:54:00:aa:00:02", "br0"),
        bridged("52:54:00:aa:00:01", "br1"),
        NicSpec {
            mac: "52:54:00:aa:00:01".into(),
            bridge: None,
            tap: Some("tap0".into()),
        },
    ] {
        let declared = with_nics(spec(json!({})), &[("eth0", changed.clone())]);
        let p = plan_web(&declared, booted("web", &boot));
        assert_eq!(
            actions(&p),
            [
                &Action::RemoveNic { id: "eth0".into() },
                &Action::AddNic {
                    id: "eth0".into(),
                    nic: changed.clone()
                }
            ],
            "{changed:?}"
        );
    }
}

#[test]
fn an_agent_tap_that_lost_its_bridge_is_replaced() {
    let s = with_nics(
        spec(json!({})),
        &[("eth0", bridged("52:54:00:aa:00:01", "br0"))],
    );
    let mut observed = booted("web", &s);
    observed.nics.get_mut("eth0").unwrap().bridge = None;
    assert_eq!(plan_web(&s, observed).steps.len(), 2);
}

#[test]
fn orphans_go_first_then_removals_adds_vcpus_memory() {
    let boot = with_disks(
        spec(json!({"maxVcpus": 4, "maxMemoryMiB": 2048, "hotplugSlots": 2})),
        &[("old", disk("/old"))],
    );
    let declared = with_nics(
        with_disks(
            spec(
                json!({"vcpus": 3, "memoryMiB": 1024, "maxVcpus": 4, "maxMemoryMiB": 2048, "hotplugSlots": 2}),
            ),
            &[("new", disk("/new"))],
        ),
        &[("eth0", bridged("52:54:00:aa:00:01", "br0"))],
    );
    let mut observed = booted("web", &boot);
    observed
        .orphan_block_nodes
        .insert(ids::disk_file_node("new"));
    observed.orphan_netdevs.insert(ids::nic_netdev("eth0"));
    let p = plan_web(&declared, observed);
    assert_eq!(
        actions(&p),
        [
            &Action::RemoveOrphanBlockNode {
                node: "disk-new-file".into()
            },
            &Action::RemoveOrphanNetdev {
                netdev: "net-eth0".into()
            },
            &remove_disk("old"),
            &add_disk("new", &disk("/new")),
            &Action::AddNic {
                id: "eth0".into(),
                nic: bridged("52:54:00:aa:00:01", "br0")
            },
            &Action::SetVcpus { from: 2, to: 3 },
            &Action::SetMemory {
                from_mib: 512,
                to_mib: 1024
            },
        ]
    );
}

#[test]
fn unplugging_devices_get_their_removal_retried_and_are_not_readded_yet() {
    let boot = with_disks(
        spec(json!({})),
        &[("a", disk("/a")), ("b", disk("/b")), ("c", disk("/c"))],
    );
    // a: no longer declared; b: declared unchanged; c: declared changed. All three unplugging.
    let declared = with_disks(spec(json!({})), &[("b", disk("/b")), ("c", disk("/c2"))]);
    let mut observed = booted("web", &boot);
    observed.unplugging = ["disk-a", "disk-b", "disk-c"].map(String::from).into();
    let p = plan_web(&declared, observed);
    assert_eq!(
        actions(&p),
        [&remove_disk("a"), &remove_disk("b"), &remove_disk("c")]
    );
}

#[test]
fn q35_adds_beyond_the_free_root_ports_are_pending() {
    let boot = spec(json!({"hotplugSlots": 1}));
    let declared = with_disks(
        spec(json!({"hotplugSlots": 1})),
        &[("a", disk("/a")), ("b", disk("/b")), ("c", disk("/c"))],
    );
    let p = plan_web(&declared, booted("web", &boot));
    assert_eq!(actions(&p), [&add_disk("a", &disk("/a"))]);
    assert_eq!(fields(&p), ["disks.b", "disks.c"]);
    assert_eq!(p.pending[0].from, "absent");
    assert_eq!(p.pending[0].to, "/b");
    assert!(
        p.pending[0].reason.contains("no free hotplug slot"),
        "{}",
        p.pending[0].reason
    );
}

#[test]
fn removals_free_root_ports_for_adds_but_unplugging_ones_do_not() {
    let boot = with_disks(spec(json!({"hotplugSlots": 0})), &[("old", disk("/old"))]);
    let declared = with_disks(spec(json!({"hotplugSlots": 0})), &[("new", disk("/new"))]);
    let p = plan_web(&declared, booted("web", &boot));
    assert_eq!(
        actions(&p),
        [&remove_disk("old"), &add_disk("new", &disk("/new"))]
    );

    let mut observed = booted("web", &boot);
    observed.unplugging.insert("disk-old".into());
    let p = plan_web(&declared, observed);
    assert_eq!(actions(&p), [&remove_disk("old")]);
    assert_eq!(fields(&p), ["disks.new"]);
}

#[test]
fn pc_has_no_root_port_limit() {
    let boot = spec(json!({"machine": "pc", "hotplugSlots": 0}));
    let declared = with_disks(
        spec(json!({"machine": "pc", "hotplugSlots": 0})),
        &[("a", disk("/a")), ("b", disk("/b"))],
    );
    assert_eq!(plan_web(&declared, booted("web", &boot)).steps.len(), 2);
}

// ---- vCPUs and memory ----

#[test]
fn vcpus_move_live_within_the_boot_range_and_clamp_beyond_it() {
    let boot = spec(json!({"vcpus": 2, "maxVcpus": 4}));
    let mut observed = booted("web", &boot);
    observed.vcpus = 3;

    let p = plan_web(&spec(json!({"vcpus": 4, "maxVcpus": 4})), observed.clone());
    assert_eq!(actions(&p), [&Action::SetVcpus { from: 3, to: 4 }]);
    assert!(p.pending.is_empty());

    let p = plan_web(&spec(json!({"vcpus": 6, "maxVcpus": 8})), observed.clone());
    assert_eq!(actions(&p), [&Action::SetVcpus { from: 3, to: 4 }]);
    assert_eq!(fields(&p), ["maxVcpus", "vcpus"]);
    assert!(p.pending[1].reason.contains("above maxVcpus at boot (4)"));

    let p = plan_web(&spec(json!({"vcpus": 1, "maxVcpus": 4})), observed);
    assert_eq!(actions(&p), [&Action::SetVcpus { from: 3, to: 2 }]);
    assert_eq!(fields(&p), ["vcpus"]);
    assert!(p.pending[0]
        .reason
        .contains("below the 2 vCPUs booted with"));
}

#[test]
fn memory_moves_live_with_virtio_mem_comparing_the_requested_size() {
    let boot = spec(json!({"memoryMiB": 512, "maxMemoryMiB": 2048}));
    let mut observed = booted("web", &boot);
    observed.memory.requested_mib = 512;
    observed.memory.plugged_mib = 128; // the guest lags behind: not a reason to resize again

    let p = plan_web(
        &spec(json!({"memoryMiB": 1024, "maxMemoryMiB": 2048})),
        observed.clone(),
    );
    assert!(p.steps.is_empty(), "{p:?}");

    let p = plan_web(
        &spec(json!({"memoryMiB": 768, "maxMemoryMiB": 2048})),
        observed.clone(),
    );
    assert_eq!(
        actions(&p),
        [&Action::SetMemory {
            from_mib: 1024,
            to_mib: 768
        }]
    );

    let p = plan_web(
        &spec(json!({"memoryMiB": 256, "maxMemoryMiB": 2048})),
        observed,
    );
    assert_eq!(
        actions(&p),
        [&Action::SetMemory {
            from_mib: 1024,
            to_mib: 512
        }]
    );
    assert_eq!(fields(&p), ["memoryMiB"]);
    assert!(p.pending[0]
        .reason
        .contains("below the 512 MiB booted with"));
}

#[test]
fn memory_without_virtio_mem_is_pending() {
    let boot = spec(json!({"memoryMiB": 512}));
    let p = plan_web(&spec(json!({"memoryMiB": 1024})), booted("web", &boot));
    assert!(p.steps.is_empty());
    assert_eq!(
        p.pending,
        [PendingChange {
            vm: "web".into(),
            field: "memoryMiB".into(),
            from: "512".into(),
            to: "1024".into(),
            reason: "no virtio-mem device at boot (maxMemoryMiB above memoryMiB)".into(),
        }]
    );
}

#[test]
fn limits_change_live_and_a_default_weight_equals_none() {
    let boot = spec(json!({}));
    let declared = spec(json!({"limits": {"cpuWeight": 300}}));
    let p = plan_web(&declared, booted("web", &boot));
    let to = declared.limits;
    assert_eq!(
        actions(&p),
        [&Action::SetLimits {
            from: Limits::default(),
            to
        }]
    );
    assert!(p.pending.is_empty());

    let p = plan_web(
        &spec(json!({"limits": {"cpuWeight": 100}})),
        booted("web", &boot),
    );
    assert!(
        p.steps.is_empty(),
        "weight 100 is the kernel's default: {p:?}"
    );
}

#[test]
fn limits_of_a_qemu_without_its_own_cgroup_wait_for_the_next_start() {
    let boot = spec(json!({}));
    let mut observed = booted("web", &boot);
    observed.limits = None;
    assert!(plan_web(&boot, observed.clone()).pending.is_empty());
    let p = plan_web(&spec(json!({"limits": {"memoryMaxMiB": 2048}})), observed);
    assert!(p.steps.is_empty());
    assert_eq!(fields(&p), ["limits"]);
    assert_eq!(p.pending[0].to, "memoryMaxMiB=2048");
    assert!(p.pending[0].reason.contains("no cgroup of its own"));
}

// ---- pending and restart ----

#[test]
fn boot_time_settings_are_pending_and_live_changes_still_apply() {
    let boot = spec(json!({"maxVcpus": 4}));
    let declared = spec(json!({
        "maxVcpus": 4, "vcpus": 3, "machine": "pc", "cmdline": "quiet", "initrd": "/k/initrd",
        "firmware": "/fw", "hotplugSlots": 2, "consoleLog": false, "accel": "kvm", "kernel": "/k/other",
        "maxMemoryMiB": 1024
    }));
    let p = plan_web(&declared, booted("web", &boot));
    assert_eq!(actions(&p), [&Action::SetVcpus { from: 2, to: 3 }]);
    assert_eq!(
        fields(&p),
        [
            "machine",
            "accel",
            "kernel",
            "initrd",
            "cmdline",
            "firmware",
            "hotplugSlots",
            "consoleLog",
            "maxMemoryMiB"
        ]
    );
    let cmdline = &p.pending[4];
    assert_eq!(
        (cmdline.from.as_str(), cmdline.to.as_str()),
        ("none", "quiet")
    );
    assert_eq!(
        (p.pending[0].from.as_str(), p.pending[0].to.as_str()),
        ("q35", "pc")
    );
}

#[test]
fn boot_disk_changes_are_pending() {
    let boot = with_disks(
        spec(json!({"kernel": null, "bootDisk": "a"})),
        &[("a", disk("/a")), ("b", disk("/b"))],
    );
    let declared = with_disks(
        spec(json!({"kernel": null, "bootDisk": "b"})),
        &[("a", disk("/a")), ("b", disk("/b"))],
    );
    assert_eq!(
        fields(&plan_web(&declared, booted("web", &boot))),
        ["bootDisk"]
    );
}

#[test]
fn on_restart_required_restart_replaces_live_steps_with_one_restart() {
    let boot = spec(json!({}));
    let declared = with_disks(
        spec(
            json!({"vcpus": 1, "maxVcpus": 2, "cmdline": "quiet", "onRestartRequired": "restart"}),
        ),
        &[("a", disk("/a"))],
    );
    let p = plan_web(&declared, booted("web", &boot));
    assert_eq!(
        actions(&p),
        [&Action::RestartVm {
            spec: Box::new(declared.clone()),
            reason: "apply changes that need a restart: cmdline, vcpus".into()
        }]
    );
    assert_eq!(fields(&p), ["cmdline", "vcpus"]);

    // Without pending changes the same policy applies everything live.
    let live = with_disks(
        spec(json!({"onRestartRequired": "restart"})),
        &[("a", disk("/a"))],
    );
    assert_eq!(
        actions(&plan_web(&live, booted("web", &boot))),
        [&add_disk("a", &disk("/a"))]
    );
}

#[test]
fn slot_exhaustion_with_restart_policy_restarts() {
    let boot = spec(json!({"hotplugSlots": 0}));
    let declared = with_disks(
        spec(json!({"hotplugSlots": 0, "onRestartRequired": "restart"})),
        &[("a", disk("/a"))],
    );
    let p = plan_web(&declared, booted("web", &boot));
    assert!(matches!(actions(&p)[..], [Action::RestartVm { .. }]));
}

#[test]
fn pending_changes_is_empty_for_the_boot_spec_itself() {
    let s = spec(json!({"maxVcpus": 4, "maxMemoryMiB": 1024, "cmdline": "x"}));
    assert!(pending_changes("web", &s, &s).is_empty());
    let p = pending_changes(
        "web",
        &spec(
            json!({"vcpus": 3, "maxVcpus": 4, "maxMemoryMiB": 1024, "memoryMiB": 768, "cmdline": "x"}),
        ),
        &s,
    );
    assert!(p.is_empty(), "live changes are not pending: {p:?}");
}

// ---- idempotence ----

/// A random but plausible VM: a few disks and NICs from small pools, so declared and observed
/// overlap, differ and collide.
fn random_spec(rng: &mut Rng) -> VmSpec {
    let vcpus = 1 + rng.below(3) as u32;
    let memory = *rng.pick(&[256u64, 512]);
    let mut s = spec(json!({
        "vcpus": vcpus,
        "maxVcpus": vcpus + rng.below(3) as u32,
        "memoryMiB": memory,
        "maxMemoryMiB": if rng.chance(70) { Some(memory + 512) } else { None },
        "machine": *rng.pick(&["q35", "q35", "pc"]),
        "hotplugSlots": rng.below(3),
        "cmdline": *rng.pick(&["a", "b"]),
        "onRestartRequired": *rng.pick(&["pending", "pending", "restart"]),
        "autostart": rng.chance(80),
    }));
    for id in ["a", "b", "c", "d"] {
        if rng.chance(50) {
            let d = DiskSpec {
                path: (*rng.pick(&["/x", "/y"])).into(),
                read_only: rng.chance(30),
                cache: *rng.pick(&[DiskCache::Writeback, DiskCache::None]),
                serial: rng.chance(30).then(|| "S".to_owned()),
                size_mib: rng.chance(50).then(|| *rng.pick(&[64, 128])),
                delete_on_remove: rng.chance(30),
                ..disk("")
            };
            s.disks.insert(id.into(), d);
        }
    }
    for id in ["eth0", "eth1", "eth2"] {
        if rng.chance(50) {
            let mac = *rng.pick(&["52:54:00:00:00:01", "52:54:00:00:00:02"]);
            let nic = if rng.chance(70) {
                let bridge = *rng.pick(&["br0", "br1"]);
                bridged(mac, bridge)
            } else {
                NicSpec {
                    mac: mac.into(),
                    bridge: None,
                    tap: Some(format!("tap-{id}")),
                }
            };
            s.nics.insert(id.into(), nic);
        }
    }
    s
}

/// What QEMU might report for a VM booted with `boot` after some history: devices hotplugged
/// or removed (within the root ports), leftovers of interrupted applies, guests ignoring unplugs.
fn random_observed(rng: &mut Rng, name: &str, boot: &VmSpec) -> ObservedVm {
    let mut vm = booted(name, boot);
    let other = random_spec(rng);
    for id in keys(&vm.disks) {
        if rng.chance(30) {
            vm.disks.remove(&id);
        }
    }
    for id in keys(&vm.nics) {
        if rng.chance(30) {
            vm.nics.remove(&id);
        }
    }
    let ports = match boot.machine {
        Machine::Q35 => crate::argv::root_port_count(boot) as usize,
        Machine::Pc => usize::MAX,
    };
    for (id, d) in &other.disks {
        if rng.chance(50) && vm.disks.len() + vm.nics.len() < ports {
            vm.disks
                .entry(id.clone())
                .or_insert_with(|| ObservedDisk::from_spec(d, false));
        }
    }
    for (id, n) in &other.nics {
        if rng.chance(50) && vm.disks.len() + vm.nics.len() < ports {
            vm.nics
                .entry(id.clone())
                .or_insert_with(|| ObservedNic::from_spec(name, id, n, false));
        }
    }
    for id in ["a", "b", "c", "d"] {
        if !vm.disks.contains_key(id) && rng.chance(20) {
            vm.orphan_block_nodes.insert(ids::disk_format_node(id));
        }
    }
    for id in ["eth0", "eth1", "eth2"] {
        if !vm.nics.contains_key(id) && rng.chance(20) {
            vm.orphan_netdevs.insert(ids::nic_netdev(id));
        }
    }
    for id in keys(&vm.disks) {
        if rng.chance(10) {
            vm.unplugging.insert(ids::disk_device(&id));
        }
    }
    for id in keys(&vm.nics) {
        if rng.chance(10) {
            vm.unplugging.insert(ids::nic_device(&id));
        }
    }
    vm.vcpus =
        boot.vcpus + rng.below(u64::from(boot.effective_max_vcpus() - boot.vcpus) + 1) as u32;
    if let Some(max) = boot.max_memory_mib {
        vm.memory.requested_mib = 2 * rng.below((max - boot.memory_mib) / 2 + 1);
        vm.memory.plugged_mib = vm.memory.requested_mib / 2;
    }
    vm
}

fn random_host(rng: &mut Rng) -> (DesiredState, ObservedHost, RunIntents) {
    let mut state = DesiredState {
        version: 1,
        vms: BTreeMap::new(),
    };
    let mut observed = ObservedHost::default();
    let mut intents = RunIntents::new();
    for name in ["a", "b", "c"] {
        let declared = random_spec(rng);
        if rng.chance(80) {
            state.vms.insert(name.into(), declared.clone());
        }
        if rng.chance(80) {
            // Often booted with what is declared now, so most differences are small.
            let boot = if rng.chance(50) {
                declared
            } else {
                random_spec(rng)
            };
            observed
                .vms
                .insert(name.into(), random_observed(rng, name, &boot));
        }
        match rng.below(3) {
            0 => drop(intents.insert(name.into(), RunIntent::Run)),
            1 => drop(intents.insert(
                name.into(),
                RunIntent::StayDown {
                    reason: "held".into(),
                },
            )),
            _ => {}
        }
    }
    (state, observed, intents)
}

#[test]
fn applying_a_plan_leaves_nothing_to_do() {
    for seed in 0..2000 {
        let mut rng = Rng::new(seed);
        let (state, observed, intents) = random_host(&mut rng);
        let first = plan(&state, &observed, &intents);
        let mut after = observed.clone();
        apply(&mut after, &first);
        let mut second = plan(&state, &after, &intents);

        let waited_for_unplug = observed.vms.values().any(|vm| !vm.unplugging.is_empty());
        if waited_for_unplug {
            // The adds deferred behind an unplug come one round later.
            apply(&mut after, &second);
            second = plan(&state, &after, &intents);
        } else {
            let restarted: Vec<&str> = first
                .steps
                .iter()
                .filter(|s| matches!(s.action, Action::RestartVm { .. }))
                .map(|s| s.vm.as_str())
                .collect();
            let still_pending: Vec<&PendingChange> = first
                .pending
                .iter()
                .filter(|c| !restarted.contains(&c.vm.as_str()))
                .collect();
            assert_eq!(
                second.pending.iter().collect::<Vec<_>>(),
                still_pending,
                "seed {seed}"
            );
        }
        assert!(
            second.steps.is_empty(),
            "seed {seed}: {first:#?}\nthen {second:#?}\nfrom {observed:#?}"
        );
    }
}

#[test]
fn a_fresh_boot_of_the_declared_spec_has_nothing_pending() {
    for seed in 0..1000 {
        let mut rng = Rng::new(seed);
        let s = VmSpec {
            autostart: true,
            ..random_spec(&mut rng)
        };
        let p = plan_web(&s, booted("web", &s));
        assert_eq!(p, Plan::default(), "seed {seed}");
    }
}

// ---- disk sizes and removal ----

fn sized(path: &str, size_mib: u64) -> DiskSpec {
    DiskSpec {
        size_mib: Some(size_mib),
        ..disk(path)
    }
}

#[test]
fn a_larger_declared_size_grows_the_disk_live() {
    let boot = with_disks(spec(json!({})), &[("data", sized("/d", 1024))]);
    let grown = with_disks(spec(json!({})), &[("data", sized("/d", 4096))]);
    let p = plan_web(&grown, booted("web", &boot));
    assert_eq!(
        actions(&p),
        [&Action::ResizeDisk {
            id: "data".into(),
            from_mib: 1024,
            to_mib: 4096
        }]
    );
    assert!(p.pending.is_empty() && p.refused.is_empty());
    let mut host = host(vec![("web", booted("web", &boot))]);
    apply(&mut host, &p);
    assert_eq!(
        plan(&desired(&[("web", &grown)]), &host, &no_intents()),
        Plan::default()
    );
}

#[test]
fn a_smaller_declared_size_is_refused_and_nothing_is_done() {
    let boot = with_disks(spec(json!({})), &[("data", sized("/d", 4096))]);
    let shrunk = with_disks(spec(json!({})), &[("data", sized("/d", 1024))]);
    let p = plan_web(&shrunk, booted("web", &boot));
    assert!(p.steps.is_empty(), "{p:#?}");
    assert!(p.pending.is_empty());
    assert_eq!(p.refused.len(), 1);
    let refused = &p.refused[0];
    assert_eq!(
        (
            refused.field.as_str(),
            refused.from.as_str(),
            refused.to.as_str()
        ),
        ("disks.data.sizeMiB", "4096", "1024")
    );
    assert!(
        refused.reason.contains("destroys the data"),
        "{}",
        refused.reason
    );
}

#[test]
fn an_undeclared_size_leaves_the_image_alone() {
    let boot = with_disks(spec(json!({})), &[("data", sized("/d", 4096))]);
    let unsized_now = with_disks(spec(json!({})), &[("data", disk("/d"))]);
    assert_eq!(
        plan_web(&unsized_now, booted("web", &boot)),
        Plan::default()
    );
}

#[test]
fn a_removed_disk_keeps_its_image_unless_it_said_delete_on_remove() {
    let keep = with_disks(spec(json!({})), &[("data", disk("/d"))]);
    let delete = with_disks(
        spec(json!({})),
        &[(
            "data",
            DiskSpec {
                delete_on_remove: true,
                ..disk("/d")
            },
        )],
    );
    let gone = spec(json!({}));
    assert_eq!(
        actions(&plan_web(&gone, booted("web", &keep))),
        [&remove_disk("data")]
    );
    assert_eq!(
        actions(&plan_web(&gone, booted("web", &delete))),
        [&Action::RemoveDisk {
            id: "data".into(),
            delete_image: Some("/d".into())
        }]
    );
    // A replaced disk (same id, another image) never deletes the old image.
    let moved = with_disks(
        spec(json!({})),
        &[(
            "data",
            DiskSpec {
                delete_on_remove: true,
                ..disk("/e")
            },
        )],
    );
    assert_eq!(
        actions(&plan_web(&moved, booted("web", &delete)))[0],
        &remove_disk("data")
    );
}

#[test]
fn credential_and_cloud_init_changes_wait_for_the_next_boot() {
    let boot = spec(json!({
        "credentials": {"pw": {"file": "/run/agenix/pw"}},
        "cloudInit": {"userData": {"text": "a"}}
    }));
    let changed = spec(json!({
        "credentials": {"pw": {"file": "/run/agenix/pw2"}, "host": {"text": "web"}},
        "cloudInit": {"userData": {"text": "b"}}
    }));
    let p = plan_web(&changed, booted("web", &boot));
    assert!(p.steps.is_empty(), "{p:#?}");
    assert_eq!(fields(&p), ["credentials", "cloudInit"]);
    assert_eq!(p.pending[0].from, "pw=file:/run/agenix/pw");
    assert!(
        p.pending[0].to.starts_with("host=text#"),
        "{}",
        p.pending[0].to
    );
    assert!(p.pending[1].from.starts_with("userData=text#"));
    assert_ne!(p.pending[1].from, p.pending[1].to);
}
