//! Which processes are a VM's: the identity check on a process's command line, and what to make
//! of everything found for one VM. Pure: the shell reads `/proc` and the pidfile and hands them in.
//!
//! The rule it serves: **a VM never gets a new QEMU while any process that is that VM's QEMU
//! exists.** A process is VM `NAME`'s QEMU when its binary is `qemu-system-*`, its `-name` says
//! `guest=NAME` and one of its options is `path=<vm dir>/qmp.sock`; it is the VM's fence guard when
//! it runs `fence-guard --vm-dir <vm dir>`. Neither check asks QEMU anything (a stopped QEMU still
//! has its command line), and option values are read the way QEMU reads them (`,,` is a comma), so
//! a run dir with a comma in its path is still recognised.

use std::path::Path;

use crate::paths::VmDir;

/// What a process is to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Qemu,
    /// The `plasmavmc fence-guard` parent of an HA VM's QEMU.
    Guard,
}

/// What `cmdline` (raw `/proc/<pid>/cmdline`) is to VM `name` in `vm_dir`, if anything.
pub fn role_of(cmdline: &[u8], name: &str, vm_dir: &VmDir) -> Option<Role> {
    let args: Vec<&[u8]> = cmdline
        .split(|&b| b == 0)
        .filter(|arg| !arg.is_empty())
        .collect();
    let binary = Path::new(std::str::from_utf8(args.first()?).ok()?);
    let dir = vm_dir.dir().as_os_str().as_encoded_bytes();
    if args.get(1) == Some(&b"fence-guard".as_slice()) {
        let guarded = args.windows(2).any(|w| w[0] == b"--vm-dir" && w[1] == dir);
        return guarded.then_some(Role::Guard);
    }
    let is_qemu = binary
        .file_name()
        .and_then(|f| f.to_str())
        .is_some_and(|f| f.starts_with("qemu-system-"));
    if !is_qemu {
        return None;
    }
    let args: Vec<&str> = args
        .iter()
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .collect();
    let guest = format!("guest={name}");
    let socket = format!("path={}", vm_dir.qmp_socket().display());
    let named = args
        .windows(2)
        .any(|w| w[0] == "-name" && qemu_options(w[1]).contains(&guest));
    let has_socket = args.iter().any(|arg| qemu_options(arg).contains(&socket));
    (named && has_socket).then_some(Role::Qemu)
}

/// The options of one QEMU option argument (`a=1,path=/x,,y`), each with `,,` read as `,`.
pub fn qemu_options(arg: &str) -> Vec<String> {
    let mut options = Vec::new();
    let mut current = String::new();
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => options.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    options.push(current);
    options
}

/// What the pidfile said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pidfile {
    Missing,
    Pid(u32),
    /// Not a PID: the text found (trimmed, shortened).
    Garbage(String),
}

/// Everything found for one VM, as the shell read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub pidfile: Pidfile,
    /// Live processes whose command line is this VM's QEMU (scanned in `/proc`).
    pub qemus: Vec<u32>,
    /// Live fence guards for this VM's directory.
    pub guards: Vec<u32>,
}

/// What the agent may do about a VM, given a `Sighting`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No process of this VM exists: it may be started (its pidfile and socket are stale).
    Absent,
    /// Exactly one QEMU, the one the pidfile names: adopt it (if its boot spec reads).
    Adopt { pid: u32 },
    /// A QEMU (or guard) of this VM exists that the agent cannot take over: leave it alone,
    /// never start another beside it, report it `unresponsive` with `reason`.
    Untouchable { pid: u32, reason: String },
}

