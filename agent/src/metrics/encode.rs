//! `HostFigures` as metric families, and the text a scrape serves: the agent's own metrics
//! (reconcile durations, reload results) and the figures of the moment.
//!
//! Encoding is most of a scrape's cost, and most families change only when the agent learns
//! something (a sample round, a VM started or stopped, a new declaration): those *stable*
//! families are encoded once per change and the text kept. The *live* ones (uptimes, sample
//! ages, QMP counters, the ChainFire session's clocks) are encoded at every scrape.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family as LabelledFamily;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{AgedSample, HostFigures, VmFigures};
use crate::status::VmState;

/// Every state a VM can be in, for the one-hot `plasmavmc_vm_state`.
const STATES: [VmState; 9] = [
    VmState::Stopped,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Failed,
    VmState::Unresponsive,
    VmState::Saving,
    VmState::Saved,
];

/// A metric family: one name, its help, and a series per label set. Names carry no prefix
/// (`plasmavmc_` is the registry's) and counters no `_total` (the encoder adds it).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

/// Integers stay integers in the text (byte and operation counts); the rest are floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            series: Vec::new(),
        }
    }

    fn push(&mut self, labels: Vec<(&'static str, String)>, value: Value) {
        self.series.push(Series { labels, value });
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let metric_type = match self.kind {
            Kind::Gauge => MetricType::Gauge,
            Kind::Counter => MetricType::Counter,
        };
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, metric_type)?;
        for series in &self.series {
            let labelled = metric.encode_family(&series.labels)?;
            match (self.kind, series.value) {
                (Kind::Gauge, Value::Int(v)) => ConstGauge::new(v).encode(labelled)?,
                (Kind::Gauge, Value::Float(v)) => ConstGauge::new(v).encode(labelled)?,
                (Kind::Counter, Value::Int(v)) => ConstCounter::new(v).encode(labelled)?,
                (Kind::Counter, Value::Float(v)) => ConstCounter::new(v).encode(labelled)?,
            }
        }
        Ok(())
    }
}

