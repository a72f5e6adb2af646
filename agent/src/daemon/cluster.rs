//! The daemon's side of ChainFire: the session config from the command line, the notices the
//! session sends (logged), and the local picture the daemon publishes (pure).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use super::ChainfireOptions;
use crate::action::PendingChange;
use crate::chainfire::records::HostFacts;
use crate::chainfire::{
    ChainFireConfig, ClusterView, HandleRecord, LocalVm, Notice, Password, SessionHandle, TlsFiles,
    VmKey, VmRecord,
};
use crate::migration::compat;
use crate::spec::DesiredState;
use crate::status::VmStatus;

/// `--lease-ttl` when not given.
const DEFAULT_LEASE_TTL: u64 = 10;

/// The session config the flags describe; the password is read from its file.
pub fn chainfire_config(options: &ChainfireOptions) -> Result<ChainFireConfig> {
    let Some(host_id) = options.host_id.clone() else {
        bail!("--chainfire needs --host-id: this host's id in the cluster");
    };
    let ttl = Duration::from_secs(options.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL));
    let mut config = ChainFireConfig::new(options.endpoints.clone(), host_id, ttl);
    config.tls = match (&options.ca, &options.cert, &options.key) {
        (Some(ca), cert, key) => Some(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, None) => None,
        (None, _, _) => bail!("--chainfire-cert/--chainfire-key need --chainfire-ca"),
    };
    config.user = match (&options.user, &options.password_file) {
        (Some(user), Some(file)) => {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("--chainfire-password-file {}", file.display()))?;
            Some((
                user.clone(),
                Password::new(password.trim_end_matches(['\n', '\r'])),
            ))
        }
        (None, None) => None,
        _ => bail!("--chainfire-user and --chainfire-password-file go together"),
    };
    config.check()?;
    Ok(config)
}

