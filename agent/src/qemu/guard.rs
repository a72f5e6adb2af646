//! `plasmavmc fence-guard`: the parent process of an HA VM's QEMU, so the VM is fenced even when
//! no agent is there to do it (killed with -9, out of memory, stuck).
//!
//! - QEMU is the guard's child and dies with it (`PR_SET_PDEATHSIG`): killing the guard, even
//!   with -9, kills the VM. The reverse never happens: an HA VM never runs unguarded.
//! - The guard sleeps until its deadline (`LeaseStatus::guard_deadline`, on `CLOCK_BOOTTIME`),
//!   then reads the lease trust file (`chainfire::trust`): renewed, it sleeps on; not, it writes
//!   why to `<vm-dir>/fenced` and SIGKILLs QEMU, before the lease can expire in the store.
//! - QEMU exits: the guard exits with QEMU's status.
//! - The guard stays root; QEMU drops to `--run-as` between fork and exec, so a compromised
//!   QEMU can neither signal nor trace its guard, nor write the lease file.
//! - SIGTERM, SIGINT and SIGHUP leave the guard alone; QEMU gets its default handling back, so
//!   stopping the VM's scope stops QEMU, and the guard follows.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use super::confine;
use super::process::{qemu_log_tail, stat_field, Pidfd};
use crate::chainfire::clock::{self, BootTime};
use crate::chainfire::trust::{self, GuardVerdict};
use crate::paths::VmDir;
use crate::runas::RunAs;

/// The guard's own exit code after fencing (QEMU's exits pass through).
const EXIT_FENCED: u8 = 4;
/// How long the agent waits for a guard to start QEMU and say its PID.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// What an HA VM's QEMU is launched under: the guard binary (this one), the trust file it
/// reads and the lease its VM's lock is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub exe: PathBuf,
    pub trust_file: PathBuf,
    pub lease: i64,
}

/// `plasmavmc fence-guard` as parsed by the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardOptions {
    pub trust_file: PathBuf,
    pub lease: i64,
    pub vm_dir: PathBuf,
    /// The unprivileged identity QEMU runs as; `None`: as the guard (root).
    pub run_as: Option<RunAs>,
    /// QEMU and its arguments.
    pub command: Vec<OsString>,
}

impl Guard {
    /// The arguments after the guard binary that make it run `qemu args` for `vm_dir`, as
    /// `run_as` if given.
    pub fn args(
        &self,
        vm_dir: &VmDir,
        qemu: &Path,
        qemu_args: &[String],
        run_as: Option<&RunAs>,
    ) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "fence-guard".into(),
            "--trust-file".into(),
            self.trust_file.clone().into(),
            "--lease".into(),
            self.lease.to_string().into(),
            "--vm-dir".into(),
            vm_dir.dir().into(),
        ];
        if let Some(run_as) = run_as {
            args.extend(["--run-as".into(), run_as.to_string().into()]);
        }
        args.extend(["--".into(), qemu.into()]);
        args.extend(qemu_args.iter().map(OsString::from));
        args
    }
}

/// Reads the QEMU PID a guard just launched reports on its stdout (a pipe). If the guard
/// refused or failed, the error carries its reason from the QEMU log.
pub fn reported_pid(guard: &mut Child, vm_dir: &VmDir) -> Result<u32> {
    let stdout = guard
        .stdout
        .take()
        .context("the guard's stdout is not a pipe")?;
    let timeout = PollTimeout::try_from(REPORT_TIMEOUT).expect("fits");
    let ready = poll(
        &mut [PollFd::new(stdout.as_fd(), PollFlags::POLLIN)],
        timeout,
    )
    .context("waiting for the fence guard")?;
    let mut line = String::new();
    if ready > 0 {
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the fence guard's report")?;
    }
    match line.trim().parse() {
        Ok(pid) => Ok(pid),
        Err(_) => {
            let _ = guard.kill();
            let _ = guard.wait();
            bail!(
                "the fence guard did not start QEMU: {}",
                qemu_log_tail(vm_dir)
            )
        }
    }
}

/// The PID of the fence guard whose child `qemu` is, if it is one for `vm_dir`.
pub fn guard_of(qemu: u32, vm_dir: &VmDir) -> Option<u32> {
    let parent: u32 = stat_field(qemu, 4)?.parse().ok()?; // ppid
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).ok()?;
    is_guard_cmdline(&cmdline, vm_dir).then_some(parent)
}

fn is_guard_cmdline(cmdline: &[u8], vm_dir: &VmDir) -> bool {
    // Any VM name: the guard's arguments identify it by its VM directory alone.
    crate::identity::role_of(cmdline, "", vm_dir) == Some(crate::identity::Role::Guard)
}

