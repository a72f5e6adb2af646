//! Console round trip: one real guest (TCG) at its shell prompt, `plasmavmc console` attached
//! (piped), a key written to the client's stdin, timed until the guest's echo of it comes out of
//! the client's stdout: client, control socket, agent, QEMU's console socket, guest serial line,
//! the guest's shell echoing, and all the way back.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::agent::{plasmavmc_binary, Agent};
use crate::stats::Summary;

const VM: &str = "bench";
const PROMPT: &str = "plasmavmc-guest:/# ";
const BOOT: Duration = Duration::from_secs(180);
const ECHO: Duration = Duration::from_secs(10);
/// Ctrl-U: the shell forgets the typed line, so it never grows long.
const KILL_LINE: u8 = 0x15;

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    pub dirs: crate::GuestDirs,
    /// Keys typed (each one timed).
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
}

pub fn report(options: &Options) -> Result<()> {
    let samples = measure(options)?;
    println!(
        "console round trip (key to echo, TCG guest shell): {}",
        Summary::of(samples)
    );
    Ok(())
}

fn measure(options: &Options) -> Result<Vec<Duration>> {
    let binary = plasmavmc_binary()?;
    let work = options.dirs.work_dir.join("console");
    let _ = std::fs::remove_dir_all(&work);
    let (state_dir, run_dir) = crate::agent::agent_dirs(&work)?;
    let guest = |file: &str| options.dirs.guest_dir.join(file);
    let config = work.join("desired.json");
    let desired = json!({"version": 1, "vms": {VM: {
        "vcpus": 1, "memoryMiB": 128, "accel": "tcg", "machine": "q35",
        "kernel": guest("vmlinuz"), "initrd": guest("initramfs.cpio.gz"),
        "cmdline": "console=ttyS0 quiet panic=-1",
    }}});
    std::fs::write(&config, desired.to_string())?;
    let agent = Agent::spawn(&binary, &config, &state_dir, &run_dir, None, &[])?;
    let samples = round_trips(&binary, &run_dir, options.keys);
    // The guest powers off on the ACPI request: the VM is gone before the agent.
    let _ = Command::new(&binary)
        .args(["stop", VM, "--run-dir"])
        .arg(&run_dir)
        .status();
    drop(agent);
    samples
}

fn round_trips(binary: &Path, run_dir: &Path, keys: usize) -> Result<Vec<Duration>> {
    wait_for_prompt(&run_dir.join("vms").join(VM).join("console.log"))?;
    let mut client = Client::attach(binary, run_dir)?;
    let mut samples = Vec::with_capacity(keys);
    for key in 0..keys {
        let started = Instant::now();
        client.type_byte(b'x')?;
        client.wait_for(b'x')?;
        samples.push(started.elapsed());
        if key % 20 == 19 {
            client.type_byte(KILL_LINE)?;
            client.drain(Duration::from_millis(300));
        }
    }
    Ok(samples)
}

fn wait_for_prompt(log: &Path) -> Result<()> {
    let deadline = Instant::now() + BOOT;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(PROMPT)
    {
        if Instant::now() > deadline {
            bail!("no shell prompt on {} within {BOOT:?}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `plasmavmc console` with piped stdin and stdout, its output forwarded byte chunk by chunk.
struct Client {
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
}

impl Client {
    fn attach(binary: &Path, run_dir: &Path) -> Result<Client> {
        let mut child = Command::new(binary)
            .args(["console", VM, "--run-dir"])
            .arg(run_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting plasmavmc console")?;
        let mut stdout = child.stdout.take().expect("piped");
        let (send, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if send.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(Client { child, output })
    }

    fn type_byte(&mut self, byte: u8) -> Result<()> {
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin.write_all(&[byte])?;
        stdin.flush()?;
        Ok(())
    }

    fn wait_for(&self, byte: u8) -> Result<()> {
        let deadline = Instant::now() + ECHO;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) if chunk.contains(&byte) => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("no echo within {ECHO:?}"),
            }
        }
    }

    fn drain(&self, quiet: Duration) {
        while self.output.recv_timeout(quiet).is_ok() {}
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
