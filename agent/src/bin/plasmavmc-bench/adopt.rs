//! Re-adoption: how long a restarted agent takes to take over N QEMUs that kept running, and
//! proof that it restarted none of them (same PIDs). Also the agent's RSS once it holds them.
//!
//! The VMs are guest-less (SeaBIOS finds no bootable disk and waits), which costs the host almost
//! nothing, so N can be 50 on a small machine; adoption does not depend on what the guest runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::agent::{pids_in_state, plasmavmc_binary, Agent};

pub struct Adoption {
    pub vms: usize,
    /// From spawning the new agent until its status shows every VM running on its old PID.
    pub took: Duration,
    pub restarted: usize,
    pub rss_kib: u64,
}

pub fn run(vms: usize, work: &Path) -> Result<Adoption> {
    let binary = plasmavmc_binary()?;
    let dir = work.join(format!("adopt-{vms}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (state_dir, run_dir) = crate::agent::agent_dirs(&dir)?;
    let names: Vec<String> = (0..vms).map(|i| format!("adopt{i}")).collect();
    let config = write_config(&dir, &names)?;

    let all_running = |status: &serde_json::Value| pids_in_state(status, "running").len() == vms;
    let first = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &[])?;
    let booted = first.wait_for(Duration::from_secs(60 + 3 * vms as u64), all_running)?;
    let before: BTreeMap<String, u64> = pids_in_state(&booted, "running").into_iter().collect();
    first.kill_hard()?;

    let start = Instant::now();
    let second = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &[])?;
    let adopted = second.wait_for(Duration::from_secs(60), all_running)?;
    let took = start.elapsed();
    let after: BTreeMap<String, u64> = pids_in_state(&adopted, "running").into_iter().collect();
    let restarted = before
        .iter()
        .filter(|(vm, pid)| after.get(*vm) != Some(pid))
        .count();
    let rss_kib = second.rss_kib()?;

    drop(second);
    kill_vms(before.values());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Adoption {
        vms,
        took,
        restarted,
        rss_kib,
    })
}

/// Small guest-less VMs named `names`, sharing one read-only blank boot disk.
pub fn write_config(dir: &Path, names: &[String]) -> Result<std::path::PathBuf> {
    let blank = dir.join("blank.raw");
    std::fs::File::create(&blank)?.set_len(1 << 20)?;
    let declared: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|name| {
            let vm = serde_json::json!({
                "vcpus": 1, "memoryMiB": 32, "machine": "pc", "accel": "tcg",
                "bootDisk": "blank", "consoleLog": false, "restartPolicy": "never",
                "disks": {"blank": {"path": blank, "format": "raw", "readOnly": true}},
            });
            (name.clone(), vm)
        })
        .collect();
    let config = dir.join("desired.json");
    let doc = serde_json::json!({"version": 1, "vms": declared});
    std::fs::write(&config, serde_json::to_vec_pretty(&doc)?)?;
    Ok(config)
}

pub fn kill_vms<'a>(pids: impl Iterator<Item = &'a u64>) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Prints one line per N.
pub fn report(counts: &[usize], work: &Path) -> Result<()> {
    for &vms in counts {
        let adoption = run(vms, work).with_context(|| format!("adoption bench with {vms} VMs"))?;
        println!(
            "adopt {:>3} running VMs: {:>9} ms, {} restarted, agent RSS {:.1} MiB",
            adoption.vms,
            format!("{:.1}", adoption.took.as_secs_f64() * 1000.0),
            adoption.restarted,
            adoption.rss_kib as f64 / 1024.0
        );
    }
    Ok(())
}
