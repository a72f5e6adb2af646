//! Each VM's QEMU in a cgroup of its own, with the declared limits (`cgroup` has the pure part).
//!
//! - With systemd (PID 1): the transient scope `plasmavmc-vm-NAME.scope` that `systemd-run
//!   --scope` makes, with the limits as properties; changed live by `systemctl set-property
//!   --runtime`.
//! - Without systemd: the agent makes `<hierarchy>/…/plasmavmc/vm-NAME` in the unified (v2)
//!   hierarchy and in each v1 hierarchy that holds the cpu or memory controller, writes the
//!   limits, and QEMU joins them between fork and exec (so it never runs a moment outside its
//!   limits). v2 cgroups sit under the hierarchy's root; v1 ones under the agent's own cgroup
//!   (a VM stays within whatever the host gave the agent's container). Never the agent's own
//!   cgroup: stopping the agent must not touch a VM, nor a VM's limits the agent.
//!
//! A limit is read back from (and changed in) the cgroup QEMU is actually in (`/proc/PID/cgroup`),
//! and only when that cgroup is the VM's own.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cgroup::{self, Controller, Membership, Mounts, Version};
use crate::paths::DEFAULT_RUN_DIR;
use crate::spec::Limits;

/// How this host gives VMs cgroups; decided once at agent start.
#[derive(Debug, Clone)]
pub struct Cgroups {
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    Systemd,
    /// Per controller: the version and the directory under which VM cgroups are made; plus the
    /// unified hierarchy's, for membership alone when it holds no controller.
    Direct {
        controllers: BTreeMap<Controller, (Version, PathBuf)>,
        unified: Option<PathBuf>,
    },
    /// No cgroup filesystem (tests of the pure parts only, odd containers): QEMU stays where
    /// the agent is, and declared limits are refused.
    Unavailable,
}

/// What a launch needs to put QEMU in its cgroup.
#[derive(Debug, Default)]
pub struct Placement {
    /// `systemd-run -p` properties (systemd hosts).
    pub systemd_properties: Vec<String>,
    /// Open `cgroup.procs` files to write `0` into between fork and exec (hosts without systemd).
    procs: Vec<OwnedFd>,
}

