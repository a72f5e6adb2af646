//! ChainFire measurements, each against its own loopback etcd: host-failure
//! detection and HA failover after a holder's kill -9 (at a given TTL), store writes per minute
//! in steady state, and how long a state change takes to reach another agent's view.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use plasmavmc_agent::chainfire::records::{
    self, HandleRecord, LocalVm, SpecSummary, VmRecord, STATE_UNKNOWN,
};
use plasmavmc_agent::chainfire::session::Session;
use plasmavmc_agent::chainfire::{ChainFireConfig, VmKey};

use crate::local_etcd::LocalEtcd;
use crate::stats::Summary;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `etcd` binary; from PATH when `None`.
    pub etcd_bin: Option<PathBuf>,
    /// TTLs for the detection and failover figures.
    pub ttls: Vec<u64>,
    /// Kills per TTL for detection and failover.
    pub rounds: u32,
    pub steady_vms: u32,
    pub steady_window: Duration,
    pub latency_samples: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            etcd_bin: None,
            ttls: vec![3, 10],
            rounds: 5,
            steady_vms: 50,
            steady_window: Duration::from_secs(30),
            latency_samples: 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ChainFireFigures {
    /// (TTL, kill -9 of an agent → its VMs marked `unknown` by another agent), per round.
    pub detection: Vec<(Duration, Vec<Duration>)>,
    /// (TTL, kill -9 of an HA holder → the standby may run the VM), per round.
    pub failover: Vec<(Duration, Vec<Duration>)>,
    /// Store revisions per minute with `steady_vms` VMs re-synced every second, nothing changing.
    pub steady_writes_per_min: f64,
    /// One VM's state change: `sync` on one agent → visible in another agent's view.
    pub publish_latency: Vec<Duration>,
}

pub async fn run(options: &BenchOptions) -> anyhow::Result<ChainFireFigures> {
    let etcd_bin = options.etcd_bin.as_deref();
    let mut figures = ChainFireFigures {
        detection: vec![],
        failover: vec![],
        steady_writes_per_min: 0.0,
        publish_latency: vec![],
    };
    for &ttl in &options.ttls {
        let ttl = Duration::from_secs(ttl);
        let (mut detection, mut failover) = (vec![], vec![]);
        for _ in 0..options.rounds {
            detection.push(detection_time(etcd_bin, ttl).await?);
            failover.push(failover_time(etcd_bin, ttl).await?);
        }
        figures.detection.push((ttl, detection));
        figures.failover.push((ttl, failover));
    }
    figures.steady_writes_per_min =
        steady_writes_per_min(etcd_bin, options.steady_vms, options.steady_window).await?;
    figures.publish_latency = publish_latency(etcd_bin, options.latency_samples).await?;
    Ok(figures)
}

/// kill -9 of an agent (its session dropped, lease not revoked) → another agent marks its VM
/// `unknown`.
pub async fn detection_time(etcd_bin: Option<&Path>, ttl: Duration) -> anyhow::Result<Duration> {
    let etcd = LocalEtcd::start(etcd_bin, 1)?;
    let observer = Session::start(config(&etcd, "observer", ttl))?;
    let victim = Session::start(config(&etcd, "victim", ttl))?;
    victim.sync(one_vm("vm", "running", false));
    let view = observer.cluster();
    wait_until("the victim's VM is seen", || {
        view.borrow()
            .vms
            .get(&key("vm"))
            .is_some_and(|r| r.value.state == "running")
    })
    .await?;
    let killed = Instant::now();
    drop(victim);
    wait_until("the victim's VM is marked unknown", || {
        view.borrow()
            .vms
            .get(&key("vm"))
            .is_some_and(|r| r.value.state == STATE_UNKNOWN)
    })
    .await?;
    Ok(killed.elapsed())
}

/// kill -9 of the HA holder → the standby's `may_run` holds the VM.
pub async fn failover_time(etcd_bin: Option<&Path>, ttl: Duration) -> anyhow::Result<Duration> {
    let etcd = LocalEtcd::start(etcd_bin, 1)?;
    let holder = Session::start(config(&etcd, "holder", ttl))?;
    holder.sync(one_vm("ha", "running", true));
    wait_until("the holder may run the VM", || {
        holder.may_run().borrow().contains(&key("ha"))
    })
    .await?;
    let standby = Session::start(config(&etcd, "standby", ttl))?;
    standby.sync(one_vm("ha", "stopped", true));
    let standby_may_run = standby.may_run();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    drop(holder);
    wait_until("the standby may run the VM", || {
        standby_may_run.borrow().contains(&key("ha"))
    })
    .await?;
    Ok(killed.elapsed())
}

