//! `plasmavmc console` on the agent's side: one connection per VM to QEMU's console socket (made
//! on the first attach, ended when QEMU closes it), fanned out to every attached client; the one
//! writer's bytes go to the guest. The rules are in `crate::console`; QEMU logs the console
//! itself, so nothing here is needed for the log to be complete.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, watch};

use crate::console::{self, Claim, Writer};
use crate::control::protocol::{ErrorKind, Request, Response};
use crate::control::server::{self, Attached};
use crate::paths::{RunDir, VmDir};
use crate::validate::is_valid_vm_name;

/// Chunks of output kept for a slow client before it skips some (a chunk is one read, ≤ 4 KiB).
const FANOUT_CHUNKS: usize = 1024;
/// How often the console logs are checked for rotation.
const ROTATE_EVERY: Duration = Duration::from_secs(10);

/// What the connection to QEMU's console fans out.
#[derive(Debug, Clone)]
enum Output {
    Bytes(Arc<[u8]>),
    /// QEMU closed the console (its VM stopped or restarted): the last item.
    Ended,
}

/// One VM's console connection.
struct Hub {
    output: broadcast::Sender<Output>,
    input: mpsc::UnboundedSender<Vec<u8>>,
    writer: watch::Sender<Option<Writer>>,
}

/// Every VM's console connection; made on the first attach.
pub struct Consoles {
    run_dir: RunDir,
    hubs: Mutex<HashMap<String, Arc<Hub>>>,
    next_client: AtomicU64,
}

type Refusal = (ErrorKind, String);

impl Consoles {
    pub fn new(run_dir: RunDir) -> Arc<Consoles> {
        Arc::new(Consoles {
            run_dir,
            hubs: Mutex::default(),
            next_client: AtomicU64::new(1),
        })
    }

    /// Serves one `Request::Console` connection until the client detaches or the console ends.
    pub async fn attach(self: Arc<Self>, attached: Attached) {
        let Attached {
            request,
            peer,
            mut read,
            mut write,
        } = attached;
        let Request::Console {
            vm,
            write: wants_write,
            force,
            tail,
            tty,
        } = request
        else {
            return;
        };
        let client = self.next_client.fetch_add(1, Ordering::Relaxed);
        let me = Writer {
            client,
            who: describe(peer, tty.as_deref()),
        };
        let hub = match self.hub(&vm).await {
            Ok(hub) => hub,
            Err((kind, message)) => {
                let _ = server::send(&mut write, &Response::Error { kind, message }).await;
                return;
            }
        };
        let mut output = hub.output.subscribe();
        let mut message = format!("attached to the console of {vm}, read-only");
        if wants_write {
            let mut outcome = Claim::Granted;
            hub.writer.send_modify(|current| {
                outcome = console::claim(current.as_ref(), &me, force);
                if !matches!(outcome, Claim::Refused { .. }) {
                    *current = Some(me.clone());
                }
            });
            message = match outcome {
                Claim::Granted => format!("attached to the console of {vm}"),
                Claim::TookOver { previous } => format!(
                    "attached to the console of {vm}, taken over from {}",
                    previous.who
                ),
                Claim::Refused { holder } => {
                    let message = format!(
                        "the console of {vm} is in use by {}; attach read-only with \
                         --no-stdin, or take it over with --force",
                        holder.who
                    );
                    let response = Response::Error {
                        kind: ErrorKind::Failed,
                        message,
                    };
                    let _ = server::send(&mut write, &response).await;
                    return;
                }
            };
        }
        tracing::info!(vm, client = %me.who, write = wants_write, "console attached");
        let result = async {
            server::send(&mut write, &Response::ConsoleAttached { message }).await?;
            if tail > 0 {
                write
                    .write_all(&log_tail(&self.run_dir.vm(&vm), tail))
                    .await?;
            }
            stream(
                &hub,
                client,
                wants_write,
                &mut output,
                &mut read,
                &mut write,
            )
            .await
        }
        .await;
        hub.writer
            .send_if_modified(|current| match console::release(current.take(), client) {
                kept @ Some(_) => {
                    *current = kept;
                    false
                }
                None => true,
            });
        tracing::info!(vm, client = %me.who, "console detached: {}", match result {
            Ok(why) => why,
            Err(e) => format!("connection error: {e}"),
        });
    }

    /// The VM's console connection, made now if there is none.
    async fn hub(self: &Arc<Self>, vm: &str) -> Result<Arc<Hub>, Refusal> {
        if !is_valid_vm_name(vm) {
            return Err((ErrorKind::BadRequest, format!("no VM named {vm:?}")));
        }
        if let Some(hub) = self.hubs.lock().unwrap().get(vm) {
            return Ok(hub.clone());
        }
        let vm_dir = self.run_dir.vm(vm);
        let stream = connect(vm, &vm_dir).await?;
        let (output, _) = broadcast::channel(FANOUT_CHUNKS);
        let (input, input_rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            output,
            input,
            writer: watch::Sender::new(None),
        });
        let mut hubs = self.hubs.lock().unwrap();
        if let Some(raced) = hubs.get(vm) {
            // Another attach connected first; QEMU serves one client, so ours was refused or
            // will see EOF: use theirs.
            return Ok(raced.clone());
        }
        hubs.insert(vm.to_owned(), hub.clone());
        tokio::spawn(pump(
            Arc::clone(self),
            vm.to_owned(),
            stream,
            hub.clone(),
            input_rx,
        ));
        Ok(hub)
    }
}

