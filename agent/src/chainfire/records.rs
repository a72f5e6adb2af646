//! The JSON values stored under each key (camelCase, like the desired-state file).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::keys::VmKey;
use crate::spec::VmSpec;

/// State other agents write for a VM whose host lost its lease.
pub const STATE_UNKNOWN: &str = "unknown";

/// `/plasmavmc/vms/{orgId}/{projectId}/{vm}`: what the VM is and how it is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub name: String,
    pub org_id: String,
    pub project_id: String,
    /// The host that runs (or last ran) it.
    pub host: String,
    /// The agent's state word (`running`, `stopped`, ... or `unknown` when its host was lost).
    pub state: String,
    pub spec: SpecSummary,
    /// Declared changes waiting for the next boot.
    #[serde(default)]
    pub pending: Vec<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the record last changed (RFC 3339). Not part of "did anything change".
    #[serde(default)]
    pub updated_at: String,
}

/// What the cluster needs to know about a VM's declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecSummary {
    pub vcpus: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    pub disks: Vec<String>,
    pub nics: Vec<String>,
    /// Declared with `ha.enable`: runs only on the holder of its lock.
    #[serde(default)]
    pub ha: bool,
}

/// `/plasmavmc/handles/{orgId}/{projectId}/{vm}`: where the running QEMU is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandleRecord {
    pub host: String,
    pub pid: u32,
    pub qmp_socket: String,
    pub started_at: String,
}

/// `/plasmavmc/hosts/{hostId}`: the host's heartbeat; it disappears with the host's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub host_id: String,
    pub agent_version: String,
    pub started_at: String,
    /// Set by `plasmavmc evacuate` (or `cordon`) until `plasmavmc uncordon`: no VM is migrated
    /// to, failed over to or started here as HA. Kept in the host's state dir, so an agent
    /// restart or a reboot republishes it.
    #[serde(default)]
    pub cordoned: bool,
    /// The HA VMs declared on this host (`org/project/vm`), running here or not: the hosts a VM
    /// could move to. (A standby writes no VM record, so this is where the cluster learns it.)
    #[serde(default)]
    pub ha_vms: Vec<String>,
    /// What another host needs to migrate a VM here (absent in records of older agents).
    #[serde(flatten)]
    pub facts: HostFacts,
}

/// A host's migration channel and QEMU, published so a source can check a move before anything
/// starts (`migration::compat`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFacts {
    /// The address this host's incoming QEMUs listen on (`--migration-address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_address: Option<String>,
    /// The ports they listen on, `FIRST-LAST` (`--migration-ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_ports: Option<String>,
    /// The migration stream is TLS (`--migration-tls-dir`); both ends must agree.
    #[serde(default)]
    pub migration_tls: bool,
    /// `major.minor.micro` of this host's QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_version: Option<String>,
    /// The versioned machine type each alias the agent uses stands for (`q35` → `pc-q35-7.2`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub machine_types: std::collections::BTreeMap<String, String>,
}

/// `/plasmavmc/locks/{orgId}/{projectId}/{vm}`: who may run an HA VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockRecord {
    pub host: String,
    /// The lease the lock is bound to: a lock of an older lease of the same host never counts.
    pub lease: i64,
    pub acquired_at: String,
}

/// One VM as this host sees it: the daemon's input to the publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVm {
    pub record: VmRecord,
    /// Present while a QEMU runs for it here.
    pub handle: Option<HandleRecord>,
    /// This host would run it now if its HA lock allowed (it runs here, or nothing but the lock
    /// keeps it down). An HA VM's lock is sought only while true and let go when false, so a
    /// host that cannot or may not run the VM leaves it to another.
    pub wants_to_run: bool,
    /// A move brings it here now (its incoming QEMU waits for the stream and the lock): even a
    /// cordoned host keeps the lock it is given, or the VM would be stopped on arrival.
    pub arriving: bool,
}

impl HostRecord {
    /// What `host` publishes about itself: its cordon, and the HA VMs of its local picture.
    pub fn of(
        host: &str,
        started_at: &str,
        cordoned: bool,
        local: &std::collections::BTreeMap<VmKey, LocalVm>,
    ) -> Self {
        HostRecord {
            host_id: host.to_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: started_at.to_owned(),
            cordoned,
            ha_vms: local
                .iter()
                .filter(|(_, vm)| vm.record.spec.ha)
                .map(|(key, _)| key.to_string())
                .collect(),
            facts: HostFacts::default(),
        }
    }