/// The families that change only when the agent learns something, in a fixed order; families
/// without a series are left out.
fn stable_families(figures: &HostFigures) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    let mut state = Family::new(
        "vm_state",
        Gauge,
        "1 for the state the VM is in (one series per state), 0 for the others.",
    );
    let mut vcpus = Family::new(
        "vm_vcpus",
        Gauge,
        "vCPUs the VM has now (boot plus hotplugged).",
    );
    let mut memory = Family::new(
        "vm_memory_bytes",
        Gauge,
        "Guest memory: boot memory plus what virtio-mem has plugged.",
    );
    let mut restarts = Family::new(
        "vm_restarts",
        Counter,
        "Restarts by the restart policy after its QEMU went away.",
    );
    let mut pending = Family::new(
        "vm_pending_changes",
        Gauge,
        "Declared changes waiting for the VM's next start.",
    );
    let mut ha_lock = Family::new(
        "vm_ha_lock_held",
        Gauge,
        "1 while this host holds the HA VM's ChainFire lock.",
    );
    let mut cpu = Family::new(
        "vm_cpu_seconds",
        Counter,
        "CPU time (user plus system) of the VM's QEMU process.",
    );
    let mut rss = Family::new(
        "vm_resident_memory_bytes",
        Gauge,
        "Resident memory of the VM's QEMU process.",
    );
    let mut disk_read_bytes = Family::new(
        "vm_disk_read_bytes",
        Counter,
        "Bytes the guest read from the disk.",
    );
    let mut disk_written_bytes = Family::new(
        "vm_disk_written_bytes",
        Counter,
        "Bytes the guest wrote to the disk.",
    );
    let mut disk_reads = Family::new(
        "vm_disk_reads_completed",
        Counter,
        "Read operations completed on the disk.",
    );
    let mut disk_writes = Family::new(
        "vm_disk_writes_completed",
        Counter,
        "Write operations completed on the disk.",
    );
    let mut disk_flushes = Family::new(
        "vm_disk_flush_requests",
        Counter,
        "Flush operations completed on the disk.",
    );
    let mut disk_read_time = Family::new(
        "vm_disk_read_time_seconds",
        Counter,
        "Time spent on reads (divide by reads for the mean latency).",
    );
    let mut disk_write_time = Family::new(
        "vm_disk_write_time_seconds",
        Counter,
        "Time spent on writes (divide by writes for the mean latency).",
    );
    let mut disk_flush_time = Family::new(
        "vm_disk_flush_time_seconds",
        Counter,
        "Time spent on flushes.",
    );
    let mut rx_bytes = Family::new(
        "vm_network_receive_bytes",
        Counter,
        "Bytes the guest received on the NIC (its tap's transmit).",
    );
    let mut tx_bytes = Family::new(
        "vm_network_transmit_bytes",
        Counter,
        "Bytes the guest sent on the NIC (its tap's receive).",
    );
    let mut rx_packets = Family::new(
        "vm_network_receive_packets",
        Counter,
        "Packets the guest received on the NIC.",
    );
    let mut tx_packets = Family::new(
        "vm_network_transmit_packets",
        Counter,
        "Packets the guest sent on the NIC.",
    );

    for vm in &figures.vms {
        let labels = vm_labels(vm);
        let with = |key: &'static str, value: &str| {
            let mut labels = labels.clone();
            labels.push((key, value.to_owned()));
            labels
        };
        for s in STATES {
            let value = Value::Int(u64::from(vm.state == s));
            state.push(with("state", s.as_str()), value);
        }
        restarts.push(labels.clone(), Value::Int(u64::from(vm.restarts)));
        pending.push(labels.clone(), Value::Int(vm.pending as u64));
        if let Some(held) = vm.ha_lock_held {
            ha_lock.push(labels.clone(), Value::Int(u64::from(held)));
        }
        let Some(aged) = &vm.sample else { continue };
        let sample = &aged.sample;
        vcpus.push(labels.clone(), Value::Int(u64::from(sample.vcpus)));
        memory.push(labels.clone(), Value::Int(sample.memory_bytes));
        if let Some(process) = sample.process {
            cpu.push(labels.clone(), Value::Float(process.cpu_seconds));
            rss.push(labels.clone(), Value::Int(process.resident_bytes));
        }
        for (disk, c) in &sample.disks {
            let l = || with("disk", disk);
            disk_read_bytes.push(l(), Value::Int(c.read_bytes));
            disk_written_bytes.push(l(), Value::Int(c.written_bytes));
            disk_reads.push(l(), Value::Int(c.reads));
            disk_writes.push(l(), Value::Int(c.writes));
            disk_flushes.push(l(), Value::Int(c.flushes));
            disk_read_time.push(l(), seconds(c.read_time_ns));
            disk_write_time.push(l(), seconds(c.write_time_ns));
            disk_flush_time.push(l(), seconds(c.flush_time_ns));
        }
        for (nic, c) in &sample.nics {
            let l = || {
                let mut labels = with("nic", nic);
                labels.push(("tap", c.tap.clone()));
                labels
            };
            rx_bytes.push(l(), Value::Int(c.receive_bytes));
            tx_bytes.push(l(), Value::Int(c.transmit_bytes));
            rx_packets.push(l(), Value::Int(c.receive_packets));
            tx_packets.push(l(), Value::Int(c.transmit_packets));
        }
    }

    [
        state,
        vcpus,
        memory,
        restarts,
        pending,
        ha_lock,
        cpu,
        rss,
        disk_read_bytes,
        disk_written_bytes,
        disk_reads,
        disk_writes,
        disk_flushes,
        disk_read_time,
        disk_write_time,
        disk_flush_time,
        rx_bytes,
        tx_bytes,
        rx_packets,
        tx_packets,
    ]
    .into_iter()
    .filter(|family| !family.series.is_empty())
    .collect()
}