/// Connects to QEMU's console socket, or says why there is none.
async fn connect(vm: &str, vm_dir: &VmDir) -> Result<UnixStream, Refusal> {
    let socket = vm_dir.console_socket();
    match UnixStream::connect(&socket).await {
        Ok(stream) => Ok(stream),
        Err(_) if !vm_dir.dir().exists() => Err((
            ErrorKind::BadRequest,
            format!("no VM named {vm} runs on this host"),
        )),
        Err(_) if !socket.exists() && vm_dir.console_log().exists() => Err((
            ErrorKind::Failed,
            format!(
                "{vm} was started by an older plasmavmc whose console went only to {}; \
                 the interactive console comes with its next start \
                 (`plasmavmc stop {vm}; plasmavmc start {vm}`, when convenient)",
                vm_dir.console_log().display()
            ),
        )),
        Err(_) if !socket.exists() => Err((
            ErrorKind::Failed,
            format!("{vm} has no serial console (consoleLog = false) or is not running"),
        )),
        Err(e) => Err((
            ErrorKind::Failed,
            format!(
                "{vm}'s QEMU does not answer on {} ({e}): is it running? (`plasmavmc status`)",
                socket.display()
            ),
        )),
    }
}

/// Copies QEMU's console to the hub's clients and the writer's bytes to QEMU, until QEMU closes
/// the console; then forgets the hub so the next attach connects again.
async fn pump(
    consoles: Arc<Consoles>,
    vm: String,
    stream: UnixStream,
    hub: Arc<Hub>,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let (mut from_qemu, mut to_qemu) = stream.into_split();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            read = from_qemu.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // No one attached is fine: QEMU has logged the bytes already.
                    let _ = hub.output.send(Output::Bytes(Arc::from(&buf[..n])));
                }
            },
            Some(bytes) = input.recv() => {
                if to_qemu.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut hubs = consoles.hubs.lock().unwrap();
    if hubs
        .get(&vm)
        .is_some_and(|current| Arc::ptr_eq(current, &hub))
    {
        hubs.remove(&vm);
    }
    let _ = hub.output.send(Output::Ended);
}

/// One client's stream until it detaches, is taken over, or the console ends; says which.
async fn stream(
    hub: &Hub,
    client: u64,
    writing: bool,
    output: &mut broadcast::Receiver<Output>,
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    write: &mut OwnedWriteHalf,
) -> std::io::Result<String> {
    let mut writer = hub.writer.subscribe();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            out = output.recv() => match out {
                Ok(Output::Bytes(bytes)) => write.write_all(&bytes).await?,
                Ok(Output::Ended) | Err(broadcast::error::RecvError::Closed) => {
                    notice(write, "the console closed: the VM's QEMU stopped or restarted").await?;
                    return Ok("the console closed".into());
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    notice(write, &format!("this client fell behind: {skipped} chunks of output skipped (the log has them)")).await?;
                }
            },
            read = read.read(&mut buf) => match read? {
                0 => return Ok("the client left".into()),
                // A reader's keystrokes go nowhere: only the writer types.
                n if writing => {
                    let _ = hub.input.send(buf[..n].to_vec());
                }
                _ => {}
            },
            changed = writer.changed(), if writing => {
                let holder = changed.ok().and_then(|()| writer.borrow_and_update().clone());
                if let Some(holder) = holder.filter(|h| h.client != client) {
                    notice(write, &format!("the console was taken over by {}", holder.who)).await?;
                    return Ok("taken over".into());
                }
            }
        }
    }
}

/// A line from plasmavmc inside the console stream, on a line of its own.
async fn notice(write: &mut OwnedWriteHalf, text: &str) -> std::io::Result<()> {
    write
        .write_all(format!("\r\n[plasmavmc: {text}]\r\n").as_bytes())
        .await
}

/// The last `lines` lines of the console log (its rotated part included).
fn log_tail(vm_dir: &VmDir, lines: usize) -> Vec<u8> {
    let mut log = std::fs::read(vm_dir.console_log_rotated()).unwrap_or_default();
    log.extend(std::fs::read(vm_dir.console_log()).unwrap_or_default());
    console::tail_lines(&log, lines).to_vec()
}

/// `pid 123 (uid 0) on /dev/pts/3 since 2026-01-01T12:00:01Z`.
fn describe(peer: Option<tokio::net::unix::UCred>, tty: Option<&str>) -> String {
    let mut who = match peer {
        Some(peer) => format!(
            "pid {} (uid {})",
            peer.pid().map_or("?".into(), |p| p.to_string()),
            peer.uid()
        ),
        None => "a client".into(),
    };
    if let Some(tty) = tty {
        who.push_str(&format!(" on {tty}"));
    }
    let since = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    who.push_str(&format!(" since {since}"));
    who
}

/// Rotates every VM's console log by size, forever. Only logs QEMU appends to (VMs booted with
/// the console socket): truncating a log opened without `O_APPEND` would leave QEMU writing at
/// its old offset.
pub async fn rotate_logs(run_dir: RunDir) {
    let mut every = tokio::time::interval(ROTATE_EVERY);
    loop {
        every.tick().await;
        let run_dir = run_dir.clone();
        let _ = tokio::task::spawn_blocking(move || rotate_all(&run_dir)).await;
    }
}

fn rotate_all(run_dir: &RunDir) {
    let Ok(entries) = std::fs::read_dir(run_dir.vms_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let vm_dir = VmDir::at(entry.path());
        if !vm_dir.console_socket().exists() {
            continue;
        }
        let log = vm_dir.console_log();
        let size = std::fs::metadata(&log).map_or(0, |m| m.len());
        if size > console::LOG_ROTATE_BYTES {
            if let Err(e) = rotate(&log, &vm_dir.console_log_rotated()) {
                tracing::warn!(log = %log.display(), "rotating the console log: {e}");
            }
        }
    }
}

/// Copy, then truncate: QEMU keeps its file open and appends at the new end.
fn rotate(log: &Path, rotated: &Path) -> std::io::Result<()> {
    std::fs::copy(log, rotated)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)
}
