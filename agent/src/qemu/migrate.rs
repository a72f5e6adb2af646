//! Live migration as QEMU does it, over QMP: the source's and the target's settings, starting,
//! watching, continuing past the switchover pause, cancelling; and where each device sits (the
//! target must lay its devices out the same way). The decisions are `crate::migration`'s.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::observe::{device_path, peripherals};
use super::qmp::{QemuEvent, Qmp, QmpError};
use crate::migration::{Cpus, HotCpu, MigrationProgress, Mode, Placement};

/// QEMU's id of the TLS credentials object (`--migration-tls-dir`).
const TLS_CREDS: &str = "migration-tls";
/// Stop and switch over once QEMU expects the rest to take at most this long (QEMU's default is
/// 300 ms; Proxmox uses 100 ms). The lock transaction comes on top.
const DOWNTIME_LIMIT_MS: u64 = 50;
/// No bandwidth cap (QEMU's default is 128 MiB/s): a move should finish as fast as the link goes.
const UNTHROTTLED: u64 = 1 << 40;

/// The source's settings: stop at `pre-switchover` until told (the HA lock moves then), converge
/// a busy guest by throttling its vCPUs (auto-converge), and encrypt with TLS (the credentials
/// loaded by [`tls_credentials`] first). `bandwidth`: a cap in bytes per second (None: as fast
/// as the link goes).
pub async fn prepare_source(
    qmp: &Qmp,
    mode: Mode,
    bandwidth: Option<u64>,
    tls: bool,
) -> Result<(), QmpError> {
    let capabilities = [
        ("pause-before-switchover", true),
        ("events", true),
        ("auto-converge", mode == Mode::Live),
    ];
    set_capabilities(qmp, &capabilities).await?;
    let mut parameters = json!({
        "downtime-limit": DOWNTIME_LIMIT_MS,
        "max-bandwidth": bandwidth.unwrap_or(UNTHROTTLED),
    });
    if tls {
        parameters["tls-creds"] = TLS_CREDS.into();
    }
    qmp.command("migrate-set-parameters", parameters).await?;
    Ok(())
}

/// The target's settings, before `migrate-incoming` (and the NBD export of the disks copied).
pub async fn prepare_target(qmp: &Qmp, tls_dir: Option<&Path>) -> Result<(), QmpError> {
    set_capabilities(qmp, &[("events", true)]).await?;
    if let Some(dir) = tls_dir {
        tls_credentials(qmp, dir, "server").await?;
        qmp.command("migrate-set-parameters", json!({"tls-creds": TLS_CREDS}))
            .await?;
    }
    Ok(())
}

async fn set_capabilities(qmp: &Qmp, capabilities: &[(&str, bool)]) -> Result<(), QmpError> {
    let list: Vec<Value> = capabilities
        .iter()
        .map(|(name, on)| json!({"capability": name, "state": on}))
        .collect();
    qmp.command("migrate-set-capabilities", json!({ "capabilities": list }))
        .await
        .map(drop)
}

/// `tls-creds-x509` over `dir` (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
/// client-key.pem), checking the peer's certificate; `endpoint` is `client` on the source (of
/// the stream and of the disk copies), `server` on the target. Loaded afresh on every move (a
/// source QEMU keeps them from an abandoned one).
pub async fn tls_credentials(qmp: &Qmp, dir: &Path, endpoint: &str) -> Result<(), QmpError> {
    let _ = qmp.command("object-del", json!({ "id": TLS_CREDS })).await;
    qmp.command(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": TLS_CREDS, "dir": dir,
               "endpoint": endpoint, "verify-peer": true}),
    )
    .await
    .map(drop)
}

/// Lets the source go on past `pre-switchover`: it sends the rest and the devices' state, and
/// stays paused (`postmigrate`, resumable by `cont` until it quits).
pub async fn continue_after_pause(qmp: &Qmp) -> Result<(), QmpError> {
    qmp.command("migrate-continue", json!({"state": "pre-switchover"}))
        .await
        .map(drop)
}

