//! `plasmavmc-bench`: measures the agent against the goals in docs/benchmarks.md.
//!
//! Benchmarks are a command, never a timed test: figures depend on the machine, so they are
//! printed (and recorded in docs/) rather than asserted.

mod adopt;
mod agent;
mod chainfire;
mod console;
mod disks;
mod faults;
mod ha;
mod hotplug;
#[path = "../../../tests/support/local_etcd.rs"]
mod local_etcd;
mod metrics;
mod migrate;
#[path = "../../../tests/support/mount_ns.rs"]
mod mount_ns;
mod plan;
#[path = "../../../tests/support/procs.rs"]
mod procs;
mod save;
mod stats;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Defaults shared by the subcommands' options.
const GUEST_DIR: &str = "target/test-guest";
const WORK_DIR: &str = "/tmp/plasmavmc-bench";

/// `--guest-dir` as an absolute path: the agents the benches start run elsewhere.
fn absolute(path: &str) -> std::io::Result<PathBuf> {
    std::path::absolute(path)
}

/// The test guest a bench boots, and where it works.
#[derive(clap::Args)]
pub struct GuestDirs {
    /// Where `tests/guest/build.sh DIR` put vmlinuz and initramfs.cpio.gz.
    #[arg(long, default_value = GUEST_DIR, value_parser = absolute)]
    pub guest_dir: PathBuf,
    #[arg(long, default_value = WORK_DIR)]
    pub work_dir: PathBuf,
}

