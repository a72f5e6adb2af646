//! The event stream behind `plasmavmc events` (see `crate::events`): the daemon and its VMs emit
//! into a broadcast channel; each `Request::Events` connection gets every event from then on,
//! one JSON line each, until the client goes. Nobody listening costs nothing.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

use crate::control::protocol::Response;
use crate::control::server::{self, Attached};
use crate::events::{Event, What};

/// Events held for a slow client before it is told it missed some.
const BACKLOG: usize = 1024;
/// A client that does not take an event in this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Journal {
    events: broadcast::Sender<Event>,
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            events: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Journal {
    /// Sends an event about `vm` (None: about the host), stamped now.
    pub fn emit(&self, vm: Option<&str>, what: What) {
        let event = Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            vm: vm.map(str::to_owned),
            what,
        };
        tracing::debug!(?event, "event");
        let _ = self.events.send(event); // nobody listening is fine
    }

    pub fn vm(&self, vm: &str, what: What) {
        self.emit(Some(vm), what);
    }

    /// Serves one `Request::Events` connection until the client closes it (or stops reading).
    pub async fn stream(&self, attached: Attached) {
        let Attached {
            mut read,
            mut write,
            ..
        } = attached;
        let mut events = self.events.subscribe();
        let follows = Response::EventsFollow {
            message: "following this host's events (Ctrl-C to stop)".into(),
        };
        if server::send(&mut write, &follows).await.is_err() {
            return;
        }
        let mut ignored = [0u8; 256];
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                // The client sends nothing; a read ending means it went away.
                read = read.read(&mut ignored) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
            };
            let event = match event {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(count)) => Event {
                    time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                    vm: None,
                    what: What::Missed { count },
                },
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let mut line = serde_json::to_string(&event).expect("events serialize");
            line.push('\n');
            match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line.as_bytes())).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}
