//! Live migration: two real agents (hosts `a` and `b` on this machine, a loopback etcd; `b` in
//! a mount namespace of its own, so a local disk's path is another file there) move real guests
//! (the test guest, TCG) back and forth with `plasmavmc migrate --json`, which reports the
//! downtime (from QEMU's pause on the source to QEMU's resume on the target, by their event
//! timestamps: one machine, one clock) and the total time. Each round of the idle cases:
//!
//! - five idle guests, each moved a -> b, then `plasmavmc evacuate --wait` on b moves all five
//!   back (two at a time), timed from the command to its exit.
//!
//! Each single move starts 1 s after the previous one ended (`SETTLE`). Then two guests start
//! working, and each round of the busy cases moves them:
//!
//! - a guest dirtying memory continuously (a shell loop copying 32 MiB of random data in a
//!   tmpfs over and over), moved a -> b -> a: it converges by QEMU's auto-converge;
//! - a guest with a 1 GiB local disk (raw, random data) that it keeps writing numbered records
//!   to (each synced, then acknowledged on its console), moved a -> b -> a (NBD mirror).
//!
//! The idle cases run first so that the busy guests' work (a whole core under TCG) is not
//! measured as the idle guests' downtime.
//!
//! Throughout, every VM's QEMU processes on both hosts are counted every 20 ms (at most two:
//! the paused source and the incoming one), exactly one after each move, and each guest prints
//! its uptime twice a second: ordered by uptime, its heartbeats change host at most once per
//! move, or two copies ran. At the end every record the disk guest acknowledged must be in the
//! image. Then the restart way, in the same run: `plasmavmc stop` of an idle guest on a, until
//! b (its HA standby) runs it booted again; and HA failover after the holder's agent is killed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::agent::{plasmavmc_binary, Agent};
use crate::local_etcd::LocalEtcd;
use crate::stats::{ms, Summary};

