//! One QMP connection per VM, through the `qapi` crate: commands with a timeout, events fanned
//! out to whoever subscribes.
//!
//! The connection's reader task is what drives command responses too, so it runs for as long as
//! the `Qmp` lives. When QEMU closes the socket the task broadcasts `QemuEvent::Disconnected`;
//! without a `Shutdown` before it, QEMU died (killed, crashed) rather than shut down.

mod transport;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qapi::qmp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use transport::{Transport, TransportError};

/// Default time a single QMP command may take before it counts as failed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What QEMU tells us without being asked, reduced to what the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuEvent {
    /// QEMU is shutting down (guest poweroff, `quit`, signal). `reason` is QEMU's `ShutdownCause`.
    Shutdown {
        guest_initiated: bool,
        reason: String,
    },
    /// An ACPI powerdown request was delivered to the guest.
    Powerdown,
    Reset {
        guest_initiated: bool,
        reason: String,
    },
    /// The guest stopped running (`at`: when, by QEMU's clock: the start of a move's downtime).
    Stop {
        at: SystemTime,
    },
    /// The guest runs again (`at`: when, by QEMU's clock).
    Resume {
        at: SystemTime,
    },
    /// A device is gone. Unplugging a virtio device first reports its `.../virtio-backend` child
    /// (no `device`), then the device itself with its id.
    DeviceDeleted {
        device: Option<String>,
        path: String,
    },
    /// The guest refused to release a device.
    DeviceUnplugGuestError {
        device: Option<String>,
        path: String,
    },
    GuestPanicked,
    /// A virtio-mem device's plugged size changed (the guest followed a `requested-size`).
    MemoryDeviceSizeChange {
        device: Option<String>,
        size_bytes: u64,
    },
    /// The migration's status changed (`active`, `pre-switchover`, `completed`, ...): with the
    /// `events` capability on, a move waits on these rather than polling.
    Migration {
        status: String,
    },
    /// The socket closed. `after_shutdown == false` means QEMU went away without a `SHUTDOWN`:
    /// it died. (Confirm with the process: a QMP decode failure closes the stream too.)
    Disconnected {
        after_shutdown: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {command} timed out after {after:?}")]
    Timeout {
        command: &'static str,
        after: Duration,
    },
    #[error("QMP {command}: QEMU said {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("QMP {command}: {source}")]
    Io {
        command: &'static str,
        source: std::io::Error,
    },
    #[error("QMP connection to {socket} failed: {source}")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("QMP connection to {socket} timed out after {after:?}")]
    ConnectTimeout { socket: String, after: Duration },
}

impl QmpError {
    /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...) when QEMU answered with one.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// The connection is gone (as opposed to QEMU refusing the command).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, QmpError::Io { .. } | QmpError::Connect { .. })
    }
}

/// A negotiated QMP session with one QEMU.
pub struct Qmp {
    transport: Transport,
    events: broadcast::Sender<QemuEvent>,
    connected: watch::Receiver<bool>,
    command_timeout: Duration,
    counters: Option<Arc<QmpCounters>>,
}

/// Commands sent, failed and timed out, counted across the connections of one VM (for metrics).
#[derive(Debug, Default)]
pub struct QmpCounters {
    commands: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
}

