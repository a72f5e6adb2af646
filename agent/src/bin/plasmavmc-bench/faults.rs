//! The fault matrix: each fault the agent must survive is injected a few times into a real agent
//! running real (guest-less, TCG) QEMUs, while a sampler counts every VM's QEMU processes in
//! `/proc` (not what `status` says). Per fault: how often it was tried, the most QEMUs one VM
//! ever had minus one (duplicates), how many VMs ended with none (lost), and how many VMs the
//! fault restarted that it should not have (a QEMU PID changed). Goal: 0, 0 and 0.
//!
//! The run dir's path has commas (QEMU reads `,,` as one), so every fault is also injected where
//! a naive identity check would lose track of the QEMUs; it is a small tmpfs, so a start can be
//! made to fail after launch by running out of inodes. Faults that leave a QEMU the agent cannot
//! manage (stalled, held, files wrong) expect `vm0` to show `unresponsive`, with its one QEMU
//! left alone, until the fault is taken away; then the same QEMU is adopted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::agent::{pids_in_state, plasmavmc_binary, Agent};
use crate::procs::qemu_count;

#[derive(clap::Args)]
pub struct Options {
    #[arg(long, default_value_t = 3)]
    pub vms: usize,
    /// Injections per fault.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    #[arg(long, default_value = crate::WORK_DIR)]
    pub work_dir: PathBuf,
}

/// One fault: its name and how to inject it (and take it away again) on a running lab.
struct Fault {
    name: &'static str,
    inject: fn(&mut Lab, u32) -> Result<()>,
    /// The fault stops and starts `vm0` on purpose: its new PID is no restart to count.
    restarts_vm0: bool,
}

const fn fault(name: &'static str, inject: fn(&mut Lab, u32) -> Result<()>) -> Fault {
    Fault {
        name,
        inject,
        restarts_vm0: false,
    }
}

const FAULTS: &[Fault] = &[
    fault(
        "agent kill -9 and restart (run dir with commas)",
        restart_agent,
    ),
    fault("agent kill -9 mid-apply (disk add)", kill_mid_apply),
    fault(
        "corrupt operator.json at agent start",
        corrupt_operator_json,
    ),
    fault("config is a FIFO at reload", fifo_config),
    fault("full state filesystem at stop", full_state_dir),
    fault(
        "QEMU stalled (SIGSTOP) under the agent",
        stalled_under_agent,
    ),
    fault(
        "QEMU stalled across an agent restart",
        stalled_across_restart,
    ),
    fault(
        "another client holds qmp.sock across a restart",
        held_qmp_socket,
    ),
    fault("corrupt spec.json at agent start", corrupt_spec),
    fault("spec.json from a newer agent at agent start", newer_spec),
    fault("garbage pidfile at agent start", garbage_pidfile),
    fault("deleted pidfile at agent start", deleted_pidfile),
    Fault {
        name: "start failing after launch (run dir out of inodes)",
        inject: start_failing_after_launch,
        restarts_vm0: true,
    },
    fault("a second agent on the same run dir", second_agent),
];

/// How long a fault's effect (a VM shown unresponsive, say) may take to show in status.
const SHOWS: Duration = Duration::from_secs(30);

/// How long the agent gets to bring every VM back to running after a fault.
const SETTLE: Duration = Duration::from_secs(60);

