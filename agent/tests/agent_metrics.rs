//! `/metrics` against a real guest (TCG), parsed with a Prometheus text-format parser: every
//! metric docs/metrics.md lists (but the ChainFire ones) is there with its labels for a running
//! VM with a disk and a NIC; the disk's write counters grow after the guest writes; a QEMU stopped
//! with SIGSTOP does not stall a scrape (its sample ages instead), and its figures move again once
//! it runs; the NIC's counters grow both ways when the guest pings the bridge; the state changes
//! at once on a stop, a start and a QEMU killed (not at the next sample). The agent, its taps and
//! the bridge live in a network namespace of the test's own.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use harness::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;

const LISTEN: &str = "127.0.0.1:9850";
/// A scrape that waited for the stalled QEMU would take the QMP timeout (5 s) at least.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(4);
const VM_LABELS: [&str; 4] = ["host", "vm", "org", "project"];

#[test]
fn metrics_show_every_documented_figure_disk_writes_and_survive_a_stalled_qemu() {
    qemu_harness::enter_netns();
    let mut host = Host::new();
    let data = host.image("data.qcow2");
    host.write_config(json!({"web": host.vm(json!({
        "orgId": "acme", "projectId": "shop", "restartPolicy": "never",
        "disks": {"data": {"path": data, "format": "qcow2"}},
        "nics": {"eth0": {"mac": "52:54:00:12:34:56", "bridge": "br0"}},
    }))}));
    host.start_agent_with(&[
        "--stop-timeout",
        "2",
        "--metrics-listen",
        LISTEN,
        "--metrics-interval",
        "1",
    ]);
    let pid = host.wait_running("web");
    host.wait_boot("web");

    // Every documented metric, with its labels, once the first sample is in.
    let scrape = wait_scrape("the first sample of web", |s| {
        find(s, "plasmavmc_vm_sample_age_seconds", &[("vm", "web")]).is_some()
    });
    for name in documented_metrics() {
        let samples: Vec<&Sample> = scrape.samples.iter().filter(|s| s.metric == name).collect();
        assert!(
            !samples.is_empty(),
            "{name} is missing:\n{}",
            names(&scrape)
        );
        if name.starts_with("plasmavmc_vm_") {
            let web = samples
                .iter()
                .find(|s| s.labels.get("vm") == Some("web"))
                .unwrap_or_else(|| panic!("{name} has no series for web"));
            for label in VM_LABELS {
                assert!(
                    web.labels.get(label).is_some(),
                    "{name} lacks {label}: {web:?}"
                );
            }
            assert_eq!(web.labels.get("org"), Some("acme"), "{name}");
            assert_eq!(web.labels.get("project"), Some("shop"), "{name}");
            if name.starts_with("plasmavmc_vm_disk_") {
                assert_eq!(web.labels.get("disk"), Some("data"), "{name}");
            }
            if name.starts_with("plasmavmc_vm_network_") {
                assert_eq!(web.labels.get("nic"), Some("eth0"), "{name}");
                assert!(web.labels.get("tap").is_some(), "{name}");
            }
        } else {
            assert!(
                samples[0].labels.get("host").is_some(),
                "{name}: {:?}",
                samples[0]
            );
        }
    }
    let running = find(
        &scrape,
        "plasmavmc_vm_state",
        &[("vm", "web"), ("state", "running")],
    );
    assert_eq!(running.map(value), Some(1.0));
    assert_eq!(
        find(&scrape, "plasmavmc_vm_vcpus", &[("vm", "web")]).map(value),
        Some(1.0)
    );
    assert_eq!(
        find(&scrape, "plasmavmc_vm_memory_bytes", &[("vm", "web")]).map(value),
        Some(128.0 * 1024.0 * 1024.0)
    );

    // The guest writes 1 MiB to its data disk (vda): the counters follow.
    let written = |s: &Scrape| {
        find(
            s,
            "plasmavmc_vm_disk_written_bytes_total",
            &[("disk", "data")],
        )
        .map_or(0.0, value)
    };
    let before = written(&scrape);
    host.in_guest(
        "web",
        "dd if=/dev/urandom of=/dev/vda bs=64k count=16 conv=fsync",
    );
    let after = wait_scrape("the guest's writes in the disk counters", |s| {
        written(s) >= before + 1024.0 * 1024.0
    });
    let writes = find(
        &after,
        "plasmavmc_vm_disk_writes_completed_total",
        &[("disk", "data")],
    );
    assert!(writes.map_or(0.0, value) > 0.0);

    // A stalled QEMU: every scrape still answers at once, with the sample aging.
    let age = |s: &Scrape| find(s, "plasmavmc_vm_sample_age_seconds", &[("vm", "web")]).map(value);
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let stalled = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let scrape = get_metrics()?;
            if age(&scrape).is_some_and(|age| age > 4.0) {
                return Ok(scrape);
            }
            if Instant::now() > deadline {
                return Err(format!("the sample never aged:\n{}", names(&scrape)));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })();
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    let stalled = stalled.unwrap_or_else(|e| panic!("while QEMU was stopped: {e}"));
    assert!(find(
        &stalled,
        "plasmavmc_vm_disk_written_bytes_total",
        &[("disk", "data")]
    )
    .is_some());
    wait_scrape("a fresh sample after SIGCONT", |s| {
        age(s).is_some_and(|age| age < 3.0)
    });

    // The guest pings the bridge's address (in this test's network namespace): its NIC's
    // counters grow both ways.
    let status = std::process::Command::new("ip")
        .args(["addr", "add", "10.77.0.1/24", "dev", "br0"])
        .status()
        .expect("ip");
    assert!(status.success(), "an address on br0");
    let nic = |s: &Scrape, metric: &str| {
        find(s, metric, &[("vm", "web"), ("nic", "eth0")]).map_or(0.0, value)
    };
    let before = get_metrics().unwrap();
    let ping = host.in_guest(
        "web",
        "ip link set eth0 up; ip addr add 10.77.0.2/24 dev eth0; ping -c 3 -W 5 10.77.0.1",
    );
    assert!(
        ping.contains("3 packets received"),
        "the bridge answered:\n{ping}"
    );
    wait_scrape("the pings in the NIC counters", |s| {
        ["receive", "transmit"].iter().all(|way| {
            let (bytes, packets) = (
                format!("plasmavmc_vm_network_{way}_bytes_total"),
                format!("plasmavmc_vm_network_{way}_packets_total"),
            );
            nic(s, &bytes) > nic(&before, &bytes)
                && nic(s, &packets) >= nic(&before, &packets) + 3.0
        })
    });

    // The state follows what the agent does and learns at once, not at the next sample.
    let state = |s: &Scrape| {
        let on = s.samples.iter().find(|x| {
            x.metric == "plasmavmc_vm_state" && x.labels.get("vm") == Some("web") && value(x) == 1.0
        });
        on.and_then(|x| x.labels.get("state")).map(str::to_owned)
    };
    host.cli(&["stop", "web"]).expect_code(0, "stop");
    assert_eq!(state(&get_metrics().unwrap()).as_deref(), Some("stopped"));
    host.cli(&["start", "web"]).expect_code(0, "start");
    assert_eq!(state(&get_metrics().unwrap()).as_deref(), Some("running"));
    let events = Follower::events_from_now(&host);
    kill_9(host.wait_running("web"));
    events.wait_for("failed", |e| e["event"] == "failed" && e["vm"] == "web");
    let failed = get_metrics().unwrap();
    assert_eq!(state(&failed).as_deref(), Some("failed"));
    assert!(
        find(&failed, "plasmavmc_vm_vcpus", &[("vm", "web")]).is_none(),
        "its QEMU's figures went with it:\n{}",
        names(&failed)
    );
}

