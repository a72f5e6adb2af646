//! QEMU confined: an unprivileged user (`--qemu-user`), a cgroup of its own, and access to just
//! what it needs. The pure rules are in `runas` and `cgroup`; this is the shell that applies them.
//!
//! What is changed for the QEMU user, and when (libvirt calls this dynamic ownership):
//! - `<run-dir>` and `<run-dir>/vms`: `root:GROUP 0710` at agent start (enter, not list).
//! - `<run-dir>/vms/NAME`: `root:GROUP 01770` from launch until QMP answers (QEMU creates
//!   `qmp.sock` and `console.log` in it; the sticky bit keeps it off the agent's files), then
//!   `0710` for as long as the VM runs.
//! - Writable disk images and block devices: `chown QEMU-USER:GROUP` before each boot and each
//!   hotplug, unless the user can already read and write them. Never given back (a chown back
//!   at stop could race the next start); permission bits are never touched.
//! - Read-only disks, kernel, initrd, firmware: never changed. They must already be readable by
//!   the user (and every directory above them enterable), or the start fails saying which.
//! - Bridged NICs' taps: created owned by the user (`ip tuntap add ... user UID group GID`).
//!
//! The agent's control socket and the lease file stay root's alone (0600).

use std::ffi::CString;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Group, Uid, User};

use super::cgroup::Cgroups;
use crate::paths::{RunDir, VmDir};
use crate::runas::{FileFacts, RunAs, Want};
use crate::spec::VmSpec;

/// How the agent launches every QEMU: as whom, in which cgroups.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// `None`: QEMU runs as the agent's user (root), the default for development.
    pub run_as: Option<RunAs>,
    /// `None`: QEMU stays in the launcher's cgroup (tests that launch QEMU by hand).
    pub cgroups: Option<Cgroups>,
}

impl Confinement {
    /// QEMU as the agent's user, in the agent's cgroup: what a bare launch does.
    pub fn none() -> Confinement {
        Confinement {
            run_as: None,
            cgroups: None,
        }
    }
}

/// `--qemu-user NAME [--qemu-group NAME]`: the user's uid, the group (default: the user's
/// primary group), and the user's supplementary groups (`kvm` for `/dev/kvm`, as `initgroups`).
pub fn resolve_user(user: &str, group: Option<&str>) -> Result<RunAs> {
    let found = User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| format!("--qemu-user {user}: no such user on this host"))?;
    if found.uid.is_root() {
        bail!("--qemu-user {user}: is uid 0; QEMU must run as an unprivileged user");
    }
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .with_context(|| format!("looking up group {name}"))?
                .with_context(|| format!("--qemu-group {name}: no such group on this host"))?
                .gid
        }
        None => found.gid,
    };
    let name = CString::new(user).context("user name")?;
    let groups = nix::unistd::getgrouplist(&name, gid)
        .with_context(|| format!("listing the groups of {user}"))?
        .into_iter()
        .map(Gid::as_raw)
        .filter(|&g| g != gid.as_raw())
        .collect();
    Ok(RunAs {
        uid: found.uid.as_raw(),
        gid: gid.as_raw(),
        groups,
    })
}

/// Becomes `run_as`: supplementary groups, group, then user (after which no way back). Only
/// async-signal-safe calls: meant for `pre_exec`, in the child that execs QEMU.
pub fn drop_privileges(run_as: &RunAs, groups: &[Gid]) -> std::io::Result<()> {
    nix::unistd::setgroups(groups)?;
    nix::unistd::setgid(Gid::from_raw(run_as.gid))?;
    nix::unistd::setuid(Uid::from_raw(run_as.uid))?;
    Ok(())
}

/// The supplementary groups to set in `drop_privileges`, made before forking.
pub fn group_list(run_as: &RunAs) -> Vec<Gid> {
    std::iter::once(run_as.gid)
        .chain(run_as.groups.iter().copied())
        .map(Gid::from_raw)
        .collect()
}

/// `<run-dir>` and `<run-dir>/vms`: enterable by the QEMU group, listable by root alone. Every
/// directory above them must be enterable by the QEMU user, or no QEMU could reach its socket:
/// said now, at agent start, rather than at each VM's start.
pub fn prepare_run_dir(run_dir: &RunDir, run_as: Option<&RunAs>) -> Result<()> {
    let Some(run_as) = run_as else {
        return Ok(());
    };
    for dir in [run_dir.root().to_path_buf(), run_dir.vms_dir()] {
        give_dir(&dir, run_as.gid, 0o710)?;
    }
    check_access(&run_dir.vms_dir(), Want::Search, run_as)
        .map_err(anyhow::Error::new)
        .with_context(|| format!("run dir {}", run_dir.root().display()))
}

/// Opens VM `vm_dir` to QEMU for its start: `root:GROUP 01770`. A `console.log` left by a QEMU
/// of another user is removed (QEMU could not reopen it; the log is rewritten each boot anyway).
pub fn open_vm_dir(vm_dir: &VmDir, run_as: Option<&RunAs>) -> Result<()> {
    let Some(run_as) = run_as else {
        return Ok(());
    };
    give_dir(vm_dir.dir(), run_as.gid, 0o1770)?;
    let log = vm_dir.console_log();
    match fs::symlink_metadata(&log) {
        Ok(meta) if meta.uid() != run_as.uid => {
            fs::remove_file(&log).with_context(|| format!("removing {}", log.display()))?
        }
        _ => {}
    }
    Ok(())
}