pub fn report(options: &Options) -> Result<()> {
    let mut lab = Lab::new(options)?;
    let result = (|| -> Result<()> {
        lab.start_agent()?;
        println!(
            "fault matrix, {} VMs (guest-less QEMU, TCG), {} rounds each",
            options.vms, options.rounds
        );
        println!("| fault | tried | duplicates | VMs lost | VMs restarted |");
        println!("|---|---|---|---|---|");
        let mut notes = Vec::new();
        for fault in FAULTS {
            let (mut duplicates, mut lost, mut restarted) = (0, 0, 0);
            for round in 0..options.rounds {
                let before = lab.qemu_pids();
                let sampler = Sampler::start(&lab.run_dir, &lab.names);
                let injected = (fault.inject)(&mut lab, round);
                let settled = match lab.agent {
                    Some(_) => lab.settle(),
                    None => lab.start_agent(),
                };
                let most = sampler.stop();
                for problem in [injected.err(), settled.err()].into_iter().flatten() {
                    notes.push(format!("{}, round {round}: {problem:#}", fault.name));
                }
                let most = most.values().max().copied().unwrap_or(0);
                duplicates = duplicates.max(most.saturating_sub(1));
                lost += lab
                    .names
                    .iter()
                    .filter(|name| qemu_count(&lab.run_dir, name) == 0)
                    .count();
                let after = lab.qemu_pids();
                restarted += before
                    .iter()
                    .filter(|(name, _)| !(fault.restarts_vm0 && *name == "vm0"))
                    .filter(|(name, pids)| after.get(*name) != Some(pids))
                    .count();
            }
            println!(
                "| {} | {} | {duplicates} | {lost} | {restarted} |",
                fault.name, options.rounds
            );
        }
        for note in &notes {
            println!("note: {note}");
        }
        if !notes.is_empty() {
            bail!("{} rounds did not go as the agent promises", notes.len());
        }
        Ok(())
    })();
    lab.tear_down();
    result
}

/// An agent with its own config, state dir (a small tmpfs, so it can be filled) and run dir.
struct Lab {
    binary: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
    run_dir: PathBuf,
    names: Vec<String>,
    agent: Option<Agent>,
}

impl Lab {
    fn new(options: &Options) -> Result<Self> {
        let dir = options.work_dir.join("faults");
        let (state_dir, run_dir) = (dir.join("state"), dir.join("run,with,commas"));
        // Tmpfs left mounted by an interrupted run.
        for mounted in [&state_dir, &run_dir] {
            let _ = Command::new("umount")
                .arg(mounted)
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&state_dir)?;
        std::fs::create_dir_all(&run_dir)?;
        mount_tmpfs(&state_dir, "size=256k")?;
        mount_tmpfs(&run_dir, "size=64m,nr_inodes=4096")?;
        let names: Vec<String> = (0..options.vms).map(|i| format!("vm{i}")).collect();
        let config = crate::adopt::write_config(&dir, &names)?;
        Ok(Self {
            binary: plasmavmc_binary()?,
            dir,
            config,
            state_dir,
            run_dir,
            names,
            agent: None,
        })
    }

    fn start_agent(&mut self) -> Result<()> {
        self.spawn_agent()?;
        self.settle()
    }

    /// Starts an agent and waits until it answers, not until its VMs run.
    fn spawn_agent(&mut self) -> Result<()> {
        let agent = Agent::spawn(
            &self.binary,
            &self.config,
            &self.state_dir,
            &self.run_dir,
            None,
            &["--stop-timeout", "1"],
        )?;
        agent.wait_for(SHOWS, |_| true)?;
        self.agent = Some(agent);
        Ok(())
    }

    fn agent(&self) -> Result<&Agent> {
        self.agent.as_ref().context("no agent")
    }

