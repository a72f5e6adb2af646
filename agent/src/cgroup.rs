//! Each VM's cgroup and its limits, as plain data: where the host mounts its controllers, which
//! file holds which limit in which cgroup version, and how to read a limit back. No I/O: the
//! shell (`qemu::cgroup`) reads `/proc` and writes the files.
//!
//! - cgroup v2 (NixOS, any systemd host): `cpu.weight`, `cpu.max`, `memory.max`. Under systemd
//!   the VM's scope gets the same limits as `CPUWeight=`, `CPUQuota=`, `MemoryMax=`.
//! - A v1 (or hybrid) host without systemd gets the v1 equivalents: `cpu.shares` (weight scaled
//!   by 1024/100, so it reads back exactly), `cpu.cfs_quota_us` over a 100 ms period, and
//!   `memory.limit_in_bytes`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::spec::{Limits, DEFAULT_CPU_WEIGHT};

/// The CPU quota period, as systemd uses it: 100 ms.
pub const CPU_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1024 * 1024;
/// v1 shares of a cgroup nobody set any for.
const DEFAULT_CPU_SHARES: u64 = 1024;
/// v1 spells "no memory limit" as a page-rounded `i64::MAX`; anything this large means none.
const V1_UNLIMITED: u64 = 1 << 62;

/// The directory under each hierarchy that holds one cgroup per VM (hosts without systemd);
/// `plasmavmc-<hash>` for an agent with another run dir.
pub const SUBTREE: &str = "plasmavmc";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Memory,
}

impl Controller {
    pub const ALL: [Controller; 2] = [Controller::Cpu, Controller::Memory];

    /// The name in `cgroup.controllers`, mountinfo options and `/proc/PID/cgroup`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The VM's own cgroup: `vm-NAME` under the `plasmavmc` subtree, or the systemd scope the agent
/// launched it in.
pub fn cgroup_name(vm: &str) -> String {
    format!("vm-{vm}")
}

/// The transient systemd scope of VM `vm`'s QEMU (`systemd-run --scope --unit`).
pub fn scope_unit(vm: &str) -> String {
    format!("plasmavmc-vm-{vm}.scope")
}

/// Whether a cgroup path (from `/proc/PID/cgroup`) is VM `vm`'s own: never the agent's, whose
/// limits must not be touched on a VM's behalf.
pub fn is_own_cgroup(path: &str, vm: &str) -> bool {
    let mut parts = path.rsplit('/');
    let leaf = parts.next().unwrap_or_default();
    let parent = parts.next().unwrap_or_default();
    let in_subtree = parent == SUBTREE || parent.starts_with(&format!("{SUBTREE}-"));
    (leaf == cgroup_name(vm) && in_subtree) || leaf == scope_unit(vm)
}

/// The files (relative to the VM's cgroup directory of `controller`) that express `limits`, in
/// writing order. Every file is written, absent limits as the kernel's default, so a limit
/// removed from the spec is lifted.
pub fn settings(
    controller: Controller,
    version: Version,
    limits: &Limits,
) -> Vec<(&'static str, String)> {
    match (controller, version) {
        (Controller::Cpu, Version::V2) => vec![
            (
                "cpu.weight",
                limits.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT).to_string(),
            ),
            (
                "cpu.max",
                match limits.cpu_quota_percent {
                    Some(percent) => format!("{} {CPU_PERIOD_US}", quota_us(percent)),
                    None => format!("max {CPU_PERIOD_US}"),
                },
            ),
        ],
        (Controller::Cpu, Version::V1) => vec![
            (
                "cpu.shares",
                limits
                    .cpu_weight
                    .map_or(DEFAULT_CPU_SHARES, weight_to_shares)
                    .to_string(),
            ),
            ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            (
                "cpu.cfs_quota_us",
                limits
                    .cpu_quota_percent
                    .map_or("-1".to_owned(), |percent| quota_us(percent).to_string()),
            ),
        ],
        (Controller::Memory, Version::V2) => vec![(
            "memory.max",
            limits
                .memory_max_mib
                .map_or("max".to_owned(), |mib| (mib * MIB).to_string()),
        )],
        (Controller::Memory, Version::V1) => vec![(
            "memory.limit_in_bytes",
            limits
                .memory_max_mib
                .map_or("-1".to_owned(), |mib| (mib * MIB).to_string()),
        )],
    }
}

