//! A move arriving at this host, as its target keeps it in its state dir (`daemon::arrivals`)
//! from before it sets the older images aside until the move ends: an agent that comes back
//! after its lease ended (its fence guard killed the incoming QEMU, the source resumed and
//! forgot the move) still knows which images are the move's and how far the move got.
//!
//! How far is known here for certain: the HA lock moves to this host only after it confirmed
//! the switchover, and the record is marked `confirmed` before the confirmation is sent. A move
//! never confirmed never reached the switchover: the images at the copied disks' paths are
//! partial; they go and the older copies come back. A confirmed one may have (the images whole,
//! the guest perhaps run from them since) or not: both files stay, and the operator is told.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::interrupted::Images;
use super::RunningConfig;

/// One move arriving here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrival {
    pub vm: String,
    /// The move's id (the source's request).
    pub id: String,
    /// The source host.
    pub from: String,
    /// The disks the move copies here.
    pub disks: Vec<CopiedDisk>,
    /// Set before this host confirms the switchover: from then on the lock may move here. Kept
    /// beside the record, as one byte (`confirmed_mark`).
    #[serde(skip)]
    pub confirmed: bool,
}

/// The confirmation mark kept beside the record: one byte, written when the record is (`0`)
/// and overwritten in place (`1`) at the confirmation: it is on the guest's downtime path, and
/// one byte synced in place costs no journal commit, unlike a file replaced and its directory
/// synced.
pub const NOT_CONFIRMED: &[u8] = b"0";
pub const CONFIRMED: &[u8] = b"1";

/// Whether a move is confirmed, from its mark as read (None: no mark). Anything but the mark
/// of a move not confirmed counts as confirmed: then nothing is deleted.
pub fn confirmed_mark(mark: Option<&[u8]>) -> bool {
    mark != Some(NOT_CONFIRMED)
}

/// A disk the move copies here: the incoming QEMU writes a new image at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopiedDisk {
    pub path: PathBuf,
    /// Where the older copy found at `path` is kept during the move
    /// (`PATH.before-migration-ID`); None when nothing was there.
    pub older: Option<PathBuf>,
}

impl Arrival {
    /// Move `id` of `vm` from `from`, copying `running`'s disks that are not shared here;
    /// `had_older(path, kept)` says whether a disk has an older copy (at `path` before it is set
    /// aside, at `kept` after).
    pub fn new(
        vm: &str,
        id: &str,
        from: &str,
        running: &RunningConfig,
        had_older: impl Fn(&Path, &Path) -> bool,
    ) -> Self {
        let disks = running
            .older_copies(id)
            .into_iter()
            .map(|(path, kept)| CopiedDisk {
                older: had_older(&path, &kept).then_some(kept),
                path,
            })
            .collect();
        Arrival {
            vm: vm.to_owned(),
            id: id.to_owned(),
            from: from.to_owned(),
            disks,
            confirmed: false,
        }
    }

    /// Each older copy: the disk's path, and where it is kept during the move.
    pub fn older_copies(&self) -> impl Iterator<Item = (&Path, &Path)> {
        self.disks
            .iter()
            .filter_map(|d| d.older.as_deref().map(|kept| (d.path.as_path(), kept)))
    }
}

/// A QEMU of the VM on this host when the agent starts, beside an arrival record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuHere {
    None,
    /// Held as part of a move (`interrupted::mid_move`).
    InAMove,
    /// Adopted, past any move: it ran the guest.
    RanTheGuest,
    /// Found, but QMP did not say what it does.
    Unreadable,
}

/// What the agent starting does with an arrival record its previous agent left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Settled with the incoming QEMU it left (`interrupted`); the record goes after.
    WithItsQemu,
    /// Nothing yet: the record stays for the next start.
    Later,
    /// This, then the record goes. `Leave` from a confirmed move: tell the operator.
    Images(Images),
}

/// What to do with the record of a move that arrived (or not) here, `confirmed` or not, while
/// `qemu` is found on this host.
pub fn leftover(confirmed: bool, qemu: QemuHere) -> Leftover {
    match (qemu, confirmed) {
        (QemuHere::InAMove, _) => Leftover::WithItsQemu,
        (QemuHere::Unreadable, _) => Leftover::Later,
        // Resumed here after the switchover: the images are live, the older copies stale.
        (QemuHere::RanTheGuest, true) => Leftover::Images(Images::RemoveOlder),
        // Never: the guest resumes here only after the confirmation. Touch nothing.
        (QemuHere::RanTheGuest, false) => Leftover::Images(Images::Leave),
        (QemuHere::None, false) => Leftover::Images(Images::PutBackOlder),
        (QemuHere::None, true) => Leftover::Images(Images::Leave),
    }
}

/// How one disk's images go back to before an abandoned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutBack<'a> {
    /// The older copy goes back over the move's image (one rename).
    Rename { kept: &'a Path, path: &'a Path },
    /// Nothing was there before the move: its image goes.
    Remove(&'a Path),
    /// The older copy is not where it was kept: never set aside (the image at the path is the
    /// older copy) or put back already. Nothing to do.
    AlreadyThere,
}

