//! The client side of the control socket, used by every CLI command but `agent` and `validate`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent not reachable at {}: is `plasmavmc agent` running? ({source})", path.display())]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
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

/// Sends one request to the agent listening on `socket` and waits for its answer (no timeout:
/// a reload may legitimately wait for guests to shut down).
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.to_owned(),
        source,
    })?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        )));
    }
    serde_json::from_str(&answer).map_err(|source| ClientError::Protocol {
        path: socket.to_owned(),
        source,
    })
}