/// The limits a cgroup has, from its files as `read(controller, version, file)` returns them
/// (`None`: no such file, e.g. a controller the host lacks: that limit reads as absent).
/// Normalized (see `Limits::normalized`).
pub fn read_limits(
    read: impl Fn(Controller, &str) -> Option<String>,
    versions: &BTreeMap<Controller, Version>,
) -> Limits {
    let number = |controller, file| -> Option<u64> { read(controller, file)?.trim().parse().ok() };
    let mut limits = Limits::default();
    match versions.get(&Controller::Cpu) {
        Some(Version::V2) => {
            limits.cpu_weight =
                number(Controller::Cpu, "cpu.weight").and_then(|w| u32::try_from(w).ok());
            limits.cpu_quota_percent = read(Controller::Cpu, "cpu.max").and_then(|max| {
                let (quota, period) = max.trim().split_once(' ')?;
                quota_percent(quota.parse().ok()?, period.parse().ok()?)
            });
        }
        Some(Version::V1) => {
            limits.cpu_weight = number(Controller::Cpu, "cpu.shares").map(shares_to_weight);
            limits.cpu_quota_percent = read(Controller::Cpu, "cpu.cfs_quota_us")
                .and_then(|quota| quota.trim().parse::<i64>().ok())
                .and_then(|quota| u64::try_from(quota).ok())
                .and_then(|quota| {
                    quota_percent(quota, number(Controller::Cpu, "cpu.cfs_period_us")?)
                });
        }
        None => {}
    }
    let memory_file = match versions.get(&Controller::Memory) {
        Some(Version::V2) => Some("memory.max"),
        Some(Version::V1) => Some("memory.limit_in_bytes"),
        None => None,
    };
    limits.memory_max_mib = memory_file
        .and_then(|file| number(Controller::Memory, file))
        .filter(|&bytes| bytes < V1_UNLIMITED)
        .map(|bytes| bytes / MIB);
    limits.normalized()
}

/// systemd properties for the VM's scope (`systemd-run -p`, `systemctl set-property`). Absent
/// limits reset the property, so a limit removed from the spec is lifted.
pub fn systemd_properties(limits: &Limits) -> Vec<String> {
    vec![
        format!(
            "CPUWeight={}",
            limits.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT)
        ),
        match limits.cpu_quota_percent {
            Some(percent) => format!("CPUQuota={percent}%"),
            None => "CPUQuota=".to_owned(),
        },
        match limits.memory_max_mib {
            Some(mib) => format!("MemoryMax={}", mib * MIB),
            None => "MemoryMax=infinity".to_owned(),
        },
    ]
}

fn quota_us(percent: u32) -> u64 {
    u64::from(percent) * CPU_PERIOD_US / 100
}

fn quota_percent(quota_us: u64, period_us: u64) -> Option<u32> {
    (period_us > 0)
        .then(|| u32::try_from(quota_us * 100 / period_us).ok())
        .flatten()
}

/// v2 weight 100 is v1 shares 1024. Rounded both ways; since a weight step is more than a
/// share step, every weight survives the round trip.
fn weight_to_shares(weight: u32) -> u64 {
    (u64::from(weight) * DEFAULT_CPU_SHARES + 50) / 100
}

fn shares_to_weight(shares: u64) -> u32 {
    u32::try_from((shares * 100 + DEFAULT_CPU_SHARES / 2) / DEFAULT_CPU_SHARES).unwrap_or(u32::MAX)
}

/// Where the host mounts its cgroup hierarchies (from `/proc/self/mountinfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup2 (unified) hierarchy: `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
    /// hybrid host.
    pub v2: Option<PathBuf>,
    /// v1 hierarchies holding a controller (`/sys/fs/cgroup/cpu,cpuacct`, ...).
    pub v1: BTreeMap<Controller, PathBuf>,
}