/// Runs the guard until its QEMU exits or is fenced; the process's exit code.
pub fn run(options: GuardOptions) -> ExitCode {
    match guard(&options) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("plasmavmc fence-guard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn guard(options: &GuardOptions) -> Result<ExitCode> {
    let boot_id = clock::boot_id();
    let verdict = || {
        let file = trust::read(&options.trust_file);
        trust::guard_verdict(file, options.lease, &boot_id, BootTime::now())
    };
    let mut deadline = match verdict() {
        GuardVerdict::Renewed { until } => until,
        GuardVerdict::Lapsed { reason } => bail!("refusing to start QEMU: {reason}"),
    };
    for stop in STOP_SIGNALS {
        // SAFETY: installs SIG_IGN; no handler code runs.
        unsafe { signal(stop, SigHandler::SigIgn) }.context("ignoring stop signals")?;
    }
    let mut qemu = spawn_dying_with_guard(&options.command, options.run_as.as_ref())?;
    report_pid(qemu.id())?;
    let exited = Pidfd::open(qemu.id()).context("watching QEMU")?;
    let timer = TimerFd::new(ClockId::CLOCK_BOOTTIME, TimerFlags::TFD_CLOEXEC)
        .context("creating the fence timer")?;
    loop {
        let at = TimeSpec::from_duration(Duration::from_millis(deadline.as_millis()));
        timer
            .set(
                Expiration::OneShot(at),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            )
            .context("arming the fence timer")?;
        if wait_for_exit_or_timer(&exited, &timer)? {
            return Ok(exit_code(qemu.wait().context("reaping QEMU")?));
        }
        match verdict() {
            GuardVerdict::Renewed { until } => deadline = until,
            GuardVerdict::Lapsed { reason } => {
                fence(&mut qemu, &options.vm_dir, &reason)?;
                return Ok(ExitCode::from(EXIT_FENCED));
            }
        }
    }
}

/// QEMU, as a child that gets SIGKILL when the guard dies, with default stop signals, its
/// output in the guard's stderr (the VM's `qemu.log`) and not on the guard's report pipe, as
/// `run_as` if given.
fn spawn_dying_with_guard(command: &[OsString], run_as: Option<&RunAs>) -> Result<Child> {
    let (program, args) = command.split_first().context("no QEMU command given")?;
    let log: OwnedFd = std::io::stderr().as_fd().try_clone_to_owned()?;
    let guard_pid = nix::unistd::getpid();
    let drop_to = run_as.map(|run_as| (run_as.clone(), confine::group_list(run_as)));
    let mut qemu = Command::new(program);
    qemu.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: only async-signal-safe calls (set*id, prctl, getppid, sigaction) between fork and
    // exec.
    unsafe {
        qemu.pre_exec(move || {
            if let Some((run_as, groups)) = &drop_to {
                // First: a change of credentials clears the parent-death signal.
                confine::drop_privileges(run_as, groups)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != guard_pid {
                // The guard died before the line above: nobody would fence this QEMU.
                return Err(std::io::Error::other("the fence guard is gone"));
            }
            for stop in STOP_SIGNALS {
                signal(stop, SigHandler::SigDfl)?;
            }
            Ok(())
        });
    }
    qemu.spawn()
        .with_context(|| format!("starting {}", Path::new(program).display()))
}

/// Tells the agent QEMU's PID on stdout, then lets go of the pipe (the agent may be gone
/// long before the guard).
fn report_pid(pid: u32) -> Result<()> {
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{pid}")
        .and_then(|()| stdout.flush())
        .context("reporting QEMU's PID")?;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1)?;
    Ok(())
}

/// True when QEMU exited, false when the deadline came.
fn wait_for_exit_or_timer(exited: &Pidfd, timer: &TimerFd) -> Result<bool> {
    loop {
        let mut fds = [
            PollFd::new(exited.as_fd(), PollFlags::POLLIN),
            PollFd::new(timer.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for QEMU or the deadline"),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            return Ok(true);
        }
        if ready(&fds[1]) {
            let _ = timer.wait();
            return Ok(false);
        }
    }
}

fn fence(qemu: &mut Child, vm_dir: &Path, reason: &str) -> Result<()> {
    let message = format!(
        "fenced by its guard at {}: {reason}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    eprintln!(
        "plasmavmc fence-guard: {message}; killing QEMU (pid {})",
        qemu.id()
    );
    // Written first: whoever sees QEMU gone finds out why.
    let marker = VmDir::at(vm_dir).fence_marker();
    if let Err(e) = crate::files::write_atomically(&marker, message.as_bytes()) {
        eprintln!("plasmavmc fence-guard: {e:#}");
    }
    qemu.kill().context("killing QEMU")?;
    qemu.wait().context("reaping QEMU")?;
    Ok(())
}

fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::RunDir;

    #[test]
    fn the_guard_is_recognised_by_its_vm_dir() {
        let vm_dir = RunDir::new("/run/plasmavmc").vm("ha1");
        let guard = Guard {
            exe: "/bin/plasmavmc".into(),
            trust_file: "/run/plasmavmc/lease.json".into(),
            lease: 42,
        };
        let mut argv = vec![OsString::from("/bin/plasmavmc")];
        argv.extend(guard.args(
            &vm_dir,
            Path::new("qemu-system-x86_64"),
            &["-S".into()],
            None,
        ));
        let cmdline: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_encoded_bytes(), b"\0"].concat())
            .collect();
        assert!(is_guard_cmdline(&cmdline, &vm_dir));
        assert!(!is_guard_cmdline(
            &cmdline,
            &RunDir::new("/run/plasmavmc").vm("ha2")
        ));
        assert!(!is_guard_cmdline(b"qemu-system-x86_64\0-S\0", &vm_dir));
    }
}
