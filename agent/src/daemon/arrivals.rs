//! The moves arriving at this host (`migration::arrival`), kept in
//! `<state-dir>/arriving/VM.json` from before the older images are set aside until the move
//! ended; the images of the disks they copy; and what an agent starting does with the records
//! its previous agent left (before anything can start the VM here).

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::interrupted::{adopted_qemu, HeldVms};
use super::supervisor::Daemon;
use crate::migration::arrival::{self, Arrival, Leftover, PutBack, QemuHere};
use crate::migration::interrupted::{self, Images};

/// Where the arrival records are.
pub struct Arrivals {
    dir: PathBuf,
}

impl Arrivals {
    pub fn new(state_dir: &Path) -> Self {
        Arrivals {
            dir: state_dir.join("arriving"),
        }
    }

    /// Keeps `arrival` (replacing the VM's record) and its mark, not confirmed, durably: each
    /// written, synced, renamed, the renames synced. Off the async runtime: a stuck state
    /// filesystem holds up this move only.
    pub async fn save(&self, arrival: &Arrival) -> Result<()> {
        let (dir, path, mark) = (
            self.dir.clone(),
            self.path(&arrival.vm),
            self.mark(&arrival.vm),
        );
        let bytes = serde_json::to_vec_pretty(arrival).expect("an arrival serializes");
        let write = move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            // The mark first: a record is never found without one.
            crate::files::write_atomically(&mark, arrival::NOT_CONFIRMED)?;
            crate::files::write_atomically(&path, &bytes)?;
            crate::files::sync_dir(&dir)
        };
        off_runtime(write).await
    }

    /// Marks `vm`'s move confirmed, durably: its mark overwritten in place and synced (no new
    /// file, no directory to sync: it is on the guest's downtime path).
    pub async fn confirm(&self, vm: &str) -> Result<()> {
        let mark = self.mark(vm);
        off_runtime(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&mark)?;
            file.write_all_at(arrival::CONFIRMED, 0)?;
            file.sync_data()?;
            Ok(())
        })
        .await
        .with_context(|| format!("marking {} confirmed", self.mark(vm).display()))
    }

    /// The move of `vm` here ended: its record goes, then its mark.
    pub fn remove(&self, vm: &str) {
        for path in [self.path(vm), self.mark(vm)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %path.display(), "removing the record of a move that ended: {e}; the next agent start looks at it again")
                }
            }
        }
    }

    fn path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.json"))
    }

    fn mark(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.confirmed"))
    }

    /// The records left, each read (or why not).
    fn left(&self) -> Vec<(PathBuf, Result<Arrival>)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut left: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|path| {
                let read = crate::files::read_regular(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|text| Ok(serde_json::from_str::<Arrival>(&text)?))
                    .map(|arrival| {
                        let mark = std::fs::read(self.mark(&arrival.vm)).ok();
                        Arrival {
                            confirmed: arrival::confirmed_mark(mark.as_deref()),
                            ..arrival
                        }
                    });
                (path, read)
            })
            .collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        left
    }
}

/// Runs `work` (file I/O) off the async runtime.
async fn off_runtime(work: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a state dir write did not finish")?
}

