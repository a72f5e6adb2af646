//! Reload triggers from outside: changes of the config file (inotify via `notify`) and SIGHUP.
//!
//! Directories are watched, not the file: editors replace files by renaming, and on NixOS
//! `/etc/plasmavmc/desired.json` is a symlink to `/etc/static/plasmavmc/desired.json` where a
//! switch replaces only the `/etc/static` symlink. So every link along the path's resolution is
//! watched by name in its directory (`desired.json` in `/etc/plasmavmc`, `static` in `/etc`, ...).
//! Events only say "look again"; the event loop debounces them, refreshes the watches (a
//! directory removed and made again needs a new one: each directory is also watched by name in
//! its parent), and reloads only if the file's content changed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::supervisor::Trigger;

/// Symlinks followed at most while resolving the config path (as the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Watches the config file and every symlink on its way; keep it alive, and `refresh` it on
/// every event.
pub struct ConfigWatch {
    config: PathBuf,
    /// The entries whose events matter; the callback reads them, `refresh` renews them.
    watched: Arc<Mutex<BTreeSet<(PathBuf, OsString)>>>,
    watcher: Mutex<notify::RecommendedWatcher>,
}

impl ConfigWatch {
    pub fn start(config: &Path, triggers: mpsc::UnboundedSender<Trigger>) -> Result<Self> {
        let config = std::path::absolute(config)
            .with_context(|| format!("resolving {}", config.display()))?;
        let watched = Arc::new(Mutex::new(BTreeSet::new()));
        let entries = Arc::clone(&watched);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Only events naming a watched entry: other files in those directories (logs,
            // editors' swap files) must not wake the agent.
            let concerns_config = |e: &notify::Event| {
                let entries = entries.lock().unwrap();
                !e.kind.is_access()
                    && e.paths.iter().any(|p| match (p.parent(), p.file_name()) {
                        (Some(dir), Some(name)) => {
                            entries.contains(&(dir.to_owned(), name.to_owned()))
                        }
                        _ => false,
                    })
            };
            if event.is_ok_and(|e| concerns_config(&e)) {
                let _ = triggers.send(Trigger::ConfigTouched);
            }
        })
        .context("creating the config watcher")?;
        let watch = Self {
            config,
            watched,
            watcher: Mutex::new(watcher),
        };
        watch.refresh();
        Ok(watch)
    }

    /// Re-resolves the config path and watches every directory on it that exists now, and
    /// each one's parent for the directory itself: a directory removed and made again (or
    /// missing at start) is watched again as soon as it is back.
    pub fn refresh(&self) {
        let entries = with_directories(watched_entries(&self.config));
        let dirs: BTreeSet<PathBuf> = entries.iter().map(|(dir, _)| dir.clone()).collect();
        *self.watched.lock().unwrap() = entries;
        let mut watcher = self.watcher.lock().unwrap();
        for dir in dirs.iter().filter(|dir| dir.is_dir()) {
            // Watching a directory again is harmless; a new one (same path) gets its watch.
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!("watching {} for config changes: {e}", dir.display());
            }
        }
    }
}

/// `entries` plus each entry's directory as an entry of its parent.
fn with_directories(entries: BTreeSet<(PathBuf, OsString)>) -> BTreeSet<(PathBuf, OsString)> {
    let dirs: Vec<(PathBuf, OsString)> = entries
        .iter()
        .filter_map(|(dir, _)| Some((dir.parent()?.to_owned(), dir.file_name()?.to_owned())))
        .collect();
    entries.into_iter().chain(dirs).collect()
}

/// `(directory, name)` of the config file and of every symlink met while resolving `path`
/// (absolute). A path that does not resolve (yet) still yields the file itself.
fn watched_entries(path: &Path) -> BTreeSet<(PathBuf, OsString)> {
    let entry = |path: &Path| Some((path.parent()?.to_owned(), path.file_name()?.to_owned()));
    let mut entries: BTreeSet<_> = entry(path).into_iter().collect();
    let mut path = path.to_owned();
    'resolve: for _ in 0..MAX_LINKS {
        let mut prefix = PathBuf::new();
        let components: Vec<Component> = path.components().collect();
        for (i, component) in components.iter().enumerate() {
            prefix.push(component);
            let Ok(target) = std::fs::read_link(&prefix) else {
                continue;
            };
            entries.extend(entry(&prefix));
            let mut next = prefix.parent().map_or_else(PathBuf::new, Path::to_owned);
            next.push(target); // an absolute target replaces the prefix
            next.extend(&components[i + 1..]);
            path = normalize(&next);
            continue 'resolve;
        }
        break;
    }
    // The file itself where it finally is (its directory may be replaced by renames too).
    entries.extend(entry(&path));
    entries
}

/// Removes `.` and `..` lexically (after a symlink has been substituted, as the kernel does).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn every_symlink_on_the_way_to_the_config_is_watched_by_name() {
        // The NixOS layout: /etc/plasmavmc/desired.json -> /etc/static/plasmavmc/desired.json,
        // /etc/static -> /nix/store/...-etc/etc.
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let store = root.join("store/etc");
        std::fs::create_dir_all(store.join("plasmavmc")).unwrap();
        std::fs::write(store.join("plasmavmc/desired.json"), "{}").unwrap();
        std::fs::create_dir_all(root.join("etc/plasmavmc")).unwrap();
        symlink(&store, root.join("etc/static")).unwrap();
        symlink(
            "../static/plasmavmc/desired.json",
            root.join("etc/plasmavmc/desired.json"),
        )
        .unwrap();

        let entries = watched_entries(&root.join("etc/plasmavmc/desired.json"));
        let expected: BTreeSet<(PathBuf, OsString)> = [
            (root.join("etc/plasmavmc"), "desired.json"),
            (root.join("etc"), "static"),
            (root.join("store/etc/plasmavmc"), "desired.json"),
        ]
        .into_iter()
        .map(|(dir, name)| (dir, OsString::from(name)))
        .collect();
        assert_eq!(entries, expected);
    }

    #[test]
    fn each_watched_directory_is_watched_by_name_in_its_parent() {
        let entries = BTreeSet::from([(PathBuf::from("/etc/plasmavmc"), OsString::from("d.json"))]);
        assert_eq!(
            with_directories(entries),
            BTreeSet::from([
                (PathBuf::from("/etc/plasmavmc"), OsString::from("d.json")),
                (PathBuf::from("/etc"), OsString::from("plasmavmc")),
            ])
        );
    }

    #[test]
    fn a_plain_or_missing_file_is_watched_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("desired.json");
        let only_itself = BTreeSet::from([(dir.path().to_owned(), OsString::from("desired.json"))]);
        assert_eq!(watched_entries(&config), only_itself);
        std::fs::write(&config, "{}").unwrap();
        assert_eq!(watched_entries(&config), only_itself);
    }
}
