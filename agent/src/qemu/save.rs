//! Managed save and restore: QEMU's migration stream, to a file and back.
//!
//! QEMU 7.2 has no `file:` migration transport, and `exec:` would need a shell that a sandboxed
//! QEMU may not spawn; so QEMU migrates over a unix socket in the VM directory and the agent
//! copies between that socket and the file. The decisions (what may be saved, what may be
//! restored) are `crate::save`'s; this only moves bytes and waits for QEMU.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use super::process;
use super::qmp::Qmp;

/// How often `query-migrate` is asked while a save or restore runs.
const POLL: Duration = Duration::from_millis(20);
/// The guest is stopped while it is saved: no reason to throttle the stream (1 TiB/s).
const UNTHROTTLED: u64 = 1 << 40;
/// How long a just-started migration may take to connect to the other side.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream QEMU wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub bytes: u64,
    pub qemu_version: String,
}

/// Stops the guest and writes its whole state (memory and devices) to `file` (mode 0600, synced).
/// QEMU stays, paused, for the caller to quit once the save is committed. On failure a guest that
/// ran is resumed, and the error says why. `qemu_user` (uid, gid): the unprivileged user QEMU runs
/// as, which must be able to connect to the agent's socket.
pub async fn save_to_file(
    qmp: &Qmp,
    socket: &Path,
    file: &Path,
    qemu_user: Option<(u32, u32)>,
) -> Result<Written> {
    let qemu_version = qmp.qemu_version().await?;
    let was_running = qmp.query_status().await?.running;
    remove_stale(socket)?;
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    if let Some((uid, gid)) = qemu_user {
        nix::unistd::chown(
            socket,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .with_context(|| format!("giving {} to QEMU's user", socket.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    qmp.stop().await.context("stopping the guest (QMP stop)")?;
    let written = async {
        qmp.set_migration_bandwidth(UNTHROTTLED).await?;
        let copy = tokio::spawn(receive(listener, tokio::fs::File::from_std(out)));
        qmp.migrate(&format!("unix:{}", socket.display())).await?;
        let migrated = wait_until_done(qmp, None).await;
        let copied = copy.await.context("the copy task")?;
        migrated?;
        copied.with_context(|| format!("writing {}", file.display()))
    }
    .await;
    let _ = std::fs::remove_file(socket);
    match written {
        Ok(bytes) => Ok(Written {
            bytes,
            qemu_version,
        }),
        Err(e) => {
            if was_running {
                if let Err(resume) = qmp.cont().await {
                    tracing::error!("the save failed and the guest could not be resumed: {resume}");
                }
            }
            Err(e.context("saving the VM's state"))
        }
    }
}

/// Feeds `file` to QEMU `pid`, launched with `-incoming defer -S`, and waits until it has loaded
/// it. The guest stays paused: resuming it (`cont`) is the caller's, once the save is consumed.
/// A stream QEMU refuses makes QEMU exit; the error then carries the end of its log.
pub async fn load_from_file(
    qmp: &Qmp,
    pid: u32,
    socket: &Path,
    file: &Path,
    log_tail: impl Fn() -> String,
) -> Result<()> {
    remove_stale(socket)?;
    let loaded = async {
        let mut input = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        qmp.migrate_incoming(&format!("unix:{}", socket.display()))
            .await?;
        let mut stream = connect(socket).await?;
        // A stream QEMU gives up on breaks the pipe: what QEMU says counts more than that.
        let sent = tokio::io::copy(&mut input, &mut stream).await;
        let _ = stream.shutdown().await;
        wait_until_done(qmp, Some(pid)).await?;
        sent.context("sending the saved state to QEMU")?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_file(socket);
    match loaded {
        Ok(()) => Ok(()),
        Err(e) if !process::wait_for_exit(pid, Duration::from_secs(2)).await => Err(e),
        Err(e) => Err(e.context(format!("QEMU exited while loading: {}", log_tail()))),
    }
}

async fn receive(listener: UnixListener, mut out: tokio::fs::File) -> Result<u64> {
    let (mut stream, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
        .await
        .context("QEMU never connected to send its state")??;
    let bytes = tokio::io::copy(&mut stream, &mut out).await?;
    out.sync_all().await?;
    Ok(bytes)
}

async fn connect(socket: &Path) -> Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {}", socket.display()))
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Polls `query-migrate` until the migration completed (Ok) or failed (Err with QEMU's reason).
/// With `pid`, a QEMU that exits meanwhile ends the wait too.
async fn wait_until_done(qmp: &Qmp, pid: Option<u32>) -> Result<()> {
    loop {
        if pid.is_some_and(|pid| !process::is_alive(pid)) {
            bail!("QEMU exited");
        }
        let info = qmp.query_migrate().await?;
        match info.status.as_deref() {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => bail!(
                "migration {status}: {}",
                info.error_desc.as_deref().unwrap_or("QEMU gave no reason")
            ),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

fn remove_stale(socket: &Path) -> Result<()> {
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", socket.display()))
        }
        _ => Ok(()),
    }
}
