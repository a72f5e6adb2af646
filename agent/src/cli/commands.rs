//! Each CLI command: build the request, talk to the agent, print the answer, pick the exit code.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use super::{EXIT_FAILED, EXIT_INVALID, EXIT_UNREACHABLE};
use crate::action::{Action, PendingChange, Plan, RefusedChange};
use crate::control::client::{self, ClientError};
use crate::control::document::DesiredDocument;
use crate::control::protocol::{ApplyReport, ErrorKind, Request, Response, StepOutcome};
use crate::daemon::AgentOptions;
use crate::observed::ObservedHost;
use crate::paths::{RunDir, DEFAULT_CONFIG};
use crate::plan::RunIntents;
use crate::status;
use crate::validate::{load_desired_state, LoadError};

pub fn agent(options: AgentOptions) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("starting the async runtime: {e}")),
    };
    let result = runtime.block_on(crate::daemon::run(options));
    // A read stuck on a hung filesystem must not keep the agent from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

pub fn validate(file: &Path, json: bool) -> ExitCode {
    let loaded = load_desired_state(file);
    if json {
        let problems: Vec<serde_json::Value> = match &loaded {
            Ok(_) => Vec::new(),
            Err(LoadError::Invalid { errors, .. }) => errors
                .problems()
                .iter()
                .map(|p| serde_json::json!({"path": p.path, "message": p.message}))
                .collect(),
            Err(e @ LoadError::Read { .. }) => {
                vec![serde_json::json!({"path": "", "message": e.to_string()})]
            }
        };
        let vms = loaded.as_ref().map_or(0, |desired| desired.vms.len());
        println!(
            "{}",
            serde_json::json!({"file": file, "valid": loaded.is_ok(), "vms": vms, "problems": problems})
        );
        return if loaded.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_INVALID)
        };
    }
    match loaded {
        Ok(desired) => {
            println!("{}: valid ({} VMs)", file.display(), desired.vms.len());
            ExitCode::SUCCESS
        }
        Err(e) => load_failed(e),
    }
}

pub fn plan(config: Option<&Path>, run_dir: &Path, json: bool) -> ExitCode {
    let desired = match config.map(load_desired_state).transpose() {
        Ok(desired) => desired,
        Err(e) => return load_failed(e),
    };
    let plan = match ask(
        run_dir,
        Request::Plan {
            desired: desired.as_ref().map(DesiredDocument::from_state),
        },
    ) {
        Ok(Response::Planned { plan }) => plan,
        Ok(other) => return unexpected(other),
        Err(ClientError::Unreachable { path, .. }) => {
            // E.g. the first activation, before the agent ever ran: nothing is running yet.
            let file = config.unwrap_or(Path::new(DEFAULT_CONFIG));
            let desired = match desired.map_or_else(|| load_desired_state(file), Ok) {
                Ok(desired) => desired,
                Err(e) => return load_failed(e),
            };
            eprintln!(
                "note: no agent at {}; planning against no running VMs",
                path.display()
            );
            let mut plan =
                crate::plan::plan(&desired, &ObservedHost::default(), &RunIntents::new());
            plan.note_migration_copies(&desired);
            plan
        }
        Err(e) => return client_failed(e),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plans serialize")
        );
    } else {
        print!("{}", render_plan(&plan));
    }
    if plan.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

pub fn reload(run_dir: &Path, json: bool) -> ExitCode {
    let what = "applying the config (a guest slow to release a device holds it up)".to_owned();
    applied(ask_showing(run_dir, Request::Reload, what), json)
}