pub fn judge(found: &Sighting, pidfile_path: &Path) -> Verdict {
    let pidfile = pidfile_path.display();
    match (found.qemus.as_slice(), &found.pidfile) {
        ([], _) => match found.guards.first() {
            None => Verdict::Absent,
            Some(&guard) => Verdict::Untouchable {
                pid: guard,
                reason: format!("its fence guard (pid {guard}) runs, without a QEMU yet"),
            },
        },
        ([pid], Pidfile::Pid(named)) if pid == named => Verdict::Adopt { pid: *pid },
        ([pid], Pidfile::Pid(named)) => Verdict::Untouchable {
            pid: *pid,
            reason: format!("{pidfile} names pid {named}, but this VM's QEMU is pid {pid}"),
        },
        ([pid], Pidfile::Missing) => Verdict::Untouchable {
            pid: *pid,
            reason: format!("{pidfile} is missing; QEMU pid {pid} was found by its command line"),
        },
        ([pid], Pidfile::Garbage(text)) => Verdict::Untouchable {
            pid: *pid,
            reason: format!(
                "{pidfile} is not a PID ({text:?}); QEMU pid {pid} was found by its command line"
            ),
        },
        (pids, _) => {
            let list: Vec<String> = pids.iter().map(u32::to_string).collect();
            let named = match found.pidfile {
                Pidfile::Pid(named) if pids.contains(&named) => named,
                _ => pids[0],
            };
            Verdict::Untouchable {
                pid: named,
                reason: format!(
                    "{} QEMU processes claim this VM (pids {})",
                    pids.len(),
                    list.join(", ")
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::RunDir;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        args.iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect()
    }

    fn web() -> VmDir {
        RunDir::new("/run/plasmavmc").vm("web")
    }

    fn web_qemu(binary: &str, name_arg: &str, chardev: &str) -> Vec<u8> {
        cmdline(&[binary, "-name", name_arg, "-chardev", chardev, "-m", "256"])
    }

    const CHARDEV: &str = "socket,id=qmp,path=/run/plasmavmc/vms/web/qmp.sock,server=on";

    #[test]
    fn accepts_the_qemu_it_launched() {
        let qemu = web_qemu(
            "/usr/bin/qemu-system-x86_64",
            "guest=web,debug-threads=on",
            CHARDEV,
        );
        assert_eq!(role_of(&qemu, "web", &web()), Some(Role::Qemu));
    }

    #[test]
    fn rejects_other_processes_and_other_vms() {
        let not_qemu = web_qemu("/bin/sleep", "guest=web", CHARDEV);
        assert_eq!(role_of(&not_qemu, "web", &web()), None);
        let other_vm = web_qemu("qemu-system-x86_64", "guest=web2", CHARDEV);
        assert_eq!(role_of(&other_vm, "web", &web()), None);
        let other_dir = web_qemu(
            "qemu-system-x86_64",
            "guest=web",
            "socket,id=qmp,path=/tmp/other/vms/web/qmp.sock,server=on",
        );
        assert_eq!(role_of(&other_dir, "web", &web()), None);
        assert_eq!(role_of(b"", "web", &web()), None);
    }

    #[test]
    fn a_run_dir_with_commas_is_read_as_qemu_reads_it() {
        let vm_dir = RunDir::new("/tmp/a,b,,c").vm("web");
        // argv.rs doubles every comma in the path, as QEMU requires.
        let chardev = "socket,id=qmp,path=/tmp/a,,b,,,,c/vms/web/qmp.sock,server=on,wait=off";
        let qemu = web_qemu("qemu-system-x86_64", "guest=web", chardev);
        assert_eq!(role_of(&qemu, "web", &vm_dir), Some(Role::Qemu));
        assert_eq!(
            role_of(&qemu, "web", &RunDir::new("/tmp/a").vm("web")),
            None
        );
        assert_eq!(
            qemu_options("path=/x,,y,server=on"),
            ["path=/x,y", "server=on"]
        );
        assert_eq!(qemu_options(""), [""]);
    }

    #[test]
    fn a_fence_guard_is_recognised_by_its_vm_dir_and_is_not_a_qemu() {
        let guard = cmdline(&[
            "/bin/plasmavmc",
            "fence-guard",
            "--trust-file",
            "/run/plasmavmc/lease.json",
            "--lease",
            "7",
            "--vm-dir",
            "/run/plasmavmc/vms/web",
            "--",
            "qemu-system-x86_64",
            "-name",
            "guest=web",
            "-chardev",
            CHARDEV,
        ]);
        assert_eq!(role_of(&guard, "web", &web()), Some(Role::Guard));
        assert_eq!(
            role_of(&guard, "web", &RunDir::new("/run/plasmavmc").vm("db")),
            None
        );
    }

    fn sighting(pidfile: Pidfile, qemus: &[u32], guards: &[u32]) -> Sighting {
        Sighting {
            pidfile,
            qemus: qemus.to_vec(),
            guards: guards.to_vec(),
        }
    }

    fn judged(found: Sighting) -> Verdict {
        judge(&found, Path::new("/run/vms/web/pid"))
    }

    #[test]
    fn only_the_qemu_its_pidfile_names_is_adopted() {
        assert_eq!(
            judged(sighting(Pidfile::Missing, &[], &[])),
            Verdict::Absent
        );
        // A stale pidfile (dead or reused PID) does not keep the VM down.
        assert_eq!(judged(sighting(Pidfile::Pid(9), &[], &[])), Verdict::Absent);
        assert_eq!(
            judged(sighting(Pidfile::Pid(5), &[5], &[4])),
            Verdict::Adopt { pid: 5 }
        );
    }

    #[test]
    fn any_other_live_process_of_the_vm_is_untouchable() {
        let untouchable = |found| match judged(found) {
            Verdict::Untouchable { pid, reason } => (pid, reason),
            other => panic!("{other:?}"),
        };
        let (pid, reason) = untouchable(sighting(Pidfile::Missing, &[5], &[]));
        assert_eq!(pid, 5);
        assert!(reason.contains("/run/vms/web/pid is missing"), "{reason}");
        let (_, reason) = untouchable(sighting(Pidfile::Garbage("x".into()), &[5], &[]));
        assert!(reason.contains("not a PID (\"x\")"), "{reason}");
        let (_, reason) = untouchable(sighting(Pidfile::Pid(6), &[5], &[]));
        assert!(reason.contains("names pid 6"), "{reason}");
        let (pid, reason) = untouchable(sighting(Pidfile::Pid(8), &[5, 8], &[]));
        assert_eq!(pid, 8);
        assert!(reason.contains("2 QEMU processes"), "{reason}");
        let (pid, _) = untouchable(sighting(Pidfile::Missing, &[], &[3]));
        assert_eq!(pid, 3);
    }
}
