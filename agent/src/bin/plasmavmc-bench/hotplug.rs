//! Live change vs restart: for a disk add, a NIC add and a vCPU add, the time from
//! `plasmavmc reload --wait` until the device is in QEMU, against the same change done the restart
//! way (stop, start, guest prints its boot marker). Runs one real guest under TCG, inside a network
//! namespace of its own (the NIC's bridge lives there).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::agent::{plasmavmc_binary, Agent};
use crate::stats::{ms, Summary};

pub(crate) const VM: &str = "bench";
const BOOT_MARKER: &str = "PLASMAVMC-GUEST-READY";
const GUEST_STATE: &str = "PLASMAVMC-GUEST-STATE ";
const BRIDGE: &str = "br0";

/// One kind of change: the declared VM without it and with it, and how to see it in status.
struct Change {
    name: &'static str,
    apply: fn(&mut Value),
    device: &'static str,
    /// What the guest's latest `PLASMAVMC-GUEST-STATE` line shows once it has the change.
    guest_sees: &'static str,
    /// Whether the change can be undone live and applied again in the same QEMU. Not a vCPU:
    /// under TCG, QEMU 7.2 aborts on the next hotplug after a vCPU unplug (docs/benchmarks.md).
    repeatable: bool,
}

const CHANGES: [Change; 3] = [
    Change {
        name: "disk add",
        apply: |vm| {
            vm["disks"]["extra"] =
                json!({"path": "@WORK@/extra.qcow2", "format": "qcow2", "serial": "extra"})
        },
        device: "disk-extra",
        guest_sees: "vda:extra",
        repeatable: true,
    },
    Change {
        name: "NIC add",
        apply: |vm| vm["nics"]["eth1"] = json!({"mac": "52:54:00:be:ec:01", "bridge": BRIDGE}),
        device: "nic-eth1",
        guest_sees: "52:54:00:be:ec:01",
        repeatable: true,
    },
    Change {
        name: "vCPU add",
        apply: |vm| vm["vcpus"] = json!(2),
        device: "vcpu",
        guest_sees: "cpus=0-1 ",
        repeatable: false,
    },
];

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub dirs: crate::GuestDirs,
    /// Live applications per change (each followed by a revert).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

pub fn report(options: &Options) -> Result<()> {
    let bench = Bench::start(options)?;
    println!("change       live (reload --wait)                         restart (stop, start, boot)   ratio");
    for change in &CHANGES {
        let (live, pid_kept) = bench.live(change, options.rounds)?;
        let restart = bench.restart(change)?;
        println!(
            "{:<12} {}   {:>12}   {:>6.0}x{}",
            change.name,
            live,
            ms(restart),
            restart.as_secs_f64() / live.median.as_secs_f64(),
            if pid_kept { "" } else { "  (QEMU PID CHANGED)" }
        );
    }
    Ok(())
}

// Field order is drop order: the agent goes before its network namespace.
struct Bench {
    binary: PathBuf,
    agent: Agent,
    /// Held for its `Drop`, which deletes the namespace.
    _netns: Netns,
    work: PathBuf,
    run_dir: PathBuf,
    config: PathBuf,
    base: Value,
}

