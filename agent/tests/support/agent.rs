//! Shared by the `agent_*` integration tests: drives the real `plasmavmc` binary the way an
//! operator does. A `Host` is a temp config/state/run dir with the shared tiny real guest
//! (`tests/guest/`, TCG); it spawns the agent, writes configs, runs client commands, parses
//! `status --json`, and on drop kills the agent and every QEMU it saw, even when the test failed.
//! A `Host` holds the cross-binary QEMU test lock for its whole life: guests boot one test at a
//! time, because this machine has 2 cores and TCG boots slowly under load.
//!
//! Each test file declares `#[path = "support/qemu_harness.rs"] mod qemu_harness;` (images, bare
//! QEMU argvs) and `#[path = "support/agent.rs"] mod harness;`; the guest's console protocol is
//! `harness::guest`.
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

#[path = "guest.rs"]
pub mod guest;
#[path = "mount_ns.rs"]
pub mod mount_ns;
#[path = "procs.rs"]
pub mod procs;
#[path = "watcher.rs"]
pub mod watcher;

use guest::{guest_artifacts, guest_cmdline, qemu_test_lock, BOOT_TIMEOUT, READY};

/// What the guest prints once its init runs.
pub const BOOT_MARKER: &str = READY;
/// A TCG boot on a loaded 2-core machine; generous on purpose.
pub const BOOT: Duration = BOOT_TIMEOUT;
/// Anything the agent does without a guest boot (adopt, stop, reload).
pub const AGENT: Duration = Duration::from_secs(60);
/// `RUST_LOG` for the agents the tests start.
const AGENT_LOG_FILTER: &str = "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info";
/// How long the agent waits for a guest to power off after the ACPI request before it quits
/// QEMU (the test guest answers at once, unless booted with `IGNORE_POWERDOWN`).
const STOP_TIMEOUT_SECS: &str = "2";

/// The agent's flags as host `host_id` of a cluster whose store is at `endpoint`, holding its
/// lease for `lease_ttl_seconds` (and the tests' short stop timeout).
pub fn cluster_agent_flags(endpoint: &str, host_id: &str, lease_ttl_seconds: u64) -> Vec<String> {
    [
        "--stop-timeout",
        STOP_TIMEOUT_SECS,
        "--chainfire",
        endpoint,
        "--host-id",
        host_id,
        "--lease-ttl",
        &lease_ttl_seconds.to_string(),
    ]
    .map(str::to_owned)
    .into()
}

/// The agent's flags for moving VMs over loopback: other hosts reach its incoming QEMUs at
/// 127.0.0.1, on `ports` (`FIRST-LAST`). Tests take their ports below 20000: above it the test
/// etcd members take theirs (`local_etcd`), and from 32768 the kernel hands out the source ports
/// of outgoing connections, any of which could hold a port the test needs when it binds it.
pub fn migration_flags(ports: &str) -> Vec<String> {
    [
        "--migration-address",
        "127.0.0.1",
        "--migration-ports",
        ports,
    ]
    .map(str::to_owned)
    .into()
}

/// The result of one `plasmavmc` client command.
#[derive(Debug)]
pub struct Cli {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    fn from(output: Output) -> Cli {
        Cli {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the command exited `code`.
    pub fn expect_code(self, code: i32, what: &str) -> Cli {
        assert_eq!(
            self.code, code,
            "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The result of a command started with `Host::cli_in_background`, once it exits.
pub fn finished(child: Child) -> Cli {
    Cli::from(child.wait_with_output().expect("waiting for plasmavmc"))
}

pub fn plasmavmc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_plasmavmc"))
}

/// Runs `plasmavmc ARGS` (no agent needed for `validate`, `plan` without agent, `--help`).
pub fn run(args: &[&str]) -> Cli {
    Cli::from(plasmavmc().args(args).output().expect("running plasmavmc"))
}

/// A host of the test's own: config, state and run dirs, guest artifacts, the agent process.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    agent: Option<Child>,
    /// Every QEMU PID a status showed: killed on drop, whatever the agent did.
    seen_qemus: std::cell::RefCell<BTreeSet<u32>>,
    _lock: Box<dyn std::any::Any>,
}

impl Host {
    pub fn new() -> Host {
        Host::holding(Box::new(qemu_test_lock()))
    }

    /// A second host in the same test (an HA pair, say): the first one holds the QEMU lock.
    pub fn another(_first: &Host) -> Host {
        Host::holding(Box::new(()))
    }

    fn holding(lock: Box<dyn std::any::Any>) -> Host {
        let dir = tempfile::Builder::new()
            .prefix("pv-agent-")
            .tempdir()
            .expect("temp dir");
        let (state_dir, run_dir) = (dir.path().join("state"), dir.path().join("run"));
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::create_dir_all(&run_dir).unwrap();
        let guest = guest_artifacts();
        Host {
            config: dir.path().join("desired.json"),
            state_dir,
            run_dir,
            kernel: guest.kernel,
            initrd: guest.initrd,
            dir,
            agent: None,
            seen_qemus: Default::default(),
            _lock: lock,
        }
    }

    /// Makes `<host dir>/NAME` the run dir (before the agent starts): a path with a comma, say,
    /// or a mount point.
    pub fn use_run_dir(&mut self, name: &str) -> PathBuf {
        self.run_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&self.run_dir).unwrap();
        self.run_dir.clone()
    }

    /// The `plasmavmc agent` command line this host runs (for a second agent, say).
    pub fn agent_command(&self) -> Command {
        let mut command = plasmavmc();
        command
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir);
        command
    }