pub async fn cancel(qmp: &Qmp) -> Result<(), QmpError> {
    qmp.command("migrate_cancel", json!({})).await.map(drop)
}

/// NBD export (target) and block mirror (source) of the disks a move copies, over TLS when the
/// migration stream is (`tls`: the credentials are loaded). Names: export
/// `disk-ID` of node `disk-ID-fmt`; on the source, NBD client node and mirror job `mig-ID`.
pub mod disks {
    use super::*;
    use crate::ids;

    fn job(disk: &str) -> String {
        format!("mig-{disk}")
    }

    /// Target: an NBD server on `listen:port` exporting each disk's format node, writable.
    pub async fn export(
        qmp: &Qmp,
        listen: &str,
        port: u16,
        disks: &[String],
        tls: bool,
    ) -> Result<(), QmpError> {
        let mut server =
            json!({"addr": {"type": "inet", "data": {"host": listen, "port": port.to_string()}}});
        if tls {
            server["tls-creds"] = TLS_CREDS.into();
        }
        qmp.command("nbd-server-start", server).await?;
        for disk in disks {
            qmp.command(
                "block-export-add",
                json!({"type": "nbd", "id": job(disk), "node-name": ids::disk_format_node(disk),
                       "name": ids::disk_device(disk), "writable": true}),
            )
            .await?;
        }
        Ok(())
    }

    /// Target, before the guest resumes: the exports and the server go.
    pub async fn unexport(qmp: &Qmp, disks: &[String]) {
        for disk in disks {
            let _ = qmp
                .command("block-export-del", json!({"id": job(disk)}))
                .await;
        }
        let _ = qmp.command("nbd-server-stop", json!({})).await;
    }

    /// Source: mirrors each disk to the target's export at `address:port`; every guest write
    /// goes to both sides from the start (`write-blocking`), so the copy converges.
    pub async fn mirror(
        qmp: &Qmp,
        address: &str,
        port: u16,
        disks: &[String],
        tls: bool,
    ) -> Result<(), QmpError> {
        for disk in disks {
            let mut client = json!({"driver": "nbd", "node-name": job(disk), "export": ids::disk_device(disk),
                                    "server": {"type": "inet", "host": address, "port": port.to_string()}});
            if tls {
                client["tls-creds"] = TLS_CREDS.into();
            }
            qmp.command("blockdev-add", client).await?;
            qmp.command(
                "blockdev-mirror",
                json!({"job-id": job(disk), "device": ids::disk_format_node(disk), "target": job(disk),
                       "sync": "full", "copy-mode": "write-blocking"}),
            )
            .await?;
        }
        Ok(())
    }

    /// The mirrors' progress: (bytes copied, bytes in all, every job ready). Err when a job is
    /// gone or failed.
    pub async fn progress(qmp: &Qmp, disks: &[String]) -> Result<(u64, u64, bool), String> {
        let jobs = qmp
            .command("query-block-jobs", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        let (mut done, mut total, mut ready) = (0, 0, true);
        for disk in disks {
            let job = jobs
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["device"] == job(disk).as_str()))
                .ok_or_else(|| format!("the copy of disk {disk} stopped"))?;
            done += job["offset"].as_u64().unwrap_or(0);
            total += job["len"].as_u64().unwrap_or(0);
            ready &= job["ready"].as_bool().unwrap_or(false);
        }
        Ok((done, total, ready))
    }

    /// Source, guest paused: ends each mirror in step (the target holds a consistent copy) and
    /// drops the NBD nodes. `force` on an abandoned move.
    pub async fn finish(qmp: &Qmp, disks: &[String], force: bool) -> Result<(), QmpError> {
        for disk in disks {
            let _ = qmp
                .command(
                    "block-job-cancel",
                    json!({"device": job(disk), "force": force}),
                )
                .await;
        }
        for _ in 0..1000 {
            let jobs = qmp.command("query-block-jobs", json!({})).await?;
            let running = jobs.as_array().is_some_and(|jobs| {
                jobs.iter()
                    .any(|j| disks.iter().any(|d| j["device"] == job(d).as_str()))
            });
            if !running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for disk in disks {
            let _ = qmp
                .command("blockdev-del", json!({"node-name": job(disk)}))
                .await;
        }
        Ok(())
    }
}

