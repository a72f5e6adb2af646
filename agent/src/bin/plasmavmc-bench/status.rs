//! `status` latency under load: N healthy guest-less VMs answer `status` while one more VM's QEMU
//! is stalled (SIGSTOP), while 20,000 idle connections sit on the control socket, and while 200
//! clients ask at once. Requests go through the client library (`control::client`), so the
//! figures are the agent's, not a CLI process start's. Every answer must show every healthy VM
//! running; the agent must be alive at the end of each scenario.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use plasmavmc_agent::control::client;
use plasmavmc_agent::control::protocol::{Request, Response};

use crate::agent::{pids_in_state, plasmavmc_binary, Agent};
use crate::stats::{ms, Summary};

/// What `status` is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Nothing wrong: the reference.
    NoFault,
    /// One more VM's QEMU stopped with SIGSTOP (resumed after).
    Stalled,
    /// `--idle` connections open on the control socket, each silent.
    Idle,
    /// `--clients` clients asking at once.
    Concurrent,
}

#[derive(clap::Args)]
pub struct Options {
    /// Comma-separated, run in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "no-fault,stalled,idle,concurrent"
    )]
    pub scenarios: Vec<Scenario>,
    #[arg(long, default_value_t = 4)]
    pub vms: usize,
    /// Requests measured per scenario (shared among the concurrent clients, at least 5 each).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// Idle connections held open in the `idle` scenario.
    #[arg(long, default_value_t = 20_000)]
    pub idle: usize,
    /// Clients asking at once in the `concurrent` scenario.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    #[arg(long, default_value = crate::WORK_DIR)]
    pub work_dir: PathBuf,
}

const HEALTHY: &str = "vm";
const STALLED: &str = "stalled";

pub fn report(options: &Options) -> Result<()> {
    let binary = plasmavmc_binary()?;
    let dir = options.work_dir.join("status");
    let _ = std::fs::remove_dir_all(&dir);
    let (state_dir, run_dir) = crate::agent::agent_dirs(&dir)?;
    let mut names: Vec<String> = (0..options.vms).map(|i| format!("{HEALTHY}{i}")).collect();
    names.push(STALLED.into());
    let config = crate::adopt::write_config(&dir, &names)?;
    let agent = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &[])?;
    let everything_runs =
        |s: &serde_json::Value| pids_in_state(s, "running").len() == options.vms + 1;
    let booted = agent.wait_for(
        Duration::from_secs(60 + 3 * options.vms as u64),
        everything_runs,
    )?;
    let pids: Vec<u64> = pids_in_state(&booted, "running")
        .iter()
        .map(|(_, p)| *p)
        .collect();
    let socket = run_dir.join("control.sock");
    let bench = Bench {
        socket: &socket,
        healthy: options.vms,
        agent: &agent,
    };

    let line = |what: &str, summary: Summary| {
        println!(
            "status, {} healthy VMs, {what}: median {}, p99 {} ({} requests)",
            options.vms,
            ms(summary.median),
            ms(summary.p99),
            summary.samples
        )
    };
    let result = options
        .scenarios
        .iter()
        .try_for_each(|scenario| -> Result<()> {
            match scenario {
                Scenario::NoFault => line("no fault", bench.sequential(options.samples)?),
                Scenario::Stalled => {
                    let pid = booted["vms"][STALLED]["pid"]
                        .as_u64()
                        .context("the stalled VM's pid")?;
                    let pid = Pid::from_raw(pid as i32);
                    kill(pid, Signal::SIGSTOP)?;
                    let stalled = bench.sequential(options.samples);
                    kill(pid, Signal::SIGCONT)?;
                    line("one more VM's QEMU stalled (SIGSTOP)", stalled?);
                }
                Scenario::Idle => {
                    let holders = hold_idle(&socket, options.idle)?;
                    let held = open_fds(agent.pid())?;
                    let summary = bench.sequential(options.samples);
                    release(holders);
                    let what = format!(
                        "{} idle connections (the agent holds {held} descriptors)",
                        options.idle
                    );
                    line(&what, summary?);
                }
                Scenario::Concurrent => line(
                    &format!("{} concurrent clients", options.clients),
                    bench.concurrent(options.clients, options.samples)?,
                ),
            }
            Ok(())
        });

    drop(agent);
    for pid in pids {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Bench<'a> {
    socket: &'a Path,
    healthy: usize,
    agent: &'a Agent,
}

impl Bench<'_> {
    /// One `status`: how long it took; an error unless every healthy VM shows running.
    fn status(&self) -> Result<Duration> {
        let start = Instant::now();
        let answer = client::request(self.socket, &Request::Status);
        let took = start.elapsed();
        let Ok(Response::Status { status }) = answer else {
            bail!(
                "status failed after {took:?}: {answer:?} (agent {})",
                if is_alive(self.agent.pid()) {
                    "alive"
                } else {
                    "DEAD"
                }
            );
        };
        let running = status
            .vms
            .iter()
            .filter(|(name, vm)| name.starts_with(HEALTHY) && vm.pid.is_some())
            .count();
        if running != self.healthy {
            bail!(
                "status shows {running} of {} healthy VMs running",
                self.healthy
            );
        }
        Ok(took)
    }

    fn sequential(&self, samples: usize) -> Result<Summary> {
        let took = (0..samples).map(|_| self.status()).collect::<Result<_>>()?;
        Ok(Summary::of(took))
    }

    /// `clients` threads, each asking `samples / clients` times (at least 5), all at once.
    fn concurrent(&self, clients: usize, samples: usize) -> Result<Summary> {
        let each = (samples / clients).max(5);
        let took = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..clients)
                .map(|_| scope.spawn(|| (0..each).map(|_| self.status()).collect::<Vec<_>>()))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("a client thread panicked"))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Summary::of(took))
    }
}

/// Idle connections one holder process opens (a process's fd limit is 20,000 on many hosts,
/// and raising the hard limit needs CAP_SYS_RESOURCE).
const PER_HOLDER: usize = 10_000;

/// `n` silent connections to `socket`, held by `plasmavmc-bench hold-idle` child processes;
/// returns once all are connected.
fn hold_idle(socket: &Path, n: usize) -> Result<Vec<Child>> {
    let bench = std::env::current_exe()?;
    let mut holders = Vec::new();
    for start in (0..n).step_by(PER_HOLDER) {
        let count = PER_HOLDER.min(n - start);
        let mut holder = Command::new(&bench)
            .arg("hold-idle")
            .arg(socket)
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut ready = String::new();
        BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut ready)?;
        holders.push(holder);
        if ready.trim() != "ready" {
            release(holders);
            bail!("a holder of idle connections failed (see its stderr above)");
        }
    }
    Ok(holders)
}

/// Closes the holders' connections (their stdin closes, they exit).
fn release(holders: Vec<Child>) {
    for mut holder in holders {
        drop(holder.stdin.take());
        let _ = holder.wait();
    }
}

/// `plasmavmc-bench hold-idle SOCKET N`: opens N connections that never send anything, says
/// `ready`, and holds them until its stdin closes.
pub fn hold_idle_here(socket: &Path, n: usize) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let idle: Vec<UnixStream> = (0..n)
        .map(|i| UnixStream::connect(socket).with_context(|| format!("idle connection {i}")))
        .collect::<Result<_>>()?;
    println!("ready");
    std::io::stdout().flush()?;
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(idle);
    Ok(())
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

fn is_alive(pid: u32) -> bool {
    plasmavmc_agent::qemu::process::is_alive(pid)
}