/// Once QEMU has made its socket and opened its log: no more writing in its VM directory
/// (`0710`). A no-op for a directory that was never opened to a group.
pub fn seal_vm_dir(vm_dir: &VmDir) -> Result<()> {
    let dir = vm_dir.dir();
    let mode = fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .mode();
    if mode & 0o020 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o710))
            .with_context(|| format!("closing {} to QEMU", dir.display()))?;
    }
    Ok(())
}

/// Makes every file `spec` boots with usable by `run_as` (see the module doc), or says why not.
pub fn grant_boot_files(spec: &VmSpec, run_as: Option<&RunAs>) -> Result<()> {
    let Some(run_as) = run_as else {
        return Ok(());
    };
    for (what, path) in [
        ("kernel", &spec.kernel),
        ("initrd", &spec.initrd),
        ("firmware", &spec.firmware),
    ] {
        if let Some(path) = path {
            check_access(path, Want::Read, run_as)
                .with_context(|| format!("{what} {}", path.display()))?;
        }
    }
    for (id, disk) in &spec.disks {
        grant_disk(&disk.path, disk.read_only, Some(run_as))
            .with_context(|| format!("disk {id}"))?;
    }
    Ok(())
}

/// Makes a disk image or block device usable by QEMU running as `run_as`: a writable one is
/// given to the user (unless it can already read and write it), a read-only one must already be
/// readable. Every directory above it must be enterable. Without `run_as` (QEMU as root): nothing.
/// Disk image creation calls this too, so a new image is QEMU's from the start.
pub fn grant_disk(path: &Path, read_only: bool, run_as: Option<&RunAs>) -> Result<()> {
    let Some(run_as) = run_as else {
        return Ok(());
    };
    let want = if read_only {
        Want::Read
    } else {
        Want::ReadWrite
    };
    match check_access(path, want, run_as) {
        Ok(()) => Ok(()),
        Err(Denied::File { real, .. }) if !read_only => {
            nix::unistd::chown(
                &real,
                Some(Uid::from_raw(run_as.uid)),
                Some(Gid::from_raw(run_as.gid)),
            )
            .with_context(|| format!("giving {} to uid {}", real.display(), run_as.uid))?;
            tracing::info!(path = %real.display(), uid = run_as.uid, gid = run_as.gid, "gave the disk to the QEMU user");
            Ok(())
        }
        Err(denied) => {
            Err(anyhow::Error::new(denied)).with_context(|| format!("{}", path.display()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Denied {
    #[error(
        "the QEMU user (uid {uid}) cannot enter directory {} (owner {}, group {}, mode {:04o})",
        dir.display(), facts.uid, facts.gid, facts.mode & 0o7777
    )]
    Directory {
        dir: PathBuf,
        uid: u32,
        facts: FileFacts,
    },
    #[error(
        "the QEMU user (uid {uid}) may not {want} {} (owner {}, group {}, mode {:04o}); make it \
         readable by the QEMU user's group or by others",
        real.display(), facts.uid, facts.gid, facts.mode & 0o7777
    )]
    File {
        real: PathBuf,
        uid: u32,
        facts: FileFacts,
        want: &'static str,
    },
    #[error("{0}")]
    Io(String),
}

/// Whether `run_as` may `want` the file at `path`: the directories on the way to the path as
/// given and to where it really is (symlinks resolved), then the file itself.
fn check_access(path: &Path, want: Want, run_as: &RunAs) -> Result<(), Denied> {
    let real = fs::canonicalize(path).map_err(|e| Denied::Io(format!("{e}")))?;
    for walked in [path, real.as_path()] {
        for dir in walked.ancestors().skip(1) {
            let facts = facts(dir).map_err(|e| Denied::Io(format!("{}: {e}", dir.display())))?;
            if !run_as.may(facts, Want::Search) {
                return Err(Denied::Directory {
                    dir: dir.to_path_buf(),
                    uid: run_as.uid,
                    facts,
                });
            }
        }
    }
    let facts = facts(&real).map_err(|e| Denied::Io(format!("{e}")))?;
    if run_as.may(facts, want) {
        return Ok(());
    }
    let wanted = match want {
        Want::Read => "read",
        Want::ReadWrite => "read and write",
        Want::Search => "enter",
    };
    Err(Denied::File {
        real,
        uid: run_as.uid,
        facts,
        want: wanted,
    })
}

fn facts(path: &Path) -> std::io::Result<FileFacts> {
    let meta = fs::metadata(path)?;
    Ok(FileFacts {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode(),
    })
}

/// `root:gid` with `mode`, on a directory that exists or is made now.
fn give_dir(dir: &Path, gid: u32, mode: u32) -> Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("creating {}", dir.display()))
        }
        _ => {}
    }
    nix::unistd::chown(dir, Some(Uid::from_raw(0)), Some(Gid::from_raw(gid)))
        .with_context(|| format!("giving {} to group {gid}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}
