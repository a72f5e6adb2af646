//! Reload triggers from outside: changes in the config file's directory (inotify via `notify`)
//! and SIGHUP.
//!
//! The directory is watched, not the file: `/etc/plasmavmc/desired.json` is a symlink that a
//! switch replaces, and editors replace files by renaming. Events only say "look again"; the
//! event loop debounces them and reloads only if the file's content changed.

use std::path::Path;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::supervisor::Trigger;

/// Watches the directory of `config`; keep the returned watcher alive.
pub fn watch_config_dir(
    config: &Path,
    triggers: mpsc::UnboundedSender<Trigger>,
) -> Result<notify::RecommendedWatcher> {
    let absolute =
        std::path::absolute(config).with_context(|| format!("resolving {}", config.display()))?;
    let dir = absolute
        .parent()
        .context("the config file has no parent directory")?
        .to_owned();
    let name = absolute
        .file_name()
        .context("the config path has no file name")?
        .to_owned();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only events naming the config file: other files in its directory (logs, editors'
        // swap files) must not wake the agent.
        let about_config = |e: &notify::Event| {
            !e.kind.is_access() && e.paths.iter().any(|p| p.file_name() == Some(&name))
        };
        if event.is_ok_and(|e| about_config(&e)) {
            let _ = triggers.send(Trigger::ConfigTouched);
        }
    })
    .context("creating the config watcher")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}

/// Sends `Trigger::Reload` on every SIGHUP.
pub fn forward_sighup(triggers: mpsc::UnboundedSender<Trigger>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let _ = triggers.send(Trigger::Reload);
        }
    });
    Ok(())
}
