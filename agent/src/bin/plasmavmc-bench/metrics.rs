//! `/metrics` under many VMs: N guest-less VMs, the agent sampling every `interval`; scrapes one
//! after another, timed, with the agent's CPU time per scrape (its CPU over the scrapes, less its
//! CPU over as long a quiet spell) and the QMP commands the scrapes cost (the sum of
//! `plasmavmc_vm_qmp_commands_total` over the scrapes, against the same span without scrapes).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agent::{pids_in_state, plasmavmc_binary, Agent};
use crate::stats::{ms, Summary};

const LISTEN: &str = "127.0.0.1:19850";

#[derive(clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 50)]
    pub vms: usize,
    /// Scrapes, one after another (each timed).
    #[arg(long, default_value_t = 200)]
    pub scrapes: usize,
    /// The agent's --metrics-interval, in seconds.
    #[arg(long = "interval", value_name = "SECONDS", default_value_t = 10)]
    pub interval_seconds: u64,
    #[arg(long, default_value = crate::WORK_DIR)]
    pub work_dir: PathBuf,
}

pub fn report(options: &Options) -> Result<()> {
    let binary = plasmavmc_binary()?;
    let dir = options.work_dir.join("metrics");
    let _ = std::fs::remove_dir_all(&dir);
    let (state_dir, run_dir) = crate::agent::agent_dirs(&dir)?;
    let names: Vec<String> = (0..options.vms).map(|i| format!("vm{i}")).collect();
    let config = crate::adopt::write_config(&dir, &names)?;
    let interval = options.interval_seconds.to_string();
    let flags = ["--metrics-listen", LISTEN, "--metrics-interval", &interval];
    let agent = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &flags)?;
    let booted = agent.wait_for(Duration::from_secs(60 + 3 * options.vms as u64), |s| {
        pids_in_state(s, "running").len() == options.vms
    })?;
    let result = measure(options, &agent);
    drop(agent);
    crate::adopt::kill_vms(pids_in_state(&booted, "running").iter().map(|(_, p)| p));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(options: &Options, agent: &Agent) -> Result<()> {
    // Every VM sampled once, so each scrape carries every figure.
    let deadline = Instant::now() + Duration::from_secs(120);
    while series(&scrape()?.1, "plasmavmc_vm_sample_age_seconds") < options.vms {
        if Instant::now() > deadline {
            bail!("not every VM was sampled within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let quiet_commands = qmp_commands(&scrape()?.1);
    let quiet_cpu = cpu_seconds(agent.pid())?;
    let quiet_started = Instant::now();
    // As long a quiet spell as the scrapes take, roughly: the agent's own work meanwhile.
    std::thread::sleep(Duration::from_secs(5));
    let quiet_span = quiet_started.elapsed();
    let quiet_cpu = cpu_seconds(agent.pid())? - quiet_cpu;
    let quiet_commands = qmp_commands(&scrape()?.1) - quiet_commands;

    let before_commands = qmp_commands(&scrape()?.1);
    let before_cpu = cpu_seconds(agent.pid())?;
    let started = Instant::now();
    let mut took = Vec::with_capacity(options.scrapes);
    let mut bytes = 0;
    for _ in 0..options.scrapes {
        let (duration, body) = scrape()?;
        took.push(duration);
        bytes = body.len();
    }
    let span = started.elapsed();
    let cpu = cpu_seconds(agent.pid())? - before_cpu;
    let commands = qmp_commands(&scrape()?.1) - before_commands;
    let idle_cpu = quiet_cpu * span.as_secs_f64() / quiet_span.as_secs_f64();
    let per_scrape = (cpu - idle_cpu).max(0.0) / options.scrapes as f64;
    let summary = Summary::of(took);
    println!(
        "metrics, {} VMs ({} KiB per scrape): scrape {summary}",
        options.vms,
        bytes / 1024
    );
    println!(
        "  agent CPU per scrape: {} (CPU over the scrapes {:.3} s, quiet agent over as long {:.3} s)",
        ms(Duration::from_secs_f64(per_scrape)),
        cpu,
        idle_cpu
    );
    println!(
        "  QMP commands: {commands} during {} scrapes in {:.1} s; {quiet_commands} in {:.1} s without scrapes \
         (the sampler: 4 per VM every {} s)",
        options.scrapes,
        span.as_secs_f64(),
        quiet_span.as_secs_f64(),
        options.interval_seconds
    );
    println!("  p99 {}", ms(summary.p99));
    Ok(())
}

/// One `GET /metrics`: how long it took, and the body.
fn scrape() -> Result<(Duration, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(LISTEN).with_context(|| format!("connecting {LISTEN}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let took = started.elapsed();
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected answer: {head}");
    }
    Ok((took, body.to_owned()))
}

/// How many series of `metric` a scrape has.
fn series(body: &str, metric: &str) -> usize {
    body.lines()
        .filter(|line| line.starts_with(metric) && line[metric.len()..].starts_with('{'))
        .count()
}

/// The sum of `plasmavmc_vm_qmp_commands_total` over every VM.
fn qmp_commands(body: &str) -> u64 {
    body.lines()
        .filter(|line| line.starts_with("plasmavmc_vm_qmp_commands_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The agent's CPU time (user plus system), from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    let figures = plasmavmc_agent::metrics::sample::process_figures(&stat, ticks, 4096)
        .context("parsing the agent's /proc/PID/stat")?;
    Ok(figures.cpu_seconds)
}