/// How `disk` goes back to before the move, `kept_exists` whether its older copy is still where
/// it was kept.
pub fn put_back(disk: &CopiedDisk, kept_exists: bool) -> PutBack<'_> {
    match &disk.older {
        Some(kept) if kept_exists => PutBack::Rename {
            kept,
            path: &disk.path,
        },
        Some(_) => PutBack::AlreadyThere,
        None => PutBack::Remove(&disk.path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;

    fn running() -> RunningConfig {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({
            "vcpus": 1, "memoryMiB": 256, "kernel": "/k",
            "disks": {
                "root": { "path": "/img/root.qcow2", "format": "qcow2" },
                "data": { "path": "/img/data.qcow2", "format": "qcow2" },
                "nfs": { "path": "/nfs/shared.qcow2", "format": "qcow2", "shared": true }
            }
        }))
        .unwrap();
        RunningConfig::booting(&spec)
    }

    #[test]
    fn the_record_lists_each_copied_disk_and_its_older_copy_only_when_one_was_there() {
        let arrival = Arrival::new("web", "a-17", "a", &running(), |path, _| {
            path == Path::new("/img/root.qcow2")
        });
        assert_eq!(
            arrival.disks,
            [
                CopiedDisk {
                    path: "/img/data.qcow2".into(),
                    older: None
                },
                CopiedDisk {
                    path: "/img/root.qcow2".into(),
                    older: Some("/img/root.qcow2.before-migration-a-17".into())
                },
            ],
            "the shared disk is not copied"
        );
        assert!(!arrival.confirmed);
        assert_eq!(
            arrival.older_copies().collect::<Vec<_>>(),
            [(
                Path::new("/img/root.qcow2"),
                Path::new("/img/root.qcow2.before-migration-a-17")
            )]
        );
        let json = serde_json::to_vec(&arrival).unwrap();
        assert_eq!(
            serde_json::from_slice::<Arrival>(&json).unwrap(),
            arrival,
            "kept as written"
        );
        let confirmed = Arrival {
            confirmed: true,
            ..arrival.clone()
        };
        assert_eq!(
            serde_json::to_vec(&confirmed).unwrap(),
            json,
            "the confirmation is kept apart"
        );
    }

    #[test]
    fn only_the_mark_of_a_move_not_confirmed_counts_as_not_confirmed() {
        assert!(!confirmed_mark(Some(NOT_CONFIRMED)));
        assert!(confirmed_mark(Some(CONFIRMED)));
        for unsure in [None, Some(&b""[..]), Some(&b"x"[..])] {
            assert!(
                confirmed_mark(unsure),
                "{unsure:?}: nothing is deleted on a guess"
            );
        }
    }

    #[test]
    fn a_move_never_confirmed_gives_way_to_the_older_copies_when_no_qemu_is_left() {
        assert_eq!(
            leftover(false, QemuHere::None),
            Leftover::Images(Images::PutBackOlder),
            "the lock never moved here: the images are partial"
        );
    }

    #[test]
    fn a_confirmed_move_with_no_qemu_left_keeps_both_files() {
        assert_eq!(
            leftover(true, QemuHere::None),
            Leftover::Images(Images::Leave),
            "the lock may have moved here: the images may be whole, the guest may have run here"
        );
    }

    #[test]
    fn a_qemu_still_here_decides() {
        for confirmed in [false, true] {
            assert_eq!(
                leftover(confirmed, QemuHere::InAMove),
                Leftover::WithItsQemu
            );
            assert_eq!(leftover(confirmed, QemuHere::Unreadable), Leftover::Later);
        }
        assert_eq!(
            leftover(true, QemuHere::RanTheGuest),
            Leftover::Images(Images::RemoveOlder),
            "the guest resumed here: the older copies are stale"
        );
        assert_eq!(
            leftover(false, QemuHere::RanTheGuest),
            Leftover::Images(Images::Leave),
            "cannot be: nothing is touched"
        );
    }

    #[test]
    fn putting_back_renames_the_older_copy_over_and_never_removes_an_image_not_set_aside() {
        let arrival = Arrival::new("web", "a-17", "a", &running(), |path, _| {
            path == Path::new("/img/root.qcow2")
        });
        let (data, root) = (&arrival.disks[0], &arrival.disks[1]);
        assert_eq!(
            put_back(root, true),
            PutBack::Rename {
                kept: Path::new("/img/root.qcow2.before-migration-a-17"),
                path: Path::new("/img/root.qcow2")
            }
        );
        assert_eq!(
            put_back(root, false),
            PutBack::AlreadyThere,
            "set aside never happened, or the copy is back: the image at the path is the older one"
        );
        for kept_exists in [false, true] {
            assert_eq!(
                put_back(data, kept_exists),
                PutBack::Remove(Path::new("/img/data.qcow2")),
                "nothing there before the move"
            );
        }
    }
}
