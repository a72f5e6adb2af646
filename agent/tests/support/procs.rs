//! Counting a VM's QEMU processes the hard way: by scanning `/proc`, independently of the agent's
//! own identity check and of what `status` says. Uniqueness tests assert with this.
//!
//! A process is VM `name`'s QEMU (under run dir `run_dir`) when its binary is `qemu-system-*` and
//! its arguments hold `guest=NAME` and that VM's QMP socket path (QEMU doubles commas inside
//! option values, so the path is compared with `,,` read as `,`). Zombies do not count.
//! Use from a test file: `#[path = "support/procs.rs"] mod procs;` (or `harness::procs`).
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// PIDs of every live QEMU process of VM `name` under `run_dir`.
pub fn qemu_pids(run_dir: &Path, name: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = live_qemus()
        .filter(|qemu| qemu.is_of(run_dir, name))
        .map(|qemu| qemu.pid)
        .collect();
    pids.sort_unstable();
    pids
}

/// How many live QEMU processes VM `name` under `run_dir` has.
pub fn qemu_count(run_dir: &Path, name: &str) -> usize {
    qemu_pids(run_dir, name).len()
}

/// How many live QEMU processes each VM of `names` has under all of `run_dirs` together, from
/// one pass over `/proc`: a watcher sampling many VMs every few milliseconds would otherwise
/// scan it once per VM and host, and its own load would be what it measures.
pub fn qemu_counts(run_dirs: &[PathBuf], names: &[String]) -> BTreeMap<String, usize> {
    let qemus: Vec<Qemu> = live_qemus().collect();
    names
        .iter()
        .map(|name| {
            let count = qemus
                .iter()
                .filter(|qemu| run_dirs.iter().any(|run| qemu.is_of(run, name)))
                .count();
            (name.clone(), count)
        })
        .collect()
}

/// A live `qemu-system-*` process and its arguments.
struct Qemu {
    pid: u32,
    args: Vec<String>,
}

impl Qemu {
    /// Whether this is VM `name`'s QEMU under `run_dir`.
    fn is_of(&self, run_dir: &Path, name: &str) -> bool {
        let socket = run_dir.join("vms").join(name).join("qmp.sock");
        let socket = socket.to_str().expect("UTF-8 run dir");
        let guest = format!("guest={name}");
        self.args
            .windows(2)
            .any(|w| w[0] == "-name" && w[1].split(',').any(|o| o == guest))
            && self.args.iter().any(|arg| arg.contains(socket))
    }
}

/// Every live QEMU process. Only a process whose `comm` says QEMU has its command line read:
/// reading another process's command line takes that process's memory lock.
fn live_qemus() -> impl Iterator<Item = Qemu> {
    let entries = std::fs::read_dir("/proc").into_iter().flatten();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("qemu-system-"))
        })
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|arg| String::from_utf8_lossy(arg).replace(",,", ","))
                .collect();
            let is_qemu = args.first().is_some_and(|binary| {
                Path::new(binary)
                    .file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with("qemu-system-"))
            });
            (is_qemu && !is_zombie(pid)).then_some(Qemu { pid, args })
        })
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, None | Some("Z" | "X"))
}