pub fn status(run_dir: &Path, json: bool, cluster: bool) -> ExitCode {
    if cluster {
        return cluster_status(run_dir, json);
    }
    match ask(run_dir, Request::Status) {
        Ok(Response::Status { status }) => {
            if json {
                println!("{}", serde_json::to_string(&status).expect("serializes"));
            } else {
                print!("{}", status::render(&status));
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

fn cluster_status(run_dir: &Path, json: bool) -> ExitCode {
    match ask(run_dir, Request::ClusterStatus) {
        Ok(Response::Cluster { table, view }) => {
            if json {
                println!("{view}");
            } else {
                print!("{table}");
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

pub fn start(run_dir: &Path, vm: String, json: bool) -> ExitCode {
    let what = format!("starting {vm}");
    applied(ask_showing(run_dir, Request::Start { vm }, what), json)
}

pub fn stop(
    run_dir: &Path,
    vm: String,
    timeout: Option<std::time::Duration>,
    force: bool,
    json: bool,
) -> ExitCode {
    let request = Request::Stop {
        vm: vm.clone(),
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
        force,
    };
    let what = match (force, timeout) {
        (true, _) => "force-quitting QEMU".to_owned(),
        (false, Some(t)) => format!(
            "waiting for the guest to shut down (then quit QEMU after {})",
            humantime::format_duration(t)
        ),
        (false, None) => "waiting for the guest to shut down".to_owned(),
    };
    let answer = ask_showing(run_dir, request, format!("stopping {vm}: {what}"));
    match answer {
        Ok(Response::Stopped { stop }) => {
            if json {
                println!("{}", serde_json::to_string(&stop).expect("serializes"));
            } else {
                println!("{}", stop.render());
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

/// A line on the terminal, rewritten every `every` with what `line` says (nothing when it says
/// nothing), until dropped; then erased.
struct Progress {
    done: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn every(
        every: std::time::Duration,
        mut line: impl FnMut() -> Option<String> + Send + 'static,
    ) -> Progress {
        let (done, stopped) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            while stopped
                .recv_timeout(every)
                .is_err_and(|e| e == std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                if let Some(line) = line() {
                    eprint!("\r\x1b[2K{line}");
                }
            }
            eprint!("\r\x1b[2K");
        });
        Progress {
            done,
            thread: Some(thread),
        }
    }

    /// `what... Ns` every second: what a command waits for, and for how long.
    fn waiting(what: String) -> Progress {
        let started = std::time::Instant::now();
        Progress::every(std::time::Duration::from_secs(1), move || {
            let waited = started.elapsed().as_secs();
            Some(format!("{what}... {waited}s"))
        })
    }

    /// A move's progress as the VM's status shows it, every half second.
    fn migration(run_dir: std::path::PathBuf, vm: String) -> Progress {
        let socket = RunDir::new(&run_dir).control_socket();
        Progress::every(std::time::Duration::from_millis(500), move || {
            let status = client::request_within(
                &socket,
                &Request::Status,
                std::time::Duration::from_secs(2),
            );
            match status {
                Ok(Response::Status { status }) => {
                    let progress = status.vms.get(&vm)?.migration.as_ref()?;
                    Some(progress.render(&vm))
                }
                _ => None,
            }
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.done.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn reset(run_dir: &Path, vm: String, soft: bool, json: bool) -> ExitCode {
    let what = match soft {
        true => format!(
            "soft reset of {vm}: waiting for the guest to shut down (a hard reset if it does not)"
        ),
        false => format!("resetting {vm}"),
    };
    done(
        ask_showing(run_dir, Request::Reset { vm, soft }, what),
        json,
    )
}

pub fn save(run_dir: &Path, vm: String, json: bool) -> ExitCode {
    let what = format!("saving {vm} (memory and devices)");
    done(ask_showing(run_dir, Request::Save { vm }, what), json)
}

pub fn cordon(run_dir: &Path, json: bool) -> ExitCode {
    cordon_changed(ask(run_dir, Request::Cordon), json)
}

pub fn uncordon(run_dir: &Path, json: bool) -> ExitCode {
    cordon_changed(ask(run_dir, Request::Uncordon), json)
}

/// Exit 0 once the host's state changed here, whether or not the cluster knows yet (the message
/// and `cluster` say).
fn cordon_changed(answer: Result<Response, ClientError>, json: bool) -> ExitCode {
    match answer {
        Ok(Response::Cordon { change }) => {
            if json {
                println!("{}", serde_json::to_string(&change).expect("serializes"));
            } else {
                println!("{}", change.message);
            }
            ExitCode::SUCCESS
        }
        answer => done(answer, json),
    }
}

/// `plasmavmc migrate`: progress on a terminal (the VM's status, asked every half second), then
/// the outcome as one line or JSON.
pub fn migrate(run_dir: &Path, request: Request, json: bool) -> ExitCode {
    let Request::Migrate { vm, cancel, .. } = &request else {
        return fail("migrate: not a migrate request".into());
    };
    let watcher = (!cancel && std::io::stderr().is_terminal())
        .then(|| Progress::migration(run_dir.to_owned(), vm.clone()));
    let answer = ask(run_dir, request);
    drop(watcher);
    match answer {
        Ok(Response::Migrated { outcome }) => {
            if json {
                println!("{}", serde_json::to_string(&outcome).expect("serializes"));
            } else {
                println!("{}", outcome.render());
            }
            ExitCode::SUCCESS
        }
        answer => done(answer, json),
    }
}

pub fn shutdown_host(
    run_dir: &Path,
    timeout_seconds: u64,
    only_when_system_stops: bool,
    json: bool,
) -> ExitCode {
    if only_when_system_stops {
        let state = system_state();
        if state != "stopping" {
            let message = format!(
                "the host is not shutting down (systemctl is-system-running: {state}); VMs are left alone"
            );
            return done(Ok(Response::Done { message }), json);
        }
    }
    let what = "taking every VM down (powerdown or save)".to_owned();
    done(
        ask_showing(run_dir, Request::ShutdownHost { timeout_seconds }, what),
        json,
    )
}

/// `plasmavmc first-apply`: the agent's first apply since it started, waited for up to
/// `timeout`; the exit code says whether it failed (still running at the timeout counts).
pub fn first_apply(run_dir: &Path, timeout: std::time::Duration, json: bool) -> ExitCode {
    let request = Request::FirstApply {
        wait_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
    };
    let what = "waiting for the agent's first apply".to_owned();
    match ask_showing(run_dir, request, what) {
        Ok(Response::FirstApply { first_apply }) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&first_apply).expect("serializes")
                );
            } else {
                print!("{}", first_apply.render());
            }
            if first_apply.is_pending() {
                eprintln!(
                    "the first apply is still running after {}; `plasmavmc status` shows each VM",
                    humantime::format_duration(timeout)
                );
                return ExitCode::from(EXIT_FAILED);
            }
            first_apply
                .failure()
                .map_or(ExitCode::SUCCESS, exit_code_of)
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

/// What `systemctl is-system-running` says (`stopping` while the host shuts down).
fn system_state() -> String {
    match std::process::Command::new("systemctl")
        .arg("is-system-running")
        .output()
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Prints the agent's `Done` message (with `json`: `{"message": ...}`).
fn done(answer: Result<Response, ClientError>, json: bool) -> ExitCode {
    match answer {
        Ok(Response::Done { message }) => {
            if json {
                println!("{}", serde_json::json!({ "message": message }));
            } else {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

/// Sends `request`; an error answer from the agent becomes `Ok(Response::Error)` for the caller's
/// match to handle via `unexpected`.
pub(super) fn ask(run_dir: &Path, request: Request) -> Result<Response, ClientError> {
    client::request(&RunDir::new(run_dir).control_socket(), &request)
}

/// `ask`, showing on a terminal `what` it waits for, and for how long.
fn ask_showing(run_dir: &Path, request: Request, what: String) -> Result<Response, ClientError> {
    let _progress = std::io::stderr()
        .is_terminal()
        .then(|| Progress::waiting(what));
    ask(run_dir, request)
}

/// Prints what the agent applied (as JSON with `json`); exit 1 if any step failed.
fn applied(answer: Result<Response, ClientError>, json: bool) -> ExitCode {
    match answer {
        Ok(Response::Applied { report }) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializes")
                );
            } else {
                print!("{}", render_report(&report));
            }
            if report.any_failed() {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(other) => unexpected(other),
        Err(e) => client_failed(e),
    }
}

pub(super) fn unexpected(response: Response) -> ExitCode {
    match response {
        Response::Error { kind, message } => {
            eprintln!("{message}");
            exit_code_of(kind)
        }
        other => fail(format!("unexpected answer from the agent: {other:?}")),
    }
}

fn exit_code_of(kind: ErrorKind) -> ExitCode {
    ExitCode::from(match kind {
        ErrorKind::InvalidConfig | ErrorKind::BadRequest => EXIT_INVALID,
        ErrorKind::Failed => EXIT_FAILED,
    })
}

pub(super) fn client_failed(e: ClientError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(match e {
        ClientError::Unreachable { .. } | ClientError::PermissionDenied { .. } => EXIT_UNREACHABLE,
        _ => EXIT_FAILED,
    })
}

fn load_failed(e: LoadError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_INVALID)
}

fn fail(message: String) -> ExitCode {
    eprintln!("{message}");
    ExitCode::from(EXIT_FAILED)
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes are noise in the journal and in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn render_plan(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.steps.is_empty() {
        out.push_str("nothing to change live\n");
    }
    for step in &plan.steps {
        out.push_str(&format!("{}: {}\n", step.vm, describe(&step.action)));
    }
    out.push_str(&render_pending(&plan.pending));
    out.push_str(&render_refused(&plan.refused));
    for (vm, note) in &plan.migration_copies {
        out.push_str(&format!("{vm}: {note}\n"));
    }
    out
}

fn render_report(report: &ApplyReport) -> String {
    let mut out = String::new();
    if report.steps.is_empty() {
        out.push_str("nothing to change live\n");
    }
    for step in &report.steps {
        let outcome = match &step.outcome {
            StepOutcome::Done => "done".to_owned(),
            StepOutcome::Unplugging { device } => {
                format!("unplugging: the guest has not released {device} yet (retried)")
            }
            StepOutcome::Failed { error } => format!("FAILED: {error}"),
            StepOutcome::Skipped { reason } => format!("skipped: {reason}"),
        };
        out.push_str(&format!(
            "{}: {}: {}\n",
            step.vm,
            describe(&step.action),
            outcome
        ));
    }
    out.push_str(&render_pending(&report.pending));
    out.push_str(&render_refused(&report.refused));
    out
}

fn render_refused(refused: &[RefusedChange]) -> String {
    refused
        .iter()
        .map(|c| {
            format!(
                "{}: REFUSED, never applied: {}: {} -> {} ({})\n",
                c.vm, c.field, c.from, c.to, c.reason
            )
        })
        .collect()
}

fn render_pending(pending: &[PendingChange]) -> String {
    pending
        .iter()
        .map(|c| {
            format!(
                "{}: pending until next start: {}: {} -> {} ({})\n",
                c.vm, c.field, c.from, c.to, c.reason
            )
        })
        .collect()
}

/// One line a human reads: what the step does.
pub fn describe(action: &Action) -> String {
    match action {
        Action::StartVm { .. } => "start".into(),
        Action::StopVm { reason } => format!("stop ({reason})"),
        Action::RestartVm { reason, .. } => format!("restart ({reason})"),
        Action::AddDisk { id, disk } => match &disk.create {
            Some(_) => format!(
                "add disk {id} ({}, created if missing)",
                disk.path.display()
            ),
            None => format!("add disk {id} ({})", disk.path.display()),
        },
        Action::RemoveDisk {
            id,
            delete_image: None,
        } => format!("remove disk {id} (its image is kept)"),
        Action::RemoveDisk {
            id,
            delete_image: Some(path),
        } => format!(
            "remove disk {id} and DELETE its image {} (deleteOnRemove)",
            path.display()
        ),
        Action::ResizeDisk {
            id,
            from_mib,
            to_mib,
        } => format!("grow disk {id} {from_mib} MiB -> {to_mib} MiB"),
        Action::AddNic { id, nic } => format!("add NIC {id} ({})", nic.mac),
        Action::RemoveNic { id } => format!("remove NIC {id}"),
        Action::RemoveOrphanBlockNode { node } => format!("remove leftover block node {node}"),
        Action::RemoveOrphanNetdev { netdev } => format!("remove leftover netdev {netdev}"),
        Action::SetVcpus { from, to } => format!("vCPUs {from} -> {to}"),
        Action::SetMemory { from_mib, to_mib } => format!("memory {from_mib} MiB -> {to_mib} MiB"),
        Action::SetLimits { from, to } => format!("limits {from} -> {to}"),
    }
}
