//! The fault matrix: each fault the agent must survive is injected a few times into a real agent
//! running real (guest-less, TCG) QEMUs, while a sampler counts every VM's QEMU processes in
//! `/proc` (not what `status` says). Per fault: how often it was tried, the most QEMUs one VM
//! ever had minus one (duplicates), and how many VMs ended with none (lost). Goal: 0 and 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::agent::{pids_in_state, plasmavmc_binary, Agent};
use crate::procs::qemu_count;

pub struct Options {
    pub vms: usize,
    pub rounds: u32,
    pub work_dir: PathBuf,
}

/// One fault: its name and how to inject it (and take it away again) on a running lab.
struct Fault {
    name: &'static str,
    inject: fn(&mut Lab, u32) -> Result<()>,
}

const FAULTS: &[Fault] = &[
    Fault {
        name: "agent kill -9 mid-apply (disk add)",
        inject: kill_mid_apply,
    },
    Fault {
        name: "corrupt operator.json at agent start",
        inject: corrupt_operator_json,
    },
    Fault {
        name: "config is a FIFO at reload",
        inject: fifo_config,
    },
    Fault {
        name: "full state filesystem at stop",
        inject: full_state_dir,
    },
];

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
        println!("| fault | tried | duplicates | VMs lost |");
        println!("|---|---|---|---|");
        let mut notes = Vec::new();
        for fault in FAULTS {
            let (mut duplicates, mut lost) = (0, 0);
            for round in 0..options.rounds {
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
            }
            println!(
                "| {} | {} | {duplicates} | {lost} |",
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
        // A tmpfs left mounted by an interrupted run.
        let _ = Command::new("umount")
            .arg(dir.join("state"))
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        let (state_dir, run_dir) = (dir.join("state"), dir.join("run"));
        std::fs::create_dir_all(&state_dir)?;
        std::fs::create_dir_all(&run_dir)?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&state_dir)
            .status()?;
        if !mounted.success() {
            bail!("mounting a tmpfs on {} (needs root)", state_dir.display());
        }
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
        self.agent = Some(Agent::spawn(
            &self.binary,
            &self.config,
            &self.state_dir,
            &self.run_dir,
            None,
            &["--stop-timeout", "1"],
        )?);
        self.settle()
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
        let _ = Command::new("umount").arg(&self.state_dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
