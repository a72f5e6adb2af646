//! The client side of the control socket, used by every CLI command but `agent` and `validate`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent not reachable at {}: is `plasmavmc agent` running? ({source})", path.display())]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("permission denied: {} is for root only (run this command as root)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error(
        "the agent at {} did not answer within {}; it may be stuck (see its log: \
         journalctl -u plasmavmc)",
        path.display(),
        humantime::format_duration(*timeout)
    )]
    TimedOut { path: PathBuf, timeout: Duration },
    #[error("talking to the agent at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {} answered something this client does not understand: {source}", path.display())]
    Protocol {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How long a client waits for the agent's answer to `request`: long enough for what the agent
/// may legitimately wait for (a guest's powerdown, a busy VM), short enough that a wedged agent
/// is reported rather than waited for forever.
pub fn timeout_for(request: &Request) -> Duration {
    match request {
        // Console, events: until the attach is answered; the stream that follows has no deadline.
        Request::Status
        | Request::Plan { .. }
        | Request::ClusterStatus
        | Request::Console { .. }
        | Request::Events
        | Request::Cordon
        | Request::Uncordon
        | Request::Evacuate => Duration::from_secs(30),
        // A stop given more time than that gets it, and a minute for quit and kill after.
        Request::Stop {
            timeout_ms: Some(ms),
            ..
        } => Duration::from_secs(600).max(Duration::from_millis(*ms) + Duration::from_secs(60)),
        Request::Reload
        | Request::Start { .. }
        | Request::Stop { .. }
        | Request::Reset { .. }
        | Request::Save { .. } => Duration::from_secs(600),
        Request::Migrate { cancel: true, .. } => Duration::from_secs(30),
        // A move's length depends on memory, disks and the link: it ends or fails by itself.
        Request::Migrate { .. } => Duration::from_secs(6 * 3600),
        // The powerdowns' bound, plus what saves may take beyond it (as the NixOS unit allows).
        Request::ShutdownHost { timeout_seconds } => Duration::from_secs(timeout_seconds + 180),
        // The agent answers by itself once the wait is over.
        Request::FirstApply { wait_ms } => {
            Duration::from_millis(*wait_ms) + Duration::from_secs(30)
        }
    }
}

/// Sends one request to the agent listening on `socket` and waits for its answer, at most
/// `timeout_for(request)` in all (connecting included).
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    request_within(socket, request, timeout_for(request))
}

/// `request`, waiting at most `timeout`.
pub fn request_within(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let (done, answer) = std::sync::mpsc::channel();
    let (path, request) = (socket.to_owned(), request.clone());
    // A thread, so the deadline covers a `connect` that blocks on a full listen backlog too;
    // on a timeout it is left behind and ends with the process.
    std::thread::spawn(move || {
        let _ = done.send(exchange(&path, &request));
    });
    answer
        .recv_timeout(timeout)
        .unwrap_or(Err(ClientError::TimedOut {
            path: socket.to_owned(),
            timeout,
        }))
}

/// How often a read-only request is sent again after the agent closed its connection unanswered.
const READ_ONLY_RETRIES: u32 = 20;

fn exchange(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let mut attempt = 0;
    loop {
        match ask(socket, request) {
            // At its connection cap the agent closes the oldest connection whose request has not
            // arrived yet (limits.rs): it never acted on it, and asking again is safe for a
            // request that changes nothing. (The caller's deadline still bounds the whole.)
            Err(error) if closed_unanswered(&error) && read_only(request) => {
                attempt += 1;
                if attempt > READ_ONLY_RETRIES {
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(10 * u64::from(attempt)));
            }
            other => return other.map(|(_, response)| response),
        }
    }
}

fn read_only(request: &Request) -> bool {
    matches!(
        request,
        Request::Status
            | Request::Plan { .. }
            | Request::ClusterStatus
            | Request::FirstApply { .. }
    )
}

/// The agent closed the connection before answering (an end of stream, or a reset when it closed
/// with the request unread).
fn closed_unanswered(error: &ClientError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    matches!(error, ClientError::Io { source, .. }
        if matches!(source.kind(), UnexpectedEof | ConnectionReset | BrokenPipe))
}

/// Connects, sends `request`, reads the answer line (waiting at most `timeout_for(request)`);
/// the connection stays open for what follows it (a console stream).
pub fn ask(
    socket: &Path,
    request: &Request,
) -> Result<(BufReader<UnixStream>, Response), ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: socket.to_owned(),
            }
        } else {
            ClientError::Unreachable {
                path: socket.to_owned(),
                source,
            }
        }
    })?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    stream
        .set_read_timeout(Some(timeout_for(request)))
        .map_err(io)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    let response = serde_json::from_str(&answer).map_err(|source| ClientError::Protocol {
        path: socket.to_owned(),
        source,
    })?;
    Ok((reader, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_that_never_answers_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let error =
            request_within(&socket, &Request::Status, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(error, ClientError::TimedOut { .. }), "{error:?}");
        assert!(
            error.to_string().contains("did not answer within 200ms"),
            "{error}"
        );
    }
}