impl Daemon {
    /// At start, after adoption and before anything can start a VM here or a move arrive: the
    /// records of moves arriving here that the previous agent left. Those whose incoming QEMU
    /// is `held` are returned, for `settle_interrupted_moves`; the others are settled here.
    pub(super) async fn settle_arrivals_left(&self, held: &HeldVms) -> BTreeMap<String, Arrival> {
        let mut with_qemu = BTreeMap::new();
        for (path, read) in self.shell.arrivals.left() {
            let arrival = match read {
                Ok(arrival) => arrival,
                Err(e) => {
                    tracing::error!(path = %path.display(), "the record of a move that arrived here (or not) is unreadable ({e:#}): \
                        nothing done; look for `.before-migration-` files beside the VM's disk images, then remove it");
                    continue;
                }
            };
            let qemu = match self.slot(&arrival.vm) {
                _ if held.contains_key(&arrival.vm) => QemuHere::InAMove,
                Some(slot) if slot.status().pid.is_some() => match adopted_qemu(&slot).await {
                    Some(q) if !interrupted::mid_move(&q) => QemuHere::RanTheGuest,
                    Some(_) => QemuHere::InAMove,
                    None => QemuHere::Unreadable,
                },
                _ => QemuHere::None,
            };
            match arrival::leftover(arrival.confirmed, qemu) {
                Leftover::WithItsQemu => {
                    with_qemu.insert(arrival.vm.clone(), arrival);
                }
                Leftover::Later => tracing::warn!(vm = %arrival.vm, id = %arrival.id,
                    "a QEMU of the VM runs here but does not say what it does: the images of the move it may have arrived by stay as they are until the next agent start"),
                Leftover::Images(images) => self.end_arrival_without_qemu(&arrival, images),
            }
        }
        with_qemu
    }

    /// The images of a move whose incoming QEMU is gone (or resumed), settled when this agent
    /// started; the record goes.
    pub(super) fn end_arrival_without_qemu(&self, arrival: &Arrival, images: Images) {
        let vm = &arrival.vm;
        match images {
            Images::PutBackOlder => tracing::warn!(vm, id = %arrival.id,
                "the move from {} stopped with this agent before this host confirmed the switchover, so it never \
                 arrived: its partial images go, the older copies come back", arrival.from),
            Images::Leave if arrival.confirmed => {
                let what = format!(
                    "move {} from {} stopped with this agent after this host confirmed the switchover: whether the HA \
                     lock came here with it cannot be told here. The images stay as they are: {}. Ask {}'s log about \
                     move {} (did the lock move?) and where the VM runs now; keep the image it must boot from, remove \
                     the other, before it runs here",
                    arrival.id,
                    arrival.from,
                    files(arrival),
                    arrival.from,
                    arrival.id
                );
                tracing::error!(vm, "{what}");
                if let Some(slot) = self.slot(vm) {
                    slot.update_status(|s| s.last_error = Some(what));
                }
                self.shell.arrivals.remove(vm);
                return;
            }
            _ => {}
        }
        end_images(vm, images, arrival);
        self.shell.arrivals.remove(vm);
    }
}

/// The images of `arrival`'s disks, for people.
fn files(arrival: &Arrival) -> String {
    let files: Vec<String> = arrival
        .disks
        .iter()
        .map(|disk| match &disk.older {
            Some(kept) => format!(
                "{} (the move's copy) and {} (the older copy)",
                disk.path.display(),
                kept.display()
            ),
            None => format!(
                "{} (the move's copy; none was there before)",
                disk.path.display()
            ),
        })
        .collect();
    files.join("; ")
}

/// Moves aside (never deletes) the older copies `arrival` found at the paths of the disks it
/// copies here (from when the VM last ran on this host). The incoming QEMU gets a blank image
/// there.
pub(super) fn set_aside_images(arrival: &Arrival) -> Result<(), String> {
    for (path, kept) in arrival.older_copies() {
        if let Err(e) = std::fs::rename(path, kept) {
            put_back_images(arrival);
            return Err(format!("moving the older {} aside: {e}", path.display()));
        }
        tracing::info!(path = %path.display(), kept = %kept.display(), "migration: an older copy of the disk is set aside");
    }
    Ok(())
}

/// An abandoned move: the blank (or partly copied) images go, the older copies come back.
pub(super) fn put_back_images(arrival: &Arrival) {
    for disk in &arrival.disks {
        let kept_exists = disk
            .older
            .as_deref()
            .is_some_and(|kept| std::fs::symlink_metadata(kept).is_ok());
        match arrival::put_back(disk, kept_exists) {
            PutBack::Rename { kept, path } => match std::fs::rename(kept, path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), kept = %kept.display(), "migration: the older copy of the disk is back, over the image of the abandoned move")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), kept = %kept.display(), "migration: putting the older copy back: {e}")
                }
            },
            PutBack::Remove(path) => {
                if std::fs::remove_file(path).is_ok() {
                    tracing::info!(path = %path.display(), "migration: the image of the abandoned move is removed");
                }
            }
            PutBack::AlreadyThere => {}
        }
    }
}