impl QmpCounters {
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    fn count(&self, error: &QmpError) {
        let counter = match error {
            QmpError::Timeout { .. } => &self.timeouts,
            _ => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and leaves negotiation mode, all within
    /// `timeout`. Commands then time out after `DEFAULT_COMMAND_TIMEOUT`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let socket_name = socket.display().to_string();
        let (event_tx, _) = broadcast::channel(256);
        let transport = tokio::time::timeout(
            timeout,
            Transport::connect(socket, forward_events(event_tx.clone())),
        )
        .await
        .map_err(|_| QmpError::ConnectTimeout {
            socket: socket_name.clone(),
            after: timeout,
        })?
        .map_err(|source| QmpError::Connect {
            socket: socket_name,
            source,
        })?;
        Ok(Qmp {
            connected: transport.connected(),
            transport,
            events: event_tx,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            counters: None,
        })
    }

    /// Counts this connection's failed and timed-out commands into `counters`.
    pub fn count_into(mut self, counters: Arc<QmpCounters>) -> Self {
        self.counters = Some(counters);
        self
    }

    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Events from now on. Subscribe BEFORE issuing a command whose event you wait for.
    pub fn subscribe(&self) -> broadcast::Receiver<QemuEvent> {
        self.events.subscribe()
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Resolves once the socket has closed (immediately if it already has).
    pub async fn disconnected(&self) {
        let mut connected = self.connected.clone();
        let _ = connected.wait_for(|up| !*up).await;
    }

    /// Since when QEMU has left a command unanswered past its timeout; None while it answers.
    pub fn silent_since(&self) -> Option<Instant> {
        self.transport.silent_since()
    }

    /// Runs any `qapi` command with the connection's timeout. Safe to give up on (drop): a late
    /// answer is recognised by its id and dropped.
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        if let Some(counters) = &self.counters {
            counters.commands.fetch_add(1, Ordering::Relaxed);
        }
        let result = self.execute_uncounted(command).await;
        if let (Err(error), Some(counters)) = (&result, &self.counters) {
            counters.count(error);
        }
        result
    }

    async fn execute_uncounted<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        let name = C::NAME;
        let arguments = serde_json::to_value(&command).map_err(|e| QmpError::Io {
            command: name,
            source: e.into(),
        })?;
        let value = self.command(name, arguments).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Io {
            command: name,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    /// Any command by name with JSON arguments, answered as JSON: migration's commands, whose
    /// arguments and answers the agent reads only in part.
    pub async fn command(
        &self,
        name: &'static str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QmpError> {
        self.transport
            .execute(name, &arguments, self.command_timeout)
            .await
            .map_err(|e| match e {
                TransportError::Timeout(after) => QmpError::Timeout {
                    command: name,
                    after,
                },
                TransportError::Qemu(class, desc) => QmpError::Command {
                    command: name,
                    class,
                    desc,
                },
                TransportError::Io(source) => QmpError::Io {
                    command: name,
                    source,
                },
            })
    }

    pub async fn query_status(&self) -> Result<qmp::StatusInfo, QmpError> {
        self.execute(qmp::query_status {}).await
    }

    pub async fn qom_list(&self, path: &str) -> Result<Vec<qmp::ObjectPropertyInfo>, QmpError> {
        self.execute(qmp::qom_list {
            path: path.to_owned(),
        })
        .await
    }

    /// Reads a QOM property and decodes it as `T`.
    pub async fn qom_get<T: DeserializeOwned>(
        &self,
        path: &str,
        property: &str,
    ) -> Result<T, QmpError> {
        let value = self
            .execute(qmp::qom_get {
                path: path.to_owned(),
                property: property.to_owned(),
            })
            .await?;
        serde_json::from_value(value).map_err(|e| QmpError::Io {
            command: "qom-get",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path}.{property}: {e}"),
            ),
        })
    }

    pub async fn qom_set(
        &self,
        path: &str,
        property: &str,
        value: impl Serialize,
    ) -> Result<(), QmpError> {
        let value = serde_json::to_value(value).expect("a QOM value serializes to JSON");
        self.execute(qmp::qom_set {
            path: path.to_owned(),
            property: property.to_owned(),
            value,
        })
        .await
        .map(drop)
    }

    /// `device_add driver=.. id=.. [bus=..] <properties>`.
    pub async fn device_add(
        &self,
        driver: &str,
        id: &str,
        bus: Option<&str>,
        properties: serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), QmpError> {
        self.execute(qmp::device_add {
            driver: driver.to_owned(),
            id: Some(id.to_owned()),
            bus: bus.map(str::to_owned),
            arguments: properties,
        })
        .await
        .map(drop)
    }