    /// The record with this host's migration facts.
    pub fn with_facts(self, facts: HostFacts) -> Self {
        HostRecord { facts, ..self }
    }
}

impl VmRecord {
    /// A record for a declared VM on `host`, stamped now.
    pub fn new(key: &VmKey, host: &str, state: &str, spec: &VmSpec) -> Self {
        Self::summarized(key, host, state, SpecSummary::of(spec), now())
    }

    fn summarized(
        key: &VmKey,
        host: &str,
        state: &str,
        spec: SpecSummary,
        updated_at: String,
    ) -> Self {
        VmRecord {
            name: key.vm.clone(),
            org_id: key.org_id.clone(),
            project_id: key.project_id.clone(),
            host: host.to_owned(),
            state: state.to_owned(),
            spec,
            pending: Vec::new(),
            last_error: None,
            updated_at,
        }
    }

    pub fn key(&self) -> VmKey {
        VmKey::new(&self.org_id, &self.project_id, &self.name)
    }

    /// Equal in everything but the time stamp: a re-sync with a fresh `updatedAt` is no change.
    pub fn same_content(&self, other: &VmRecord) -> bool {
        VmRecord {
            updated_at: String::new(),
            ..self.clone()
        } == VmRecord {
            updated_at: String::new(),
            ..other.clone()
        }
    }
}

#[cfg(test)]
impl VmRecord {
    /// A small VM's record for unit tests (1 vCPU, 64 MiB, no disks or NICs, not HA): `key` in
    /// `state` on `host`, stamped `t0`.
    pub(crate) fn for_test(key: &VmKey, host: &str, state: &str) -> Self {
        let small = SpecSummary {
            vcpus: 1,
            memory_mib: 64,
            disks: vec![],
            nics: vec![],
            ha: false,
        };
        Self::summarized(key, host, state, small, "t0".into())
    }
}

impl SpecSummary {
    pub fn of(spec: &VmSpec) -> Self {
        SpecSummary {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disks: spec.disks.keys().cloned().collect(),
            nics: spec.nics.keys().cloned().collect(),
            ha: spec.ha.enable,
        }
    }
}

/// Wall-clock time for records (RFC 3339, milliseconds); never used for decisions.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(host: &str, state: &str) -> VmRecord {
        VmRecord {
            name: "vm1".into(),
            org_id: "acme".into(),
            project_id: "web".into(),
            host: host.into(),
            state: state.into(),
            spec: SpecSummary {
                vcpus: 2,
                memory_mib: 512,
                disks: vec!["root".into()],
                nics: vec![],
                ha: false,
            },
            pending: vec![],
            last_error: None,
            updated_at: "2024-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn updated_at_alone_is_no_change() {
        let a = record("h1", "running");
        let b = VmRecord {
            updated_at: now(),
            ..a.clone()
        };
        assert!(a.same_content(&b));
        assert!(!a.same_content(&record("h1", "stopped")));
    }

    #[test]
    fn a_host_publishes_its_cordon_and_its_ha_vms_only() {
        let mut ha = record("h1", "stopped");
        ha.spec.ha = true;
        let plain = VmRecord {
            name: "vm2".into(),
            ..record("h1", "running")
        };
        let local = [ha, plain]
            .into_iter()
            .map(|record| {
                let vm = LocalVm {
                    record,
                    handle: None,
                    wants_to_run: true,
                    arriving: false,
                };
                (vm.record.key(), vm)
            })
            .collect();
        let host = HostRecord::of("h1", "t0", true, &local);
        assert_eq!(host.ha_vms, ["acme/web/vm1"]);
        let json = serde_json::to_value(&host).unwrap();
        assert_eq!(
            (json["cordoned"].clone(), json["haVms"].clone()),
            (true.into(), serde_json::json!(["acme/web/vm1"]))
        );
        // A record written by an older agent reads as uncordoned, declaring nothing.
        let old: HostRecord = serde_json::from_value(serde_json::json!(
            {"hostId": "h2", "agentVersion": "0.1.0", "startedAt": "t"}
        ))
        .unwrap();
        assert!(!old.cordoned && old.ha_vms.is_empty());
    }

    #[test]
    fn json_keys_are_camel_case() {
        let json = serde_json::to_value(record("h1", "running")).unwrap();
        assert_eq!(json["orgId"], "acme");
        assert_eq!(json["spec"]["memoryMiB"], 512);
        assert!(json.get("updatedAt").is_some() && json.get("lastError").is_some());
    }
}
