//! Fails a test the moment a VM runs twice, whatever status says. A thread samples every 20 ms
//! until dropped:
//! - each VM's QEMU processes on all the hosts together (by `/proc`): more than `max_qemus` is a
//!   failure (during a move two exist: the source and the paused incoming one);
//! - the guests' heartbeats (`guest::HEARTBEAT`, printed with `guest::HEARTBEAT_FLAG` or typed
//!   into the console) on every host's console, ordered by guest uptime: two copies *running*
//!   at once would both beat, interleaved, so the beats change host more often than moves of
//!   that VM were started (`move_starts`).
//!
//! `check` panics with the first failure seen.
#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::guest::HEARTBEAT;
use super::{procs, Host};

pub struct Watcher {
    stop: Arc<AtomicBool>,
    /// Moves started so far, by VM.
    moves: Arc<Mutex<BTreeMap<String, usize>>>,
    failure: Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Watches `vms` on `hosts`; a VM with more than `max_qemus` QEMUs in all is a failure.
    pub fn start(hosts: &[&Host], vms: &[&str], max_qemus: usize) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let moves = Arc::new(Mutex::new(BTreeMap::new()));
        let failure = Arc::new(Mutex::new(None));
        let runs: Vec<PathBuf> = hosts.iter().map(|h| h.run_dir.clone()).collect();
        let vms: Vec<String> = vms.iter().map(|vm| vm.to_string()).collect();
        let (s, m, f) = (stop.clone(), moves.clone(), failure.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let counts = procs::qemu_counts(&runs, &vms);
                for vm in &vms {
                    let qemus = counts[vm];
                    let switches = heartbeat_switches(&runs, vm);
                    let moves = m.lock().unwrap().get(vm).copied().unwrap_or(0);
                    let problem = if qemus > max_qemus {
                        Some(format!("{qemus} QEMUs of {vm} at once"))
                    } else if switches > moves {
                        Some(format!(
                            "two copies of {vm} ran: its heartbeats changed host {switches} times in {moves} moves"
                        ))
                    } else {
                        None
                    };
                    if let Some(problem) = problem {
                        f.lock().unwrap().get_or_insert(problem);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watcher {
            stop,
            moves,
            failure,
            thread: Some(thread),
        }
    }

    /// A move of `vm` starts: its heartbeats may change host once more.
    pub fn move_starts(&self, vm: &str) {
        *self.moves.lock().unwrap().entry(vm.to_owned()).or_default() += 1;
    }

    pub fn check(&self) {
        if let Some(problem) = self.failure.lock().unwrap().clone() {
            panic!("{problem}");
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `vm`'s heartbeats on every host's console, by guest uptime: how often the host changes.
fn heartbeat_switches(runs: &[PathBuf], vm: &str) -> usize {
    let mut beats: Vec<(f64, usize)> = Vec::new();
    for (host, run) in runs.iter().enumerate() {
        let log = std::fs::read_to_string(run.join("vms").join(vm).join("console.log"))
            .unwrap_or_default();
        beats.extend(
            log.split(HEARTBEAT)
                .skip(1)
                // Complete lines only: a number cut short mid-write would sort out of place.
                .filter_map(|rest| {
                    rest.split_once('\n')?
                        .0
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .map(|uptime: f64| (uptime, host)),
        );
    }
    beats.sort_by(|x, y| x.0.total_cmp(&y.0));
    beats.windows(2).filter(|w| w[0].1 != w[1].1).count()
}
