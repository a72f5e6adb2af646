//! The QMP wire: one JSON object per line over the monitor socket, commands matched to their
//! replies by an `id` QEMU echoes back.
//!
//! Rules that make a slow or stopped QEMU harmless:
//! - Every command carries its own id. A command given up (timed out, or its future dropped)
//!   removes its entry from the pending table on the way out, so its late reply is recognised
//!   and dropped, never handed to the next command (the `qapi` crate's client reused id 0 and
//!   panicked on the next command after a timeout).
//! - Lines are written by a task of their own: a caller that gives up never leaves half a line on
//!   the socket, and a QEMU that stops reading blocks only that task.
//! - Nothing here panics on what QEMU sends; an unparseable line is logged and skipped.
//! - `silent_since` says since when QEMU has left a command unanswered past its timeout (cleared
//!   by any reply): what `status` shows as `unresponsive`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// A QMP command's answer: its `return` value, or QEMU's error class and description.
pub type Reply = Result<Value, (String, String)>;

/// What one line from QEMU is.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// The greeting (`{"QMP": ...}`), sent once on connect.
    Greeting,
    Reply {
        id: Option<u64>,
        reply: Reply,
    },
    /// An event, as the whole JSON object (`event`, `data`, `timestamp`).
    Event(Value),
}

/// Parses one line QEMU sent. `None`: not JSON or not a QMP message.
pub fn parse_line(line: &str) -> Option<Message> {
    let value: Value = serde_json::from_str(line).ok()?;
    let object = value.as_object()?;
    if object.contains_key("QMP") {
        return Some(Message::Greeting);
    }
    if object.contains_key("event") {
        return Some(Message::Event(value));
    }
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(ret) = object.get("return") {
        return Some(Message::Reply {
            id,
            reply: Ok(ret.clone()),
        });
    }
    let error = object.get("error")?;
    let text = |key: &str| {
        error
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    Some(Message::Reply {
        id,
        reply: Err((text("class"), text("desc"))),
    })
}

/// The line that runs command `name` with `arguments` as request `id`.
pub fn command_line(name: &str, arguments: &Value, id: u64) -> String {
    let mut command = serde_json::json!({ "execute": name, "id": id });
    let has_arguments = arguments.as_object().is_some_and(|a| !a.is_empty());
    if has_arguments {
        command["arguments"] = arguments.clone();
    }
    let mut line = command.to_string();
    line.push('\n');
    line
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("QEMU said {0}: {1}")]
    Qemu(String, String),
    #[error("{0}")]
    Io(std::io::Error),
}

type Pending = HashMap<u64, oneshot::Sender<Reply>>;

struct Shared {
    pending: Mutex<Pending>,
    /// When a command first went unanswered past its timeout; None once QEMU answers again.
    silent_since: Mutex<Option<Instant>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn silent_since(&self) -> MutexGuard<'_, Option<Instant>> {
        self.silent_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A negotiated QMP connection.
pub struct Transport {
    shared: Arc<Shared>,
    lines: mpsc::UnboundedSender<String>,
    next_id: AtomicU64,
    connected: watch::Receiver<bool>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Closes the socket, so QEMU accepts its next client.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Removes a command's pending entry however its caller ends (answer, timeout, drop).
struct PendingEntry<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        self.shared.pending().remove(&self.id);
    }
}