impl Placement {
    /// Moves the calling process into the VM's cgroups. Async-signal-safe (one `write` per
    /// file): meant for `pre_exec`.
    pub fn join(&self) -> std::io::Result<()> {
        for fd in &self.procs {
            // SAFETY: a valid open fd, a static buffer.
            if unsafe { nix::libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Cgroups {
    /// Looks at this host: systemd, else the cgroup mounts of `/proc/self/mountinfo`. `run_dir`
    /// names the subtree, so agents with different run dirs (tests) never share a VM cgroup.
    pub fn detect(run_dir: &Path) -> Cgroups {
        let mode = if under_systemd() {
            Mode::Systemd
        } else {
            direct_mode(&host_mounts(), &subtree_name(run_dir))
        };
        tracing::info!(?mode, "VM cgroups");
        Cgroups { mode }
    }

    /// Prepares VM `vm`'s cgroups with `limits` for a launch.
    pub fn place(&self, vm: &str, limits: &Limits) -> Result<Placement> {
        match &self.mode {
            Mode::Systemd => Ok(Placement {
                systemd_properties: cgroup::systemd_properties(limits),
                procs: Vec::new(),
            }),
            Mode::Direct {
                controllers,
                unified,
            } => match place_directly(vm, limits, controllers, unified.as_deref()) {
                Ok(procs) => Ok(Placement {
                    systemd_properties: Vec::new(),
                    procs,
                }),
                // Without limits to enforce, a host that will not let the agent make cgroups
                // (an unprivileged container) still runs the VM, in the agent's cgroup.
                Err(e) if limits.normalized() == Limits::default() => {
                    tracing::warn!(vm, "no cgroup of its own for this VM: {e:#}");
                    Ok(Placement::default())
                }
                Err(e) => Err(e),
            },
            Mode::Unavailable => {
                refuse_unplaceable(limits, &BTreeMap::new())?;
                Ok(Placement::default())
            }
        }
    }

    /// Removes VM `vm`'s cgroups once its QEMU is gone (the subtree stays: another VM may be
    /// starting in it). Best effort: the kernel refuses to remove a cgroup with a process in it.
    pub fn remove(&self, vm: &str) {
        let Mode::Direct {
            controllers,
            unified,
        } = &self.mode
        else {
            return;
        };
        let bases = controllers.values().map(|(_, base)| base).chain(unified);
        for base in bases {
            let _ = std::fs::remove_dir(base.join(cgroup::cgroup_name(vm)));
        }
    }
}

/// The limits of the cgroup QEMU `pid` is in, if it is VM `vm`'s own (`None`: it is not, e.g. a
/// QEMU an older agent started).
pub fn read_limits(vm: &str, pid: u32) -> Option<Limits> {
    let (dirs, versions) = own_dirs(&host_mounts(), vm, pid)?;
    let read = |controller: Controller, file: &str| {
        std::fs::read_to_string(dirs.get(&controller)?.join(file)).ok()
    };
    Some(cgroup::read_limits(read, &versions))
}

/// Changes the limits of the running VM `vm` (QEMU `pid`): its scope's properties under systemd,
/// else its cgroup's files.
pub fn set_limits(vm: &str, pid: u32, limits: &Limits) -> Result<()> {
    if under_systemd() {
        return systemctl_set_property(vm, limits);
    }
    let Some((dirs, versions)) = own_dirs(&host_mounts(), vm, pid) else {
        bail!("QEMU (pid {pid}) is not in a cgroup of its own");
    };
    let present: BTreeMap<Controller, (Version, PathBuf)> = dirs
        .into_iter()
        .map(|(c, dir)| (c, (versions[&c], dir)))
        .collect();
    refuse_unplaceable(limits, &present)?;
    for (controller, (version, dir)) in present {
        write_settings(&dir, cgroup::settings(controller, version, limits))?;
    }
    tracing::info!(vm, pid, %limits, "set the VM's cgroup limits");
    Ok(())
}

fn under_systemd() -> bool {
    Path::new("/run/systemd/system").exists()
}

fn host_mounts() -> Mounts {
    Mounts::parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Per controller, the directory of the cgroup `pid` is in and its version: `None` unless `pid`
/// is in VM `vm`'s own cgroup (in the unified hierarchy, or in a v1 one).
fn own_dirs(
    mounts: &Mounts,
    vm: &str,
    pid: u32,
) -> Option<(BTreeMap<Controller, PathBuf>, BTreeMap<Controller, Version>)> {
    let membership =
        Membership::parse(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?);
    let unified = membership
        .v2
        .as_deref()
        .filter(|p| cgroup::is_own_cgroup(p, vm));
    let v2_root = mounts.v2.as_deref();
    let v2_controllers = v2_root.map(controllers_of).unwrap_or_default();
    let (mut dirs, mut versions) = (BTreeMap::new(), BTreeMap::new());
    for controller in Controller::ALL {
        if let (Some(path), Some(root)) = (unified, v2_root) {
            if v2_controllers.contains(&controller) {
                dirs.insert(controller, cgroup::cgroup_dir(root, path));
                versions.insert(controller, Version::V2);
                continue;
            }
        }
        let v1 = membership
            .v1
            .get(&controller)
            .filter(|p| cgroup::is_own_cgroup(p, vm));
        if let (Some(path), Some(root)) = (v1, mounts.v1.get(&controller)) {
            dirs.insert(controller, cgroup::cgroup_dir(root, path));
            versions.insert(controller, Version::V1);
        }
    }
    (unified.is_some() || !dirs.is_empty()).then_some((dirs, versions))
}

/// Makes VM `vm`'s cgroups with `limits` (see `Mode::Direct`); their `cgroup.procs`, open.
fn place_directly(
    vm: &str,
    limits: &Limits,
    controllers: &BTreeMap<Controller, (Version, PathBuf)>,
    unified: Option<&Path>,
) -> Result<Vec<OwnedFd>> {
    refuse_unplaceable(limits, controllers)?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (controller, (version, base)) in controllers {
        let dir = make_dir(base, vm, *version == Version::V2)?;
        write_settings(&dir, cgroup::settings(*controller, *version, limits))?;
        dirs.push(dir);
    }
    if let Some(base) = unified {
        dirs.push(make_dir(base, vm, false)?);
    }
    dirs.dedup();
    dirs.iter()
        .map(|dir| {
            let path = dir.join("cgroup.procs");
            let file = File::options()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok(file.into())
        })
        .collect()
}

/// `plasmavmc` for the default run dir; `plasmavmc-<hash>` for any other, so two agents on one
/// host (tests) keep their VMs apart.
fn subtree_name(run_dir: &Path) -> String {
    if run_dir == Path::new(DEFAULT_RUN_DIR) {
        return cgroup::SUBTREE.to_owned();
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = run_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("{}-{:08x}", cgroup::SUBTREE, hash as u32)
}

fn direct_mode(mounts: &Mounts, subtree: &str) -> Mode {
    let own = Membership::parse(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    let mut controllers = BTreeMap::new();
    let v2_controllers = mounts.v2.as_deref().map(controllers_of).unwrap_or_default();
    for controller in Controller::ALL {
        if let Some(root) = mounts
            .v2
            .as_deref()
            .filter(|_| v2_controllers.contains(&controller))
        {
            controllers.insert(controller, (Version::V2, root.join(subtree)));
        } else if let Some(root) = mounts.v1.get(&controller) {
            let agent = own.v1.get(&controller).map_or("/", String::as_str);
            controllers.insert(
                controller,
                (Version::V1, cgroup::cgroup_dir(root, agent).join(subtree)),
            );
        }
    }
    let unified = mounts.v2.as_ref().map(|root| root.join(subtree));
    if controllers.is_empty() && unified.is_none() {
        return Mode::Unavailable;
    }
    Mode::Direct {
        controllers,
        unified,
    }
}

/// The controllers a v2 cgroup may hand to its children (`cgroup.controllers`).
fn controllers_of(dir: &Path) -> Vec<Controller> {
    let text = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    Controller::ALL
        .into_iter()
        .filter(|c| text.split_whitespace().any(|name| name == c.name()))
        .collect()
}

/// `<base>/vm-NAME`, made if missing. In v2, the controllers are enabled on the way down (the
/// root's and the subtree's `cgroup.subtree_control`).
fn make_dir(base: &Path, vm: &str, enable_v2_controllers: bool) -> Result<PathBuf> {
    std::fs::create_dir_all(base).with_context(|| format!("creating cgroup {}", base.display()))?;
    if enable_v2_controllers {
        let root = base.parent().unwrap_or(base);
        for dir in [root, base] {
            let wanted: Vec<String> = controllers_of(dir)
                .iter()
                .map(|c| format!("+{}", c.name()))
                .collect();
            let path = dir.join("cgroup.subtree_control");
            std::fs::write(&path, wanted.join(" "))
                .with_context(|| format!("enabling {} in {}", wanted.join(" "), path.display()))?;
        }
    }
    let dir = base.join(cgroup::cgroup_name(vm));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    Ok(dir)
}

fn write_settings(dir: &Path, settings: Vec<(&'static str, String)>) -> Result<()> {
    for (file, value) in settings {
        let path = dir.join(file);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .with_context(|| format!("writing {value:?} to {}", path.display()))?;
    }
    Ok(())
}

/// A declared limit whose controller this host does not give VMs is an error, not a silent
/// no-op.
fn refuse_unplaceable(
    limits: &Limits,
    controllers: &BTreeMap<Controller, (Version, PathBuf)>,
) -> Result<()> {
    let needs = [
        (
            Controller::Cpu,
            limits.cpu_weight.is_some() || limits.cpu_quota_percent.is_some(),
        ),
        (Controller::Memory, limits.memory_max_mib.is_some()),
    ];
    for (controller, needed) in needs {
        if needed && !controllers.contains_key(&controller) {
            bail!(
                "limits ({limits}) need the {} cgroup controller, which this host does not \
                 offer for VMs",
                controller.name()
            );
        }
    }
    Ok(())
}

fn systemctl_set_property(vm: &str, limits: &Limits) -> Result<()> {
    let output = Command::new("systemctl")
        .args(["set-property", "--runtime", &cgroup::scope_unit(vm)])
        .args(cgroup::systemd_properties(limits))
        .output()
        .context("running systemctl set-property")?;
    if !output.status.success() {
        bail!(
            "systemctl set-property {}: {}",
            cgroup::scope_unit(vm),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_with_other_run_dirs_get_other_subtrees() {
        assert_eq!(subtree_name(Path::new("/run/plasmavmc")), "plasmavmc");
        let a = subtree_name(Path::new("/tmp/a/run"));
        assert!(a.starts_with("plasmavmc-"), "{a}");
        assert_ne!(a, subtree_name(Path::new("/tmp/b/run")));
        assert!(cgroup::is_own_cgroup(&format!("/{a}/vm-web"), "web"));
    }
}