/// The families whose values move at every instant, in a fixed order; families without a
/// series are left out.
fn live_families(figures: &HostFigures) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    let mut uptime = Family::new(
        "vm_uptime_seconds",
        Gauge,
        "Seconds since the VM's QEMU started.",
    );
    let mut qmp_commands = Family::new(
        "vm_qmp_commands",
        Counter,
        "QMP commands sent to the VM's QEMU (the sampler's and the agent's).",
    );
    let mut qmp_errors = Family::new(
        "vm_qmp_errors",
        Counter,
        "QMP commands to the VM's QEMU that failed (refused or connection lost).",
    );
    let mut qmp_timeouts = Family::new(
        "vm_qmp_timeouts",
        Counter,
        "QMP commands to the VM's QEMU that got no answer in time.",
    );
    let mut age = Family::new(
        "vm_sample_age_seconds",
        Gauge,
        "Age of the sample the VM's QEMU figures come from (grows while QEMU does not answer).",
    );

    for vm in &figures.vms {
        let labels = vm_labels(vm);
        qmp_commands.push(labels.clone(), Value::Int(vm.qmp_commands));
        qmp_errors.push(labels.clone(), Value::Int(vm.qmp_errors));
        qmp_timeouts.push(labels.clone(), Value::Int(vm.qmp_timeouts));
        if let Some(seconds) = vm.uptime_seconds {
            uptime.push(labels.clone(), Value::Float(seconds));
        }
        if let Some(aged) = &vm.sample {
            age.push(labels, Value::Float(aged.age_seconds));
        }
    }

    let mut connected = Family::new(
        "chainfire_connected",
        Gauge,
        "1 while the ChainFire session is connected to the store.",
    );
    let mut lease = Family::new("chainfire_lease_remaining_seconds", Gauge, "Seconds until the store could expire this host's lease (TTL after the last acknowledged keep-alive was sent).");
    let mut keepalive = Family::new(
        "chainfire_keepalive_age_seconds",
        Gauge,
        "Seconds since the last acknowledged keep-alive was sent.",
    );
    if let Some(chainfire) = &figures.chainfire {
        connected.push(vec![], Value::Int(u64::from(chainfire.connected)));
        if let Some(remaining) = chainfire.lease_remaining_seconds {
            lease.push(vec![], Value::Float(remaining));
        }
        if let Some(age) = chainfire.keepalive_age_seconds {
            keepalive.push(vec![], Value::Float(age));
        }
    }

    [
        uptime,
        qmp_commands,
        qmp_errors,
        qmp_timeouts,
        age,
        connected,
        lease,
        keepalive,
    ]
    .into_iter()
    .filter(|family| !family.series.is_empty())
    .collect()
}

/// What the stable families show: `figures` without the live values. Every field
/// `live_families` reads must be cleared here, or a change of it alone would not be shown.
fn stable_part(figures: &HostFigures) -> HostFigures {
    HostFigures {
        vms: figures
            .vms
            .iter()
            .map(|vm| VmFigures {
                qmp_commands: 0,
                qmp_errors: 0,
                qmp_timeouts: 0,
                uptime_seconds: None,
                sample: vm.sample.as_ref().map(|aged| AgedSample {
                    sample: aged.sample.clone(),
                    age_seconds: 0.0,
                }),
                ..vm.clone()
            })
            .collect(),
        chainfire: None,
    }
}

fn vm_labels(vm: &VmFigures) -> Vec<(&'static str, String)> {
    vec![
        ("vm", vm.name.clone()),
        ("org", vm.org.clone()),
        ("project", vm.project.clone()),
    ]
}

fn seconds(nanoseconds: u64) -> Value {
    Value::Float(nanoseconds as f64 / 1e9)
}

/// How a reload (`plasmavmc reload`, SIGHUP, a changed config file) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// Every step done (or nothing to do).
    Applied,
    /// Some step failed or waits (an unplug the guest has not answered).
    Incomplete,
    /// The config was refused; nothing was touched.
    Invalid,
}

