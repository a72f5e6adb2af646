//! One agent per run dir: an exclusive `flock` on `<run-dir>/agent.lock`, held for the agent's
//! lifetime and taken before anything else (control socket, adoption, any VM). A second agent
//! on the same run dir would rebind the control socket and start every VM twice; it exits
//! instead, naming the first one's PID. The kernel drops the lock when the agent dies, however
//! it dies, so a stale lock file never blocks the next agent. The file is opened close-on-exec:
//! QEMUs, which outlive the agent, never inherit it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Held for as long as the agent runs.
pub struct RunDirLock(#[allow(dead_code)] Flock<File>);

pub fn lock(run_dir: &Path) -> Result<RunDirLock> {
    let path = run_dir.join("agent.lock");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another agent".to_owned(),
                pid => format!("another agent (pid {pid})"),
            };
            bail!(
                "{holder} already runs on run dir {} (it holds {}); not starting a second one, \
                 which would start every VM twice",
                run_dir.display(),
                path.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(RunDirLock(lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_run_dir_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let error = lock(dir.path()).err().expect("refused").to_string();
        let pid = std::process::id().to_string();
        assert!(
            error.contains(&format!("(pid {pid}) already runs")),
            "{error}"
        );
        drop(first);
        lock(dir.path()).expect("free again once the first is gone");
    }
}