impl Bench {
    fn start(options: &Options) -> Result<Self> {
        let binary = plasmavmc_binary()?;
        let work = options.dirs.work_dir.join("hotplug");
        let _ = std::fs::remove_dir_all(&work);
        let (state_dir, run_dir) = crate::agent::agent_dirs(&work)?;
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &path_str(&work.join("extra.qcow2"))?,
                "64M",
            ],
        )?;
        let netns = Netns::create(&format!("pvbench{}", std::process::id()))?;
        netns.run(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        netns.run(&["ip", "link", "set", BRIDGE, "up"])?;

        let guest = |file: &str| options.dirs.guest_dir.join(file);
        let base = json!({
            "vcpus": 1, "maxVcpus": 4, "memoryMiB": 256, "accel": "tcg", "machine": "q35",
            "kernel": guest("vmlinuz"), "initrd": guest("initramfs.cpio.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1",
            "restartPolicy": "never",
        });
        let config = work.join("desired.json");
        write_config(&config, &work, &base)?;
        // The busybox guest powers off on ACPI powerdown; a short stop timeout caps that wait, so
        // the restart way stays at its floor (power off or quit, launch, boot).
        let agent = Agent::spawn(
            &binary,
            &config,
            &state_dir,
            &run_dir,
            Some(&netns.name),
            &["--stop-timeout", "1"],
        )?;
        let bench = Self {
            binary,
            agent,
            _netns: netns,
            work,
            run_dir,
            config,
            base,
        };
        bench.wait_for_boot()?;
        Ok(bench)
    }

    /// Applies the change live `rounds` times (once if it is not repeatable), reverting it live
    /// between rounds. The change stays applied afterwards; `restart` restores the baseline.
    fn live(&self, change: &Change, rounds: usize) -> Result<(Summary, bool)> {
        let pid_before = self.qemu_pid()?;
        let mut with = self.base.clone();
        (change.apply)(&mut with);
        let rounds = if change.repeatable { rounds } else { 1 };
        let mut samples = Vec::with_capacity(rounds);
        for round in 0..rounds {
            if round > 0 {
                write_config(&self.config, &self.work, &self.base)?;
                self.reload()?;
                self.wait_until(
                    |bench| Ok(!bench.has_device(change.device)?),
                    "the device to go",
                )?;
            }
            write_config(&self.config, &self.work, &with)?;
            let start = Instant::now();
            self.reload()?;
            samples.push(start.elapsed());
            ensure!(
                self.has_device(change.device)?,
                "{}: {} not in QEMU after reload",
                change.name,
                change.device
            );
        }
        Ok((Summary::of(samples), self.qemu_pid()? == pid_before))
    }

    /// The same change the way other tools do it: stop the VM, start it with the change, and
    /// wait until the guest has booted. Restores the baseline the same way afterwards.
    fn restart(&self, change: &Change) -> Result<Duration> {
        let mut with = self.base.clone();
        (change.apply)(&mut with);
        write_config(&self.config, &self.work, &with)?;
        let took = self.restart_vm()?;
        self.wait_until(
            |bench| bench.guest_sees(change.guest_sees),
            "the guest to see the change",
        )?;
        write_config(&self.config, &self.work, &self.base)?;
        self.restart_vm()?;
        Ok(took)
    }

    fn restart_vm(&self) -> Result<Duration> {
        let start = Instant::now();
        self.cli(&["stop", VM])?;
        // The old console log would show the old boot's marker until QEMU truncates it.
        let _ = std::fs::remove_file(self.console());
        self.cli(&["start", VM])?;
        self.wait_for_boot()?;
        Ok(start.elapsed())
    }

    fn reload(&self) -> Result<()> {
        self.cli(&["reload", "--wait"])
    }

    fn cli(&self, args: &[&str]) -> Result<()> {
        crate::agent::cli(&self.binary, &self.run_dir, args)
    }

    fn vm_status(&self) -> Result<Value> {
        let status = self
            .agent
            .status()
            .context("agent does not answer status")?;
        Ok(status["vms"][VM].clone())
    }

    fn qemu_pid(&self) -> Result<u64> {
        self.vm_status()?["pid"].as_u64().context("VM has no pid")
    }

    fn has_device(&self, device: &str) -> Result<bool> {
        let status = self.vm_status()?;
        let devices = status["devices"].as_array().cloned().unwrap_or_default();
        Ok(devices
            .iter()
            .any(|d| d["id"].as_str().is_some_and(|id| id.starts_with(device))))
    }

    fn console(&self) -> PathBuf {
        self.run_dir.join("vms").join(VM).join("console.log")
    }

    fn guest_sees(&self, what: &str) -> Result<bool> {
        let console = std::fs::read_to_string(self.console())?;
        let latest = console
            .lines()
            .rev()
            .find(|line| line.starts_with(GUEST_STATE));
        Ok(latest.is_some_and(|line| format!("{line} ").contains(what)))
    }

    fn wait_for_boot(&self) -> Result<()> {
        self.wait_until(
            |bench| Ok(std::fs::read_to_string(bench.console())?.contains(BOOT_MARKER)),
            "the guest to boot",
        )
    }

    fn wait_until(&self, done: impl Fn(&Self) -> Result<bool>, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while !done(self).unwrap_or(false) {
            ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.cli(&["stop", VM]);
    }
}

/// A network namespace of the bench's own, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        let netns = Self {
            name: name.to_owned(),
        };
        netns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Writes `{"version": 1, "vms": {"bench": vm}}`, with `@WORK@` replaced by `work`.
pub(crate) fn write_config(path: &Path, work: &Path, vm: &Value) -> Result<()> {
    let text = json!({"version": 1, "vms": {VM: vm}}).to_string();
    std::fs::write(path, text.replace("@WORK@", &path_str(work)?))?;
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

pub(crate) fn path_str(path: &Path) -> Result<String> {
    path.to_str().map(str::to_owned).context("non-UTF-8 path")
}
