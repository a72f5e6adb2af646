//! QEMU processes: launched detached from the agent, found again after an agent restart.
//!
//! Detached means killing, restarting or upgrading the agent never stops a VM: under systemd
//! QEMU gets its own transient scope (so stopping the agent's unit leaves it alone), and in any
//! case its own session (no controlling terminal, no signals aimed at the agent's group).
//! Identity is PID-reuse safe: the pidfile alone is never trusted, `/proc/<pid>/cmdline` must be
//! a QEMU for this VM name and this VM directory's QMP socket.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::confine::{self, Confinement};
use super::guard::{self, Guard};
use super::passed;
use super::qmp::{Qmp, QmpError};
use crate::argv;
use crate::files::write_atomically;
use crate::identity::{self, Pidfile, Role, Sighting, Verdict};
use crate::migration::RunningConfig;
use crate::paths::{RunDir, VmDir};
use crate::spec::VmSpec;

/// Environment variable naming the QEMU binary (the CLI's `--qemu` takes precedence).
pub const QEMU_ENV: &str = "PLASMAVMC_QEMU";
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// The unit that runs `plasmavmc shutdown-host` when the host goes down (nixos-modules/systemd.nix);
/// ordering after a unit that does not exist is a no-op.
pub const HOST_SHUTDOWN_UNIT: &str = "plasmavmc-host-shutdown.service";

/// A QEMU process that is provably this VM's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningQemu {
    pub pid: u32,
    /// The spec QEMU was launched with (`<vm_dir>/spec.json`).
    pub boot_spec: VmSpec,
}

/// What runs for a VM, as far as the agent may act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per VM, short-lived
pub enum Found {
    /// Nothing: the VM may be started.
    Absent,
    /// Its QEMU, provably, with the spec it was booted with: adopt it.
    Running(RunningQemu),
    /// A process of this VM the agent cannot take over (see `identity::judge`, or an unreadable
    /// boot spec): never start another beside it; leave it alone unless the operator forces.
    Untouchable(AlreadyRuns),
}

/// Refusal to start a VM because a process of it already exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a QEMU of this VM already runs (pid {pid}): {reason}")]
pub struct AlreadyRuns {
    pub pid: u32,
    pub reason: String,
}

/// The QEMU binary: `explicit` (the `--qemu` flag), else `$PLASMAVMC_QEMU`, else from `PATH`.
pub fn qemu_binary(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(QEMU_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU))
}

/// Where and how a VM's QEMU starts: VM `name`, its directory, the QEMU binary, the fence guard
/// it runs under (if any), and as whom and in which cgroup (`confinement`).
#[derive(Clone, Copy)]
pub struct Launcher<'a> {
    pub name: &'a str,
    pub vm_dir: &'a VmDir,
    pub qemu: &'a Path,
    pub guard: Option<&'a Guard>,
    pub confinement: &'a Confinement,
}