const BOOT: Duration = Duration::from_secs(240);
const IDLE: [&str; 5] = ["idle1", "idle2", "idle3", "idle4", "idle5"];
const HEARTBEAT: &str = "HB:";
/// The disk guest's acknowledgement of record N: `ACK:N` once record N is on its disk.
const ACK: &str = "ACK:";
const RECORD: usize = 512;
/// Before each single move: the machine at rest, as when an operator moves one VM. Right after a
/// move the guest that arrived runs on a fresh QEMU whose TCG translates its code anew, and the
/// source's QEMU is still exiting; on two cores that work would land in the next move's pause.
/// (The evacuation figure is of moves back to back, two at a time.)
const SETTLE: Duration = Duration::from_secs(1);
/// The migration ports of hosts `a` and `b`: below 20000, where the etcd members take theirs
/// (`local_etcd`), and below the kernel's ephemeral range (32768-60999), whose ports any outgoing
/// connection can take; apart from the integration tests' (18381-18432).
const A_PORTS: &str = "18481-18489";
const B_PORTS: &str = "18491-18499";

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
    let mut vms: BTreeMap<String, Value> = IDLE
        .iter()
        .map(|n| (n.to_string(), vm(json!({}))))
        .collect();
    vms.insert("busy".into(), vm(json!({})));
    vms.insert(
        "disk".into(),
        vm(json!({"disks": {"data": {"path": disk, "format": "raw", "serial": "data"}}})),
    );
    let names: Vec<String> = vms.keys().cloned().collect();
    let endpoint = etcd.endpoint(0);
    let start = |host: &str, ports: &str, mount: Option<(&Path, &Path)>| -> Result<Host> {
        let dir = work.join(host);
        let (state, run) = crate::agent::agent_dirs(&dir)?;
        let config = dir.join("desired.json");
        std::fs::write(&config, json!({"version": 1, "vms": vms}).to_string())?;
        let migration = [
            "--migration-address",
            "127.0.0.1",
            "--migration-ports",
            ports,
        ];
        let flags = [
            &crate::agent::cluster_flags(&endpoint, host, "5")[..],
            &["--stop-timeout", "5"],
            &migration,
        ]
        .concat();
        let agent = match mount {
            None => Agent::spawn(&binary, &config, &state, &run, None, &flags)?,
            Some((dir, over)) => {
                Agent::spawn_mounted(&binary, &config, &state, &run, (dir, over), &flags)?
            }
        };
        Ok(Host {
            agent,
            run,
            vms: names.clone(),
        })
    };
    let a = start("a", A_PORTS, None)?;
    for name in &names {
        a.agent
            .wait_for(BOOT, |s| s["vms"][name]["state"] == "running")?;
        wait_console(&a.run, name, "PLASMAVMC-GUEST-READY", BOOT)?;
    }
    let b = start("b", B_PORTS, Some((&b_local, &a_local)))?;
    b.agent.wait_for(BOOT, |s| {
        names
            .iter()
            .all(|n| s["vms"][n]["heldDown"] == "HA: another host holds it (a)")
    })?;
    for name in &names {
        type_into(
            &binary,
            &a.run,
            name,
            "(while true; do read up rest < /proc/uptime; echo \"H\"\"B:$up\"; sleep 0.5; done) &",
        )?;
    }
    let watch = Watch::start(&[&a.run, &b.run], &names);
    let (mut idle, mut busy, mut with_disk, mut evacuations) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        for name in IDLE {
            std::thread::sleep(SETTLE);
            idle.push(migrate(&binary, &a.run, name, "b", &watch)?);
            watch.at_rest(name)?;
        }
        let started = Instant::now();
        watch.moves_start(&IDLE);
        evacuate(&binary, &b.run)?;
        evacuations.push(started.elapsed());
        for name in IDLE {
            watch.wait_only(name, &a.run)?;
        }
        crate::agent::cli(&binary, &b.run, &["uncordon"])?;
    }
    let idle_load = load_average();
    type_into(
        &binary,
        &a.run,
        "busy",
        "mkdir -p /dev/shm; mount -t tmpfs tmpfs /dev/shm; \
         dd if=/dev/urandom of=/dev/shm/src bs=1M count=32 2>/dev/null; \
         (while true; do cp /dev/shm/src /dev/shm/copy; done) &",
    )?;
    type_into(
        &binary,
        &a.run,
        "disk",
        "for d in /sys/block/vd*; do read s < $d/serial; [ \"$s\" = data ] && dev=/dev/${d##*/}; done; \
         (i=0; while true; do echo \"REC-$i\" | dd of=$dev bs=512 seek=$i count=1 conv=fsync,notrunc 2>/dev/null \
         && echo \"A\"\"CK:$i\"; i=$((i+1)); sleep 0.05; done) &",
    )?;
    wait_console(&a.run, "disk", ACK, Duration::from_secs(30))?;

    for _ in 0..options.rounds {
        for (from, to) in [(&a, "b"), (&b, "a")] {
            std::thread::sleep(SETTLE);
            busy.push(migrate(&binary, &from.run, "busy", to, &watch)?);
            watch.at_rest("busy")?;
            std::thread::sleep(SETTLE);
            with_disk.push(migrate(&binary, &from.run, "disk", to, &watch)?);
            watch.at_rest("disk")?;
        }
    }
    let load = load_average();
    print_case(
        &format!("idle {} MiB guest", options.memory_mib),
        &idle,
        &idle_load,
    );
    print_case(
        &format!(
            "{} MiB guest dirtying memory (auto-converge)",
            options.memory_mib
        ),
        &busy,
        &load,
    );
    print_case(
        &format!(
            "{} MiB guest, 1 GiB local disk (NBD mirror)",
            options.memory_mib
        ),
        &with_disk,
        &load,
    );
    println!(
        "evacuate --wait of 5 idle {} MiB guests (two at a time): {}; load average {idle_load}",
        options.memory_mib,
        Summary::of(evacuations)
    );
    // Every record the disk guest acknowledged is in the image (the guest runs on a again).
    let acked = acknowledged(&[&a.run, &b.run])?;
    let missing = missing_records(&disk, acked)?;
    println!(
        "lost writes: {} of {} acknowledged records missing from the disk after {} moves",
        missing.len(),
        acked + 1,
        with_disk.len()
    );
    let copies = watch.finish();
    println!("two copies: {copies}");
    ensure!(missing.is_empty(), "records lost: {missing:?}");
    ensure!(copies.ok(), "two copies of a VM: {copies}");

    let (launched, booted) = restart_way(&binary, &a, &b, "idle1")?;
    println!(
        "the restart way, planned (plasmavmc stop on a; b, its HA standby, boots it): b's QEMU up after {}, the guest booted after {}; load average {}",
        ms(launched),
        ms(booted),
        load_average()
    );
    drop((a, b));
    let failover = crate::ha::run(None, 3, 0, &options.work_dir)?;
    println!(
        "the restart way, unplanned (HA failover, holder's agent killed, TTL 3 s, guest-less VM): holder fenced after {:.2} s, standby's QEMU up after {:.2} s (its guest then boots); load average {}",
        failover.fenced.as_secs_f64(),
        failover.taken_over.as_secs_f64(),
        load_average()
    );
    Ok(())
}

