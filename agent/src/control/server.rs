//! The server side of the control socket: accepts connections and hands each request to a
//! handler, one task per connection, so a slow request (a reload waiting for a guest) never
//! blocks `status`.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::protocol::{ErrorKind, Request, Response};

/// Binds `socket` (mode 0600, replacing a stale one left by a killed agent).
pub fn bind(socket: &Path) -> Result<UnixListener> {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", socket.display()))
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(listener)
}

/// Serves requests forever with `handle`.
pub async fn serve<H, F>(listener: UnixListener, handle: Arc<H>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, handle.as_ref()).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a control connection: {e}"),
        }
    }
}

async fn connection<H, F>(stream: UnixStream, handle: &H) -> Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => handle(request).await,
        Err(e) => Response::Error {
            kind: ErrorKind::BadRequest,
            message: format!("not a request this agent understands: {e}"),
        },
    };
    let mut answer = serde_json::to_string(&response).expect("responses serialize");
    answer.push('\n');
    write.write_all(answer.as_bytes()).await?;
    Ok(())
}
