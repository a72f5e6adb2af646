//! The real `plasmavmc` binary, driven from the outside the way an operator would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `plasmavmc`, from beside this bench binary (both are built by the same `cargo build`).
pub fn plasmavmc_binary() -> Result<PathBuf> {
    let bench = std::env::current_exe().context("locating plasmavmc-bench")?;
    let agent = bench.with_file_name("plasmavmc");
    if !agent.exists() {
        bail!(
            "{} not found: build both binaries (cargo build --release --bins)",
            agent.display()
        );
    }
    Ok(agent)
}

/// `dir/state` and `dir/run`, made: the state and run dirs of an agent the bench starts.
pub fn agent_dirs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (state_dir, run_dir) = (dir.join("state"), dir.join("run"));
    std::fs::create_dir_all(&state_dir)?;
    std::fs::create_dir_all(&run_dir)?;
    Ok((state_dir, run_dir))
}

/// The agent's flags as host `host` of a cluster whose store is at `endpoint`, holding its
/// lease for `lease_ttl` seconds.
pub fn cluster_flags<'a>(endpoint: &'a str, host: &'a str, lease_ttl: &'a str) -> [&'a str; 6] {
    [
        "--chainfire",
        endpoint,
        "--host-id",
        host,
        "--lease-ttl",
        lease_ttl,
    ]
}

/// `plasmavmc ARGS --run-dir RUN_DIR`; an error with its stderr unless it succeeds.
pub fn cli(binary: &Path, run_dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new(binary)
        .args(args)
        .arg("--run-dir")
        .arg(run_dir)
        .output()?;
    if !output.status.success() {
        bail!(
            "plasmavmc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A running `plasmavmc agent` on a config, state dir and run dir of the bench's own.
pub struct Agent {
    binary: PathBuf,
    run_dir: PathBuf,
    child: Child,
}

impl Agent {
    /// Starts the agent, inside network namespace `netns` when given (its taps and bridges live
    /// there), with `extra` agent flags.
    pub fn spawn(
        binary: &Path,
        config: &Path,
        state_dir: &Path,
        run_dir: &Path,
        netns: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let command = match netns {
            // `ip netns exec` execs the agent, so the child's PID is the agent's.
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        Self::spawn_command(command, binary, config, state_dir, run_dir, extra)
    }

    /// `spawn` in a mount namespace of its own where `over` shows `dir` (another host's view of
    /// the same path).
    pub fn spawn_mounted(
        binary: &Path,
        config: &Path,
        state_dir: &Path,
        run_dir: &Path,
        (dir, over): (&Path, &Path),
        extra: &[&str],
    ) -> Result<Self> {
        let command = crate::mount_ns::command(dir, over, binary.as_os_str());
        Self::spawn_command(command, binary, config, state_dir, run_dir, extra)
    }

    fn spawn_command(
        mut command: Command,
        binary: &Path,
        config: &Path,
        state_dir: &Path,
        run_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let log = std::fs::File::create(run_dir.with_extension("agent.log"))?;
        let child = command
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--run-dir")
            .arg(run_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            binary: binary.to_owned(),
            run_dir: run_dir.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `plasmavmc status --json`, or None while the agent does not answer yet.
    pub fn status(&self) -> Option<Value> {
        let output = Command::new(&self.binary)
            .args(["status", "--json", "--run-dir"])
            .arg(&self.run_dir)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Polls status until `done` holds, returning the status that satisfied it.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status().filter(|status| done(status)) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent status did not reach the expected state within {timeout:?}; last: {}",
                    self.status().map_or("no answer".into(), |s| s.to_string())
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Resident set size, from /proc.
    pub fn rss_kib(&self) -> Result<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// What `kill -9` does: no chance to clean up.
    pub fn kill_hard(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// VM name → pid for the VMs status reports in `state`.
pub fn pids_in_state(status: &Value, state: &str) -> Vec<(String, u64)> {
    status["vms"]
        .as_object()
        .map(|vms| {
            vms.iter()
                .filter(|(_, vm)| vm["state"] == state)
                .filter_map(|(name, vm)| Some((name.clone(), vm["pid"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}