/// What this host publishes for migrations: its channel (from the flags) and its QEMU (asked
/// once at startup; unknown facts make every move to or from this host refused, saying why).
pub fn host_facts(qemu: &std::path::Path, migration: &super::MigrationSettings) -> HostFacts {
    let ask = |args: &[&str]| {
        std::process::Command::new(qemu)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let qemu_version = ask(&["--version"]).and_then(|text| compat::parse_version(&text));
    let machine_types = ask(&["-machine", "help"])
        .map(|text| compat::parse_machine_help(&text))
        .unwrap_or_default();
    if qemu_version.is_none() || machine_types.is_empty() {
        tracing::warn!(qemu = %qemu.display(), "could not ask QEMU its version and machine types: migrations to and from this host will be refused");
    }
    HostFacts {
        migration_address: Some(migration.address.clone()),
        migration_ports: Some(migration.ports.to_string()),
        migration_tls: migration.tls_dir.is_some(),
        qemu_version,
        machine_types,
    }
}

/// Logs what the session reports, until it stops.
pub fn log_notices(session: &SessionHandle) {
    let mut notices = session.notices();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match notices.recv().await {
                Ok(Notice::Connected { revision }) => {
                    tracing::info!(revision, "chainfire: connected")
                }
                Ok(Notice::Disconnected { error }) => {
                    tracing::warn!(%error, "chainfire: disconnected; VMs untouched, retrying")
                }
                Ok(Notice::Resynced { revision }) => {
                    tracing::info!(revision, "chainfire: watch compacted, resynced")
                }
                Ok(Notice::Store(event)) => tracing::debug!(?event, "chainfire: store change"),
                Ok(Notice::Wrote(write)) => tracing::info!(?write, "chainfire: wrote"),
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "chainfire: notices skipped")
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
}

/// Every declared VM as this host has it: its record, its handle while a QEMU runs, whether
/// this host wants to run it (`wanted`, or it runs here) and whether a move brings it here
/// (`arriving`). `handle(vm, pid)` says where that QEMU is; its `startedAt` must stay the same
/// while the QEMU lives, or every sync would write.
pub fn local_picture(
    host_id: &str,
    desired: &DesiredState,
    vms: &BTreeMap<String, VmStatus>,
    (wanted, arriving): (&BTreeSet<String>, &BTreeSet<String>),
    handle: impl Fn(&str, u32) -> HandleRecord,
) -> BTreeMap<VmKey, LocalVm> {
    desired
        .vms
        .iter()
        .map(|(name, spec)| {
            let key = VmKey::new(&spec.org_id, &spec.project_id, name);
            let status = vms.get(name);
            let state = status.map_or("stopped", |s| s.state.as_str());
            let mut record = VmRecord::new(&key, host_id, state, spec);
            if let Some(status) = status {
                record.pending = status.pending.iter().map(describe).collect();
                record.last_error.clone_from(&status.last_error);
            }
            let handle = status.and_then(|s| s.pid).map(|pid| handle(name, pid));
            let wants_to_run = handle.is_some() || wanted.contains(name);
            (
                key,
                LocalVm {
                    record,
                    handle,
                    wants_to_run,
                    arriving: arriving.contains(name),
                },
            )
        })
        .collect()
}

/// What `lastError` says of an HA VM this host stopped because it lost its lease.
pub const FENCED: &str = "fenced: lost the ChainFire lease";

/// Why an HA VM must stay down here, or None when this host may run it (it holds its lock).
pub fn ha_hold(
    host_id: &str,
    key: &VmKey,
    may_run: &BTreeSet<VmKey>,
    view: &ClusterView,
) -> Option<String> {
    if may_run.contains(key) {
        return None;
    }
    Some(match view.locks.get(key) {
        Some(lock) if lock.host != host_id => format!("HA: another host holds it ({})", lock.host),
        _ => "HA: waiting for the ChainFire lock".to_owned(),
    })
}

/// The cluster view as JSON: live hosts, and every VM with its handle and HA lock.
pub fn view_json(view: &ClusterView) -> serde_json::Value {
    let vms: Vec<_> = view
        .vms
        .iter()
        .map(|(key, vm)| {
            serde_json::json!({
                "key": key.to_string(),
                "vm": vm.value,
                "handle": view.handles.get(key).map(|h| &h.value),
                "lock": view.locks.get(key),
            })
        })
        .collect();
    serde_json::json!({ "hosts": view.hosts.values().collect::<Vec<_>>(), "vms": vms })
}

fn describe(change: &PendingChange) -> String {
    format!(
        "{}: {} -> {} ({})",
        change.field, change.from, change.to, change.reason
    )
}

/// When process `pid` started, to the second (boot time plus its start ticks): the same for as
/// long as the process lives, unlike anything read from the files it may rewrite.
pub fn process_started_at(pid: u32) -> Option<String> {
    let started_after_boot = crate::qemu::process::started_after_boot(pid)?;
    let boot_time: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let started =
        SystemTime::UNIX_EPOCH + Duration::from_secs(boot_time + started_after_boot.as_secs());
    Some(humantime::format_rfc3339_seconds(started).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::VmState;

    fn desired() -> DesiredState {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "vms": {
                "web": {"orgId": "acme", "projectId": "shop", "vcpus": 1, "memoryMiB": 256,
                        "kernel": "/k", "initrd": "/i"},
                "db": {"vcpus": 1, "memoryMiB": 256, "kernel": "/k", "initrd": "/i"}
            }
        }))
        .unwrap()
    }

    fn handle(vm: &str, pid: u32) -> HandleRecord {
        HandleRecord {
            host: String::new(),
            pid,
            qmp_socket: format!("/run/{vm}/qmp.sock"),
            started_at: "t0".into(),
        }
    }

    #[test]
    fn picture_has_every_declared_vm_with_state_pending_error_and_handle() {
        let mut running = VmStatus::stopped(true);
        running.state = VmState::Running;
        running.pid = Some(42);
        running.last_error = Some("boom".into());
        running.pending = vec![PendingChange {
            vm: "web".into(),
            field: "machine".into(),
            from: "pc".into(),
            to: "q35".into(),
            reason: "boot-time setting".into(),
        }];
        let statuses = BTreeMap::from([("web".to_owned(), running)]);
        let picture = local_picture(
            "h1",
            &desired(),
            &statuses,
            (&BTreeSet::new(), &BTreeSet::new()),
            handle,
        );

        let web = &picture[&VmKey::new("acme", "shop", "web")];
        assert_eq!(web.record.state, "running");
        assert_eq!(web.record.host, "h1");
        assert_eq!(web.record.last_error.as_deref(), Some("boom"));
        assert_eq!(
            web.record.pending,
            ["machine: pc -> q35 (boot-time setting)"]
        );
        assert_eq!(web.handle.as_ref().map(|h| h.pid), Some(42));

        assert!(web.wants_to_run, "it runs here");

        let db = picture.values().find(|vm| vm.record.name == "db").unwrap();
        assert_eq!(db.record.state, "stopped");
        assert_eq!(db.handle, None);
        assert!(!db.wants_to_run, "not wanted, not running");
        assert_eq!(picture.len(), 2);
        let wanted = BTreeSet::from(["db".to_owned()]);
        let picture = local_picture(
            "h1",
            &desired(),
            &statuses,
            (&wanted, &BTreeSet::new()),
            handle,
        );
        assert!(picture.values().all(|vm| vm.wants_to_run));
    }

    #[test]
    fn ha_vms_run_only_with_their_lock() {
        let key = VmKey::new("default", "default", "ha1");
        let mut view = ClusterView::default();
        let allowed = BTreeSet::from([key.clone()]);
        assert_eq!(ha_hold("a", &key, &allowed, &view), None);
        let none = BTreeSet::new();
        assert_eq!(
            ha_hold("a", &key, &none, &view).as_deref(),
            Some("HA: waiting for the ChainFire lock")
        );
        view.locks.insert(
            key.clone(),
            crate::chainfire::records::LockRecord {
                host: "b".into(),
                lease: 7,
                acquired_at: String::new(),
            },
        );
        assert_eq!(
            ha_hold("a", &key, &none, &view).as_deref(),
            Some("HA: another host holds it (b)")
        );
    }

    #[test]
    fn start_time_is_stable_for_a_living_process() {
        let first = process_started_at(std::process::id()).expect("own start time");
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(process_started_at(std::process::id()), Some(first));
        assert_eq!(process_started_at(u32::MAX), None);
    }

    fn options() -> ChainfireOptions {
        ChainfireOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            host_id: Some("a".into()),
            lease_ttl: None,
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        }
    }

    #[test]
    fn host_id_is_required() {
        let error = chainfire_config(&ChainfireOptions {
            host_id: None,
            ..options()
        })
        .unwrap_err();
        assert!(format!("{error:#}").contains("--host-id"), "{error:#}");
    }

    #[test]
    fn defaults_and_password_file() {
        let config = chainfire_config(&options()).unwrap();
        assert_eq!(config.lease_ttl, Duration::from_secs(DEFAULT_LEASE_TTL));
        assert_eq!(config.user, None);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = chainfire_config(&ChainfireOptions {
            user: Some("root".into()),
            password_file: Some(file),
            lease_ttl: Some(3),
            ..options()
        })
        .unwrap();
        assert_eq!(config.user, Some(("root".into(), Password::new("s3cret"))));
        assert_eq!(config.lease_ttl, Duration::from_secs(3));
    }

    #[test]
    fn half_given_credentials_are_refused() {
        assert!(chainfire_config(&ChainfireOptions {
            user: Some("root".into()),
            ..options()
        })
        .is_err());
        assert!(chainfire_config(&ChainfireOptions {
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..options()
        })
        .is_err());
    }
}
