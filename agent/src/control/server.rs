//! The server side of the control socket: accepts connections and hands each request to a
//! handler, one task per connection, so a slow request (a reload waiting for a guest) never
//! blocks `status`. The limits and who gets in at the cap are `limits`' rules. A request that
//! takes the connection over (`Request::Console`, `Request::Events`) goes to the `attach` handler
//! with the connection instead.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf, UCred};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Notify};

use super::limits::{self, Connections, LogThrottle};
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

/// The open connections, and how to close an idle one evicted at the cap.
struct Registry {
    connections: Connections,
    evict: HashMap<u64, oneshot::Sender<()>>,
    /// Evictions, refusals, timeouts and failed accepts: warned about now and then, not each.
    throttle: LogThrottle,
}

impl Registry {
    fn warn(&mut self, what: impl std::fmt::Display) {
        if let Some(suppressed) = self.throttle.record(Instant::now()) {
            tracing::warn!(
                open = self.connections.open(),
                "control socket: {what} ({suppressed} similar since the last warning)"
            );
        }
    }
}

/// A request that takes its connection over, with the connection: the attach handler answers
/// on `write` and then streams both ways.
pub struct Attached {
    pub request: Request,
    /// Who connected (from the kernel, not from the client's word).
    pub peer: Option<UCred>,
    /// What the client sends after its request line (bytes already read included).
    pub read: tokio::io::Chain<std::io::Cursor<Vec<u8>>, OwnedReadHalf>,
    pub write: OwnedWriteHalf,
}

/// Serves requests forever with `handle`, and connections taken over with `attach`, keeping at
/// most `limits::connection_cap` connections open (from the process's soft fd limit at the time;
/// an attached console counts as a busy connection).
pub async fn serve<H, F, A, G>(listener: UnixListener, handle: Arc<H>, attach: Arc<A>)
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
    A: Fn(Attached) -> G + Send + Sync + 'static,
    G: Future<Output = ()> + Send + 'static,
{
    let cap = limits::connection_cap(fd_limit());
    tracing::info!(
        max_connections = cap,
        max_request_bytes = limits::MAX_REQUEST_BYTES,
        idle_timeout = ?limits::IDLE_TIMEOUT,
        "control socket limits"
    );
    let registry = Arc::new(Mutex::new(Registry {
        connections: Connections::new(cap),
        evict: HashMap::new(),
        throttle: LogThrottle::default(),
    }));
    let closed = Arc::new(Notify::new());
    loop {
        // At the cap, wait (clients queue in the listen backlog) until there is room.
        let wait = {
            let mut registry = registry.lock().unwrap();
            registry
                .connections
                .set_cap(limits::connection_cap(fd_limit()));
            registry.connections.may_accept(Instant::now())
        };
        match wait {
            Ok(()) => {}
            Err(Some(evictable)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(evictable.into()) => {}
                    () = closed.notified() => {}
                }
                continue;
            }
            Err(None) => {
                closed.notified().await;
                continue;
            }
        }
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: retrying at once would spin and flood the log.
                registry
                    .lock()
                    .unwrap()
                    .warn(format!("accepting a connection: {e}; retrying shortly"));
                tokio::time::sleep(limits::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (evicted_rx, id) = {
            let mut registry = registry.lock().unwrap();
            let (id, evict) = registry.connections.admit(Instant::now());
            if let Some(oldest) = evict {
                registry.evict.remove(&oldest); // dropping the sender closes it
                let cap = registry.connections.cap();
                registry.warn(format_args!(
                    "{cap} connections open: closing the oldest that sent no request"
                ));
            }
            let (evict, evicted_rx) = oneshot::channel();
            registry.evict.insert(id, evict);
            (evicted_rx, id)
        };
        let handle = handle.clone();
        let attach = attach.clone();
        let registry = registry.clone();
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut busy = false;
            let outcome = connection(stream, handle.as_ref(), attach.as_ref(), evicted_rx, || {
                let mut registry = registry.lock().unwrap();
                registry.evict.remove(&id);
                busy = registry.connections.start_request(id);
                busy
            })
            .await;
            let mut registry = registry.lock().unwrap();
            registry.connections.close(id, busy);
            registry.evict.remove(&id);
            closed.notify_one();
            if let Err(e) = outcome {
                registry.warn(format!("{e:#}"));
            }
        });
    }
}

/// Serves one connection: reads its request line (within the limits), then, if `start` agrees
/// (the connection was not evicted meanwhile), answers it.
async fn connection<H, F, A, G>(
    stream: UnixStream,
    handle: &H,
    attach: &A,
    mut evicted: oneshot::Receiver<()>,
    start: impl FnOnce() -> bool,
) -> Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
    A: Fn(Attached) -> G,
    G: Future<Output = ()>,
{
    let peer = stream.peer_cred().ok();
    let (read_half, mut write) = stream.into_split();
    let mut request = Vec::new();
    let mut reader = BufReader::new(read_half.take(limits::MAX_REQUEST_BYTES as u64));
    let read = tokio::time::timeout(limits::IDLE_TIMEOUT, reader.read_until(b'\n', &mut request));
    let parsed = tokio::select! {
        _ = &mut evicted => return Ok(()),
        read = read => match read {
            Err(_) => Err(error(format!("no request within {:?}: closing", limits::IDLE_TIMEOUT))),
            Ok(Err(e)) => return Err(e).context("reading a request"),
            Ok(Ok(_)) if !start() => return Ok(()),
            Ok(Ok(n)) if n == limits::MAX_REQUEST_BYTES && !request.ends_with(b"\n") => {
                Err(error(format!("a request is at most {} bytes", limits::MAX_REQUEST_BYTES)))
            }
            Ok(Ok(_)) => serde_json::from_slice::<Request>(&request)
                .map_err(|e| error(format!("not a request this agent understands: {e}"))),
        },
    };
    let response = match parsed {
        Ok(request @ (Request::Console { .. } | Request::Events)) => {
            let early = reader.buffer().to_vec();
            let read = std::io::Cursor::new(early).chain(reader.into_inner().into_inner());
            attach(Attached {
                request,
                peer,
                read,
                write,
            })
            .await;
            return Ok(());
        }
        Ok(request) => handle(request).await,
        Err(response) => response,
    };
    tokio::time::timeout(
        limits::WRITE_TIMEOUT,
        write.write_all(line(&response).as_bytes()),
    )
    .await
    .context("the client did not take its answer in time")?
    .context("answering a request")
}

fn error(message: String) -> Response {
    Response::Error {
        kind: ErrorKind::BadRequest,
        message,
    }
}

/// Writes one response line (on a connection taken over).
pub async fn send(write: &mut OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    write.write_all(line(response).as_bytes()).await
}

fn line(response: &Response) -> String {
    let mut answer = serde_json::to_string(response).expect("responses serialize");
    answer.push('\n');
    answer
}

/// The soft `RLIMIT_NOFILE` (unknown: as if unlimited, the cap then is `MAX_CONNECTIONS`).
fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}