    /// Asks the guest to release a device; completion is the `DeviceDeleted` event.
    pub async fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute(qmp::device_del { id: id.to_owned() })
            .await
            .map(drop)
    }

    /// `blockdev-add` with the options given as JSON (QEMU's own schema, e.g.
    /// `{"driver": "file", "node-name": .., "filename": ..}`).
    pub async fn blockdev_add(&self, options: serde_json::Value) -> Result<(), QmpError> {
        self.execute(raw::BlockdevAdd(options)).await.map(drop)
    }

    pub async fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError> {
        self.execute(qmp::blockdev_del {
            node_name: node_name.to_owned(),
        })
        .await
        .map(drop)
    }

    /// Grows (never shrinks: the planner refuses that) a block node's image to `size` bytes; the
    /// guest's device sees the new capacity at once.
    pub async fn block_resize(&self, node_name: &str, size: u64) -> Result<(), QmpError> {
        self.execute(qmp::block_resize {
            device: None,
            node_name: Some(node_name.to_owned()),
            size: size as i64,
        })
        .await
        .map(drop)
    }

    /// `netdev_add` with the options as JSON (`{"type": "tap", "id": .., "ifname": ..}`).
    pub async fn netdev_add(&self, options: serde_json::Value) -> Result<(), QmpError> {
        self.execute(raw::NetdevAdd(options)).await.map(drop)
    }

    pub async fn netdev_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute(qmp::netdev_del { id: id.to_owned() })
            .await
            .map(drop)
    }

    /// Netdevs and their tap interface names, from HMP `info network` (QEMU 7.2 has no
    /// `query-netdev`).
    pub async fn netdevs(&self) -> Result<BTreeMap<String, Netdev>, QmpError> {
        let text = self
            .execute(qmp::human_monitor_command {
                command_line: "info network".to_owned(),
                cpu_index: None,
            })
            .await?;
        Ok(parse_info_network(&text))
    }

    pub async fn query_hotpluggable_cpus(&self) -> Result<Vec<qmp::HotpluggableCPU>, QmpError> {
        self.execute(qmp::query_hotpluggable_cpus {}).await
    }

    pub async fn query_named_block_nodes(&self) -> Result<Vec<raw::BlockNode>, QmpError> {
        self.execute(raw::QueryNamedBlockNodes { flat: true }).await
    }

    /// I/O counters of every block backend (for metrics).
    pub async fn query_blockstats(
        &self,
    ) -> Result<Vec<crate::metrics::sample::BlockStatsEntry>, QmpError> {
        self.execute(raw::QueryBlockstats {}).await
    }

    pub async fn query_memory_size_summary(&self) -> Result<qmp::MemoryInfo, QmpError> {
        self.execute(qmp::query_memory_size_summary {}).await
    }

    /// Hard reset, like pressing the reset button.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute(qmp::system_reset {}).await.map(drop)
    }

    /// ACPI power button: the guest decides what to do (it may ignore it).
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute(qmp::system_powerdown {}).await.map(drop)
    }

    /// Resumes stopped vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute(qmp::cont {}).await.map(drop)
    }

    /// What a guest shutdown does: exit QEMU (`poweroff`, the default) or only stop the vCPUs
    /// (`pause`), which lets the agent reset and resume the same process.
    pub async fn set_shutdown_action(&self, action: qmp::ShutdownAction) -> Result<(), QmpError> {
        self.execute(qmp::set_action {
            shutdown: Some(action),
            panic: None,
            reboot: None,
            watchdog: None,
        })
        .await
        .map(drop)
    }

    /// Makes QEMU exit now, without asking the guest.
    pub async fn quit(&self) -> Result<(), QmpError> {
        self.execute(qmp::quit {}).await.map(drop)
    }

    /// Stops the vCPUs (the guest freezes; QEMU and its devices stay).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute(qmp::stop {}).await.map(drop)
    }

    /// `major.minor.micro` of the QEMU behind this monitor.
    pub async fn qemu_version(&self) -> Result<String, QmpError> {
        let info = self.execute(qmp::query_version {}).await?;
        let v = info.qemu;
        let package = info.package.trim();
        Ok(match package {
            "" => format!("{}.{}.{}", v.major, v.minor, v.micro),
            _ => format!("{}.{}.{} ({package})", v.major, v.minor, v.micro),
        })
    }

    /// Starts an outgoing migration to `uri` (returns at once; see `query_migrate`).
    pub async fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(raw::Migrate {
            uri: uri.to_owned(),
        })
        .await
        .map(drop)
    }

    /// Makes a QEMU started with `-incoming defer` receive the migration on `uri`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute(raw::MigrateIncoming {
            uri: uri.to_owned(),
        })
        .await
        .map(drop)
    }

    pub async fn query_migrate(&self) -> Result<raw::MigrationInfo, QmpError> {
        self.execute(raw::QueryMigrate {}).await
    }

    /// Caps the outgoing migration's bandwidth (QEMU's default is 128 MiB/s).
    pub async fn set_migration_bandwidth(&self, bytes_per_second: u64) -> Result<(), QmpError> {
        self.execute(raw::MigrateSetParameters {
            max_bandwidth: bytes_per_second,
        })
        .await
        .map(drop)
    }
}

/// Commands whose typed `qapi` form does not fit QEMU 7.2, or that the agent only needs a few
/// fields of: defined here with exactly what 7.2 accepts and returns.
pub mod raw {
    use serde::{Deserialize, Serialize};

