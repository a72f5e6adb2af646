//! Another host's view of a directory on this machine: a command run in a mount namespace of its
//! own (`unshare -m`, private propagation) where `over` shows `dir`. The command and every
//! process it starts see the same path as a different file than everyone else. Used by the
//! migration test and bench for a second agent whose local disks are its own. Needs root.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// `program` (add its arguments to the result) inside the namespace.
pub fn command(dir: &Path, over: &Path, program: &OsStr) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && shift 2 && exec \"$@\"")
        .arg("sh")
        .arg(dir)
        .arg(over)
        .arg(program);
    command
}
