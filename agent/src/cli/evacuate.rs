//! `plasmavmc evacuate [--wait] [--json]`: asks the agent to evacuate the host, prints the plan,
//! and with --wait follows `status` until every move has ended, printing each VM as it changes.
//! Run again, it answers with the evacuation under way (or the one an agent restart carries on):
//! a client that lost the agent follows it again.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::commands::{ask, client_failed, unexpected};
use super::EXIT_FAILED;
use crate::control::protocol::{Request, Response};
use crate::evacuation::Evacuation;

/// How often --wait asks how far the moves are.
const POLL: Duration = Duration::from_millis(500);

pub fn evacuate(run_dir: &Path, wait: bool, json: bool) -> ExitCode {
    let started = match ask(run_dir, Request::Evacuate) {
        Ok(Response::Evacuation { evacuation }) => evacuation,
        Ok(other) => return unexpected(other),
        Err(e) => return client_failed(e),
    };
    if !json {
        println!(
            "host cordoned (`plasmavmc uncordon` opens it); evacuation started {}:",
            started.started_at
        );
        print!("{}", started.render());
    }
    let evacuation = if wait {
        match follow(run_dir, started, json) {
            Ok(done) => done,
            Err(code) => return code,
        }
    } else {
        started
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&evacuation).expect("an evacuation serializes")
        );
    }
    if !wait || evacuation.succeeded() {
        ExitCode::SUCCESS
    } else {
        if !json {
            eprintln!("some moves failed: those VMs run here as before");
        }
        ExitCode::from(EXIT_FAILED)
    }
}

/// Polls `status` until the evacuation has finished; prints each VM whose line changed.
fn follow(run_dir: &Path, mut shown: Evacuation, json: bool) -> Result<Evacuation, ExitCode> {
    while !shown.finished {
        std::thread::sleep(POLL);
        let now = match ask(run_dir, Request::Status) {
            Ok(Response::Status { status }) => status.evacuation,
            Ok(other) => return Err(unexpected(other)),
            Err(e) => {
                eprintln!(
                    "lost the agent (restarting?): the evacuation goes on once it is back; \
                     `plasmavmc evacuate --wait` follows it again"
                );
                return Err(client_failed(e));
            }
        };
        let Some(now) = now.filter(|now| now.started_at == shown.started_at) else {
            eprintln!(
                "the agent no longer knows this evacuation (uncordoned and evacuated anew?): \
                 run `plasmavmc evacuate` again to move what is left"
            );
            return Err(ExitCode::from(EXIT_FAILED));
        };
        if !json {
            for (name, vm) in &now.vms {
                if shown.vms.get(name) != Some(vm) {
                    println!("{}", vm.render(name));
                }
            }
        }
        shown = now;
    }
    Ok(shown)
}
