//! The `plasmavmc` command line: the daemon (`agent`) and the client commands that talk to it over
//! `<run-dir>/control.sock`.
//!
//! Exit codes, for every command: 0 ok, 1 the operation failed, 2 usage error or invalid config
//! (nothing touched), 3 the agent is not reachable (not running, or permission denied).
//! Every client command gives up with exit 1 when the agent does not answer in time (30 s for
//! `status` and `plan`, 10 min for commands that may wait for guests).

mod commands;
mod console;
mod evacuate;
mod events;
mod generate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::control::protocol::Request;
use crate::daemon::{AgentOptions, ChainfireOptions, MetricsOptions};
use crate::paths::{DEFAULT_CONFIG, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR};
use crate::qemu::guard::GuardOptions;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "plasmavmc",
    version,
    about = "Declarative QEMU VMs: the host matches desired.json, changes are applied live",
    long_about = "Declarative QEMU VMs for NixOS hosts.\n\n\
        `plasmavmc agent` makes the host match the desired-state file: it starts, adopts and \
        stops QEMU processes, applies disk/NIC/vCPU/memory changes live over QMP, and reports \
        what must wait for a restart. The other commands talk to the running agent over \
        <run-dir>/control.sock.\n\n\
        Exit codes: 0 ok, 1 operation failed (or no answer in time: 30 s for status and plan, \
        10 min for commands that may wait for guests), 2 usage error or invalid config \
        (nothing touched), 3 agent not reachable (not running, or permission denied)."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where client commands find the agent.
