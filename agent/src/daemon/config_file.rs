//! Reading the desired-state file without ever blocking the agent: the read runs on a blocking
//! thread with a deadline, so a file on a hung network filesystem costs a refused reload, never
//! a wedged agent deaf to requests and SIGTERM. A FIFO or device is refused at once
//! (`files::read_regular`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::spec::DesiredState;
use crate::validate::{parse_desired_state_on, HostPaths, LoadError, ValidationErrors};

/// How long reading the config file may take before the reload is refused.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The file's text, or why it could not be read (in time).
pub async fn read(path: &Path) -> Result<String, LoadError> {
    let owned = path.to_owned();
    off_runtime(move || crate::files::read_regular(&owned))
        .await
        .and_then(|read| read)
        .map_err(|error| read_error(path, error))
}

/// Validates `text` for this host. Whether two disk paths reach one image is a question for
/// the filesystem (`HostPaths`), asked off the runtime under the same deadline.
pub async fn validate(text: String) -> std::io::Result<Result<DesiredState, ValidationErrors>> {
    off_runtime(move || parse_desired_state_on(&text, &HostPaths)).await
}

/// The file's text (as read) and the desired state it holds, or why not.
pub async fn load(path: &Path) -> (Option<String>, Result<DesiredState, LoadError>) {
    let text = match read(path).await {
        Ok(text) => text,
        Err(e) => return (None, Err(e)),
    };
    let desired = match validate(text.clone()).await {
        Ok(checked) => checked.map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        }),
        Err(error) => Err(read_error(path, error)),
    };
    (Some(text), desired)
}

/// Runs blocking filesystem `work` on a blocking thread, giving up after `READ_TIMEOUT`.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    match tokio::time::timeout(READ_TIMEOUT, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(panicked)) => Err(std::io::Error::other(panicked.to_string())),
        // The blocked thread is left behind; the runtime does not wait for it on exit.
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {READ_TIMEOUT:?} (a hung network filesystem?)"),
        )),
    }
}

fn read_error(path: &Path, error: std::io::Error) -> LoadError {
    LoadError::Read {
        path: PathBuf::from(path),
        error,
    }
}