/// Prints one case: downtime and total time, memory sent per move.
fn print_case(what: &str, outcomes: &[Value], load: &str) {
    let ms_of = |key: &str| {
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
    println!("{what}, {} moves (load average {load}):", outcomes.len());
    println!("  downtime {}", ms_of("downtimeMs"));
    println!("  total    {}", ms_of("totalMs"));
    println!("  memory sent per move {} MiB", sent >> 20);
}

struct Host {
    agent: Agent,
    run: PathBuf,
    vms: Vec<String>,
}

impl Drop for Host {
    fn drop(&mut self) {
        // The agent dies with its Agent; its QEMUs do not: kill every QEMU of this run dir.
        for name in &self.vms {
            for pid in crate::procs::qemu_pids(&self.run, name) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Counts every VM's QEMU processes on both hosts every 20 ms until finished.
struct Watch {
    runs: [PathBuf; 2],
    stop: Arc<AtomicBool>,
    most: Arc<Mutex<BTreeMap<String, usize>>>,
    moves: Mutex<BTreeMap<String, usize>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the watch saw: the most QEMUs a VM had at once, and the heartbeat check.
struct Copies {
    most_qemus: usize,
    /// VMs whose heartbeats changed host more often than they were moved.
    interleaved: Vec<String>,
}

impl Copies {
    fn ok(&self) -> bool {
        self.most_qemus <= 2 && self.interleaved.is_empty()
    }
}

impl std::fmt::Display for Copies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at most {} QEMU processes of a VM at once (2 = the paused source and the incoming one), \
             exactly 1 after every move; heartbeats of two running copies: {}",
            self.most_qemus,
            if self.interleaved.is_empty() {
                "none".to_owned()
            } else {
                self.interleaved.join(", ")
            }
        )
    }
}

impl Watch {
    fn start(runs: &[&PathBuf; 2], vms: &[String]) -> Watch {
        let runs = [runs[0].clone(), runs[1].clone()];
        let stop = Arc::new(AtomicBool::new(false));
        let most = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, m, r, vms) = (stop.clone(), most.clone(), runs.clone(), vms.to_vec());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let counts = crate::procs::qemu_counts(&r, &vms);
                let mut most = m.lock().unwrap();
                for (vm, count) in counts {
                    let seen = most.entry(vm).or_insert(0);
                    *seen = (*seen).max(count);
                }
                drop(most);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch {
            runs,
            stop,
            most,
            moves: Mutex::new(BTreeMap::new()),
            thread: Some(thread),
        }
    }

    fn moves_start(&self, vms: &[&str]) {
        let mut moves = self.moves.lock().unwrap();
        for vm in vms {
            *moves.entry(vm.to_string()).or_insert(0) += 1;
        }
    }

    /// After a move: exactly one QEMU of `vm` on the two hosts.
    fn at_rest(&self, vm: &str) -> Result<()> {
        let count: usize = self
            .runs
            .iter()
            .map(|r| crate::procs::qemu_count(r, vm))
            .sum();
        ensure!(count == 1, "{count} QEMUs of {vm} after its move");
        Ok(())
    }

    /// Waits until `vm` has one QEMU, under `run`.
    fn wait_only(&self, vm: &str, run: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let here = crate::procs::qemu_count(run, vm);
            let all: usize = self
                .runs
                .iter()
                .map(|r| crate::procs::qemu_count(r, vm))
                .sum();
            if here == 1 && all == 1 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{vm} never ran on one host only ({all} QEMUs)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> Copies {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let most = self.most.lock().unwrap();
        let moves = self.moves.lock().unwrap();
        let interleaved = most
            .keys()
            .filter(|vm| heartbeat_switches(&self.runs, vm) > moves.get(*vm).copied().unwrap_or(0))
            .cloned()
            .collect();
        Copies {
            most_qemus: most.values().copied().max().unwrap_or(0),
            interleaved,
        }
    }
}

/// `vm`'s heartbeats on both consoles, by guest uptime: how often the host changes.
fn heartbeat_switches(runs: &[PathBuf; 2], vm: &str) -> usize {
    let mut beats: Vec<(f64, usize)> = Vec::new();
    for (host, run) in runs.iter().enumerate() {
        let log = std::fs::read_to_string(console_log(run, vm)).unwrap_or_default();
        beats.extend(
            log.split(HEARTBEAT)
                .skip(1)
                .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
                .map(|uptime: f64| (uptime, host)),
        );
    }
    beats.sort_by(|x, y| x.0.total_cmp(&y.0));
    beats.windows(2).filter(|w| w[0].1 != w[1].1).count()
}

fn console_log(run: &Path, vm: &str) -> PathBuf {
    run.join("vms").join(vm).join("console.log")
}

/// `plasmavmc migrate VM --to TO --json` on the host of `run`.
fn migrate(binary: &Path, run: &Path, vm: &str, to: &str, watch: &Watch) -> Result<Value> {
    watch.moves_start(&[vm]);
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

/// `plasmavmc evacuate --wait` on the host of `run`.
fn evacuate(binary: &Path, run: &Path) -> Result<()> {
    let output = Command::new(binary)
        .args(["evacuate", "--wait", "--run-dir"])
        .arg(run)
        .output()?;
    if !output.status.success() {
        bail!(
            "evacuate --wait: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The restart way: `plasmavmc stop VM` on `a`; its HA standby `b` takes the lock and boots it.
/// Returns until b's QEMU was up, and until its guest had booted.
fn restart_way(binary: &Path, a: &Host, b: &Host, vm: &str) -> Result<(Duration, Duration)> {
    let booted_before = std::fs::read_to_string(console_log(&b.run, vm))
        .unwrap_or_default()
        .matches("PLASMAVMC-GUEST-READY")
        .count();
    let started = Instant::now();
    crate::agent::cli(binary, &a.run, &["stop", vm])?;
    let deadline = started + BOOT;
    while crate::procs::qemu_count(&b.run, vm) == 0 {
        ensure!(Instant::now() < deadline, "b never started {vm}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let launched = started.elapsed();
    loop {
        let boots = std::fs::read_to_string(console_log(&b.run, vm))
            .unwrap_or_default()
            .matches("PLASMAVMC-GUEST-READY")
            .count();
        if boots > booted_before {
            break;
        }
        ensure!(Instant::now() < deadline, "{vm} never booted on b");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((launched, started.elapsed()))
}

/// The highest record number the disk guest acknowledged, on either console.
fn acknowledged(runs: &[&PathBuf; 2]) -> Result<usize> {
    runs.iter()
        .flat_map(|run| {
            let log = std::fs::read_to_string(console_log(run, "disk")).unwrap_or_default();
            log.split(ACK)
                .skip(1)
                .filter_map(|rest| {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .collect::<Vec<usize>>()
        })
        .max()
        .context("the disk guest acknowledged no record")
}

/// Records 0..=`last` that are not in the image.
fn missing_records(image: &Path, last: usize) -> Result<Vec<usize>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(image)?;
    let mut missing = Vec::new();
    let mut record = [0u8; RECORD];
    for i in 0..=last {
        file.seek(SeekFrom::Start((i * RECORD) as u64))?;
        file.read_exact(&mut record)?;
        if !record.starts_with(format!("REC-{i}\n").as_bytes()) {
            missing.push(i);
        }
    }
    Ok(missing)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn wait_console(run: &Path, vm: &str, marker: &str, within: Duration) -> Result<()> {
    let log = console_log(run, vm);
    let deadline = Instant::now() + within;
    while !std::fs::read_to_string(&log).is_ok_and(|text| text.contains(marker)) {
        if Instant::now() > deadline {
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
    std::thread::sleep(Duration::from_secs(2));
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