#[derive(Parser)]
#[command(
    name = "plasmavmc-bench",
    about = "Measure plasmavmc: planning, adoption, live changes, disks, console, save/restore, \
             host shutdown, ChainFire, HA failover, status under load and faults"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Time a no-op plan (nothing changed) over many declared VMs. Pure CPU, no QEMU.
    Plan {
        #[arg(long, default_value_t = 1000)]
        vms: usize,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
    /// Kill -9 the agent while N VMs run, start a new one, time until it has adopted them all
    /// (zero restarts expected), and report its RSS. Runs real QEMUs (guest-less, TCG).
    Adopt {
        /// Comma-separated VM counts.
        #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
        vms: Vec<usize>,
        /// Scratch directory for configs, state and run dirs.
        #[arg(long, default_value = WORK_DIR)]
        work_dir: PathBuf,
    },
    /// Live change vs restart for a disk add, a NIC add and a vCPU add on one real guest (TCG),
    /// in a network namespace of the bench's own. Needs root.
    Hotplug(hotplug::Options),
    /// Disk images: creating a 10 GiB sparse image (qcow2 and raw), and a live grow on one real
    /// guest (TCG): `reload --wait` and until the guest sees the new size.
    Disks(disks::Options),
    /// `/metrics` with N guest-less VMs: scrape time, the agent's CPU per scrape, and the QMP
    /// commands scrapes cost (none: only the sampler talks to QEMU).
    Metrics(metrics::Options),
    /// Console round trip: a key typed into `plasmavmc console` until the guest's echo comes
    /// back out of it, on one real guest's shell (TCG).
    Console(console::Options),
    /// Managed save and restore of one real guest (TCG) against its boot; host shutdown of N
    /// guest-less VMs that ignore ACPI, in parallel (`shutdown-host`) against one by one.
    Save(save::Options),
    /// Live migration between two agents on this machine (loopback etcd; the second agent in a
    /// mount namespace of its own): downtime and total time of idle guests, of a guest
    /// dirtying memory (auto-converge) and of a guest with a 1 GiB local disk (NBD mirror) that
    /// keeps writing (no acknowledged write may be lost); `evacuate --wait` of 5 idle guests;
    /// QEMU processes counted all along (never two copies); and the restart way (stop there,
    /// boot here; HA failover) in the same run. Needs root.
    Migrate {
        #[command(flatten)]
        dirs: GuestDirs,
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Rounds: each moves 5 idle guests a -> b and evacuates b, and moves the dirtying guest
        /// and the disk guest a -> b -> a.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// ChainFire against loopback etcd: host-failure detection and HA failover after a kill -9
    /// per TTL, store writes per minute in steady state, publish latency of a state change.
    Chainfire {
        /// Lease TTLs, in seconds, for detection and failover.
        #[arg(long, value_delimiter = ',', default_value = "3,10")]
        ttls: Vec<u64>,
        /// Kills per TTL for detection and failover.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// VMs published in the steady-state measurement.
        #[arg(long, default_value_t = 50)]
        vms: u32,
        /// How long the steady state is watched, in seconds.
        #[arg(long, default_value_t = 60)]
        window: u64,
        #[arg(long, default_value_t = 20)]
        samples: u32,
        /// `etcd` binary (default: from PATH).
        #[arg(long)]
        etcd: Option<PathBuf>,
    },
    /// HA failover end to end: two real agents and a loopback etcd, one HA VM (guest-less
    /// QEMU); the holder's agent is killed -9 and not restarted. Times its QEMU's fence (by the
    /// fence guard) and the standby's QEMU start, per TTL; fails if two copies ever run.
    Ha {
        /// Lease TTLs, in seconds.
        #[arg(long, value_delimiter = ',', default_value = "3,10")]
        ttls: Vec<u64>,
        /// Kills per TTL.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        #[arg(long, default_value = WORK_DIR)]
        work_dir: PathBuf,
        /// `etcd` binary (default: from PATH).
        #[arg(long)]
        etcd: Option<PathBuf>,
    },
    /// The fault matrix: inject each fault the agent must survive (agent kill -9, also mid-apply;
    /// corrupt operator.json; FIFO config; full state filesystem; a stalled QEMU, also across an
    /// agent restart; a held qmp.sock; corrupt or newer spec.json; garbage or deleted pidfile; a
    /// start failing after launch; a second agent), in a run dir whose path has commas, a few
    /// times into a real agent with guest-less QEMUs; count every VM's QEMU processes in /proc
    /// throughout, and print fault, tried, duplicates, VMs lost, VMs restarted. Needs root (the
    /// state and run dirs are small tmpfs).
    Faults(faults::Options),
    /// `status` latency (median, p99) for N healthy guest-less VMs: with no fault, with one
    /// more VM's QEMU stalled (SIGSTOP), behind idle connections, and with concurrent clients.
    /// Runs real QEMUs (TCG); the idle connections are held by child processes, 10,000 each.
    Status(status::Options),
    /// (Used by `status`.) Open N silent connections to SOCKET and hold them until stdin closes.
    #[command(hide = true)]
    HoldIdle { socket: PathBuf, connections: usize },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Plan { vms, iterations } => {
            let summary = plan::run(vms, iterations);
            println!("no-op plan, {vms} VMs: {summary}");
        }
        Bench::Adopt { vms, work_dir } => adopt::report(&vms, &work_dir)?,
        Bench::Chainfire {
            ttls,
            rounds,
            vms,
            window,
            samples,
            etcd,
        } => {
            let options = chainfire::BenchOptions {
                etcd_bin: etcd,
                ttls,
                rounds,
                steady_vms: vms,
                steady_window: std::time::Duration::from_secs(window),
                latency_samples: samples,
            };
            let figures = tokio::runtime::Runtime::new()?.block_on(chainfire::run(&options))?;
            chainfire::report(&options, &figures);
        }
        Bench::Ha {
            ttls,
            rounds,
            work_dir,
            etcd,
        } => ha::report(etcd.as_deref(), &ttls, rounds, &work_dir)?,
        Bench::Status(options) => status::report(&options)?,
        Bench::Faults(options) => faults::report(&options)?,
        Bench::Metrics(options) => metrics::report(&options)?,
        Bench::Console(options) => console::report(&options)?,
        Bench::HoldIdle {
            socket,
            connections,
        } => status::hold_idle_here(&socket, connections)?,
        Bench::Disks(options) => disks::report(&options)?,
        Bench::Migrate {
            dirs: GuestDirs {
                guest_dir,
                work_dir,
            },
            memory_mib,
            rounds,
        } => migrate::report(&migrate::Options {
            guest_dir,
            work_dir,
            memory_mib,
            rounds,
        })?,
        Bench::Save(options) => save::report(&options)?,
        Bench::Hotplug(options) => hotplug::report(&options)?,
    }
    Ok(())
}
