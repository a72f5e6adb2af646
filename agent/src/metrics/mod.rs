//! Prometheus metrics (`plasmavmc agent --metrics-listen ADDR:PORT`, served at `/metrics`): what
//! the agent exports, as plain data, and its encoding in the Prometheus text format.
//!
//! The rule: **a scrape never asks QEMU anything.** A sampler (`daemon/metrics.rs`) refreshes each
//! VM's figures from QMP (`query-blockstats`, vCPUs, memory, netdevs), its taps' counters
//! and `/proc/PID/stat`, at most once per interval and with a per-VM timeout; a scrape encodes the
//! last sample of every VM with its age (`plasmavmc_vm_sample_age_seconds`), so a stalled QEMU
//! makes its own figures old, never the scrape slow. The text of what changes only with a sample
//! or a state change is encoded once per change (see `encode`).
//!
//! Pure: the daemon fills [`HostFigures`] from its status snapshots and the last samples;
//! `families` turns them into metric families. `sample` parses what the sampler reads.
//!
//! Names follow Prometheus conventions (base units, `_total` counters, node_exporter's names for
//! disk and network counters); every per-VM series has the labels `host`, `vm`, `org`,
//! `project` (docs/metrics.md lists them all).

mod encode;
pub mod sample;

use std::collections::BTreeMap;

pub use encode::{AgentMetrics, Exposition, Family, Kind, ReloadResult, Series, Value};

use crate::status::VmState;

/// Everything a scrape shows, gathered from memory only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFigures {
    pub vms: Vec<VmFigures>,
    /// With `--chainfire`: the session's health.
    pub chainfire: Option<ChainfireFigures>,
}

/// One VM, as the agent knows it now plus its last sample.
#[derive(Debug, Clone, PartialEq)]
pub struct VmFigures {
    pub name: String,
    pub org: String,
    pub project: String,
    pub state: VmState,
    /// How often the restart policy restarted it.
    pub restarts: u32,
    /// Declared changes waiting for the next start.
    pub pending: usize,
    /// For an HA VM with ChainFire: whether this host holds its lock now.
    pub ha_lock_held: Option<bool>,
    /// QMP commands to this VM's QEMU: sent, failed, timed out (since the agent started).
    pub qmp_commands: u64,
    pub qmp_errors: u64,
    pub qmp_timeouts: u64,
    /// Seconds since its QEMU started, while one runs.
    pub uptime_seconds: Option<f64>,
    /// The last sample of its QEMU (None: no QEMU, or not sampled yet).
    pub sample: Option<AgedSample>,
}

/// A sample and how old it is at the scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct AgedSample {
    pub sample: VmSample,
    pub age_seconds: f64,
}

/// What the sampler read for one VM in one go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSample {
    /// vCPUs present (boot plus hotplugged).
    pub vcpus: u32,
    /// Guest memory: boot memory plus what virtio-mem has plugged.
    pub memory_bytes: u64,
    /// By declared disk id.
    pub disks: BTreeMap<String, DiskCounters>,
    /// By declared NIC id.
    pub nics: BTreeMap<String, NicCounters>,
    /// The QEMU process (None when `/proc` could not be read).
    pub process: Option<ProcessFigures>,
}

/// One disk's I/O counters since its QEMU started (`query-blockstats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskCounters {
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Time spent on the operations, in nanoseconds (the latency sums).
    pub read_time_ns: u64,
    pub write_time_ns: u64,
    pub flush_time_ns: u64,
}

/// One NIC's counters, from the guest's side (its tap's transmit is the guest's receive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// The host tap interface.
    pub tap: String,
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
    pub receive_packets: u64,
    pub transmit_packets: u64,
}

/// The QEMU process, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessFigures {
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

/// The ChainFire session, as the agent sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChainfireFigures {
    pub connected: bool,
    /// How long until the store could expire this host's lease, as far as the agent can know
    /// (TTL after the last acknowledged keep-alive was sent); None without a lease.
    pub lease_remaining_seconds: Option<f64>,
    /// Since the last acknowledged keep-alive was sent.
    pub keepalive_age_seconds: Option<f64>,
}
