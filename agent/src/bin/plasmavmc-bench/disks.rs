//! Disk images: the time to create a 10 GiB sparse image (the agent's own code path, `qemu-img`
//! under it), and a live grow on one real guest (TCG): `reload --wait` (the agent side: plan,
//! `block_resize`) and until the guest itself reports the new size.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use plasmavmc_agent::qemu::images;
use plasmavmc_agent::spec::{DiskCreate, DiskSpec};
use serde_json::{json, Value};

use crate::agent::cli;
use crate::agent::{plasmavmc_binary, Agent};
use crate::hotplug::{write_config, VM};
use crate::stats::Summary;

const BLKSIZE: &str = "PLASMAVMC-GUEST-BLKSIZE ";
const READY: &str = "PLASMAVMC-GUEST-READY";

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub dirs: crate::GuestDirs,
    /// Creations per format and grows.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
}

pub fn report(options: &Options) -> Result<()> {
    let work = options.dirs.work_dir.join("disks");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    for format in ["qcow2", "raw"] {
        let summary = create(&work, format, options.rounds)?;
        println!("create a 10 GiB {format:<5} image (sparse): {summary}");
    }
    let (agent_side, guest_sees) = grow(options, &work)?;
    println!("live grow, reload --wait (agent side):     {agent_side}");
    println!("live grow, until the guest sees the size:  {guest_sees}");
    Ok(())
}

/// `images::prepare` on a missing 10 GiB disk with `create = {}`, as before a VM start.
fn create(work: &Path, format: &str, rounds: usize) -> Result<Summary> {
    let runtime = tokio::runtime::Runtime::new()?;
    let qemu_img = images::qemu_img(Path::new("qemu-system-x86_64"));
    let path = work.join(format!("created.{format}"));
    let disk: DiskSpec = serde_json::from_value(json!({
        "path": path, "format": format, "sizeMiB": 10240, "create": {},
    }))?;
    assert_eq!(disk.create, Some(DiskCreate::default()));
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&path);
        let start = Instant::now();
        runtime.block_on(images::prepare(&qemu_img, "bench", &disk, None))?;
        samples.push(start.elapsed());
        let used = std::fs::metadata(&path)?.len();
        ensure!(used > 0, "no image at {}", path.display());
    }
    Ok(Summary::of(samples))
}

/// Grows a 64 MiB disk by 64 MiB per round on a running guest.
fn grow(options: &Options, work: &Path) -> Result<(Summary, Summary)> {
    let binary = plasmavmc_binary()?;
    let (state_dir, run_dir) = crate::agent::agent_dirs(work)?;
    let guest = |file: &str| options.dirs.guest_dir.join(file);
    let vm = |size_mib: u64| -> Value {
        json!({
            "vcpus": 1, "memoryMiB": 128, "accel": "tcg", "machine": "q35",
            "kernel": guest("vmlinuz"), "initrd": guest("initramfs.cpio.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1", "restartPolicy": "never",
            "disks": {"data": {"path": "@WORK@/grown.qcow2", "format": "qcow2",
                               "sizeMiB": size_mib, "create": {}, "deleteOnRemove": true}},
        })
    };
    let config = work.join("desired.json");
    write_config(&config, work, &vm(64))?;
    let agent = Agent::spawn(
        &binary,
        &config,
        &state_dir,
        &run_dir,
        None,
        &["--stop-timeout", "1"],
    )?;
    let console = run_dir.join("vms").join(VM).join("console.log");
    wait_until(|| Ok(std::fs::read_to_string(&console)?.contains(READY)))?;
    wait_until(|| Ok(latest_size(&console)?.is_some()))?;
    let (mut agent_side, mut guest_sees) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds as u64 {
        let size_mib = 64 + 64 * round;
        write_config(&config, work, &vm(size_mib))?;
        let start = Instant::now();
        cli(&binary, &run_dir, &["reload", "--wait"])?;
        agent_side.push(start.elapsed());
        wait_until(|| Ok(latest_size(&console)? == Some(size_mib * 2048)))?;
        guest_sees.push(start.elapsed());
    }
    let _ = cli(&binary, &run_dir, &["stop", VM]);
    drop(agent);
    Ok((Summary::of(agent_side), Summary::of(guest_sees)))
}

/// The size (sectors) the guest reports for its only virtio disk, from its latest BLKSIZE line.
fn latest_size(console: &Path) -> Result<Option<u64>> {
    let text = std::fs::read_to_string(console)?;
    // The guest's console shell may have printed its prompt first on the same line.
    let Some(line) = text
        .lines()
        .rev()
        .find_map(|l| l.find(BLKSIZE).map(|at| &l[at + BLKSIZE.len()..]))
    else {
        return Ok(None);
    };
    Ok(line
        .split(',')
        .find_map(|item| item.split_once(':'))
        .and_then(|(_, sectors)| sectors.trim().parse().ok()))
}

fn wait_until(done: impl Fn() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !done().unwrap_or(false) {
        ensure!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