/// A completed move: the older copies are stale.
pub(super) fn forget_images(arrival: &Arrival) {
    for (_, kept) in arrival.older_copies() {
        if std::fs::remove_file(kept).is_ok() {
            tracing::info!(kept = %kept.display(), "migration: the stale older copy of the disk is removed");
        }
    }
}

/// What a target does with the images of a move's disk copies once it ends (`images`); logged.
pub(super) fn end_images(vm: &str, images: Images, arrival: &Arrival) {
    let kept: Vec<String> = arrival
        .older_copies()
        .map(|(_, kept)| kept.display().to_string())
        .collect();
    match images {
        Images::Leave if !kept.is_empty() => tracing::error!(
            vm,
            ?kept,
            "migration: it cannot be told whether the move's images here are whole: they stay, \
             and so do the older copies it set aside; keep the right one before the VM runs here"
        ),
        Images::Leave => {}
        Images::RemoveOlder => {
            tracing::info!(vm, ?kept, "migration: the move's images here are whole; the older copies it set aside are stale");
            forget_images(arrival);
        }
        Images::PutBackOlder => {
            tracing::warn!(vm, ?kept, "migration: the move was abandoned before the switchover; its images here are partial");
            put_back_images(arrival);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::arrival::CopiedDisk;

    fn arrival(dir: &Path) -> Arrival {
        let disk = |name: &str, older: bool| CopiedDisk {
            path: dir.join(name),
            older: older.then(|| dir.join(format!("{name}.before-migration-a-1"))),
        };
        Arrival {
            vm: "web".into(),
            id: "a-1".into(),
            from: "a".into(),
            disks: vec![disk("root.qcow2", true), disk("data.qcow2", false)],
            confirmed: false,
        }
    }

    #[tokio::test]
    async fn a_record_is_kept_until_removed_and_an_abandoned_moves_images_give_way() {
        let dir = tempfile::tempdir().unwrap();
        let arrivals = Arrivals::new(&dir.path().join("state"));
        let arrival = arrival(dir.path());
        arrivals.save(&arrival).await.unwrap();
        let left = arrivals.left();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.as_ref().unwrap(), &arrival);
        arrivals.confirm("web").await.unwrap();
        assert!(arrivals.left()[0].1.as_ref().unwrap().confirmed);
        std::fs::remove_file(dir.path().join("state/arriving/web.confirmed")).unwrap();
        assert!(
            arrivals.left()[0].1.as_ref().unwrap().confirmed,
            "no mark: confirmed, nothing is deleted on a guess"
        );

        let root = dir.path().join("root.qcow2");
        std::fs::write(&root, "older").unwrap();
        set_aside_images(&arrival).unwrap();
        assert!(!root.exists(), "set aside");
        std::fs::write(&root, "partial").unwrap();
        std::fs::write(dir.path().join("data.qcow2"), "partial").unwrap();
        put_back_images(&arrival);
        assert_eq!(std::fs::read_to_string(&root).unwrap(), "older");
        assert!(!dir.path().join("data.qcow2").exists(), "nothing was there");
        put_back_images(&arrival);
        assert_eq!(
            std::fs::read_to_string(&root).unwrap(),
            "older",
            "put back twice: the older copy stays"
        );

        arrivals.remove("web");
        arrivals.remove("web");
        assert!(arrivals.left().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("state/arriving"))
                .unwrap()
                .count(),
            0,
            "record and mark gone"
        );
    }

    #[tokio::test]
    async fn an_unreadable_record_is_reported_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let arrivals = Arrivals::new(dir.path());
        arrivals.save(&arrival(dir.path())).await.unwrap();
        std::fs::write(dir.path().join("arriving/web.json"), "{not json").unwrap();
        let left = arrivals.left();
        assert_eq!(left.len(), 1);
        assert!(left[0].1.is_err());
    }
}
