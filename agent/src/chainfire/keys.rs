//! The store's key layout, built and parsed in one place.
//!
//! ```text
//! /plasmavmc/vms/{orgId}/{projectId}/{vm}      VmRecord (JSON)
//! /plasmavmc/handles/{orgId}/{projectId}/{vm}  HandleRecord (JSON)
//! /plasmavmc/hosts/{hostId}                    HostRecord, bound to the host's lease
//! /plasmavmc/locks/{orgId}/{projectId}/{vm}    HA lock, bound to the holder's lease
//! /plasmavmc/migrations/{orgId}/{projectId}/{vm}  a move's request, bound to the source's lease
//! /plasmavmc/incoming/{orgId}/{projectId}/{vm}    the target's answer, bound to its lease
//! ```
//!
//! Keys written by someone else can be anything: parsing returns an error value, never panics.

use std::fmt;

use serde::{Deserialize, Serialize};

pub const ROOT: &str = "/plasmavmc/";
pub const VMS: &str = "/plasmavmc/vms/";
pub const HANDLES: &str = "/plasmavmc/handles/";
pub const HOSTS: &str = "/plasmavmc/hosts/";
pub const LOCKS: &str = "/plasmavmc/locks/";
pub const MIGRATIONS: &str = "/plasmavmc/migrations/";
pub const INCOMING: &str = "/plasmavmc/incoming/";

/// A VM's identity across the cluster: names are unique within a project.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmKey {
    pub org_id: String,
    pub project_id: String,
    pub vm: String,
}

impl VmKey {
    pub fn new(
        org_id: impl Into<String>,
        project_id: impl Into<String>,
        vm: impl Into<String>,
    ) -> Self {
        VmKey {
            org_id: org_id.into(),
            project_id: project_id.into(),
            vm: vm.into(),
        }
    }

    /// Why this key cannot be written, if it cannot: a segment that is empty or holds a `/`
    /// would read back as a different key.
    pub fn check(&self) -> Result<(), KeyError> {
        for (what, segment) in [
            ("orgId", &self.org_id),
            ("projectId", &self.project_id),
            ("vm", &self.vm),
        ] {
            check_segment(what, segment)?;
        }
        Ok(())
    }