/// Metric names in docs/metrics.md's tables, but the ChainFire ones (this agent is standalone).
fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    let standalone = doc.split("With ChainFire").next().unwrap();
    let names: BTreeSet<String> = standalone
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .filter(|name| name.starts_with("plasmavmc_"))
        .map(str::to_owned)
        .collect();
    assert!(names.len() > 20, "docs/metrics.md lists {names:?}");
    names
}

/// Every metric the example Grafana dashboard queries is a documented one.
#[test]
fn the_grafana_dashboard_queries_documented_metrics() {
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/grafana-dashboard.json"
    ))
    .expect("docs/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(metric) = word.strip_prefix("plasmavmc_") {
                    let metric = format!("plasmavmc_{}", metric.trim_end_matches("_bucket"));
                    assert!(
                        doc.contains(&format!("`{metric}`")),
                        "{metric} is not in docs/metrics.md"
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried > 10, "{queried}");
}

/// GET /metrics, parsed; Err when the endpoint does not answer within SCRAPE_TIMEOUT.
fn get_metrics() -> Result<Scrape, String> {
    let mut stream = TcpStream::connect(LISTEN).map_err(|e| format!("connect {LISTEN}: {e}"))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("no full answer within {SCRAPE_TIMEOUT:?}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") || !head.contains("text/plain; version=0.0.4") {
        return Err(format!("unexpected answer:\n{head}"));
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).map_err(|e| format!("parse: {e}"))
}

fn wait_scrape(what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + AGENT;
    loop {
        let scrape = get_metrics().unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}:\n{}",
            names(&scrape)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn find<'a>(scrape: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

fn value(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        _ => panic!("not a plain value: {sample:?}"),
    }
}

fn names(scrape: &Scrape) -> String {
    scrape
        .samples
        .iter()
        .map(|s| format!("{} {:?} {:?}", s.metric, s.labels, s.value))
        .collect::<Vec<_>>()
        .join("\n")
}
