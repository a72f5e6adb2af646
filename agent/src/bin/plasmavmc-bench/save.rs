//! Managed save and host shutdown.
//!
//! - Save and restore of one real guest (the test guest, TCG, 256 MiB by default): `plasmavmc
//!   save` and `plasmavmc start` (which restores) as the operator sees them, against a boot of
//!   the same guest (`start` until the guest prints its boot marker).
//! - Host shutdown of N guest-less VMs that ignore ACPI, as a hung guest would: `plasmavmc
//!   shutdown-host` (all in parallel) against `plasmavmc stop` of one VM after the other.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;

use crate::adopt::{kill_vms, write_config};
use crate::agent::{pids_in_state, plasmavmc_binary, Agent};
use crate::stats::Summary;

const VM: &str = "bench";
const BOOT_MARKER: &str = "PLASMAVMC-GUEST-READY";

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub dirs: crate::GuestDirs,
    /// Memory of the saved guest.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Save/restore rounds (boots: at most 3).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// VMs taken down by the host-shutdown measurement.
    #[arg(long, default_value_t = 10)]
    pub shutdown_vms: usize,
    /// The agent's --stop-timeout there (each VM ignores ACPI, so each waits this long).
    #[arg(long, default_value_t = 2)]
    pub stop_timeout: u64,
}

pub fn report(options: &Options) -> Result<()> {
    let binary = plasmavmc_binary()?;
    let figures = save_restore(&binary, options)?;
    println!(
        "save/restore, {} MiB guest (TCG), {} rounds; stream {} MiB",
        options.memory_mib, options.rounds, figures.stream_mib
    );
    println!("  save    {}", figures.save);
    println!("  restore {}", figures.restore);
    println!("  boot    {}", figures.boot);
    println!(
        "  restore vs boot: {:.1}x faster (medians)",
        figures.boot.median.as_secs_f64() / figures.restore.median.as_secs_f64()
    );
    let (parallel, sequence) = shutdown(&binary, options)?;
    println!(
        "host shutdown, {} VMs ignoring ACPI, stop timeout {} s: in parallel (shutdown-host) {:.2} s, in sequence (stop one by one) {:.2} s",
        options.shutdown_vms,
        options.stop_timeout,
        parallel.as_secs_f64(),
        sequence.as_secs_f64()
    );
    Ok(())
}

struct SaveFigures {
    save: Summary,
    restore: Summary,
    boot: Summary,
    stream_mib: u64,
}

fn save_restore(binary: &Path, options: &Options) -> Result<SaveFigures> {
    let work = fresh_dir(&options.dirs.work_dir.join("save"))?;
    let guest = |file: &str| options.dirs.guest_dir.join(file);
    let vm = json!({
        "vcpus": 1, "memoryMiB": options.memory_mib, "accel": "tcg", "machine": "q35",
        "kernel": guest("vmlinuz"), "initrd": guest("initramfs.cpio.gz"),
        "cmdline": "console=ttyS0 quiet panic=-1", "restartPolicy": "never",
    });
    let config = write_desired(&work, json!({ VM: vm }))?;
    let host = Host::start(binary, &work, &config, &["--stop-timeout", "1"])?;
    let console = host.run_dir.join("vms").join(VM).join("console.log");
    let booted = || std::fs::read_to_string(&console).is_ok_and(|c| c.contains(BOOT_MARKER));
    host.agent.wait_for(Duration::from_secs(180), |s| {
        s["vms"][VM]["state"] == "running"
    })?;
    wait_until(booted, "the first boot")?;

    let (mut saves, mut restores, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    let mut stream_mib = 0;
    for _ in 0..options.rounds {
        saves.push(timed(|| host.cli(&["save", VM]))?);
        let record = host.state_dir.join("saved").join(VM).join("record.json");
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(record)?)?;
        stream_mib = record["bytes"].as_u64().unwrap_or(0) >> 20;
        restores.push(timed(|| host.cli(&["start", VM]))?);
        ensure!(!booted(), "the restored guest booted again");
    }
    for _ in 0..options.rounds.min(3) {
        host.cli(&["stop", VM])?;
        let started = Instant::now();
        host.cli(&["start", VM])?;
        wait_until(booted, "a boot")?;
        boots.push(started.elapsed());
    }
    host.cli(&["stop", VM])?;
    Ok(SaveFigures {
        save: Summary::of(saves),
        restore: Summary::of(restores),
        boot: Summary::of(boots),
        stream_mib,
    })
}

/// (parallel, sequence) wall times to take `shutdown_vms` running VMs down.
fn shutdown(binary: &Path, options: &Options) -> Result<(Duration, Duration)> {
    let n = options.shutdown_vms;
    let timeout = options.stop_timeout.to_string();
    let mut took = Vec::new();
    for parallel in [true, false] {
        let work = fresh_dir(&options.dirs.work_dir.join("shutdown"))?;
        // Guest-less: SeaBIOS waits for a boot disk and ignores ACPI, as a hung guest would.
        let names: Vec<String> = (0..n).map(|i| format!("vm{i}")).collect();
        let config = write_config(&work, &names)?;
        let host = Host::start(binary, &work, &config, &["--stop-timeout", &timeout])?;
        let running = host
            .agent
            .wait_for(Duration::from_secs(60 + 3 * n as u64), |s| {
                pids_in_state(s, "running").len() == n
            })?;
        let pids: Vec<u64> = pids_in_state(&running, "running")
            .into_iter()
            .map(|(_, pid)| pid)
            .collect();
        let started = Instant::now();
        if parallel {
            host.cli(&["shutdown-host", "--timeout", "600"])?;
        } else {
            for i in 0..n {
                host.cli(&["stop", &format!("vm{i}")])?;
            }
        }
        took.push(started.elapsed());
        kill_vms(pids.iter());
    }
    Ok((took[0], took[1]))
}

/// An agent on a work dir of its own.
struct Host {
    binary: PathBuf,
    agent: Agent,
    state_dir: PathBuf,
    run_dir: PathBuf,
}

impl Host {
    fn start(binary: &Path, work: &Path, config: &Path, flags: &[&str]) -> Result<Self> {
        let (state_dir, run_dir) = crate::agent::agent_dirs(work)?;
        let agent = Agent::spawn(binary, config, &state_dir, &run_dir, None, flags)?;
        agent.wait_for(Duration::from_secs(60), |_| true)?;
        Ok(Self {
            binary: binary.to_owned(),
            agent,
            state_dir,
            run_dir,
        })
    }

    fn cli(&self, args: &[&str]) -> Result<()> {
        crate::agent::cli(&self.binary, &self.run_dir, args)
    }
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

fn wait_until(done: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done() {
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(dir.to_owned())
}

fn write_desired(dir: &Path, vms: serde_json::Value) -> Result<PathBuf> {
    let config = dir.join("desired.json");
    let doc = json!({"version": 1, "vms": vms});
    std::fs::write(&config, serde_json::to_vec_pretty(&doc)?)?;
    Ok(config)
}