    /// Waits until status shows `vm0` in `state` (the reason must contain `why`).
    fn wait_vm0(&self, state: &str, why: &str) -> Result<Value> {
        let status = self.agent()?.wait_for(SHOWS, |s| {
            s["vms"]["vm0"]["state"] == state
                && s["vms"]["vm0"]["stateReason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(why)
        })?;
        Ok(status["vms"]["vm0"].clone())
    }

    /// vm0 is `unresponsive` for `why` and keeps its one QEMU through a reload.
    fn vm0_left_alone(&self, why: &str) -> Result<()> {
        let pid = vm0_pid(self)?;
        let vm0 = self.wait_vm0("unresponsive", why)?;
        if vm0["pid"] != pid {
            bail!("vm0 shown unresponsive with pid {}, not {pid}", vm0["pid"]);
        }
        if !self.cli(&["reload", "--wait"])? {
            bail!("a reload beside an unresponsive VM failed");
        }
        match qemu_count(&self.run_dir, "vm0") {
            1 => Ok(()),
            n => bail!("vm0 has {n} QEMUs beside its unresponsive one"),
        }
    }

    /// File `file` of VM `vm`'s run directory.
    fn vm_file(&self, vm: &str, file: &str) -> PathBuf {
        self.run_dir.join("vms").join(vm).join(file)
    }

    /// Every VM's QEMU PIDs, from `/proc`.
    fn qemu_pids(&self) -> BTreeMap<String, Vec<u32>> {
        self.names
            .iter()
            .map(|name| (name.clone(), crate::procs::qemu_pids(&self.run_dir, name)))
            .collect()
    }

    fn kill_agent(&mut self) -> Result<()> {
        self.agent.take().context("no agent")?.kill_hard()
    }

    /// Waits until status shows every VM running and the agent answers.
    fn settle(&self) -> Result<()> {
        let agent = self.agent.as_ref().context("no agent")?;
        agent.wait_for(SETTLE, |s| {
            pids_in_state(s, "running").len() == self.names.len()
        })?;
        Ok(())
    }

    /// `plasmavmc ARGS --run-dir RUN`: whether it succeeded.
    fn cli(&self, args: &[&str]) -> Result<bool> {
        Ok(Command::new(&self.binary)
            .args(args)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    }

    /// Declares disk `id` (a new 1 MiB image) on every VM. Disks are only ever added: a
    /// guest-less VM never answers an unplug.
    fn add_disk(&self, id: &str) -> Result<()> {
        let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&self.config)?)?;
        for name in &self.names {
            let image = self.dir.join(format!("{name}-{id}.raw"));
            std::fs::File::create(&image)?.set_len(1 << 20)?;
            doc["vms"][name]["disks"][id] = serde_json::json!({"path": image, "format": "raw"});
        }
        let tmp = self.config.with_extension("json.new");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    fn tear_down(&mut self) {
        self.agent = None;
        for name in &self.names {
            for pid in crate::procs::qemu_pids(&self.run_dir, name) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        // The run dir's tmpfs can only be unmounted once they are gone.
        for _ in 0..100 {
            if self.qemu_pids().values().all(Vec::is_empty) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for mounted in [&self.state_dir, &self.run_dir] {
            let _ = Command::new("umount").arg(mounted).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mount_tmpfs(dir: &Path, options: &str) -> Result<()> {
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir)
        .status()?;
    if !mounted.success() {
        bail!("mounting a tmpfs on {} (needs root)", dir.display());
    }
    Ok(())
}

/// Counts every VM's QEMU processes in `/proc` every 20 ms until stopped; keeps the maximum.
struct Sampler {
    stop: Arc<AtomicBool>,
    most: Arc<Mutex<BTreeMap<String, usize>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(run_dir: &Path, names: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(Mutex::new(BTreeMap::new()));
        let (run_dir, names) = (run_dir.to_owned(), names.to_vec());
        let thread = std::thread::spawn({
            let (stop, most) = (stop.clone(), most.clone());
            move || loop {
                for name in &names {
                    let count = qemu_count(&run_dir, name);
                    let mut most = most.lock().unwrap();
                    let seen = most.entry(name.clone()).or_insert(0);
                    *seen = (*seen).max(count);
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, most, thread }
    }

    fn stop(self) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        Arc::try_unwrap(self.most)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// A reload that adds a disk to every VM; the agent is killed -9 after a delay that moves from
/// round to round through the apply; a new agent takes over and finishes it.
fn kill_mid_apply(lab: &mut Lab, round: u32) -> Result<()> {
    lab.add_disk(&format!("extra{round}"))?;
    let mut reload = Command::new(&lab.binary)
        .args(["reload", "--wait", "--run-dir"])
        .arg(&lab.run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(20 + 60 * u64::from(round)));
    lab.kill_agent()?;
    let _ = reload.wait();
    lab.start_agent()
}

/// The agent is killed -9 and its operator.json replaced by garbage (an empty file in even
/// rounds) before a new agent starts.
fn corrupt_operator_json(lab: &mut Lab, round: u32) -> Result<()> {
    lab.kill_agent()?;
    let garbage: &[u8] = if round % 2 == 0 {
        b""
    } else {
        b"{\"vm0\": \"sto"
    };
    std::fs::write(lab.state_dir.join("operator.json"), garbage)?;
    lab.start_agent()?;
    // What was set aside is evidence, not a fault to repeat: the tmpfs is small.
    for entry in std::fs::read_dir(&lab.state_dir)? {
        let path = entry?.path();
        if path.to_string_lossy().contains(".corrupt-") {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// The config file is swapped for a FIFO nobody writes; a reload must be refused, not hang.
fn fifo_config(lab: &mut Lab, _round: u32) -> Result<()> {
    let aside = lab.config.with_extension("json.aside");
    std::fs::rename(&lab.config, &aside)?;
    nix::unistd::mkfifo(&lab.config, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let refused = !lab.cli(&["reload", "--wait"])?;
    std::fs::remove_file(&lab.config)?;
    std::fs::rename(&aside, &lab.config)?;
    if !refused {
        bail!("a reload of a FIFO config succeeded");
    }
    if !lab.cli(&["reload", "--wait"])? {
        bail!("the reload after the FIFO failed");
    }
    Ok(())
}

/// The state filesystem is filled; an operator stop cannot be recorded and must not happen.
fn full_state_dir(lab: &mut Lab, _round: u32) -> Result<()> {
    let filler = lab.state_dir.join("filler");
    let mut file = std::fs::File::create(&filler)?;
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let stopped = lab.cli(&["stop", "vm0"])?;
    std::fs::remove_file(&filler)?;
    if stopped {
        bail!("a stop that could not be recorded succeeded");
    }
    Ok(())
}

/// The agent is killed -9 and a new one adopts every QEMU (under the run dir with commas).
fn restart_agent(lab: &mut Lab, _round: u32) -> Result<()> {
    lab.kill_agent()?;
    lab.start_agent()
}

/// VM `vm0`'s QEMU, from status.
fn vm0_pid(lab: &Lab) -> Result<u64> {
    let status = lab.agent()?.status().context("no status")?;
    status["vms"]["vm0"]["pid"]
        .as_u64()
        .context("vm0 has no pid")
}

fn signal(pid: u64, signal: Signal) -> Result<()> {
    Ok(kill(Pid::from_raw(pid as i32), signal)?)
}

/// vm0's QEMU is stopped (SIGSTOP) under a running agent: it becomes `unresponsive`, nothing
/// starts beside it; resumed, the same QEMU is `running` again.
fn stalled_under_agent(lab: &mut Lab, _round: u32) -> Result<()> {
    let pid = vm0_pid(lab)?;
    signal(pid, Signal::SIGSTOP)?;
    let left_alone = lab.vm0_left_alone("is stopped");
    signal(pid, Signal::SIGCONT)?;
    left_alone
}

/// vm0's QEMU is stopped while the agent is killed -9 and a new one starts; then it resumes.
fn stalled_across_restart(lab: &mut Lab, _round: u32) -> Result<()> {
    let pid = vm0_pid(lab)?;
    signal(pid, Signal::SIGSTOP)?;
    let left_alone = lab
        .kill_agent()
        .and_then(|()| lab.spawn_agent())
        .and_then(|()| lab.vm0_left_alone("is stopped"));
    signal(pid, Signal::SIGCONT)?;
    left_alone
}

/// Another client (a monitoring tool) holds vm0's qmp.sock while a new agent starts; it lets
/// go after the agent has shown the VM unresponsive.
fn held_qmp_socket(lab: &mut Lab, _round: u32) -> Result<()> {
    lab.kill_agent()?;
    let held = UnixStream::connect(lab.vm_file("vm0", "qmp.sock"))?;
    let mut greeting = String::new();
    BufReader::new(&held).read_line(&mut greeting)?;
    lab.spawn_agent()?;
    let left_alone = lab.vm0_left_alone("another client");
    drop(held);
    left_alone
}

/// vm0's `file` is damaged by `damage` while no agent runs; a new agent leaves vm0's QEMU
/// alone (`unresponsive`, saying `why`); the file is repaired and another agent adopts it.
fn damaged_file(
    lab: &mut Lab,
    file: &str,
    damage: impl FnOnce(&Path) -> Result<()>,
    why: &str,
) -> Result<()> {
    lab.kill_agent()?;
    let path = lab.vm_file("vm0", file);
    let good = std::fs::read(&path)?;
    damage(&path)?;
    let left_alone = lab.spawn_agent().and_then(|()| lab.vm0_left_alone(why));
    lab.kill_agent()?;
    std::fs::write(&path, good)?;
    lab.start_agent()?;
    left_alone
}

fn corrupt_spec(lab: &mut Lab, _round: u32) -> Result<()> {
    let damage = |spec: &Path| Ok(std::fs::write(spec, b"{\"vcpus\": 1, trunc")?);
    damaged_file(
        lab,
        "spec.json",
        damage,
        "not a VM spec this agent understands",
    )
}

fn newer_spec(lab: &mut Lab, _round: u32) -> Result<()> {
    let damage = |spec: &Path| {
        let mut newer: Value = serde_json::from_slice(&std::fs::read(spec)?)?;
        newer["fieldFromTheFuture"] = Value::Bool(true);
        Ok(std::fs::write(spec, newer.to_string())?)
    };
    damaged_file(lab, "spec.json", damage, "written by a newer agent")
}

fn garbage_pidfile(lab: &mut Lab, _round: u32) -> Result<()> {
    let damage = |pidfile: &Path| Ok(std::fs::write(pidfile, "garbage\n")?);
    damaged_file(lab, "pid", damage, "is not a PID")
}

fn deleted_pidfile(lab: &mut Lab, _round: u32) -> Result<()> {
    let damage = |pidfile: &Path| Ok(std::fs::remove_file(pidfile)?);
    damaged_file(lab, "pid", damage, "is missing")
}

/// vm0 is stopped by the operator, the run dir is left one free inode, and vm0 is started: the
/// start fails after QEMU was launched (its QMP socket or its pidfile finds no inode), and the
/// launched QEMU must be gone; with room again, one start makes exactly one QEMU.
fn start_failing_after_launch(lab: &mut Lab, _round: u32) -> Result<()> {
    if !lab.cli(&["stop", "vm0"])? {
        bail!("stopping vm0");
    }
    let stat = nix::sys::statvfs::statvfs(&lab.run_dir)?;
    let used = stat.files() - stat.files_free();
    let tight = format!("remount,nr_inodes={}", used + 1);
    mount_tmpfs(&lab.run_dir, &tight)?;
    let started = lab.cli(&["start", "vm0"]);
    let mut leftover = 0;
    for _ in 0..10 {
        leftover = leftover.max(qemu_count(&lab.run_dir, "vm0"));
        std::thread::sleep(Duration::from_millis(100));
    }
    mount_tmpfs(&lab.run_dir, "remount,nr_inodes=4096")?;
    if started? {
        bail!("vm0 started with one free inode: the fault was not injected");
    }
    if leftover > 0 {
        bail!("a failed start left {leftover} QEMU(s) behind");
    }
    if !lab.cli(&["start", "vm0"])? {
        bail!("starting vm0 with room again");
    }
    Ok(())
}

/// A second agent is started on the same run dir; it must refuse at once and touch nothing.
fn second_agent(lab: &mut Lab, _round: u32) -> Result<()> {
    let mut second = Command::new(&lab.binary)
        .arg("agent")
        .arg("--config")
        .arg(&lab.config)
        .arg("--state-dir")
        .arg(&lab.state_dir)
        .arg("--run-dir")
        .arg(&lab.run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..100 {
        if let Some(exit) = second.try_wait()? {
            if exit.success() {
                bail!("the second agent exited successfully");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = second.kill();
    let _ = second.wait();
    bail!("the second agent was still running after 10 s")
}
