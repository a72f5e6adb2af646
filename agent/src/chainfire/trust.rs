//! The lease trust file, `<run-dir>/lease.json`: what this host's agent knows of its lease,
//! rewritten at every acknowledged keep-alive. It has two readers:
//!
//! - each HA VM's fence guard, at its deadline: renewed, it waits on; not, it kills its QEMU.
//!   So a VM is fenced even when its agent is dead (`kill -9`, OOM) and nobody renews.
//! - the next agent on this host (a restart, an upgrade, a crash): it resumes the same lease and
//!   trusts the same locks until the same deadline, so HA VMs ride through an agent restart and
//!   the host never flaps in the store.
//!
//! Times are on `CLOCK_BOOTTIME` and only mean something on the boot that wrote them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::clock::BootTime;
use super::fence::LeaseStatus;
use super::keys::VmKey;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseTrust {
    pub host_id: String,
    pub boot_id: String,
    pub lease: i64,
    pub ttl_seconds: u64,
    /// When the last keep-alive the server acknowledged was sent (ms of `CLOCK_BOOTTIME`).
    pub acked_at: BootTime,
    /// The HA locks this host holds under `lease`.
    pub held: Vec<VmKey>,
}

impl LeaseTrust {
    pub fn new(
        host_id: &str,
        boot_id: &str,
        lease: &LeaseStatus,
        held: &BTreeMap<VmKey, i64>,
    ) -> Self {
        LeaseTrust {
            host_id: host_id.to_owned(),
            boot_id: boot_id.to_owned(),
            lease: lease.id,
            ttl_seconds: lease.ttl.as_secs(),
            acked_at: lease.last_acked_sent,
            held: held
                .iter()
                .filter(|(_, bound_to)| **bound_to == lease.id)
                .map(|(key, _)| key.clone())
                .collect(),
        }
    }

    pub fn status(&self) -> LeaseStatus {
        LeaseStatus {
            id: self.lease,
            ttl: Duration::from_secs(self.ttl_seconds),
            last_acked_sent: self.acked_at,
        }
    }

    /// What a restarted agent of `host_id` on boot `boot_id` takes over: the lease (to resume
    /// with keep-alives) and its locks. None: the file is another host's or another boot's.
    pub fn restore(
        &self,
        host_id: &str,
        boot_id: &str,
    ) -> Option<(LeaseStatus, BTreeMap<VmKey, i64>)> {
        (self.host_id == host_id && self.boot_id == boot_id).then(|| {
            let held = self
                .held
                .iter()
                .map(|key| (key.clone(), self.lease))
                .collect();
            (self.status(), held)
        })
    }
}

/// What a fence guard bound to `lease` concludes from the file when its deadline comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardVerdict {
    /// Renewed: wait until this new deadline.
    Renewed { until: BootTime },
    /// Not renewed in time: kill the QEMU now, for this reason.
    Lapsed { reason: String },
}

pub fn guard_verdict(
    file: Result<LeaseTrust, String>,
    lease: i64,
    boot_id: &str,
    now: BootTime,
) -> GuardVerdict {
    let lapsed = |reason: String| GuardVerdict::Lapsed { reason };
    let trust = match file {
        Ok(trust) => trust,
        Err(e) => return lapsed(format!("lease {lease} cannot be confirmed: {e}")),
    };
    if trust.boot_id != boot_id {
        return lapsed(format!(
            "the lease file is from another boot ({})",
            trust.boot_id
        ));
    }
    if trust.lease != lease {
        return lapsed(format!(
            "the agent no longer holds lease {lease} (it now has lease {})",
            trust.lease
        ));
    }
    let deadline = trust.status().guard_deadline();
    if now < deadline {
        GuardVerdict::Renewed { until: deadline }
    } else {
        lapsed(format!(
            "lease {lease} was last renewed {:.1} s ago, past its guard deadline (the agent is \
             gone, stuck or cut off from ChainFire)",
            trust.acked_at.until(now).as_secs_f64()
        ))
    }
}

pub fn read(path: &Path) -> Result<LeaseTrust, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn write(path: &Path, trust: &LeaseTrust) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(trust).context("serializing the lease trust")?;
    crate::files::write_atomically(path, &json)
}

/// The lease is gone: nobody may trust it any longer.
pub fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(acked_at: u64) -> LeaseTrust {
        let lease = LeaseStatus {
            id: 7,
            ttl: Duration::from_secs(9),
            last_acked_sent: BootTime::from_millis(acked_at),
        };
        let held = [
            (VmKey::new("o", "p", "ha1"), 7),
            (VmKey::new("o", "p", "older"), 6),
        ]
        .into();
        LeaseTrust::new("h1", "boot-a", &lease, &held)
    }

    #[test]
    fn keeps_only_the_locks_of_its_lease_and_restores_them_on_the_same_host_and_boot() {
        let t = trust(1_000);
        assert_eq!(t.held, [VmKey::new("o", "p", "ha1")]);
        let (status, held) = t.restore("h1", "boot-a").unwrap();
        assert_eq!((status.id, status.ttl), (7, Duration::from_secs(9)));
        assert_eq!(held, [(VmKey::new("o", "p", "ha1"), 7)].into());
        assert_eq!(t.restore("h2", "boot-a"), None);
        assert_eq!(t.restore("h1", "boot-b"), None);
    }

    #[test]
    fn guard_waits_while_renewed_and_fences_on_anything_else() {
        // TTL 9: margin 3 s, the guard's deadline 7.5 s after the acknowledged keep-alive.
        let now = BootTime::from_millis(10_000);
        assert_eq!(
            guard_verdict(Ok(trust(3_000)), 7, "boot-a", now),
            GuardVerdict::Renewed {
                until: BootTime::from_millis(10_500)
            }
        );
        let lapsed = |file, lease, boot| match guard_verdict(file, lease, boot, now) {
            GuardVerdict::Lapsed { reason } => reason,
            renewed => panic!("{renewed:?}"),
        };
        assert!(lapsed(Ok(trust(2_000)), 7, "boot-a").contains("last renewed 8.0 s ago"));
        assert!(lapsed(Ok(trust(3_000)), 6, "boot-a").contains("now has lease 7"));
        assert!(lapsed(Ok(trust(3_000)), 7, "boot-b").contains("another boot"));
        assert!(lapsed(Err("gone".into()), 7, "boot-a").contains("cannot be confirmed: gone"));
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lease.json");
        write(&path, &trust(1)).unwrap();
        assert_eq!(read(&path), Ok(trust(1)));
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(read(&path).unwrap_err().contains("lease.json"));
    }
}