/// `query-migrate`, the parts a move watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// `setup`, `active`, `pre-switchover`, `device`, `completed`, `failed`, `cancelled`...;
    /// None before any migration.
    pub status: Option<String>,
    pub error: Option<String>,
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub mbps: u64,
    pub expected_downtime_ms: Option<u64>,
    /// What QEMU measured, once completed (source side).
    pub downtime_ms: Option<u64>,
}

/// What [`next_change`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A `MIGRATION` event: the new status.
    Status(String),
    /// Events were dropped (a slow subscriber): ask QEMU.
    Missed,
    /// QEMU's QMP socket closed.
    Closed,
    /// Nothing within the time given.
    Quiet,
}

/// Waits until QEMU reports a migration status change (a `MIGRATION` event: the `events`
/// capability is on at both ends) or its QMP socket closes, `at_most`: a move reacts to the
/// switchover at once instead of on its next poll, and still refreshes its progress meanwhile.
/// The status comes with the event: while QEMU saves or loads the devices' state at the
/// switchover its monitor answers nothing, and a move need not wait on it to know.
pub async fn next_change(events: &mut broadcast::Receiver<QemuEvent>, at_most: Duration) -> Change {
    let change = async {
        loop {
            match events.recv().await {
                Ok(QemuEvent::Migration { status }) => return Change::Status(status),
                Ok(QemuEvent::Disconnected { .. }) => return Change::Closed,
                Err(broadcast::error::RecvError::Lagged(_)) => return Change::Missed,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    };
    tokio::time::timeout(at_most, change)
        .await
        .unwrap_or(Change::Quiet)
}

/// A failed or cancelled migration among the events `events` has received (its status), without
/// asking QEMU.
pub fn broke(events: &mut broadcast::Receiver<QemuEvent>) -> Option<String> {
    first_received(events, |event| match event {
        QemuEvent::Migration { status } if matches!(&**status, "failed" | "cancelled") => {
            Some(status.clone())
        }
        _ => None,
    })
}

/// When QEMU stopped the guest, by its `STOP` among the events `events` has received: the
/// start of a move's downtime. QEMU sends `STOP` before it reports the pause at
/// `pre-switchover`, so once a `query-migrate` said so, the event is in.
pub fn stopped_at(events: &mut broadcast::Receiver<QemuEvent>) -> Option<SystemTime> {
    first_received(events, |event| match event {
        QemuEvent::Stop { at } => Some(*at),
        _ => None,
    })
}

/// When QEMU resumed the guest, by its `RESUME` among the events `events` has received (QEMU
/// sends it before it answers `cont`).
pub fn resumed_at(events: &mut broadcast::Receiver<QemuEvent>) -> Option<SystemTime> {
    first_received(events, |event| match event {
        QemuEvent::Resume { at } => Some(*at),
        _ => None,
    })
}

/// The first event already received that `pick` takes, without waiting.
fn first_received<T>(
    events: &mut broadcast::Receiver<QemuEvent>,
    pick: impl Fn(&QemuEvent) -> Option<T>,
) -> Option<T> {
    loop {
        match events.try_recv() {
            Ok(event) => {
                if let Some(found) = pick(&event) {
                    return Some(found);
                }
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return None,
        }
    }
}

pub async fn status(qmp: &Qmp) -> Result<Status, QmpError> {
    let info = qmp.command("query-migrate", json!({})).await?;
    Ok(parse_status(&info))
}

fn parse_status(info: &Value) -> Status {
    let ram = &info["ram"];
    let number = |v: &Value| v.as_u64().unwrap_or(0);
    Status {
        status: info["status"].as_str().map(str::to_owned),
        error: info["error-desc"].as_str().map(str::to_owned),
        transferred: number(&ram["transferred"]),
        remaining: number(&ram["remaining"]),
        total: number(&ram["total"]),
        mbps: ram["mbps"].as_f64().unwrap_or(0.0) as u64,
        expected_downtime_ms: info["expected-downtime"].as_u64(),
        downtime_ms: info["downtime"].as_u64(),
    }
}

impl Status {
    /// Into the progress `status` shows.
    pub fn fill(&self, progress: &mut MigrationProgress) {
        progress.ram_transferred_bytes = self.transferred;
        progress.ram_remaining_bytes = self.remaining;
        progress.ram_total_bytes = self.total;
        progress.throughput_mbps = self.mbps;
        progress.expected_downtime_ms = self.expected_downtime_ms;
    }
}

/// The source's vCPUs: boot ones still there, and those plugged live (their QOM path is under
/// the peripherals: they have an id).
pub async fn cpus(qmp: &Qmp) -> Result<Cpus, QmpError> {
    let mut slots = qmp.query_hotpluggable_cpus().await?;
    slots.sort_by_key(|cpu| {
        let p = &cpu.props;
        (p.socket_id, p.core_id, p.thread_id)
    });
    let mut cpus = Cpus::default();
    for slot in slots {
        let Some(path) = &slot.qom_path else { continue };
        match path.strip_prefix("/machine/peripheral/") {
            Some(id) => {
                let props = match serde_json::to_value(&slot.props) {
                    Ok(Value::Object(map)) => {
                        map.into_iter().filter(|(_, v)| !v.is_null()).collect()
                    }
                    _ => Default::default(),
                };
                cpus.hotplugged.push(HotCpu {
                    driver: slot.type_.clone(),
                    id: id.to_owned(),
                    props,
                })
            }
            None => cpus.boot_present += 1,
        }
    }
    Ok(cpus)
}

/// Target, before the stream: plugs the vCPUs the source plugged live, as it did.
pub async fn plug_cpus(qmp: &Qmp, cpus: &[HotCpu]) -> Result<(), QmpError> {
    for cpu in cpus {
        qmp.device_add(&cpu.driver, &cpu.id, None, cpu.props.clone())
            .await?;
    }
    Ok(())
}

/// Where every disk and NIC device sits (bus and slot), by device id.
pub async fn placements(qmp: &Qmp) -> anyhow::Result<BTreeMap<String, Placement>> {
    let mut placed = BTreeMap::new();
    for (id, kind) in peripherals(qmp).await? {
        if !(kind == "virtio-blk-pci" || kind == "virtio-net-pci") || !is_agent_device(&id) {
            continue;
        }
        let path = device_path(&id);
        let bus: String = qmp.qom_get(&path, "parent_bus").await?;
        let devfn: i64 = qmp.qom_get(&path, "addr").await?;
        placed.insert(id, Placement::from_qom(&bus, devfn));
    }
    Ok(placed)
}

fn is_agent_device(id: &str) -> bool {
    crate::ids::parse_disk_device(id).is_some() || crate::ids::parse_nic_device(id).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_answers_parse() {
        let active = json!({"status": "active", "expected-downtime": 12,
            "ram": {"transferred": 1000, "remaining": 200, "total": 4000, "mbps": 812.5}});
        let s = parse_status(&active);
        assert_eq!(s.status.as_deref(), Some("active"));
        assert_eq!(
            (s.transferred, s.remaining, s.total, s.mbps),
            (1000, 200, 4000, 812)
        );
        assert_eq!(s.expected_downtime_ms, Some(12));
        let failed = json!({"status": "failed", "error-desc": "Connection reset"});
        assert_eq!(
            parse_status(&failed).error.as_deref(),
            Some("Connection reset")
        );
        assert_eq!(parse_status(&json!({})), Status::default());
    }
}
