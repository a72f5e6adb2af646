//! Live migration: two real agents (hosts `a` and `b` on this machine, a loopback etcd; `b` in
//! a mount namespace of its own, so a local disk's path is another file there) move real guests
//! (the test guest, TCG) back and forth with `plasmavmc migrate --json`, which reports the
//! downtime (source paused → target running), the total time and the bytes sent.
//!
//! - an idle guest;
//! - a guest dirtying memory continuously (a shell loop writing 64 MiB to a tmpfs over and
//!   over): it converges by QEMU's auto-converge (vCPU throttling);
//! - a guest with a 1 GiB local disk (raw, filled with random data), mirrored over NBD;
//! - and, in the same run, the restart way: HA failover of a guest-less VM (holder's agent
//!   killed, TTL 3 s) until the standby's QEMU is up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::agent::{plasmavmc_binary, Agent};
use crate::local_etcd::LocalEtcd;
use crate::stats::Summary;

const BOOT: Duration = Duration::from_secs(240);

pub struct Options {
    pub guest_dir: PathBuf,
    pub work_dir: PathBuf,
    pub memory_mib: u64,
    pub rounds: usize,
}

pub fn report(options: &Options) -> Result<()> {
    let binary = plasmavmc_binary()?;
    let work = options.work_dir.join("migrate");
    let _ = std::fs::remove_dir_all(&work);
    let etcd = LocalEtcd::start(None, 1)?;
    let (a_local, b_local) = (work.join("a/local"), work.join("b/local"));
    std::fs::create_dir_all(&a_local)?;
    std::fs::create_dir_all(&b_local)?;
    let disk = a_local.join("data.raw");
    fill_random(&disk, 1 << 30)?;
    let guest = |file: &str| options.guest_dir.join(file);
    let vm = |extra: Value| {
        let mut vm = json!({
            "vcpus": 1, "memoryMiB": options.memory_mib, "accel": "tcg", "machine": "q35",
            "kernel": guest("vmlinuz"), "initrd": guest("initramfs.cpio.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1", "ha": {"enable": true},
        });
        for (key, value) in extra.as_object().unwrap() {
            vm[key] = value.clone();
        }
        vm
    };
    let vms = json!({
        "idle": vm(json!({})),
        "busy": vm(json!({})),
        "disk": vm(json!({"disks": {"data": {"path": disk, "format": "raw"}}})),
    });
    let endpoint = etcd.endpoint(0);
    let start = |host: &str, ports: &str, mount: Option<(&Path, &Path)>| -> Result<Host> {
        let dir = work.join(host);
        let (state, run) = (dir.join("state"), dir.join("run"));
        std::fs::create_dir_all(&state)?;
        std::fs::create_dir_all(&run)?;
        let config = dir.join("desired.json");
        std::fs::write(&config, json!({"version": 1, "vms": vms}).to_string())?;
        let flags = [
            "--chainfire",
            &endpoint,
            "--host-id",
            host,
            "--lease-ttl",
            "5",
            "--migration-address",
            "127.0.0.1",
            "--migration-ports",
            ports,
        ];
        let agent = match mount {
            None => Agent::spawn(&binary, &config, &state, &run, None, &flags)?,
            Some((dir, over)) => {
                Agent::spawn_mounted(&binary, &config, &state, &run, (dir, over), &flags)?
            }
        };
        Ok(Host { agent, run })
    };
    let a = start("a", "49471-49479", None)?;
    for name in ["idle", "busy", "disk"] {
        a.agent
            .wait_for(BOOT, |s| s["vms"][name]["state"] == "running")?;
        wait_console(&a.run, name, "PLASMAVMC-GUEST-READY")?;
    }
    let b = start("b", "49481-49489", Some((&b_local, &a_local)))?;
    b.agent.wait_for(BOOT, |s| {
        s["vms"]["disk"]["heldDown"] == "HA: another host holds it (a)"
    })?;
    type_into(
        &binary,
        &a.run,
        "busy",
        "mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm; \
         (while true; do dd if=/dev/zero of=/dev/shm/d bs=1M count=64 2>/dev/null; done) &",
    )?;

    let hosts = [&a, &b];
    for (name, what) in [
        ("idle", format!("idle {} MiB guest", options.memory_mib)),
        (
            "busy",
            format!(
                "{} MiB guest dirtying memory (auto-converge)",
                options.memory_mib
            ),
        ),
        (
            "disk",
            format!(
                "{} MiB guest, 1 GiB local disk (NBD mirror)",
                options.memory_mib
            ),
        ),
    ] {
        let mut outcomes = Vec::new();
        for round in 0..options.rounds {
            let (from, to) = (hosts[round % 2], ["b", "a"][round % 2]);
            outcomes.push(migrate(&binary, &from.run, name, to)?);
        }
        // Back home for the next scenario's order.
        if options.rounds % 2 == 1 {
            migrate(&binary, &b.run, name, "a")?;
        }
        let ms = |key: &str| {
            Summary::of(
                outcomes
                    .iter()
                    .map(|o| Duration::from_millis(o[key].as_u64().unwrap_or(0)))
                    .collect(),
            )
        };
        let sent = outcomes
            .iter()
            .map(|o| o["transferredBytes"].as_u64().unwrap_or(0))
            .sum::<u64>()
            / outcomes.len().max(1) as u64;
        println!("{what}, {} moves:", outcomes.len());
        println!("  downtime {}", ms("downtimeMs"));
        println!("  total    {}", ms("totalMs"));
        println!("  memory sent per move {} MiB", sent >> 20);
    }
    drop((a, b));
    let failover = crate::ha::run(None, 3, 0, &options.work_dir)?;
    println!(
        "the restart way (HA failover, TTL 3 s, guest-less VM): holder fenced after {:.2} s, standby's QEMU up after {:.2} s (its guest then boots)",
        failover.fenced.as_secs_f64(),
        failover.taken_over.as_secs_f64()
    );
    Ok(())
}

struct Host {
    agent: Agent,
    run: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        // The agent dies with its Agent; its QEMUs do not: kill every QEMU of this run dir.
        for name in ["idle", "busy", "disk"] {
            for pid in crate::procs::qemu_pids(&self.run, name) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// `plasmavmc migrate VM --to TO --json` on the host of `run`.
fn migrate(binary: &Path, run: &Path, vm: &str, to: &str) -> Result<Value> {
    let output = Command::new(binary)
        .args(["migrate", vm, "--to", to, "--json", "--run-dir"])
        .arg(run)
        .output()?;
    if !output.status.success() {
        bail!(
            "migrate {vm} --to {to}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn wait_console(run: &Path, vm: &str, marker: &str) -> Result<()> {
    let log = run.join("vms").join(vm).join("console.log");
    let deadline = std::time::Instant::now() + BOOT;
    while !std::fs::read_to_string(&log).is_ok_and(|text| text.contains(marker)) {
        if std::time::Instant::now() > deadline {
            bail!("{vm} never printed {marker}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Types one line into the guest's console shell.
fn type_into(binary: &Path, run: &Path, vm: &str, line: &str) -> Result<()> {
    let mut console = Command::new(binary)
        .args(["console", vm, "--run-dir"])
        .arg(run)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    console
        .stdin
        .take()
        .context("console stdin")?
        .write_all(format!("{line}\n").as_bytes())?;
    std::thread::sleep(Duration::from_secs(3));
    let _ = console.kill();
    let _ = console.wait();
    Ok(())
}

/// A raw image of `size` random bytes (data the mirror must really carry).
fn fill_random(path: &Path, size: u64) -> Result<()> {
    let status = Command::new("head")
        .args(["-c", &size.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(path)?)
        .status()?;
    if !status.success() {
        bail!("filling {} failed", path.display());
    }
    Ok(())
}