#[derive(Debug, clap::Args)]
struct RunDirArg {
    /// The agent's run directory; its control socket is <run-dir>/control.sock.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Run the agent (daemon): adopt running VMs, reconcile on every config change, serve the
    /// control socket.
    ///
    /// On start it adopts the QEMUs of declared VMs without restarting them, stops VMs that are
    /// no longer declared, and reports (never touches) QEMUs it cannot identify. It reconciles
    /// again when the config file changes, on SIGHUP, on `plasmavmc reload`, and when a QEMU
    /// exits. SIGTERM stops the agent and leaves every VM running; with --chainfire it also
    /// leaves its lease for the next agent to resume (HA VMs keep running if one comes back in
    /// time; if none does, their fence guards stop them before the lease expires).
    Agent(AgentArgs),
    /// Check a desired-state file and list every problem with its JSON path. Needs no agent.
    Validate {
        /// The desired-state JSON file.
        file: PathBuf,
        /// {"file", "valid", "vms", "problems": [{"path", "message"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Show what the agent would change (read-only): steps applied live and changes pending
    /// until a restart.
    ///
    /// Plans against the VMs the agent runs now. Without a reachable agent, plans against no
    /// running VMs (everything would be started) and says so.
    Plan {
        /// Desired-state file to plan for; default: the file the agent watches.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        run_dir: RunDirArg,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the agent re-read its config file and apply it; prints the steps applied and the
    /// pending changes.
    ///
    /// Exits 1 if any step failed, 2 if the config is invalid (then nothing is touched).
    Reload {
        /// Wait until the changes are applied (always the case; kept for ExecReload scripts).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show every VM: state, PID, uptime, devices as QEMU reports them now, pending changes,
    /// last error; and any stranger QEMU.
    Status {
        /// Machine-readable: {"vms": {NAME: {"state", "pid", "uptimeSeconds", "devices",
        /// "pending", "lastError", ...}}, "strangers": [...], "config": {...}}.
        #[arg(long)]
        json: bool,
        /// Keep the table on screen, redrawn on every event (see `plasmavmc events`) and every
        /// --interval, until Ctrl-C.
        #[arg(long, conflicts_with_all = ["json", "cluster"])]
        watch: bool,
        /// With --watch: redraw at least this often (e.g. 2s, 1m).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration, requires = "watch")]
        interval: std::time::Duration,
        /// Every host's VMs as ChainFire has them (needs an agent started with --chainfire).
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Start a declared VM, cancelling an earlier `stop` or a restart backoff.
    Start {
        vm: String,
        /// Print the report as JSON (as `reload --json`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Stop a VM (ACPI powerdown, then quit) and keep it down, across agent restarts, until
    /// `plasmavmc start`.
    ///
    /// Shows how long it has waited while on a terminal, and ends with a line saying whether the
    /// guest shut down or was force-quit. An `unresponsive` VM (see `status`) is only stopped
    /// with --force, which kills its QEMU.
    Stop {
        vm: String,
        /// How long the guest gets to shut down after the ACPI powerdown before QEMU is told to
        /// quit (e.g. 30s, 2m) [default: the agent's --stop-timeout].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Do not ask the guest: quit QEMU now (SIGKILL if it does not answer). Also kills the
        /// QEMU of an `unresponsive` VM.
        #[arg(long)]
        force: bool,
        /// Print the outcome as JSON: {"vm", "how": "shutDown"|"quit"|"killed"|"alreadyStopped",
        /// "forceQuit", "forced", "timeoutSeconds", "seconds"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Reset a running VM: hard (system_reset) by default.
    Reset {
        vm: String,
        /// ACPI powerdown, wait for the guest to shut down, start it again in the same QEMU;
        /// falls back to a hard reset (and says so) if the guest does not shut down in time.
        #[arg(long)]
        soft: bool,
        /// Print the outcome as JSON: {"message"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Follow what happens on this host, one line per event, until Ctrl-C: VMs started, stopped,
    /// failed, restarted; devices added and removed; pending changes; HA locks gained and lost;
    /// fences.
    ///
    /// Exits 1 when the agent closes the stream (it stopped or restarted), 3 when it is not
    /// reachable.
    Events {
        /// One JSON object per line: {"time", "vm", "event": "started"|"stopped"|"failed"|
        /// "restarted"|"deviceAdded"|"deviceRemoved"|"unplugWaiting"|"changed"|
        /// "pendingChanged"|"lockGained"|"lockLost"|"fenced"|"missed", ...details}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Attach to a VM's serial console; Ctrl-] detaches.
    ///
    /// On a terminal it is interactive (raw mode, like `virsh console`). Piped, it copies the
    /// console to stdout and stdin to the guest, and ends once stdin ended and the console was
    /// quiet for --linger seconds. Any number of clients may read; one at a time may type (a
    /// second is refused and told who holds it, unless --force). The log
    /// <run-dir>/vms/NAME/console.log holds everything the guest printed, attached or not.
    ///
    /// Exits 0 when detached or when the console closes (the VM stopped), 1 when refused.
    Console {
        vm: String,
        /// Read only: never type, never take the writer seat; follow until the console closes.
        #[arg(long)]
        no_stdin: bool,
        /// Take the writer seat over from whoever holds it (they are told and detached).
        #[arg(long, conflicts_with = "no_stdin")]
        force: bool,
        /// Print the last N lines of the console log first.
        #[arg(long, value_name = "N", default_value_t = 0)]
        tail: usize,
        /// Piped: after stdin ends, wait until the console was quiet this long, then end.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        linger: f64,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Print the completion script for a shell (the Nix package installs them).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (plasmavmc.1, plasmavmc-COMMAND.1) into a directory (the Nix package
    /// installs them).
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Managed save: write the running VM's whole state (memory and devices) to
    /// <state-dir>/saved/NAME, stop its QEMU, and keep it saved (across agent restarts and
    /// reboots) until `plasmavmc start NAME`, which restores it: the guest goes on where it was.
    ///
    /// Refused for HA VMs and for a VM changed live since it booted (restart it first). A save
    /// that cannot be restored later (QEMU refuses it, or the declared VM changed in a setting
    /// only a boot applies) is kept under <state-dir>/saved/unrestorable/, shown by `status`,
    /// and the VM boots fresh.
    Save {
        vm: String,
        /// Print the outcome as JSON: {"message"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Move a running HA VM to another host, live: the guest keeps running, paused only for the
    /// switchover (the HA lock moves to HOST in one ChainFire transaction while it is paused).
    ///
    /// Run it on the host where NAME runs. The VM must be declared with ha.enable on both hosts;
    /// disks declared `shared` stay where they are. Returns once NAME runs on HOST (exit 0), or
    /// once the move was abandoned and NAME runs here as before (exit 1, saying why). On a
    /// terminal it shows progress; at the end one line with the downtime, the total time and the
    /// bytes sent.
    Migrate {
        vm: String,
        /// The target host's --host-id.
        #[arg(long, value_name = "HOST", required_unless_present = "cancel")]
        to: Option<String>,
        /// Cold move: pause the guest for the whole copy (for a guest that dirties memory faster
        /// than the link carries it).
        #[arg(long, conflicts_with = "cancel")]
        offline: bool,
        /// Abandon the move of NAME in flight from this host (the VM stays here).
        #[arg(long)]
        cancel: bool,
        /// Cap the migration stream at this many MiB/s (default: as fast as the link goes).
        #[arg(long, value_name = "MIB", conflicts_with = "cancel")]
        bandwidth: Option<u64>,
        /// Print the outcome as JSON: {"vm", "from", "to", "mode": "live"|"offline",
        /// "downtimeMs", "totalMs", "transferredBytes"} ({"message"} with --cancel).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Close this host to HA VMs from elsewhere: none is failed over, migrated or started here
    /// until `plasmavmc uncordon`. VMs running here stay; an HA VM stopped here lets its lock go
    /// to another host.
    ///
    /// The cordon is published in ChainFire and kept in the state dir, so it survives agent
    /// restarts and reboots. VMs declared on this host only (not `ha.enable`) are not affected:
    /// they have no other host.
    ///
    /// Returns once ChainFire holds the cordon (every host reading it then sees it), or after 5
    /// seconds without the store: the host is cordoned here all the same, the answer says the
    /// cluster does not know yet, and the agent tells it when the store is back. Exit 0 both ways.
    Cordon {
        /// Print the outcome as JSON: {"cordoned", "cluster": "published"|"notYet"|"standalone",
        /// "message"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Empty this host before a reboot: cordon it (see `cordon`), then move every VM that can
    /// move to another live, uncordoned host that declares it, live, two at a time.
    ///
    /// Targets: the VM's `ha.preferredHosts` first, then the least busy host. VMs that cannot
    /// move (declared here only, or no other host can take them) are listed and stay; the
    /// host's shutdown takes them down as their `onHostShutdown` says. The host stays cordoned,
    /// across agent restarts and reboots, until `plasmavmc uncordon`. The workflow:
    /// `nixos-rebuild boot && plasmavmc evacuate --wait && reboot`.
    ///
    /// Prints the plan; with --wait, follows the moves and exits 0 when every VM that could move
    /// did, 1 when a move failed (the VM runs here as before). An agent restarted meanwhile
    /// carries the evacuation on; run again, `evacuate --wait` follows the one under way.
    Evacuate {
        /// Wait until every move has ended, printing each as it does.
        #[arg(long)]
        wait: bool,
        /// Print the evacuation (at the end, with --wait) as JSON: {"startedAt", "finished",
        /// "vms": {NAME: {"state": "queued"|"moving"|"moved"|"failed"|"staying", "to", "note"}}}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Open a cordoned host again (see `cordon` and `evacuate`): it takes HA VMs again.
    ///
    /// Returns once ChainFire holds the host open (a `migrate --to` this host from another host
    /// is then accepted), or after 5 seconds without the store, saying the cluster does not know
    /// yet (see `cordon`). Exit 0 both ways.
    Uncordon {
        /// Print the outcome as JSON: {"cordoned", "cluster": "published"|"notYet"|"standalone",
        /// "message"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// Say how the running agent's first apply went, waiting for it while it runs: exit 0 when
    /// every VM was applied, 1 naming each VM that failed and why (or when it still runs at
    /// --timeout), 2 when the agent had no valid config (nothing touched), 3 when no agent is
    /// reachable.
    ///
    /// The first apply is the one right after the agent started (at boot, after a switch that
    /// restarted it, after `systemctl restart plasmavmc`); later reloads do not change its
    /// outcome: their own exit code, `status` and `events` say how they went. The NixOS module
    /// runs this as plasmavmc-first-apply.service after every agent start, so a switch that
    /// restarts the agent fails, naming that unit, when the first apply fails.
    FirstApply {
        /// How long to wait for a first apply that is still running (e.g. 90s, 5m).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Print the outcome as JSON: {"state": "pending"|"done"|"failed"|"notApplied", "steps",
        /// "vms": {NAME: why}, "kind", "message"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// (Run by the NixOS module at host shutdown.) Take every running VM down as its
    /// `onHostShutdown` says: `powerdown` (ACPI, then quit after the stop timeout), `save`, or
    /// `evacuate` (HA VMs move live to another host, the others are saved), all VMs in
    /// parallel; the agent starts no VM afterwards.
    ShutdownHost {
        /// Upper bound for the powerdowns (each also bounded by the agent's --stop-timeout).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
        /// Do nothing unless systemd is shutting the host down (`systemctl is-system-running`
        /// says `stopping`): a unit stopped by hand or by a switch leaves the VMs alone.
        #[arg(long)]
        only_when_system_stops: bool,
        /// Print the outcome as JSON: {"message"} (one line per VM in the message).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        run_dir: RunDirArg,
    },
    /// (Started by the agent.) Run an HA VM's QEMU as this process's child and kill it when the
    /// agent stops renewing the ChainFire lease its lock is bound to.
    ///
    /// QEMU dies with the guard, so an HA VM never runs unguarded; the guard needs no agent, so
    /// a host whose agent was killed still fences its HA VMs before the lease expires in the
    /// store. SIGTERM, SIGINT and SIGHUP leave the guard running; it exits with QEMU.
    FenceGuard(FenceGuardArgs),
}

#[derive(Debug, clap::Args)]
struct FenceGuardArgs {
    /// The agent's lease trust file (<run-dir>/lease.json).
    #[arg(long, value_name = "FILE")]
    trust_file: PathBuf,
    /// The lease the VM's HA lock is bound to.
    #[arg(long, value_name = "ID")]
    lease: i64,
    /// The VM's directory (<run-dir>/vms/NAME): why a fence happened goes to its `fenced`.
    #[arg(long, value_name = "DIR")]
    vm_dir: PathBuf,
    /// Start QEMU as this unprivileged identity (the guard itself stays root).
    #[arg(long, value_name = "UID:GID[:GROUPS]")]
    run_as: Option<crate::runas::RunAs>,
    /// QEMU and its arguments.
    #[arg(last = true, required = true, value_name = "QEMU ARGS")]
    command: Vec<std::ffi::OsString>,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Desired-state file; re-read fresh (through symlinks) on every change and reload.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Persistent state (operator stops survive agent restarts and reboots).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Runtime directory (tmpfs): control socket, per-VM QMP sockets, pidfiles, console logs.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// QEMU binary [default: $PLASMAVMC_QEMU, else qemu-system-x86_64 from PATH].
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// How long a guest gets to shut down after an ACPI powerdown before QEMU is told to quit.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    stop_timeout: u64,
    /// How long a guest gets to release a device after device_del before it is shown
    /// `unplugging` (the removal is retried on the next reconcile).
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    unplug_timeout: u64,
    /// Run every QEMU as this unprivileged user (with its supplementary groups, e.g. kvm);
    /// disk images, block devices and taps are given to it. Without it QEMU runs as root.
    #[arg(long, value_name = "USER")]
    qemu_user: Option<String>,
    /// The group QEMU runs as, and that gets the run directory [default: the user's primary
    /// group].
    #[arg(long, value_name = "GROUP", requires = "qemu_user")]
    qemu_group: Option<String>,
    /// Seconds a host must have been live and uncordoned, without a break, before a VM that
    /// lists it first in `ha.preferredHosts` is moved there live (a host that flaps, or has just
    /// rebooted, is not chased at once).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    placement_settle: u64,
    #[command(flatten)]
    chainfire: ChainfireArgs,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (per-VM state, vCPUs, memory, disk
    /// and NIC counters, QEMU CPU and RSS; reconcile durations, reloads, ChainFire health).
    /// Scrapes never wait for QEMU: they show each VM's last sample and its age.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// How often the metrics sampler asks each VM's QEMU for its figures (a few QMP queries
    /// per VM), whatever the scrape rate.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), requires = "metrics_listen")]
    metrics_interval: u64,
    #[command(flatten)]
    migration: MigrationArgs,
}

#[derive(Debug, clap::Args)]
struct MigrationArgs {
    /// The address this host's incoming migrations listen on, published in its ChainFire host
    /// record for sources to connect to.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    migration_address: String,
    /// The address incoming migrations actually listen on, when it is not the published
    /// --migration-address (a host behind NAT or a proxy) [default: --migration-address].
    #[arg(long, value_name = "ADDR")]
    migration_listen: Option<String>,
    /// The TCP ports incoming migrations listen on, FIRST-LAST (open them in the firewall).
    #[arg(long, value_name = "FIRST-LAST", default_value = "49152-49215")]
    migration_ports: crate::migration::ports::PortRange,
    /// Encrypt migration streams with TLS: a directory in QEMU's tls-creds-x509 layout
    /// (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem); both
    /// hosts of a move need it. WITHOUT IT THE STREAM (the guest's whole memory and disks) IS
    /// PLAINTEXT on the network.
    #[arg(long, value_name = "DIR")]
    migration_tls_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ChainfireArgs {
    /// ChainFire (etcd v3 API) endpoints, comma separated; without it the agent is standalone.
    #[arg(long, value_name = "URL,..", value_delimiter = ',')]
    chainfire: Vec<String>,
    /// This host's id in the cluster.
    #[arg(long, value_name = "ID")]
    host_id: Option<String>,
    /// A host that stops is seen failed, and its HA VMs are free to start elsewhere, within
    /// this many seconds (at least 3) [default: 10].
    #[arg(long, value_name = "SECS")]
    lease_ttl: Option<u64>,
    /// CA bundle to verify ChainFire's TLS certificate.
    #[arg(long, value_name = "FILE")]
    chainfire_ca: Option<PathBuf>,
    /// Client certificate for ChainFire mTLS.
    #[arg(long, value_name = "FILE")]
    chainfire_cert: Option<PathBuf>,
    /// Client key for ChainFire mTLS.
    #[arg(long, value_name = "FILE")]
    chainfire_key: Option<PathBuf>,
    /// ChainFire user name.
    #[arg(long, value_name = "USER")]
    chainfire_user: Option<String>,
    /// File holding the ChainFire password.
    #[arg(long, value_name = "FILE")]
    chainfire_password_file: Option<PathBuf>,
}

/// Parses the command line and runs the command; the process's exit code.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => commands::agent(args.into_options()),
        Command::Validate { file, json } => commands::validate(&file, json),
        Command::Plan {
            config,
            run_dir,
            json,
        } => commands::plan(config.as_deref(), &run_dir.run_dir, json),
        Command::Reload { run_dir, json, .. } => commands::reload(&run_dir.run_dir, json),
        Command::Status {
            watch: true,
            interval,
            run_dir,
            ..
        } => events::watch_status(&run_dir.run_dir, interval),
        Command::Status {
            json,
            cluster,
            run_dir,
            ..
        } => commands::status(&run_dir.run_dir, json, cluster),
        Command::Events { json, run_dir } => events::events(&run_dir.run_dir, json),
        Command::Start { vm, json, run_dir } => commands::start(&run_dir.run_dir, vm, json),
        Command::Stop {
            vm,
            timeout,
            force,
            json,
            run_dir,
        } => commands::stop(&run_dir.run_dir, vm, timeout, force, json),
        Command::Reset {
            vm,
            soft,
            json,
            run_dir,
        } => commands::reset(&run_dir.run_dir, vm, soft, json),
        Command::Console {
            vm,
            no_stdin,
            force,
            tail,
            linger,
            run_dir,
        } => console::console(
            &run_dir.run_dir,
            vm,
            console::ConsoleOptions {
                no_stdin,
                force,
                tail,
                linger: std::time::Duration::from_secs_f64(linger.max(0.0)),
            },
        ),
        Command::Completions { shell } => generate::print(&generate::completions(shell)),
        Command::Manpages { dir } => generate::manpages(&dir),
        Command::Save { vm, json, run_dir } => commands::save(&run_dir.run_dir, vm, json),
        Command::Migrate {
            vm,
            to,
            offline,
            cancel,
            bandwidth,
            json,
            run_dir,
        } => commands::migrate(
            &run_dir.run_dir,
            Request::Migrate {
                vm,
                to,
                offline,
                cancel,
                bandwidth_mib: bandwidth,
            },
            json,
        ),
        Command::ShutdownHost {
            timeout,
            only_when_system_stops,
            json,
            run_dir,
        } => commands::shutdown_host(&run_dir.run_dir, timeout, only_when_system_stops, json),
        Command::FirstApply {
            timeout,
            json,
            run_dir,
        } => commands::first_apply(&run_dir.run_dir, timeout, json),
        Command::Cordon { json, run_dir } => commands::cordon(&run_dir.run_dir, json),
        Command::Uncordon { json, run_dir } => commands::uncordon(&run_dir.run_dir, json),
        Command::Evacuate {
            wait,
            json,
            run_dir,
        } => evacuate::evacuate(&run_dir.run_dir, wait, json),
        Command::FenceGuard(args) => crate::qemu::guard::run(GuardOptions {
            trust_file: args.trust_file,
            lease: args.lease,
            vm_dir: args.vm_dir,
            run_as: args.run_as,
            command: args.command,
        }),
    }
}

impl AgentArgs {
    fn into_options(self) -> AgentOptions {
        let c = self.chainfire;
        AgentOptions {
            config: self.config,
            state_dir: self.state_dir,
            run_dir: self.run_dir,
            qemu: self.qemu,
            qemu_user: self.qemu_user,
            qemu_group: self.qemu_group,
            metrics: self.metrics_listen.map(|listen| MetricsOptions {
                listen,
                interval: std::time::Duration::from_secs(self.metrics_interval),
            }),
            stop_timeout: std::time::Duration::from_secs(self.stop_timeout),
            unplug_timeout: std::time::Duration::from_secs(self.unplug_timeout),
            placement_settle: std::time::Duration::from_secs(self.placement_settle),
            chainfire: (!c.chainfire.is_empty()).then_some(ChainfireOptions {
                endpoints: c.chainfire,
                host_id: c.host_id,
                lease_ttl: c.lease_ttl,
                ca: c.chainfire_ca,
                cert: c.chainfire_cert,
                key: c.chainfire_key,
                user: c.chainfire_user,
                password_file: c.chainfire_password_file,
            }),
            migration: crate::daemon::MigrationSettings {
                address: self.migration.migration_address,
                listen: self.migration.migration_listen,
                ports: self.migration.migration_ports,
                tls_dir: self.migration.migration_tls_dir,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_guard_parses_the_arguments_the_agent_gives_it() {
        let guard = crate::qemu::Guard {
            exe: "/bin/plasmavmc".into(),
            trust_file: "/run/plasmavmc/lease.json".into(),
            lease: 7,
        };
        let vm_dir = crate::paths::RunDir::new("/run/plasmavmc").vm("ha1");
        let qemu_args = ["-name".to_owned(), "guest=ha1".to_owned()];
        let mut argv = vec![std::ffi::OsString::from("plasmavmc")];
        let run_as: crate::runas::RunAs = "990:991:78".parse().unwrap();
        argv.extend(guard.args(
            &vm_dir,
            std::path::Path::new("/bin/qemu"),
            &qemu_args,
            Some(&run_as),
        ));
        let Command::FenceGuard(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not fence-guard")
        };
        assert_eq!(args.lease, 7);
        assert_eq!(args.vm_dir, vm_dir.dir());
        assert_eq!(args.trust_file, guard.trust_file);
        assert_eq!(args.run_as, Some(run_as));
        assert_eq!(args.command, ["/bin/qemu", "-name", "guest=ha1"]);
    }

    #[test]
    fn nixos_module_first_apply_invocation_parses() {
        let cli = Cli::try_parse_from([
            "plasmavmc",
            "first-apply",
            "--timeout",
            "240s",
            "--run-dir",
            "/run/plasmavmc",
        ])
        .unwrap();
        let Command::FirstApply { timeout, json, .. } = cli.command else {
            panic!("not first-apply")
        };
        assert_eq!((timeout.as_secs(), json), (240, false));
    }

    #[test]
    fn nixos_module_agent_invocation_parses() {
        let cli = Cli::try_parse_from([
            "plasmavmc",
            "agent",
            "--config",
            "/run/current-system/etc/plasmavmc/desired.json",
            "--state-dir",
            "/var/lib/plasmavmc",
            "--run-dir",
            "/run/plasmavmc",
            "--stop-timeout",
            "60",
            "--chainfire",
            "https://a:2379,https://b:2379",
            "--host-id",
            "h1",
            "--lease-ttl",
            "10",
            "--chainfire-password-file",
            "/run/secrets/pw",
        ])
        .unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("not agent")
        };
        let options = args.into_options();
        assert_eq!(options.chainfire.unwrap().endpoints.len(), 2);
    }
}
