//! The managed saves on disk (`paths::SavedDir`): begin, commit, consume, set aside.
//!
//! A save is committed by renaming `NAME.partial/` to `NAME/`, so a save is either whole or
//! absent. A save that cannot be restored is never deleted: it moves to `unrestorable/`, with
//! the reason beside it, until the operator removes it.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::files::{sync_dir, write_atomically};
use crate::paths::{saved_record, saved_state, unrestorable_reason, SavedDir};
use crate::save::SavedRecord;

/// A fresh `NAME.partial/` for a save of `name` (an older, never committed one is discarded:
/// its VM went on running, so it holds nothing anybody needs).
pub fn begin(saved: &SavedDir, name: &str) -> Result<PathBuf> {
    let partial = saved.partial(name);
    if partial.exists() {
        tracing::info!(vm = name, path = %partial.display(), "discarding an interrupted, uncommitted save");
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    create_private_dir(&partial)?;
    Ok(partial)
}

/// Writes the record beside the stream and commits the save: from here on it is what the VM's
/// next start restores.
pub fn commit(saved: &SavedDir, name: &str, partial: &Path, record: &SavedRecord) -> Result<()> {
    let json = serde_json::to_vec_pretty(record).expect("a record serializes");
    write_atomically(&saved_record(partial), &json)?;
    sync_dir(partial)?;
    let committed = saved.committed(name);
    fs::rename(partial, &committed).with_context(|| {
        format!(
            "committing the save: {} -> {}",
            partial.display(),
            committed.display()
        )
    })?;
    sync_dir(saved.root())
}

/// The committed save of `name`: `Ok(None)` when there is none; `Err` when it cannot be read
/// (the caller sets it aside).
pub fn committed(saved: &SavedDir, name: &str) -> Result<Option<(PathBuf, SavedRecord)>> {
    let dir = saved.committed(name);
    if !dir.is_dir() {
        return Ok(None);
    }
    let path = saved_record(&dir);
    let json = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let record = serde_json::from_slice(&json)
        .with_context(|| format!("{}: not a save record", path.display()))?;
    Ok(Some((saved_state(&dir), record)))
}

/// Removes a save just loaded into QEMU, before its guest runs: it must never be restored twice.
pub fn consume(saved: &SavedDir, name: &str) -> Result<()> {
    let dir = saved.committed(name);
    fs::remove_dir_all(&dir)
        .with_context(|| format!("removing the restored save {}", dir.display()))
}

/// Moves the committed save of `name` aside with `reason`; returns where it is kept now.
pub fn set_aside(saved: &SavedDir, name: &str, reason: &str) -> Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    create_private_dir(&saved.unrestorable_root())?;
    let mut kept = saved.unrestorable(name, stamp);
    for n in 1.. {
        if !kept.exists() {
            break;
        }
        kept = saved
            .unrestorable(name, stamp)
            .with_extension(n.to_string());
    }
    let committed = saved.committed(name);
    fs::rename(&committed, &kept)
        .with_context(|| format!("moving {} to {}", committed.display(), kept.display()))?;
    fs::write(unrestorable_reason(&kept), format!("{reason}\n"))
        .with_context(|| format!("writing {}", unrestorable_reason(&kept).display()))?;
    Ok(kept)
}

/// `PATH: REASON` for every unrestorable save of `name`, oldest first.
pub fn unrestorable(saved: &SavedDir, name: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(saved.unrestorable_root()) else {
        return Vec::new();
    };
    let prefix = format!("{name}-");
    let mut kept: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|stamp| stamp.starts_with(|c: char| c.is_ascii_digit()))
            })
        })
        .map(|e| e.path())
        .collect();
    kept.sort();
    kept.iter()
        .map(|dir| {
            let reason = fs::read_to_string(unrestorable_reason(dir)).unwrap_or_default();
            format!("{}: {}", dir.display(), reason.trim())
        })
        .collect()
}

fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::RECORD_FORMAT;

    fn record() -> SavedRecord {
        SavedRecord {
            format: RECORD_FORMAT,
            spec: serde_json::from_value(
                serde_json::json!({"vcpus": 1, "memoryMiB": 64, "kernel": "/k"}),
            )
            .unwrap(),
            qemu_version: "7.2.0".into(),
            saved_at_unix: 1,
            bytes: 3,
        }
    }

    #[test]
    fn a_save_is_absent_until_committed_then_set_aside_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedDir::new(dir.path());
        let partial = begin(&saved, "web").unwrap();
        fs::write(saved_state(&partial), b"abc").unwrap();
        assert!(committed(&saved, "web").unwrap().is_none());

        commit(&saved, "web", &partial, &record()).unwrap();
        let (state, read) = committed(&saved, "web").unwrap().expect("committed");
        assert_eq!(read, record());
        assert_eq!(fs::read(&state).unwrap(), b"abc");

        let kept = set_aside(&saved, "web", "QEMU refused it").unwrap();
        assert!(committed(&saved, "web").unwrap().is_none());
        assert_eq!(fs::read(saved_state(&kept)).unwrap(), b"abc");
        let listed = unrestorable(&saved, "web");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].ends_with(": QEMU refused it"), "{listed:?}");
        assert!(unrestorable(&saved, "we").is_empty());
    }
}