impl Launcher<'_> {
    /// Starts QEMU as `spec` declares it (`argv::qemu_argv`), confined, handing it the
    /// credentials and cloud-init seed as inherited memfds (`passed`); see `launch_confined`.
    pub fn launch(&self, spec: &VmSpec) -> Result<u32> {
        self.launch_running(&RunningConfig::booting(spec), &[])
    }

    /// Launches QEMU with `running`'s devices laid out as it says (a migration target),
    /// recording `running.boot_spec` as the spec QEMU booted with (pending changes stay
    /// pending), with `extra` arguments after the spec's (`-incoming` for a restore, say).
    pub fn launch_running(&self, running: &RunningConfig, extra: &[&str]) -> Result<u32> {
        let spec = &running.spec;
        let passed = passed::open(self.name, spec)?;
        let block_devices = super::backing::block_devices(spec);
        let mut args = argv::qemu_argv_laid_out(
            self.name,
            spec,
            &running.layout,
            self.vm_dir,
            &block_devices,
            &passed.fds,
        );
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        self.spawn(&running.boot_spec, &args, passed.raw_fds())
        // `passed` closes here: from now on only QEMU holds the values.
    }

    /// Starts QEMU with `args`, detached, and returns its PID. With a guard, QEMU runs as the
    /// child of a fence guard, which reports QEMU's PID to the agent. Writes the boot spec
    /// (`spec`) and the pidfile; QEMU's own stdout/stderr go to `<vm_dir>/qemu.log`. Returns as
    /// soon as the process exists: use `qmp_after_launch` to wait for it to be usable (or to
    /// learn why it died). For `find_running` to recognise the process, `args` must hold
    /// `-name guest=NAME` and the QMP chardev `path=<vm_dir>/qmp.sock` (as `argv::qemu_argv`
    /// does). The confinement says as whom QEMU runs (dropped between fork and exec, by the
    /// guard for a guarded QEMU) and in which cgroup (joined between fork and exec, by the guard
    /// and QEMU alike).
    pub fn launch_confined(&self, spec: &VmSpec, args: &[String]) -> Result<u32> {
        self.spawn(spec, args, Vec::new())
    }

    /// `launch_confined`, with descriptors QEMU inherits (`inherit`: open in the agent with
    /// close-on-exec, cleared in the child only).
    fn spawn(&self, spec: &VmSpec, args: &[String], inherit: Vec<i32>) -> Result<u32> {
        let Launcher {
            name,
            vm_dir,
            qemu,
            guard,
            confinement,
        } = *self;
        let run_as = confinement.run_as.as_ref();
        match find(name, vm_dir) {
            Found::Absent => {}
            Found::Running(running) => {
                return Err(AlreadyRuns {
                    pid: running.pid,
                    reason: "it was not adopted".into(),
                }
                .into())
            }
            Found::Untouchable(already) => return Err(already.into()),
        }
        prepare_vm_dir(vm_dir)?;
        confine::open_vm_dir(vm_dir, run_as)?;
        confine::grant_boot_files(spec, run_as)?;
        let placement = match &confinement.cgroups {
            Some(cgroups) => cgroups
                .place(name, &spec.limits)
                .with_context(|| format!("VM {name}'s cgroup"))?,
            None => Default::default(),
        };
        write_atomically(
            &vm_dir.boot_spec(),
            &serde_json::to_vec_pretty(spec).expect("a VmSpec serializes"),
        )?;
        let log = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(qemu_log(vm_dir))
            .with_context(|| format!("opening {}", qemu_log(vm_dir).display()))?;
        // A guarded QEMU drops privileges in its guard, which stays root (QEMU must not be able to
        // touch its fence). Under systemd, systemd-run drops them (it must start as root itself).
        let run_as_here = run_as.filter(|_| guard.is_none());
        let scope = under_systemd().then(|| Scope {
            properties: placement.systemd_properties.clone(),
            run_as: run_as_here.cloned(),
        });
        let drop_to = run_as_here
            .filter(|_| scope.is_none())
            .map(|run_as| (run_as.clone(), confine::group_list(run_as)));
        let mut command = match guard {
            Some(guard) => detached_command(
                name,
                &guard.exe,
                &guard.args(vm_dir, qemu, args, run_as),
                scope.as_ref(),
            ),
            None => detached_command(name, qemu, args, scope.as_ref()),
        };
        let stdout = match guard {
            Some(_) => Stdio::piped(), // the guard reports QEMU's PID there
            None => log
                .try_clone()
                .context("duplicating the QEMU log handle")?
                .into(),
        };
        command.stdin(Stdio::null()).stdout(stdout).stderr(log);
        // SAFETY: only async-signal-safe calls (setsid, fcntl, umask, write, set*id) between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid()?;
                for &fd in &inherit {
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                }
                // The QMP socket and console log QEMU creates: 0600, the agent's (or QEMU's) alone.
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                placement.join()?;
                if let Some((run_as, groups)) = &drop_to {
                    confine::drop_privileges(run_as, groups)?;
                }
                Ok(())
            });
        }
        let program = guard.map_or(qemu, |g| g.exe.as_path());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {} for VM {name}", program.display()))?;
        let pid = match guard {
            Some(_) => guard::reported_pid(&mut child, vm_dir)?,
            None => child.id(),
        };
        if let Err(e) = write_atomically(&vm_dir.pidfile(), format!("{pid}\n").as_bytes()) {
            // Never leave a QEMU running that nothing tracks.
            kill_launched(&mut child, pid);
            return Err(e.context(format!("QEMU (pid {pid}) was killed again")));
        }
        // Our child (QEMU, or its guard) until the agent exits; reap it so it never lingers as a
        // zombie (after the agent is gone, init reaps it). Observers learn about the exit from QMP
        // and `/proc`.
        let (child_pid, what) = (child.id(), program_name(guard.is_some()));
        let reaper = std::thread::Builder::new()
            .name(format!("reap-{child_pid}"))
            .spawn(move || {
                let status = child.wait();
                tracing::info!(pid = child_pid, ?status, "{what} exited");
            });
        if let Err(e) = reaper {
            // QEMU runs and is tracked: failing the start now would orphan it. Its exit leaves a
            // zombie until the agent exits (`is_alive` counts zombies as dead).
            tracing::warn!(pid = child_pid, "no reaper thread for {what}: {e}");
        }
        tracing::info!(vm = name, pid, guarded = guard.is_some(), "launched QEMU");
        Ok(pid)
    }
}

