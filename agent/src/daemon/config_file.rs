//! Reading the desired-state file without ever blocking the agent: the read runs on a blocking
//! thread with a deadline, so a file on a hung network filesystem costs a refused reload, never
//! a wedged agent deaf to requests and SIGTERM. A FIFO or device is refused at once
//! (`files::read_regular`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::DesiredState;
use crate::validate::{parse_desired_state, LoadError};

/// How long reading the config file may take before the reload is refused.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The file's text, or why it could not be read (in time).
pub async fn read(path: &Path) -> Result<String, LoadError> {
    let owned = path.to_owned();
    let read = tokio::task::spawn_blocking(move || crate::files::read_regular(&owned));
    let error = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(result)) => return result.map_err(|error| read_error(path, error)),
        Ok(Err(panicked)) => std::io::Error::other(panicked.to_string()),
        // The blocked thread is left behind; the runtime does not wait for it on exit.
        Err(_) => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {READ_TIMEOUT:?} (a hung network filesystem?)"),
        ),
    };
    Err(read_error(path, error))
}

/// The file's text (as read) and the desired state it holds, or why not.
pub async fn load(path: &Path) -> (Option<String>, Result<DesiredState, LoadError>) {
    match read(path).await {
        Ok(text) => {
            let desired = parse_desired_state(&text).map_err(|errors| LoadError::Invalid {
                path: path.to_owned(),
                errors,
            });
            (Some(text), desired)
        }
        Err(e) => (None, Err(e)),
    }
}

fn read_error(path: &Path, error: std::io::Error) -> LoadError {
    LoadError::Read {
        path: PathBuf::from(path),
        error,
    }
}