    /// `blockdev-add` takes a union keyed by `driver`; JSON keeps it close to QEMU's docs.
    #[derive(Serialize)]
    #[serde(transparent)]
    pub struct BlockdevAdd(pub serde_json::Value);

    #[derive(Serialize)]
    #[serde(transparent)]
    pub struct NetdevAdd(pub serde_json::Value);

    #[derive(Serialize)]
    pub struct QueryNamedBlockNodes {
        pub flat: bool,
    }

    /// The part of `BlockDeviceInfo` observation needs.
    #[derive(Debug, Clone, Deserialize)]
    pub struct BlockNode {
        #[serde(rename = "node-name")]
        pub node_name: Option<String>,
        /// Driver: `file`, `qcow2`, `raw`, ...
        pub drv: String,
        /// The image file name (for a format node, its file's name).
        pub file: String,
        pub ro: bool,
        pub cache: BlockNodeCache,
        pub image: BlockNodeImage,
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct BlockNodeImage {
        #[serde(rename = "virtual-size")]
        pub virtual_size: u64,
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct BlockNodeCache {
        pub direct: bool,
        #[serde(rename = "no-flush")]
        pub no_flush: bool,
    }

    #[derive(Serialize)]
    pub struct Migrate {
        pub uri: String,
    }

    #[derive(Serialize)]
    pub struct MigrateIncoming {
        pub uri: String,
    }

    #[derive(Serialize)]
    pub struct QueryMigrate {}

    /// The part of `query-migrate` a save or restore waits on (both directions report here).
    #[derive(Debug, Clone, Deserialize)]
    pub struct MigrationInfo {
        /// `setup`, `active`, `completed`, `failed`, ...; absent before any migration.
        pub status: Option<String>,
        #[serde(rename = "error-desc")]
        pub error_desc: Option<String>,
    }

    #[derive(Serialize)]
    pub struct MigrateSetParameters {
        #[serde(rename = "max-bandwidth")]
        pub max_bandwidth: u64,
    }

    macro_rules! command {
        ($ty:ty, $name:literal, $ok:ty) => {
            impl qapi::Command for $ty {
                type Ok = $ok;
                const NAME: &'static str = $name;
                const ALLOW_OOB: bool = false;
            }
            impl qapi::qmp::QmpCommand for $ty {}
        };
    }

    #[derive(Serialize)]
    pub struct QueryBlockstats {}

    command!(BlockdevAdd, "blockdev-add", qapi::Empty);
    command!(
        QueryBlockstats,
        "query-blockstats",
        Vec<crate::metrics::sample::BlockStatsEntry>
    );
    command!(Migrate, "migrate", qapi::Empty);
    command!(MigrateIncoming, "migrate-incoming", qapi::Empty);
    command!(QueryMigrate, "query-migrate", MigrationInfo);
    command!(MigrateSetParameters, "migrate-set-parameters", qapi::Empty);
    command!(NetdevAdd, "netdev_add", qapi::Empty);
    command!(
        QueryNamedBlockNodes,
        "query-named-block-nodes",
        Vec<BlockNode>
    );
}

/// Turns the connection's events into `QemuEvent`s for subscribers; when it closes, says whether
/// QEMU announced a shutdown first.
fn forward_events(tx: broadcast::Sender<QemuEvent>) -> impl FnMut(Option<serde_json::Value>) {
    let mut after_shutdown = false;
    move |event| match event {
        Some(event) => match serde_json::from_value::<qmp::Event>(event) {
            Ok(event) => {
                if let Some(event) = QemuEvent::from_qmp(event) {
                    tracing::debug!(?event, "QMP event");
                    after_shutdown |= matches!(event, QemuEvent::Shutdown { .. });
                    let _ = tx.send(event);
                }
            }
            Err(e) => tracing::debug!("QMP event this agent does not know: {e}"),
        },
        None => {
            let _ = tx.send(QemuEvent::Disconnected { after_shutdown });
        }
    }
}

impl QemuEvent {
    fn from_qmp(event: qmp::Event) -> Option<QemuEvent> {
        use qmp::Event as E;
        Some(match event {
            E::SHUTDOWN { data, .. } => QemuEvent::Shutdown {
                guest_initiated: data.guest,
                reason: enum_name(&data.reason),
            },
            E::POWERDOWN { .. } => QemuEvent::Powerdown,
            E::RESET { data, .. } => QemuEvent::Reset {
                guest_initiated: data.guest,
                reason: enum_name(&data.reason),
            },
            E::STOP { timestamp, .. } => QemuEvent::Stop {
                at: wall_time(timestamp),
            },
            E::RESUME { timestamp, .. } => QemuEvent::Resume {
                at: wall_time(timestamp),
            },
            E::DEVICE_DELETED { data, .. } => QemuEvent::DeviceDeleted {
                device: data.device,
                path: data.path,
            },
            E::DEVICE_UNPLUG_GUEST_ERROR { data, .. } => QemuEvent::DeviceUnplugGuestError {
                device: data.device,
                path: data.path,
            },
            E::GUEST_PANICKED { .. } => QemuEvent::GuestPanicked,
            E::MIGRATION { data, .. } => QemuEvent::Migration {
                status: enum_name(&data.status),
            },
            E::MEMORY_DEVICE_SIZE_CHANGE { data, .. } => QemuEvent::MemoryDeviceSizeChange {
                device: data.id,
                size_bytes: data.size,
            },
            _ => return None,
        })
    }
}

/// An event's timestamp (seconds and microseconds since the Unix epoch, QEMU's host clock).
fn wall_time(timestamp: qapi::Timestamp) -> SystemTime {
    let value = serde_json::to_value(timestamp).unwrap_or_default();
    let number = |field: &str| value[field].as_u64().unwrap_or(0);
    UNIX_EPOCH
        + Duration::from_secs(number("seconds"))
        + Duration::from_micros(number("microseconds"))
}

/// A host network backend as `info network` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netdev {
    /// `tap`, `user`, ...
    pub kind: String,
    /// The host interface of a tap netdev.
    pub ifname: Option<String>,
}

/// Parses HMP `info network`: NIC lines (`type=nic`) and netdev lines, the latter indented with
/// ` \ ` under the NIC that uses them, or at top level when no NIC does.
fn parse_info_network(text: &str) -> BTreeMap<String, Netdev> {
    let mut netdevs = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('\\').trim();
        let Some((id, options)) = line.split_once(": ") else {
            continue;
        };
        let option = |key: &str| {
            options
                .split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        match option("type") {
            Some(kind) if kind != "nic" => {
                let ifname = option("ifname");
                netdevs.insert(id.to_owned(), Netdev { kind, ifname });
            }
            _ => {}
        }
    }
    netdevs
}

/// QAPI enums serialize as their wire name (`guest-shutdown`, `DeviceNotFound`).
fn enum_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>(_: &T) {}