    /// A small TCG guest; `extra` keys are merged over the defaults.
    pub fn vm(&self, extra: Value) -> Value {
        let mut vm = json!({
            "vcpus": 1, "memoryMiB": 128, "accel": "tcg", "machine": "q35",
            "kernel": self.kernel, "initrd": self.initrd,
            "cmdline": guest_cmdline(false),
        });
        for (key, value) in extra.as_object().expect("an object") {
            vm[key] = value.clone();
        }
        vm
    }

    /// A qcow2 image in the host's dir.
    pub fn image(&self, name: &str) -> PathBuf {
        crate::qemu_harness::image(self.dir.path(), name, "qcow2", 16)
    }

    /// Writes `{"version": 1, "vms": vms}` the way NixOS does: a new file renamed over the old.
    pub fn write_config(&self, vms: Value) {
        self.write_config_text(&json!({"version": 1, "vms": vms}).to_string());
    }

    pub fn write_config_text(&self, text: &str) {
        let tmp = self.config.with_extension("json.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// Writes the config the way a NixOS switch does: generation `generation` goes to its own
    /// immutable directory (`store-N/etc/plasmavmc/desired.json`), then the `etc/static` symlink
    /// is swapped to it atomically; `etc/plasmavmc/desired.json` always points through
    /// `etc/static` and is never touched. Makes that path the host's config.
    pub fn switch_config(&mut self, generation: u32, vms: Value) {
        let root = self.dir.path();
        let store = root.join(format!("store-{generation}/etc"));
        std::fs::create_dir_all(store.join("plasmavmc")).unwrap();
        let text = json!({"version": 1, "vms": vms}).to_string();
        std::fs::write(store.join("plasmavmc/desired.json"), text).unwrap();
        let etc = root.join("etc");
        std::fs::create_dir_all(etc.join("plasmavmc")).unwrap();
        let new_link = etc.join("static.new");
        let _ = std::fs::remove_file(&new_link);
        std::os::unix::fs::symlink(&store, &new_link).unwrap();
        std::fs::rename(&new_link, etc.join("static")).unwrap();
        let config = etc.join("plasmavmc/desired.json");
        if std::fs::symlink_metadata(&config).is_err() {
            std::os::unix::fs::symlink("../static/plasmavmc/desired.json", &config).unwrap();
        }
        self.config = config;
    }

    /// Starts `plasmavmc agent` and waits until it answers `status`.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&["--stop-timeout", STOP_TIMEOUT_SECS]);
    }

    /// Starts `plasmavmc agent` with extra flags and waits until it answers `status`.
    pub fn start_agent_with(&mut self, flags: &[impl AsRef<OsStr>]) {
        self.start_agent_with_env(flags, &[]);
    }

    /// `start_agent_with`, the agent's environment extended by `env`.
    pub fn start_agent_with_env(&mut self, flags: &[impl AsRef<OsStr>], env: &[(&str, &str)]) {
        let command = self.agent_command();
        self.spawn_agent(command, flags, env);
    }

    /// Starts the agent in a mount namespace of its own where `over` shows `dir` (`unshare -m`
    /// and a bind mount): the same path is a different file for it and its QEMUs, as on another
    /// host.
    pub fn start_agent_with_mount(&mut self, dir: &Path, over: &Path, flags: &[impl AsRef<OsStr>]) {
        let agent = self.agent_command();
        let mut command = mount_ns::command(dir, over, agent.get_program());
        command.args(agent.get_args());
        self.spawn_agent(command, flags, &[]);
    }

    fn spawn_agent(
        &mut self,
        mut command: Command,
        flags: &[impl AsRef<OsStr>],
        env: &[(&str, &str)],
    ) {
        assert!(self.agent.is_none(), "an agent already runs");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.agent_log())
            .unwrap();
        let child = command
            .args(flags)
            // The agent's own debug lines; its gRPC stack's would fill the log (and the tail
            // printed when a test fails) with HTTP/2 frames.
            .env("RUST_LOG", AGENT_LOG_FILTER)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning plasmavmc agent");
        self.agent = Some(child);
        let deadline = Instant::now() + AGENT;
        while self.cli(&["status", "--json"]).code != 0 {
            if let Some(exit) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!("the agent exited ({exit}):\n{}", self.agent_log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent never answered:\n{}",
                self.agent_log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9` the agent: no chance to clean up (VMs must not notice).
    pub fn kill_agent(&mut self) {
        let mut child = self.agent.take().expect("no agent running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("no agent running").id()
    }

    /// `plasmavmc ARGS --run-dir <this host's run dir>`.
    pub fn cli(&self, args: &[&str]) -> Cli {
        Cli::from(self.client(args).output().expect("running plasmavmc"))
    }

    /// `cli` in the background (a command that waits, say): `finished` gives its result.
    pub fn cli_in_background(&self, args: &[&str]) -> Child {
        self.client(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running plasmavmc")
    }

    fn client(&self, args: &[&str]) -> Command {
        let mut command = plasmavmc();
        command.args(args).arg("--run-dir").arg(&self.run_dir);
        command
    }

    /// `status --json`, parsed; remembers every QEMU PID in it for cleanup.
    pub fn status(&self) -> Value {
        let out = self
            .cli(&["status", "--json"])
            .expect_code(0, "status --json");
        let status: Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", out.stdout));
        if let Some(vms) = status["vms"].as_object() {
            for vm in vms.values() {
                if let Some(pid) = vm["pid"].as_u64() {
                    self.seen_qemus.borrow_mut().insert(pid as u32);
                }
            }
        }
        status
    }

    pub fn vm_status(&self, name: &str) -> Value {
        self.status()["vms"][name].clone()
    }

    /// Polls `status --json` until `done` holds for it.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {what}; last status:\n{status:#}\nagent log:\n{}",
                self.agent_log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until VM `name` is `running` and returns its QEMU PID.
    pub fn wait_running(&self, name: &str) -> u32 {
        let status = self.wait_status(&format!("{name} running"), BOOT, |s| {
            s["vms"][name]["state"] == "running" && s["vms"][name]["pid"].is_u64()
        });
        status["vms"][name]["pid"].as_u64().unwrap() as u32
    }

    /// The VM's serial console, as the guest wrote it.
    pub fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.run_dir.join("vms").join(name).join("console.log"))
            .unwrap_or_default()
    }

    /// Waits until the guest of VM `name` printed its boot marker.
    pub fn wait_boot(&self, name: &str) {
        let deadline = Instant::now() + BOOT;
        while !self.console(name).contains(BOOT_MARKER) {
            assert!(
                Instant::now() < deadline,
                "{name} never booted; console:\n{}\nagent log:\n{}",
                self.console(name),
                self.agent_log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `commands` in the shell on VM `name`'s console (a piped `plasmavmc console`) and
    /// returns the console's output until they ran: a marker the shell prints after them says so
    /// (a console that never goes quiet, a heartbeat say, cannot tell it).
    pub fn in_guest(&self, name: &str, commands: &str) -> String {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut child = plasmavmc()
            .args(["console", name, "--run-dir"])
            .arg(&self.run_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("plasmavmc console");
        let mut stdin = child.stdin.take().unwrap();
        // Quoted apart, so the echoed command line does not hold the marker itself.
        std::io::Write::write_all(
            &mut stdin,
            format!("{commands}\necho \"DO\"\"NE-{n}\"\n").as_bytes(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(read) = std::io::Read::read(&mut stdout, &mut buf) {
                if read == 0 || tx.send(buf[..read].to_vec()).is_err() {
                    break;
                }
            }
        });
        let (marker, deadline) = (format!("DONE-{n}"), Instant::now() + AGENT);
        let mut output = Vec::new();
        while !String::from_utf8_lossy(&output).contains(&marker) {
            assert!(
                Instant::now() < deadline,
                "the guest {name} never ran {commands:?}; console output:\n{}",
                String::from_utf8_lossy(&output)
            );
            if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
                output.extend(chunk);
            }
        }
        // Stdin stays open until the marker came: a piped console ends once stdin ended and
        // the console was quiet.
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
        // The agent frees the console's writer seat once it sees the client gone.
        std::thread::sleep(Duration::from_millis(300));
        String::from_utf8_lossy(&output).into_owned()
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub fn agent_log_text(&self) -> String {
        std::fs::read_to_string(self.agent_log()).unwrap_or_default()
    }

    fn agent_log_tail(&self) -> String {
        let text = self.agent_log_text();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// How many QEMU processes VM `name` has, counted by scanning `/proc` (not from status).
    pub fn qemu_count(&self, name: &str) -> usize {
        procs::qemu_count(&self.run_dir, name)
    }

    /// QEMU PIDs of every VM directory under `<run-dir>/vms`: named by its pidfile and still a
    /// QEMU of that VM, or found by scanning `/proc` (duplicates included).
    fn qemus_in_run_dir(&self) -> Vec<u32> {
        let run_dir = plasmavmc_agent::paths::RunDir::new(&self.run_dir);
        let Ok(entries) = std::fs::read_dir(run_dir.vms_dir()) else {
            return vec![];
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names
            .iter()
            .filter_map(|name| {
                let vm_dir = run_dir.vm(name);
                let pid: u32 = std::fs::read_to_string(vm_dir.pidfile())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                plasmavmc_agent::qemu::process::is_qemu_of(pid, name, &vm_dir).then_some(pid)
            })
            .chain(
                names
                    .iter()
                    .flat_map(|name| procs::qemu_pids(&self.run_dir, name)),
            )
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let mut pids: BTreeSet<u32> = self.qemus_in_run_dir().into_iter().collect();
        // Only PIDs that are still a QEMU: a seen PID may have been reused since.
        pids.extend(self.seen_qemus.borrow().iter().filter(|pid| is_qemu(**pid)));
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.agent_log_tail());
        }
    }
}

/// `plasmavmc ARGS` running in the background (`events --json`, `status --watch`, a console
/// reader), its stdout collected line by line; killed on drop.
pub struct Follower {
    pub child: Child,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Follower {
    pub fn start(host: &Host, args: &[&str]) -> Follower {
        Self::spawn(host, args, Stdio::null())
    }

    /// `events --json`, once it follows: every event from its return on is in `events()`.
    pub fn events_from_now(host: &Host) -> Follower {
        let mut follower = Self::spawn(host, &["events", "--json"], Stdio::piped());
        let mut stderr = std::io::BufReader::new(follower.child.stderr.take().unwrap());
        // The agent subscribes `events` before it answers; the command then says so, on stderr.
        let mut said = String::new();
        let _ = std::io::BufRead::read_line(&mut stderr, &mut said);
        assert!(
            said.starts_with("following"),
            "`plasmavmc events` does not follow: {said:?}"
        );
        // Read on, so what it says when it ends is not a write into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        follower
    }

    fn spawn(host: &Host, args: &[&str], stderr: Stdio) -> Follower {
        let mut child = plasmavmc()
            .args(args)
            .arg("--run-dir")
            .arg(&host.run_dir)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("plasmavmc");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let shared = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                shared.lock().unwrap().push(line);
            }
        });
        Follower { child, lines }
    }

    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
            .collect()
    }

    /// Waits until an event matches `wanted`; its index.
    pub fn wait_for(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> usize {
        let deadline = Instant::now() + BOOT;
        loop {
            let events = self.events();
            if let Some(at) = events.iter().position(&wanted) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} event in:\n{events:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_alive(pid: u32) -> bool {
    plasmavmc_agent::qemu::process::is_alive(pid)
}

fn is_qemu(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("qemu-system"))
        .unwrap_or(false)
        && is_alive(pid)
}

/// `kill -9 PID`.
pub fn kill_9(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
}

/// Waits until `pid` is gone (a zombie counts as gone).
pub fn wait_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// The device ids `status` reports for a VM.
pub fn device_ids(vm: &Value) -> Vec<String> {
    vm["devices"]
        .as_array()
        .map(|devices| {
            devices
                .iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}