impl Transport {
    /// Connects, reads the greeting and leaves negotiation mode. Events go to `on_event`, and a
    /// final `None` when the connection closes. The caller bounds the time this takes.
    pub async fn connect(
        socket: &Path,
        on_event: impl FnMut(Option<Value>) + Send + 'static,
    ) -> std::io::Result<Transport> {
        let stream = UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = String::new();
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        read.read_line(&mut line).await?;
        if parse_line(&line) != Some(Message::Greeting) {
            return Err(invalid(format!("not a QMP greeting: {:?}", line.trim())));
        }
        write
            .write_all(command_line("qmp_capabilities", &Value::Null, 0).as_bytes())
            .await?;
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            match parse_line(&line) {
                Some(Message::Reply { reply: Ok(_), .. }) => break,
                Some(Message::Reply {
                    reply: Err((class, desc)),
                    ..
                }) => return Err(invalid(format!("qmp_capabilities: {class}: {desc}"))),
                _ => {}
            }
        }
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            silent_since: Mutex::new(None),
        });
        let (lines, line_rx) = mpsc::unbounded_channel();
        let (connected_tx, connected) = watch::channel(true);
        let reader = tokio::spawn(read_loop(read, Arc::clone(&shared), on_event, connected_tx));
        let writer = tokio::spawn(write_loop(write, line_rx));
        Ok(Transport {
            shared,
            lines,
            next_id: AtomicU64::new(1),
            connected,
            tasks: [reader, writer],
        })
    }

    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Since when a command has gone unanswered past its timeout (None: QEMU answers).
    pub fn silent_since(&self) -> Option<Instant> {
        *self.shared.silent_since()
    }

    /// Runs command `name` and waits up to `timeout` for its reply.
    pub async fn execute(
        &self,
        name: &str,
        arguments: &Value,
        timeout: Duration,
    ) -> Result<Value, TransportError> {
        if !*self.connected.borrow() {
            return Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the QMP connection is closed",
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending().insert(id, tx);
        let _entry = PendingEntry {
            shared: &self.shared,
            id,
        };
        let closed = || {
            TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "QEMU closed the QMP connection",
            ))
        };
        if self.lines.send(command_line(name, arguments, id)).is_err() {
            return Err(closed());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err((class, desc)))) => Err(TransportError::Qemu(class, desc)),
            Ok(Err(_)) => Err(closed()),
            Err(_) => {
                self.shared.silent_since().get_or_insert_with(Instant::now);
                Err(TransportError::Timeout(timeout))
            }
        }
    }
}

async fn write_loop(mut write: OwnedWriteHalf, mut lines: mpsc::UnboundedReceiver<String>) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = write.write_all(line.as_bytes()).await {
            tracing::debug!("QMP write: {e}");
            return;
        }
    }
}

async fn read_loop(
    mut read: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    mut on_event: impl FnMut(Option<Value>),
    connected: watch::Sender<bool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("QMP read: {e}");
                break;
            }
        }
        match parse_line(&line) {
            Some(Message::Event(event)) => on_event(Some(event)),
            Some(Message::Reply { id, reply }) => {
                *shared.silent_since() = None;
                let waiting = id.and_then(|id| shared.pending().remove(&id));
                match waiting {
                    Some(waiting) => {
                        let _ = waiting.send(reply);
                    }
                    None => tracing::debug!(?id, "QMP: late reply to a command given up"),
                }
            }
            Some(Message::Greeting) | None => {
                tracing::warn!("QMP: ignoring an unexpected line: {:?}", line.trim())
            }
        }
    }
    connected.send_replace(false);
    // Waiting commands learn the connection is gone.
    shared.pending().clear();
    on_event(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_events_and_noise_are_told_apart() {
        assert_eq!(
            parse_line(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#),
            Some(Message::Greeting)
        );
        assert_eq!(
            parse_line(r#"{"return": {"status": "running"}, "id": 7}"#),
            Some(Message::Reply {
                id: Some(7),
                reply: Ok(serde_json::json!({"status": "running"}))
            })
        );
        assert_eq!(
            parse_line(r#"{"error": {"class": "DeviceNotFound", "desc": "no disk-x"}, "id": 8}"#),
            Some(Message::Reply {
                id: Some(8),
                reply: Err(("DeviceNotFound".into(), "no disk-x".into()))
            })
        );
        assert!(matches!(
            parse_line(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#),
            Some(Message::Event(_))
        ));
        assert_eq!(parse_line("garbage\n"), None);
        assert_eq!(parse_line("[1, 2]"), None);
        assert_eq!(parse_line(r#"{"id": 3}"#), None);
    }

    #[test]
    fn commands_carry_their_id_and_only_real_arguments() {
        assert_eq!(
            command_line("query-status", &Value::Null, 5),
            "{\"execute\":\"query-status\",\"id\":5}\n"
        );
        let line = command_line("device_del", &serde_json::json!({"id": "disk-a"}), 6);
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["arguments"]["id"], "disk-a");
        assert_eq!(back["id"], 6);
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
    }
}
