//! The metrics shell: the sampler that refreshes each VM's figures from its QEMU at a bounded
//! rate, and the gathering of everything a scrape shows from memory (see `crate::metrics` for
//! the rules, `metrics_http` for the endpoint).
//!
//! Per VM and round the sampler sends four QMP commands (`query-blockstats`,
//! `query-hotpluggable-cpus`, `query-memory-size-summary`, `info network`) and reads `/proc` and
//! `/proc/net/dev`; a VM that does not answer within `SAMPLE_TIMEOUT` keeps its previous sample, which
//! ages. Rounds start every `--metrics-interval`, however many scrapes come.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::join_all;

use super::supervisor::Daemon;
use super::vm::VmSlot;
use crate::chainfire::clock::BootTime;
use crate::metrics::{sample, AgedSample, ChainfireFigures, HostFigures, VmFigures, VmSample};
use crate::qemu::qmp::QmpCounters;
use crate::qemu::Qmp;
use crate::spec::VmSpec;

/// How long one VM's sample may take before the round goes on without it.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the metrics know of one VM: its QMP counters, its QEMU while one runs, its last sample.
#[derive(Default)]
pub struct SlotMetrics {
    pub qmp: Arc<QmpCounters>,
    target: Mutex<Option<Target>>,
    last: Mutex<Option<(Instant, VmSample)>>,
}

/// The QEMU to sample.
#[derive(Clone)]
struct Target {
    qmp: Arc<Qmp>,
    pid: u32,
    started: Instant,
}

impl SlotMetrics {
    /// A QEMU of this VM is connected: sample it from now on.
    pub fn connected(&self, qmp: &Arc<Qmp>, pid: u32, started: Instant) {
        *lock(&self.target) = Some(Target {
            qmp: Arc::clone(qmp),
            pid,
            started,
        });
        *lock(&self.last) = None;
    }

    /// Its QEMU is gone: its counters went with it.
    pub fn disconnected(&self) {
        *lock(&self.target) = None;
        *lock(&self.last) = None;
    }

    fn target(&self) -> Option<Target> {
        lock(&self.target).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Samples every VM's QEMU every `interval`, forever (a VM that does not answer holds a round up
/// by `SAMPLE_TIMEOUT` at most).
pub async fn sample_forever(daemon: Arc<Daemon>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        join_all(daemon.slots().iter().map(|slot| sample_slot(slot))).await;
    }
}

async fn sample_slot(slot: &VmSlot) {
    let Some(target) = slot.metrics.target() else {
        return;
    };
    match tokio::time::timeout(SAMPLE_TIMEOUT, read(&target)).await {
        Ok(Ok(sample)) => {
            // Still the same QEMU (it may have been replaced while this one was read).
            if slot.metrics.target().is_some_and(|t| t.pid == target.pid) {
                *lock(&slot.metrics.last) = Some((Instant::now(), sample));
            }
        }
        Ok(Err(e)) => tracing::debug!(vm = %slot.name, "metrics sample: {e:#}"),
        Err(_) => tracing::debug!(vm = %slot.name, pid = target.pid,
            "metrics sample: no answer within {SAMPLE_TIMEOUT:?}; the last sample ages"),
    }
}

/// One sample of one QEMU.
async fn read(target: &Target) -> Result<VmSample> {
    let qmp = &target.qmp;
    // One command of each at once: the connection takes them concurrently.
    let (blockstats, cpus, memory, netdevs) = futures::try_join!(
        qmp.query_blockstats(),
        qmp.query_hotpluggable_cpus(),
        qmp.query_memory_size_summary(),
        qmp.netdevs(),
    )?;
    let vcpus = cpus
        .iter()
        .filter(|cpu| cpu.qom_path.is_some())
        .map(|cpu| cpu.vcpus_count as u32)
        .sum();
    let interfaces = std::fs::read_to_string("/proc/net/dev")
        .map(|text| sample::interface_counters(&text))
        .unwrap_or_default();
    let nics = netdevs
        .iter()
        .filter_map(|(netdev, backend)| {
            let nic = crate::ids::parse_nic_netdev(netdev)?;
            let counters = interfaces.get(backend.ifname.as_deref()?)?;
            Some((nic.to_owned(), counters.clone()))
        })
        .collect();
    let process = std::fs::read_to_string(format!("/proc/{}/stat", target.pid))
        .ok()
        .and_then(|stat| sample::process_figures(&stat, *TICKS_PER_SECOND, *PAGE_SIZE));
    Ok(VmSample {
        vcpus,
        memory_bytes: memory.base_memory + memory.plugged_memory.unwrap_or(0),
        disks: sample::disk_counters(&blockstats),
        nics,
        process,
    })
}

static TICKS_PER_SECOND: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100));
static PAGE_SIZE: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096));

fn sysconf(var: nix::unistd::SysconfVar) -> Option<u64> {
    nix::unistd::sysconf(var).ok().flatten().map(|v| v as u64)
}

/// Everything a scrape shows, from memory: status snapshots, the last samples, the session's
/// state. Never waits for a VM.
pub fn figures(daemon: &Daemon) -> HostFigures {
    let now = Instant::now();
    let may_run = daemon.may_run().map(|may_run| may_run.borrow().clone());
    let vms = daemon
        .slots()
        .iter()
        .map(|slot| {
            let status = slot.status();
            let spec: Option<VmSpec> = daemon.declared_spec(&slot.name);
            let (org, project) = spec
                .as_ref()
                .map(|s| (s.org_id.clone(), s.project_id.clone()))
                .unwrap_or_default();
            let ha_lock_held = match (&spec, &may_run) {
                (Some(spec), Some(may_run)) if spec.ha.enable => {
                    let key =
                        crate::chainfire::VmKey::new(&spec.org_id, &spec.project_id, &slot.name);
                    Some(may_run.contains(&key))
                }
                _ => None,
            };
            let target = slot.metrics.target();
            let sample = lock(&slot.metrics.last)
                .as_ref()
                .map(|(taken, sample)| AgedSample {
                    sample: sample.clone(),
                    age_seconds: now.duration_since(*taken).as_secs_f64(),
                });
            VmFigures {
                name: slot.name.clone(),
                org,
                project,
                state: status.state,
                restarts: status.restarts,
                pending: status.pending.len(),
                ha_lock_held,
                qmp_commands: slot.metrics.qmp.commands(),
                qmp_errors: slot.metrics.qmp.errors(),
                qmp_timeouts: slot.metrics.qmp.timeouts(),
                uptime_seconds: target.map(|t| now.duration_since(t.started).as_secs_f64()),
                sample,
            }
        })
        .collect();
    HostFigures {
        vms,
        chainfire: daemon.chainfire_health().map(|(connected, lease)| {
            let now = BootTime::now();
            ChainfireFigures {
                connected,
                lease_remaining_seconds: lease
                    .map(|l| now.until(l.last_acked_sent + l.ttl).as_secs_f64()),
                keepalive_age_seconds: lease.map(|l| l.last_acked_sent.until(now).as_secs_f64()),
            }
        }),
    }
}

/// The `host` label: the ChainFire host id, else the host name.
pub fn host_label(chainfire_host_id: Option<&str>) -> Result<String> {
    match chainfire_host_id {
        Some(id) if !id.is_empty() => Ok(id.to_owned()),
        _ => Ok(nix::unistd::gethostname()
            .context("reading the host name for the metrics' host label")?
            .to_string_lossy()
            .into_owned()),
    }
}
