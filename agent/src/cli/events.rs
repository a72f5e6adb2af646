//! `plasmavmc events` (the host's events as they happen) and `plasmavmc status --watch` (the
//! status table, redrawn on every event and every few seconds).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::commands::{client_failed, unexpected};
use super::EXIT_FAILED;
use crate::control::client::{self, ClientError};
use crate::control::protocol::{Request, Response};
use crate::events::Event;
use crate::paths::RunDir;
use crate::status;

/// Follows the agent's events until it goes away: one line each, JSON with `json`. Says on
/// stderr when it follows (every event from then on comes).
pub fn events(run_dir: &Path, json: bool) -> ExitCode {
    let (mut stream, following) = match follow(run_dir) {
        Ok(followed) => followed,
        Err(exit) => return exit,
    };
    eprintln!("{following}");
    let mut line = String::new();
    let mut stdout = std::io::stdout();
    loop {
        line.clear();
        match stream.read_line(&mut line) {
            Ok(0) => {
                eprintln!("the agent closed the event stream (it stopped or restarted)");
                return ExitCode::from(EXIT_FAILED);
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("reading the agent's events: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
        let printed = if json {
            stdout.write_all(line.as_bytes())
        } else {
            match serde_json::from_str::<Event>(&line) {
                Ok(event) => writeln!(stdout, "{}", event.render()),
                Err(_) => stdout.write_all(line.as_bytes()),
            }
        };
        // A closed pipe (`| head`) ends the command quietly.
        if printed.and_then(|()| stdout.flush()).is_err() {
            return ExitCode::SUCCESS;
        }
    }
}

/// The events connection, past its answer, and the agent's message; or the exit code of why
/// there is none.
fn follow(run_dir: &Path) -> Result<(BufReader<UnixStream>, String), ExitCode> {
    let socket = RunDir::new(run_dir).control_socket();
    let (reader, response) = client::ask(&socket, &Request::Events).map_err(client_failed)?;
    let message = match response {
        Response::EventsFollow { message } => message,
        other => return Err(unexpected(other)),
    };
    // Events come when they come: no deadline from here on.
    let _ = reader.get_ref().set_read_timeout(None);
    Ok((reader, message))
}

/// Redraws `status` every `every` and at once on each event, until interrupted.
pub fn watch_status(run_dir: &Path, every: Duration) -> ExitCode {
    let socket = RunDir::new(run_dir).control_socket();
    let (wake, woken) = std::sync::mpsc::channel();
    // Events only hurry the next redraw; without them (an older agent) it still comes on time.
    if let Ok((mut stream, _)) = follow(run_dir) {
        std::thread::spawn(move || {
            let mut line = String::new();
            while stream.read_line(&mut line).is_ok_and(|n| n > 0) {
                line.clear();
                if wake.send(()).is_err() {
                    return;
                }
            }
        });
    }
    let terminal = std::io::stdout().is_terminal();
    loop {
        let table = match client::request(&socket, &Request::Status) {
            Ok(Response::Status { status }) => status::render(&status),
            Ok(other) => return unexpected(other),
            Err(e @ (ClientError::Unreachable { .. } | ClientError::PermissionDenied { .. })) => {
                return client_failed(e)
            }
            Err(e) => format!("{e}\n"),
        };
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let header = format!(
            "plasmavmc status at {now}: redrawn on every event and every {}; Ctrl-C to stop\n\n",
            humantime::format_duration(every)
        );
        let screen = if terminal {
            // Home and clear: a redraw, not a scroll.
            format!("\x1b[H\x1b[2J{header}{table}")
        } else {
            format!("{header}{table}\n")
        };
        let mut stdout = std::io::stdout();
        if stdout
            .write_all(screen.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        if woken.recv_timeout(every).is_ok() {
            // Events come in bursts (a stop, then pending changes): one redraw for the burst.
            std::thread::sleep(Duration::from_millis(200));
            while woken.try_recv().is_ok() {}
        }
    }
}
