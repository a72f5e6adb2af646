//! HA failover end to end: two real agents with ChainFire (a loopback etcd) declare one HA VM
//! (guest-less QEMU, as in the adoption bench); the holder's agent is killed -9 and not
//! restarted. From the kill: the holder's QEMU is gone (its fence guard killed it), then the
//! standby's QEMU is up. Both hosts are polled every 5 ms; a moment with two copies alive fails
//! the bench.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use plasmavmc_agent::paths::RunDir;
use plasmavmc_agent::qemu::find_running;

use crate::agent::{plasmavmc_binary, Agent};
use crate::local_etcd::LocalEtcd;
use crate::stats::Summary;

const WAIT: Duration = Duration::from_secs(60);

/// One kill of the holder's agent.
pub struct Round {
    /// Until the holder's QEMU was gone.
    pub fenced: Duration,
    /// Until the standby's QEMU was up (launched; its guest then boots).
    pub taken_over: Duration,
}

struct Side {
    agent: Agent,
    run_dir: RunDir,
}

pub fn run(etcd_bin: Option<&Path>, ttl: u64, round: u32, work: &Path) -> Result<Round> {
    let binary = plasmavmc_binary()?;
    let etcd = LocalEtcd::start(etcd_bin, 1)?;
    let dir = work.join(format!("ha-{ttl}-{round}"));
    let _ = std::fs::remove_dir_all(&dir);
    let vm = "ha".to_owned();
    let ttl_flag = ttl.to_string();
    let endpoint = etcd.endpoint(0);
    let start = |host: &str| -> Result<Side> {
        let host_dir = dir.join(host);
        let (state_dir, run_dir) = crate::agent::agent_dirs(&host_dir)?;
        let config = write_config(&host_dir, &vm)?;
        let flags = crate::agent::cluster_flags(&endpoint, host, &ttl_flag);
        let agent = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &flags)?;
        Ok(Side {
            agent,
            run_dir: RunDir::new(run_dir),
        })
    };
    let holder = start("holder")?;
    holder
        .agent
        .wait_for(WAIT, |s| s["vms"]["ha"]["state"] == "running")?;
    let standby = start("standby")?;
    standby.agent.wait_for(WAIT, |s| {
        s["vms"]["ha"]["heldDown"] == "HA: another host holds it (holder)"
    })?;
    let holder_qemu = running(&holder.run_dir, &vm).context("the holder's QEMU")?;

    let Side { agent, run_dir } = holder;
    agent.kill_hard()?;
    let killed = Instant::now();
    let mut fenced = None;
    let taken_over = loop {
        let (on_holder, on_standby) = (running(&run_dir, &vm), running(&standby.run_dir, &vm));
        if on_holder.is_some() && on_standby.is_some() {
            bail!("two copies of the HA VM alive at once");
        }
        if on_holder.is_none() && fenced.is_none() {
            fenced = Some(killed.elapsed());
        }
        if on_standby.is_some() {
            break killed.elapsed();
        }
        if killed.elapsed() > WAIT {
            bail!("the standby never took the VM over");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder_qemu as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let standby_qemu = running(&standby.run_dir, &vm);
    drop(standby);
    if let Some(pid) = standby_qemu {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Round {
        fenced: fenced.context("the holder's QEMU outlived the takeover")?,
        taken_over,
    })
}

/// The VM's QEMU on that host, if one runs.
fn running(run_dir: &RunDir, vm: &str) -> Option<u32> {
    find_running(vm, &run_dir.vm(vm))
        .ok()
        .flatten()
        .map(|q| q.pid)
}

/// One guest-less HA VM (SeaBIOS finds no bootable disk and waits).
fn write_config(dir: &Path, vm: &str) -> Result<PathBuf> {
    let blank = dir.join("blank.raw");
    std::fs::File::create(&blank)?.set_len(1 << 20)?;
    let spec = serde_json::json!({
        "vcpus": 1, "memoryMiB": 32, "machine": "pc", "accel": "tcg",
        "bootDisk": "blank", "consoleLog": false, "ha": {"enable": true},
        "disks": {"blank": {"path": blank, "format": "raw", "readOnly": true}},
    });
    let config = dir.join("desired.json");
    let doc = serde_json::json!({"version": 1, "vms": {vm: spec}});
    std::fs::write(&config, serde_json::to_vec_pretty(&doc)?)?;
    Ok(config)
}

/// Two lines per TTL.
pub fn report(etcd_bin: Option<&Path>, ttls: &[u64], rounds: u32, work: &Path) -> Result<()> {
    for &ttl in ttls {
        let results = (0..rounds)
            .map(|round| run(etcd_bin, ttl, round, work))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("HA bench at TTL {ttl} s"))?;
        let fenced = Summary::of(results.iter().map(|r| r.fenced).collect());
        let taken_over = Summary::of(results.iter().map(|r| r.taken_over).collect());
        println!(
            "holder agent kill -9, TTL {ttl} s: holder's QEMU fenced by its guard after {fenced}"
        );
        println!("holder agent kill -9, TTL {ttl} s: standby's QEMU up after {taken_over}");
    }
    Ok(())
}
