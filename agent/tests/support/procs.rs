//! Counting a VM's QEMU processes the hard way: by scanning `/proc`, independently of the agent's
//! own identity check and of what `status` says. Uniqueness tests assert with this.
//!
//! A process is VM `name`'s QEMU (under run dir `run_dir`) when its binary is `qemu-system-*` and
//! its arguments hold `guest=NAME` and that VM's QMP socket path (QEMU doubles commas inside
//! option values, so the path is compared with `,,` read as `,`). Zombies do not count.
//! Use from a test file: `#[path = "support/procs.rs"] mod procs;` (or `harness::procs`).
#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;

/// PIDs of every live QEMU process of VM `name` under `run_dir`.
pub fn qemu_pids(run_dir: &Path, name: &str) -> Vec<u32> {
    let socket = run_dir.join("vms").join(name).join("qmp.sock");
    let socket = socket.to_str().expect("UTF-8 run dir");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid| is_qemu_of(*pid, name, socket) && !is_zombie(*pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// How many live QEMU processes VM `name` under `run_dir` has.
pub fn qemu_count(run_dir: &Path, name: &str) -> usize {
    qemu_pids(run_dir, name).len()
}

fn is_qemu_of(pid: u32, name: &str, socket: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).replace(",,", ","))
        .collect();
    let is_qemu = args.first().is_some_and(|binary| {
        Path::new(binary)
            .file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with("qemu-system-"))
    });
    let guest = format!("guest={name}");
    is_qemu
        && args
            .windows(2)
            .any(|w| w[0] == "-name" && w[1].split(',').any(|o| o == guest))
        && args.iter().any(|arg| arg.contains(socket))
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