/// Revisions per minute while `vms` VMs are re-synced unchanged every second.
pub async fn steady_writes_per_min(
    etcd_bin: Option<&Path>,
    vms: u32,
    window: Duration,
) -> anyhow::Result<f64> {
    let etcd = LocalEtcd::start(etcd_bin, 1)?;
    let session = Session::start(config(&etcd, "host", Duration::from_secs(3)))?;
    let picture = || -> BTreeMap<VmKey, LocalVm> {
        (0..vms)
            .map(|i| local_vm(&format!("vm{i}"), "running", false))
            .collect()
    };
    session.sync(picture());
    let view = session.cluster();
    wait_until("every VM published", || {
        view.borrow().handles.len() == vms as usize
    })
    .await?;
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None).await?;
    let before = revision(&mut client).await?;
    let started = Instant::now();
    while started.elapsed() < window {
        session.sync(picture());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let writes = revision(&mut client).await? - before;
    Ok(writes as f64 * 60.0 / started.elapsed().as_secs_f64())
}

/// `sync` of a changed state on one agent → the change in another agent's view.
pub async fn publish_latency(
    etcd_bin: Option<&Path>,
    samples: u32,
) -> anyhow::Result<Vec<Duration>> {
    let etcd = LocalEtcd::start(etcd_bin, 1)?;
    let publisher = Session::start(config(&etcd, "publisher", Duration::from_secs(3)))?;
    let observer = Session::start(config(&etcd, "observer", Duration::from_secs(3)))?;
    let view = observer.cluster();
    let mut latencies = Vec::new();
    for i in 0..=samples {
        let state = if i % 2 == 0 { "running" } else { "stopped" };
        let started = Instant::now();
        publisher.sync(one_vm("vm", state, false));
        wait_until("the change reaches the observer", || {
            view.borrow()
                .vms
                .get(&key("vm"))
                .is_some_and(|r| r.value.state == state)
        })
        .await?;
        if i > 0 {
            latencies.push(started.elapsed()); // the first one also creates the record
        }
    }
    latencies.sort();
    Ok(latencies)
}

fn config(etcd: &LocalEtcd, host: &str, ttl: Duration) -> ChainFireConfig {
    ChainFireConfig::new(etcd.endpoints(), host, ttl)
}

fn key(name: &str) -> VmKey {
    VmKey::new("bench", "bench", name)
}

fn one_vm(name: &str, state: &str, ha: bool) -> BTreeMap<VmKey, LocalVm> {
    [local_vm(name, state, ha)].into()
}

fn local_vm(name: &str, state: &str, ha: bool) -> (VmKey, LocalVm) {
    let key = key(name);
    let record = VmRecord {
        name: key.vm.clone(),
        org_id: key.org_id.clone(),
        project_id: key.project_id.clone(),
        host: String::new(),
        state: state.to_owned(),
        spec: SpecSummary {
            vcpus: 1,
            memory_mib: 256,
            disks: vec!["root".into()],
            nics: vec![],
            ha,
        },
        pending: vec![],
        last_error: None,
        updated_at: records::now(),
    };
    let handle = (state == "running").then(|| HandleRecord {
        host: String::new(),
        pid: 1,
        qmp_socket: format!("/run/{name}.qmp"),
        started_at: "2024-01-01T00:00:00Z".into(), // fixed: a QEMU starts once
    });
    (
        key,
        LocalVm {
            record,
            handle,
            wants_to_run: true,
            arriving: false,
        },
    )
}

async fn revision(client: &mut etcd_client::Client) -> anyhow::Result<i64> {
    let resp = client.get("/", None).await?;
    resp.header()
        .map(|h| h.revision())
        .context("response without header")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !check() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "bench: timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

pub fn report(options: &BenchOptions, figures: &ChainFireFigures) {
    for (ttl, took) in &figures.detection {
        println!(
            "host failure detected, TTL {ttl:?}: {}",
            Summary::of(took.clone())
        );
    }
    for (ttl, took) in &figures.failover {
        println!(
            "HA lock to the standby after holder kill -9, TTL {ttl:?}: {}",
            Summary::of(took.clone())
        );
    }
    println!(
        "store writes per minute, {} VMs in steady state: {:.2}",
        options.steady_vms, figures.steady_writes_per_min
    );
    if !figures.publish_latency.is_empty() {
        println!(
            "publish latency of a state change: {}",
            Summary::of(figures.publish_latency.clone())
        );
    }
}