impl ReloadResult {
    fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Incomplete => "incomplete",
            ReloadResult::Invalid => "invalid",
        }
    }
}

type ResultLabel = [(&'static str, &'static str); 1];

/// The agent's own metrics, updated as things happen (shared with the daemon).
#[derive(Debug)]
pub struct AgentMetrics {
    reconcile_seconds: Histogram,
    reloads: LabelledFamily<ResultLabel, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let reloads = LabelledFamily::default();
        // Every result from the start at 0, so `increase()` sees the first one.
        for result in [
            ReloadResult::Applied,
            ReloadResult::Incomplete,
            ReloadResult::Invalid,
        ] {
            let _ = reloads.get_or_create(&[("result", result.as_str())]);
        }
        Self {
            // 1 ms .. ~65 s: a no-op reconcile is a few ms, a start under TCG several seconds.
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            reloads,
        }
    }
}

impl AgentMetrics {
    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile_seconds.observe(seconds);
    }

    pub fn count_reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&[("result", result.as_str())])
            .inc();
    }
}

/// Families made beforehand, as a collector.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for family in &self.0 {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

/// The text a scrape serves (Prometheus text format, version 0.0.4): everything under the
/// `plasmavmc_` prefix with a `host` label. Keeps the stable families' text until what they
/// show changes.
pub struct Exposition {
    host: String,
    agent: Arc<AgentMetrics>,
    /// The stable part of the figures last encoded, and its text.
    stable: Mutex<Option<(HostFigures, String)>>,
}

impl Exposition {
    pub fn new(host: &str, agent: Arc<AgentMetrics>) -> Exposition {
        Exposition {
            host: host.to_owned(),
            agent,
            stable: Mutex::new(None),
        }
    }

    /// The text for `figures` (gathered from memory at this scrape).
    pub fn text(&self, figures: &HostFigures) -> String {
        let shown = stable_part(figures);
        let mut stable = self.stable.lock().unwrap_or_else(PoisonError::into_inner);
        if !matches!(&*stable, Some((last, _)) if *last == shown) {
            let text = encode(&self.registry(stable_families(figures)));
            *stable = Some((shown, text));
        }
        let text = &stable.as_ref().expect("encoded above").1;
        let mut out = String::with_capacity(text.len() + 32 * 1024);
        out.push_str(text);
        drop(stable);
        let mut live = self.registry(live_families(figures));
        live.register(
            "reconcile_duration_seconds",
            "How long reconciles took (observe, plan and apply, all VMs)",
            self.agent.reconcile_seconds.clone(),
        );
        live.register(
            "reloads",
            "Config reloads, by result: applied, incomplete (a step failed or waits), invalid (refused)",
            self.agent.reloads.clone(),
        );
        out.push_str(&encode(&live));
        out
    }