    fn path(&self) -> String {
        format!("{}/{}/{}", self.org_id, self.project_id, self.vm)
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

/// What a key under [`ROOT`] names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Vm(VmKey),
    Handle(VmKey),
    Host(String),
    Lock(VmKey),
    Migration(VmKey),
    Incoming(VmKey),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotUtf8,
    #[error("key is outside {ROOT}")]
    OutsideRoot,
    #[error("unknown kind {0:?} (expected vms, handles, hosts, locks, migrations or incoming)")]
    UnknownKind(String),
    #[error("expected {expected} segments after the kind, found {found}")]
    SegmentCount { expected: usize, found: usize },
    #[error("{0} is empty")]
    EmptySegment(&'static str),
    #[error("{0} contains '/'")]
    SlashInSegment(&'static str),
}

pub fn vm(key: &VmKey) -> String {
    format!("{VMS}{}", key.path())
}

pub fn handle(key: &VmKey) -> String {
    format!("{HANDLES}{}", key.path())
}

pub fn lock(key: &VmKey) -> String {
    format!("{LOCKS}{}", key.path())
}

pub fn migration(key: &VmKey) -> String {
    format!("{MIGRATIONS}{}", key.path())
}

pub fn incoming(key: &VmKey) -> String {
    format!("{INCOMING}{}", key.path())
}

pub fn host(host_id: &str) -> String {
    format!("{HOSTS}{host_id}")
}

/// Parses any key under [`ROOT`].
pub fn parse(raw: &[u8]) -> Result<Key, KeyError> {
    let text = std::str::from_utf8(raw).map_err(|_| KeyError::NotUtf8)?;
    let rest = text.strip_prefix(ROOT).ok_or(KeyError::OutsideRoot)?;
    let (kind, tail) = rest.split_once('/').unwrap_or((rest, ""));
    match kind {
        "vms" => parse_vm_key(tail).map(Key::Vm),
        "handles" => parse_vm_key(tail).map(Key::Handle),
        "locks" => parse_vm_key(tail).map(Key::Lock),
        "migrations" => parse_vm_key(tail).map(Key::Migration),
        "incoming" => parse_vm_key(tail).map(Key::Incoming),
        "hosts" => {
            check_segment("hostId", tail)?;
            Ok(Key::Host(tail.to_owned()))
        }
        other => Err(KeyError::UnknownKind(other.to_owned())),
    }
}

fn parse_vm_key(tail: &str) -> Result<VmKey, KeyError> {
    let segments: Vec<&str> = tail.split('/').collect();
    let [org_id, project_id, vm] = segments[..] else {
        return Err(KeyError::SegmentCount {
            expected: 3,
            found: segments.len(),
        });
    };
    let key = VmKey::new(org_id, project_id, vm);
    key.check()?;
    Ok(key)
}

fn check_segment(what: &'static str, segment: &str) -> Result<(), KeyError> {
    if segment.is_empty() {
        Err(KeyError::EmptySegment(what))
    } else if segment.contains('/') {
        Err(KeyError::SlashInSegment(what))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> VmKey {
        VmKey::new("acme", "web", "vm1")
    }

    #[test]
    fn built_keys_parse_back() {
        assert_eq!(parse(vm(&key()).as_bytes()), Ok(Key::Vm(key())));
        assert_eq!(parse(handle(&key()).as_bytes()), Ok(Key::Handle(key())));
        assert_eq!(parse(lock(&key()).as_bytes()), Ok(Key::Lock(key())));
        assert_eq!(parse(host("h1").as_bytes()), Ok(Key::Host("h1".into())));
        assert_eq!(
            parse(migration(&key()).as_bytes()),
            Ok(Key::Migration(key()))
        );
        assert_eq!(parse(incoming(&key()).as_bytes()), Ok(Key::Incoming(key())));
        assert_eq!(vm(&key()), "/plasmavmc/vms/acme/web/vm1");
    }

    #[test]
    fn malformed_keys_are_errors() {
        let cases: &[(&[u8], KeyError)] = &[
            (b"\xff\xfe", KeyError::NotUtf8),
            (b"/other/vms/a/b/c", KeyError::OutsideRoot),
            (b"/plasmavmc/", KeyError::UnknownKind(String::new())),
            (
                b"/plasmavmc/disks/a/b/c",
                KeyError::UnknownKind("disks".into()),
            ),
            (
                b"/plasmavmc/vms/a/b",
                KeyError::SegmentCount {
                    expected: 3,
                    found: 2,
                },
            ),
            (
                b"/plasmavmc/vms/a/b/c/d",
                KeyError::SegmentCount {
                    expected: 3,
                    found: 4,
                },
            ),
            (
                b"/plasmavmc/vms",
                KeyError::SegmentCount {
                    expected: 3,
                    found: 1,
                },
            ),
            (
                b"/plasmavmc/handles/a//c",
                KeyError::EmptySegment("projectId"),
            ),
            (b"/plasmavmc/locks//b/c", KeyError::EmptySegment("orgId")),
            (b"/plasmavmc/hosts/", KeyError::EmptySegment("hostId")),
            (b"/plasmavmc/hosts/a/b", KeyError::SlashInSegment("hostId")),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                parse(raw).as_ref(),
                Err(expected),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn unwritable_vm_keys_are_refused() {
        assert_eq!(
            VmKey::new("a", "b/c", "d").check(),
            Err(KeyError::SlashInSegment("projectId"))
        );
        assert_eq!(
            VmKey::new("a", "b", "").check(),
            Err(KeyError::EmptySegment("vm"))
        );
    }
}