impl Mounts {
    /// Parses `/proc/self/mountinfo`: field 5 is the mount point, and after the ` - `
    /// separator come the filesystem type, the source and the super options (the v1
    /// controllers).
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut mounts = Mounts::default();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split(' ').nth(4) else {
                continue;
            };
            let point = PathBuf::from(unescape_octal(point));
            let mut right = right.split(' ');
            match right.next() {
                Some("cgroup2") => mounts.v2 = mounts.v2.or(Some(point)),
                Some("cgroup") => {
                    let options: Vec<&str> = right.nth(1).unwrap_or_default().split(',').collect();
                    for controller in Controller::ALL {
                        if options.contains(&controller.name()) {
                            mounts.v1.entry(controller).or_insert_with(|| point.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        mounts
    }
}

/// A process's cgroups (from `/proc/PID/cgroup`): the unified path, and the v1 path of each
/// controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub v2: Option<String>,
    pub v1: BTreeMap<Controller, String>,
}

impl Membership {
    /// Lines are `ID:CONTROLLERS:PATH`; the unified one is `0::PATH`.
    pub fn parse(proc_cgroup: &str) -> Membership {
        let mut membership = Membership::default();
        for line in proc_cgroup.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                membership.v2 = Some(path.to_owned());
                continue;
            }
            for controller in Controller::ALL {
                if controllers.split(',').any(|c| c == controller.name()) {
                    membership.v1.insert(controller, path.to_owned());
                }
            }
        }
        membership
    }
}

/// `<mount>/<path>` for a cgroup path as `/proc` writes it (absolute, relative to the mount).
pub fn cgroup_dir(mount: &Path, path: &str) -> PathBuf {
    mount.join(path.trim_start_matches('/'))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or_default();
            if let Ok(code) = u8::from_str_radix(digits, 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(weight: Option<u32>, quota: Option<u32>, memory: Option<u64>) -> Limits {
        Limits {
            cpu_weight: weight,
            cpu_quota_percent: quota,
            memory_max_mib: memory,
        }
    }

    /// Writes `limits` into a fake cgroup of `version`, reads them back.
    fn round_trip(version: Version, limits: &Limits) -> Limits {
        let mut files = BTreeMap::new();
        for controller in Controller::ALL {
            for (file, value) in settings(controller, version, limits) {
                files.insert(file, value);
            }
        }
        let versions = Controller::ALL.iter().map(|&c| (c, version)).collect();
        read_limits(|_, file| files.get(file).cloned(), &versions)
    }

    #[test]
    fn every_limit_reads_back_as_written_in_both_versions() {
        for version in [Version::V1, Version::V2] {
            for weight in [None, Some(1), Some(33), Some(100), Some(250), Some(10_000)] {
                for quota in [None, Some(1), Some(150), Some(400)] {
                    for memory in [None, Some(300), Some(65_536)] {
                        let declared = limits(weight, quota, memory);
                        assert_eq!(
                            round_trip(version, &declared),
                            declared.normalized(),
                            "{version:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn v2_files_say_what_the_kernel_expects() {
        let files = settings(
            Controller::Cpu,
            Version::V2,
            &limits(Some(50), Some(150), None),
        );
        assert_eq!(
            files,
            vec![
                ("cpu.weight", "50".to_owned()),
                ("cpu.max", "150000 100000".to_owned())
            ]
        );
        let none = settings(Controller::Memory, Version::V2, &Limits::default());
        assert_eq!(none, vec![("memory.max", "max".to_owned())]);
        let v1 = settings(
            Controller::Memory,
            Version::V1,
            &limits(None, None, Some(2)),
        );
        assert_eq!(v1, vec![("memory.limit_in_bytes", "2097152".to_owned())]);
    }

    #[test]
    fn v1_unlimited_memory_reads_as_no_limit() {
        let versions = [(Controller::Memory, Version::V1)].into_iter().collect();
        let read = read_limits(
            |_, file| (file == "memory.limit_in_bytes").then(|| "9223372036854771712\n".to_owned()),
            &versions,
        );
        assert_eq!(read, Limits::default());
    }

    #[test]
    fn systemd_properties_lift_absent_limits() {
        assert_eq!(
            systemd_properties(&limits(Some(200), Some(50), Some(1024))),
            ["CPUWeight=200", "CPUQuota=50%", "MemoryMax=1073741824"]
        );
        assert_eq!(
            systemd_properties(&Limits::default()),
            ["CPUWeight=100", "CPUQuota=", "MemoryMax=infinity"]
        );
    }

    #[test]
    fn only_the_vms_own_cgroup_counts() {
        assert!(is_own_cgroup("/plasmavmc/vm-web", "web"));
        assert!(is_own_cgroup("/process_api/1/plasmavmc/vm-web", "web"));
        assert!(is_own_cgroup("/system.slice/plasmavmc-vm-web.scope", "web"));
        assert!(!is_own_cgroup("/system.slice/plasmavmc.service", "web"));
        assert!(!is_own_cgroup("/plasmavmc/vm-web2", "web"));
        assert!(!is_own_cgroup("/", "web"));
        assert!(!is_own_cgroup("/elsewhere/vm-web", "web"));
    }

    #[test]
    fn mounts_of_a_hybrid_host() {
        let mountinfo = "\
24 18 0:21 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
25 24 0:22 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
26 24 0:23 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
27 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
28 24 0:25 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
29 24 0:26 / /mnt/with\\040space rw - ext4 /dev/sda1 rw";
        let mounts = Mounts::parse(mountinfo);
        assert_eq!(mounts.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            mounts.v1[&Controller::Cpu],
            PathBuf::from("/sys/fs/cgroup/cpu")
        );
        assert_eq!(
            mounts.v1[&Controller::Memory],
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        assert_eq!(unescape_octal("/mnt/with\\040space"), "/mnt/with space");
    }

    #[test]
    fn membership_of_a_process() {
        let text =
            "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n1:name=systemd:/\n0::/plasmavmc/vm-web\n";
        let membership = Membership::parse(text);
        assert_eq!(membership.v2.as_deref(), Some("/plasmavmc/vm-web"));
        assert_eq!(membership.v1[&Controller::Memory], "/process_api/abc");
        assert_eq!(membership.v1[&Controller::Cpu], "/");
        assert_eq!(
            cgroup_dir(Path::new("/sys/fs/cgroup"), "/plasmavmc/vm-web"),
            PathBuf::from("/sys/fs/cgroup/plasmavmc/vm-web")
        );
    }
}