    /// The daemon shares one `Qmp` per VM across tasks and spawns its futures.
    #[allow(dead_code, unreachable_code, clippy::diverging_sub_expression)]
    fn qmp_and_its_futures_are_send(qmp: &Qmp) {
        assert_send_sync(qmp);
        let future = qmp.query_status();
        assert_send_sync(&future);
    }

    #[test]
    fn info_network_lists_netdevs_with_and_without_nics() {
        let text = "nic-e: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\n \\ net-e: index=0,type=tap,ifname=tapx,script=no,downscript=no\r\nnet-old: index=0,type=tap,ifname=pv0123456789ab,script=no,downscript=no\r\n";
        let netdevs = parse_info_network(text);
        assert_eq!(netdevs.len(), 2, "{netdevs:?}");
        assert_eq!(netdevs["net-e"].ifname.as_deref(), Some("tapx"));
        assert_eq!(netdevs["net-old"].kind, "tap");
        assert_eq!(netdevs["net-old"].ifname.as_deref(), Some("pv0123456789ab"));
    }

    #[test]
    fn stop_and_resume_carry_qemus_timestamp() {
        let event = |json: &str| {
            QemuEvent::from_qmp(serde_json::from_str(json).unwrap()).expect("a known event")
        };
        let at = UNIX_EPOCH + Duration::from_micros(1_290_688_046_388_707);
        assert_eq!(
            event(
                r#"{"event": "STOP", "timestamp": {"seconds": 1290688046, "microseconds": 388707}}"#
            ),
            QemuEvent::Stop { at }
        );
        assert_eq!(
            event(
                r#"{"event": "RESUME", "timestamp": {"seconds": 1290688046, "microseconds": 388707}}"#
            ),
            QemuEvent::Resume { at }
        );
    }

    #[test]
    fn enum_names_are_wire_names() {
        assert_eq!(
            enum_name(&qmp::ShutdownCause::guest_shutdown),
            "guest-shutdown"
        );
    }
}