    /// A registry with the prefix and the host label, holding `families`.
    fn registry(&self, families: Vec<Family>) -> Registry {
        let host_label = (Cow::Borrowed("host"), Cow::Owned(self.host.clone()));
        let mut registry = Registry::with_prefix_and_labels("plasmavmc", [host_label].into_iter());
        registry.register_collector(Box::new(Families(families)));
        registry
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{
        AgedSample, ChainfireFigures, DiskCounters, NicCounters, ProcessFigures, VmSample,
    };

    fn vm(name: &str, state: VmState, sample: Option<VmSample>) -> VmFigures {
        VmFigures {
            name: name.into(),
            org: "acme".into(),
            project: "web".into(),
            state,
            restarts: 2,
            pending: 1,
            ha_lock_held: None,
            qmp_commands: 40,
            qmp_errors: 3,
            qmp_timeouts: 1,
            uptime_seconds: sample.as_ref().map(|_| 12.5),
            sample: sample.map(|sample| AgedSample {
                sample,
                age_seconds: 0.25,
            }),
        }
    }

    fn running_sample() -> VmSample {
        VmSample {
            vcpus: 2,
            memory_bytes: 256 << 20,
            disks: [(
                "root".to_owned(),
                DiskCounters {
                    read_bytes: 4096,
                    written_bytes: 8192,
                    reads: 1,
                    writes: 2,
                    flushes: 1,
                    read_time_ns: 1_500_000,
                    write_time_ns: 3_000_000_000,
                    flush_time_ns: 0,
                },
            )]
            .into(),
            nics: [(
                "eth0".to_owned(),
                NicCounters {
                    tap: "tap-web0".into(),
                    receive_bytes: 100,
                    transmit_bytes: 200,
                    receive_packets: 3,
                    transmit_packets: 4,
                },
            )]
            .into(),
            process: Some(ProcessFigures {
                cpu_seconds: 7.25,
                resident_bytes: 50 << 20,
            }),
        }
    }

    fn scrape(figures: HostFigures) -> String {
        let agent = AgentMetrics::default();
        agent.observe_reconcile(0.003);
        agent.count_reload(ReloadResult::Applied);
        Exposition::new("h1", Arc::new(agent)).text(&figures)
    }

    #[test]
    fn a_running_vm_has_every_figure_with_its_labels() {
        let text = scrape(HostFigures {
            vms: vec![vm("web", VmState::Running, Some(running_sample()))],
            chainfire: None,
        });
        let labels = r#"host="h1",vm="web",org="acme",project="web""#;
        for line in [
            format!(r#"plasmavmc_vm_state{{{labels},state="running"}} 1"#),
            format!(r#"plasmavmc_vm_state{{{labels},state="stopped"}} 0"#),
            format!("plasmavmc_vm_vcpus{{{labels}}} 2"),
            format!("plasmavmc_vm_memory_bytes{{{labels}}} 268435456"),
            format!("plasmavmc_vm_restarts_total{{{labels}}} 2"),
            format!("plasmavmc_vm_uptime_seconds{{{labels}}} 12.5"),
            format!("plasmavmc_vm_pending_changes{{{labels}}} 1"),
            format!("plasmavmc_vm_qmp_commands_total{{{labels}}} 40"),
            format!("plasmavmc_vm_qmp_errors_total{{{labels}}} 3"),
            format!("plasmavmc_vm_qmp_timeouts_total{{{labels}}} 1"),
            format!("plasmavmc_vm_sample_age_seconds{{{labels}}} 0.25"),
            format!("plasmavmc_vm_cpu_seconds_total{{{labels}}} 7.25"),
            format!("plasmavmc_vm_resident_memory_bytes{{{labels}}} 52428800"),
            format!(r#"plasmavmc_vm_disk_written_bytes_total{{{labels},disk="root"}} 8192"#),
            format!(r#"plasmavmc_vm_disk_write_time_seconds_total{{{labels},disk="root"}} 3.0"#),
            format!(r#"plasmavmc_vm_disk_read_time_seconds_total{{{labels},disk="root"}} 0.0015"#),
            format!(
                r#"plasmavmc_vm_network_receive_bytes_total{{{labels},nic="eth0",tap="tap-web0"}} 100"#
            ),
            "plasmavmc_reloads_total{host=\"h1\",result=\"applied\"} 1".to_owned(),
            "plasmavmc_reconcile_duration_seconds_count{host=\"h1\"} 1".to_owned(),
            "# TYPE plasmavmc_vm_disk_reads_completed_total counter".to_owned(),
            "# TYPE plasmavmc_reconcile_duration_seconds histogram".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("chainfire"), "standalone: {text}");
        assert!(!text.contains("ha_lock"), "not an HA VM: {text}");
    }

    #[test]
    fn a_stopped_vm_has_its_state_but_no_qemu_figures() {
        let stopped = HostFigures {
            vms: vec![vm("db", VmState::Stopped, None)],
            chainfire: None,
        };
        let families = stable_families(&stopped);
        let names: Vec<&str> = families.iter().map(|f| f.name).collect();
        assert_eq!(names, ["vm_state", "vm_restarts", "vm_pending_changes"]);
        let live = live_families(&stopped);
        let names: Vec<&str> = live.iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            ["vm_qmp_commands", "vm_qmp_errors", "vm_qmp_timeouts"]
        );
        let state = &families[0];
        assert_eq!(state.series.len(), STATES.len());
        let on: Vec<&Series> = state
            .series
            .iter()
            .filter(|s| s.value == Value::Int(1))
            .collect();
        assert_eq!(on.len(), 1);
        assert!(on[0].labels.contains(&("state", "stopped".to_owned())));
    }

    #[test]
    fn chainfire_and_ha_figures_show_when_there_are_some() {
        let mut ha = vm("ha1", VmState::Running, Some(running_sample()));
        ha.ha_lock_held = Some(true);
        let text = scrape(HostFigures {
            vms: vec![ha],
            chainfire: Some(ChainfireFigures {
                connected: true,
                lease_remaining_seconds: Some(8.5),
                keepalive_age_seconds: None,
            }),
        });
        for line in [
            "plasmavmc_chainfire_connected{host=\"h1\"} 1",
            "plasmavmc_chainfire_lease_remaining_seconds{host=\"h1\"} 8.5",
            "plasmavmc_vm_ha_lock_held{host=\"h1\",vm=\"ha1\",org=\"acme\",project=\"web\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(!text.contains("keepalive_age"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut odd = vm("web", VmState::Running, None);
        odd.org = "a\"b\\c".into();
        let text = scrape(HostFigures {
            vms: vec![odd],
            chainfire: None,
        });
        assert!(text.contains(r#"org="a\"b\\c""#), "{text}");
    }

    /// The stable text is kept while what it shows is the same, re-encoded as soon as it is
    /// not (a VM stopped: its state at once, its QEMU figures gone); live values are always
    /// those of the scrape.
    #[test]
    fn the_stable_text_follows_every_change_and_live_values_every_scrape() {
        let exposition = Exposition::new("h1", Arc::new(AgentMetrics::default()));
        let mut figures = HostFigures {
            vms: vec![vm("web", VmState::Running, Some(running_sample()))],
            chainfire: None,
        };
        let labels = r#"host="h1",vm="web",org="acme",project="web""#;
        let first = exposition.text(&figures);
        figures.vms[0].uptime_seconds = Some(13.5);
        figures.vms[0].qmp_commands = 44;
        figures.vms[0].sample.as_mut().unwrap().age_seconds = 1.25;
        let later = exposition.text(&figures);
        for line in [
            format!("plasmavmc_vm_uptime_seconds{{{labels}}} 13.5"),
            format!("plasmavmc_vm_qmp_commands_total{{{labels}}} 44"),
            format!("plasmavmc_vm_sample_age_seconds{{{labels}}} 1.25"),
        ] {
            assert!(later.lines().any(|l| l == line), "no {line:?} in:\n{later}");
        }
        assert_eq!(first.lines().count(), later.lines().count());

        figures.vms[0] = vm("web", VmState::Stopped, None);
        let stopped = exposition.text(&figures);
        assert!(
            stopped
                .lines()
                .any(|l| l == format!(r#"plasmavmc_vm_state{{{labels},state="stopped"}} 1"#)),
            "{stopped}"
        );
        assert!(!stopped.contains("plasmavmc_vm_vcpus"), "{stopped}");

        let mut sample = running_sample();
        sample.disks.get_mut("root").unwrap().written_bytes = 16384;
        figures.vms[0] = vm("web", VmState::Running, Some(sample));
        let written = exposition.text(&figures);
        assert!(
            written.lines().any(|l| l
                == format!(
                    r#"plasmavmc_vm_disk_written_bytes_total{{{labels},disk="root"}} 16384"#
                )),
            "{written}"
        );
    }
}