/// Kills a QEMU just launched (and its guard, `child`, if it has one) and waits until both are
/// gone, so a retry never finds it still there.
fn kill_launched(child: &mut std::process::Child, qemu: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.kill();
    let _ = child.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while is_alive(qemu) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn program_name(guarded: bool) -> &'static str {
    if guarded {
        "fence guard"
    } else {
        "QEMU"
    }
}

/// Waits until the QEMU just launched as `pid` answers on its QMP socket. If it exits first (bad
/// disk path, bad option), the error carries the end of its log, which says why.
pub async fn qmp_after_launch(pid: u32, vm_dir: &VmDir, timeout: Duration) -> Result<Qmp> {
    let deadline = tokio::time::Instant::now() + timeout;
    let socket = vm_dir.qmp_socket();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match Qmp::connect(&socket, left.min(Duration::from_secs(2))).await {
            Ok(qmp) => {
                confine::seal_vm_dir(vm_dir)?;
                return Ok(qmp);
            }
            Err(e) if !is_alive(pid) => {
                bail!(
                    "QEMU exited during startup ({e}): {}",
                    qemu_log_tail(vm_dir)
                )
            }
            Err(e) if left.is_zero() || !is_transient(&e) => {
                return Err(e).context(format!("QEMU (pid {pid}) never answered on QMP"));
            }
            // The socket appears a moment after exec; retry shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A connect error that only means "QEMU has not opened its socket yet".
fn is_transient(error: &QmpError) -> bool {
    match error {
        QmpError::Connect { source, .. } => matches!(
            source.kind(),
            ErrorKind::NotFound | ErrorKind::ConnectionRefused
        ),
        QmpError::ConnectTimeout { .. } => true,
        _ => false,
    }
}

/// What runs for VM `name`: its pidfile and every process whose command line is the VM's QEMU
/// or fence guard (a `/proc` scan; QEMU is not asked anything), judged by `identity::judge`.
pub fn find(name: &str, vm_dir: &VmDir) -> Found {
    let sighting = sighting(name, vm_dir);
    let pid = match identity::judge(&sighting, &vm_dir.pidfile()) {
        Verdict::Absent => return Found::Absent,
        Verdict::Untouchable { pid, reason } => {
            return Found::Untouchable(AlreadyRuns { pid, reason })
        }
        Verdict::Adopt { pid } => pid,
    };
    let path = vm_dir.boot_spec();
    let boot_spec = fs::read(&path)
        .with_context(|| format!("reading {}", path.display()))
        .and_then(|json| {
            serde_json::from_slice(&json).with_context(|| {
                format!(
                    "{}: not a VM spec this agent understands (corrupt, or written by a newer agent)",
                    path.display()
                )
            })
        });
    match boot_spec {
        Ok(boot_spec) => Found::Running(RunningQemu { pid, boot_spec }),
        Err(e) => Found::Untouchable(AlreadyRuns {
            pid,
            reason: format!("{e:#}"),
        }),
    }
}

/// The pidfile and the live processes of VM `name`, found by scanning `/proc`.
pub fn sighting(name: &str, vm_dir: &VmDir) -> Sighting {
    let pidfile = match fs::read_to_string(vm_dir.pidfile()) {
        Err(_) => Pidfile::Missing,
        Ok(text) => match text.trim().parse() {
            Ok(pid) => Pidfile::Pid(pid),
            Err(_) => Pidfile::Garbage(text.trim().chars().take(40).collect()),
        },
    };
    let mut found = Sighting {
        pidfile,
        qemus: Vec::new(),
        guards: Vec::new(),
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        match identity::role_of(&cmdline, name, vm_dir) {
            Some(Role::Qemu) if is_alive(pid) => found.qemus.push(pid),
            Some(Role::Guard) if is_alive(pid) => found.guards.push(pid),
            _ => {}
        }
    }
    found.qemus.sort_unstable();
    found.guards.sort_unstable();
    found
}

/// The QEMU of VM `name`, if the pidfile names a live process that is provably it.
/// `Ok(None)`: no pidfile, or the PID is dead or belongs to something else (PID reuse).
/// `Err`: a process of this VM exists that cannot be adopted (`Found::Untouchable`).
pub fn find_running(name: &str, vm_dir: &VmDir) -> Result<Option<RunningQemu>> {
    match find(name, vm_dir) {
        Found::Absent => Ok(None),
        Found::Running(running) => Ok(Some(running)),
        Found::Untouchable(already) => Err(already.into()),
    }
}

/// Names of all VM directories under `<run-dir>/vms` (the VMs some agent launched on this boot).
/// With `find_running`, this is how undeclared QEMUs are found.
pub fn list_vm_dirs(run_dir: &RunDir) -> Result<Vec<String>> {
    let dir = run_dir.vms_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Whether `pid` is alive (a zombie counts as dead).
pub fn is_alive(pid: u32) -> bool {
    stat_field(pid, 3).is_some_and(|state| state != "Z" && state != "X")
}

/// Field `field` of `/proc/<pid>/stat`, numbered as in proc(5) (3 and up: state, ppid, ...).
pub(crate) fn stat_field(pid: u32, field: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, is in parentheses and may hold spaces and parentheses itself.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace()
        .nth(field.checked_sub(3)?)
        .map(str::to_owned)
}

/// Waits until `pid` has exited, up to `timeout`; true if it did. Event driven through a pidfd
/// (works for processes that are not our children, e.g. adopted QEMUs).
pub async fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let exited = async {
        match Pidfd::open(pid) {
            Ok(pidfd) => {
                // SAFETY: the AsyncFd owns the pidfd, which stays open for as long as it is
                // registered.
                if let Ok(fd) = unsafe { tokio::io::unix::AsyncFd::register(pidfd) } {
                    let _ = fd.readable().await;
                }
            }
            // ESRCH: gone already. Anything else (no pidfd support): fall back to watching /proc.
            Err(_) => {
                while is_alive(pid) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    tokio::time::timeout(timeout, exited).await.is_ok() || !is_alive(pid)
}

/// A pidfd: becomes readable when the process exits.
pub(crate) struct Pidfd(std::os::fd::OwnedFd);

impl Pidfd {
    pub(crate) fn open(pid: u32) -> std::io::Result<Pidfd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just handed us this fd; nobody else owns it.
        Ok(Pidfd(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }
}

impl std::os::fd::AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl std::os::fd::AsFd for Pidfd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Whether `pid` runs a QEMU started for VM `name` with `vm_dir`'s QMP socket.
pub fn is_qemu_of(pid: u32, name: &str, vm_dir: &VmDir) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    identity::role_of(&cmdline, name, vm_dir) == Some(Role::Qemu) && is_alive(pid)
}

/// Removes what only makes sense while QEMU runs (pidfile, QMP socket); keeps the logs and the
/// boot spec for post-mortems. Refuses while any process of VM `name` lives: they are its files.
pub fn clear_runtime_files(name: &str, vm_dir: &VmDir) -> Result<()> {
    let live = sighting(name, vm_dir);
    if let Some(pid) = live.qemus.first().or(live.guards.first()) {
        bail!(
            "left {} and its QMP socket in place: they belong to pid {pid}, which still runs",
            vm_dir.pidfile().display()
        );
    }
    clear_runtime_files_unchecked(vm_dir)
}

/// `clear_runtime_files` for a caller that has just proven no process of the VM lives.
fn clear_runtime_files_unchecked(vm_dir: &VmDir) -> Result<()> {
    for path in [vm_dir.pidfile(), vm_dir.qmp_socket()] {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// QEMU's stdout/stderr: why it refused to start, what it warned about.
pub fn qemu_log(vm_dir: &VmDir) -> PathBuf {
    vm_dir.dir().join("qemu.log")
}

/// The last lines of `qemu.log`, for error messages.
pub fn qemu_log_tail(vm_dir: &VmDir) -> String {
    let text = fs::read_to_string(qemu_log(vm_dir)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// The transient scope a launch runs in under systemd: its cgroup properties, and the user
/// `systemd-run` drops to before exec.
struct Scope {
    properties: Vec<String>,
    run_as: Option<crate::runas::RunAs>,
}

fn under_systemd() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// `program args` (QEMU, or a fence guard with QEMU as its child) in a place of its own: its
/// own `scope` under systemd, else its own session.
fn detached_command(
    name: &str,
    program: &Path,
    args: &[impl AsRef<OsStr>],
    scope: Option<&Scope>,
) -> Command {
    match scope {
        Some(scope) => {
            // Its own scope: stopping the agent's unit does not take the VMs with it. `--scope`
            // execs the command in place, so the PID we get is the program's.
            let mut command = Command::new("systemd-run");
            command
                .args(["--scope", "--collect", "--quiet", "--unit"])
                .arg(crate::cgroup::scope_unit(name))
                // At host shutdown systemd stops units in reverse order: the scope only after
                // the NixOS module's host-shutdown unit has powered the VM down or saved it.
                .arg(format!("--property=After={HOST_SHUTDOWN_UNIT}"));
            for property in &scope.properties {
                command.arg("-p").arg(property);
            }
            if let Some(run_as) = &scope.run_as {
                command
                    .arg(format!("--uid={}", run_as.uid))
                    .arg(format!("--gid={}", run_as.gid));
            }
            command.arg("--").arg(program).args(args);
            command
        }
        None => {
            let mut command = Command::new(program);
            command.args(args);
            command
        }
    }
}

fn prepare_vm_dir(vm_dir: &VmDir) -> Result<()> {
    let dir = vm_dir.dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    // A stale socket would let a connect succeed against nothing; a stale pidfile would name a
    // dead (or reused) PID until the new one is written; a stale fence marker would explain the
    // next exit wrongly.
    take_fence_marker(vm_dir);
    clear_runtime_files_unchecked(vm_dir)
}

/// Why the fence guard killed this VM's QEMU, if it did; removes the marker.
pub fn take_fence_marker(vm_dir: &VmDir) -> Option<String> {
    let path = vm_dir.fence_marker();
    let reason = fs::read_to_string(&path).ok()?;
    let _ = fs::remove_file(&path);
    Some(reason)
}

/// How long after the host booted process `pid` started (`/proc/<pid>/stat` starttime): fixed for
/// the life of the process, so it tells uptime and a stable start time without trusting any file
/// the process may rewrite.
pub fn started_after_boot(pid: u32) -> Option<Duration> {
    let start_ticks: u64 = stat_field(pid, 22)?.parse().ok()?; // starttime, in clock ticks
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as u64;
    Some(Duration::from_secs_f64(
        start_ticks as f64 / ticks_per_sec.max(1) as f64,
    ))
}
