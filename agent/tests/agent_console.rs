//! `plasmavmc console` against a real guest: a client on a pseudo-terminal types into the guest's
//! shell and reads the answer; a second writer is refused with who holds the console; a reader
//! gets the log's tail; Ctrl-] detaches and restores the terminal; the log holds the session;
//! after `kill -9` of the agent, the adopted VM's console works again and `--force` takes it over;
//! a VM booted without a console socket (by an older agent) is told apart. Commands that wait
//! (`reset --soft`, `stop` of a guest ignoring the power button) show their progress on a
//! terminal, and none of it when piped.

#[path = "support/agent.rs"]
mod harness;
#[path = "support/qemu_harness.rs"]
mod qemu_harness;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::*;
use nix::sys::termios::{tcgetattr, LocalFlags, Termios};
use serde_json::json;

/// The guest's shell answers a line in well under a second; generous for a loaded TCG host.
const ANSWER: Duration = Duration::from_secs(60);
const CTRL_RIGHT_BRACKET: u8 = 0x1d;

/// `plasmavmc` (`console`, say) on a pseudo-terminal, as an operator's terminal would run it.
struct Terminal {
    child: Child,
    master: File,
    /// The slave side, kept open to look at its modes after the client ends.
    slave: OwnedFd,
    /// The slave's modes before the client started.
    cooked: Termios,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn attach(host: &Host, vm: &str) -> Terminal {
        Terminal::run(host, &["console", vm])
    }

    /// `plasmavmc ARGS --run-dir` with stdin, stdout and stderr on the terminal.
    fn run(host: &Host, args: &[&str]) -> Terminal {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let slave = File::from(pty.slave);
        let cooked = tcgetattr(slave.as_fd()).unwrap();
        let child = plasmavmc()
            .args(args)
            .arg("--run-dir")
            .arg(&host.run_dir)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()))
            .spawn()
            .expect("plasmavmc");
        let master = File::from(pty.master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave fd is closed.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shared.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            master,
            slave: slave.into(),
            cooked,
            screen,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + ANSWER;
        while !self.screen().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared on the terminal:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + AGENT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "console client still running:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `plasmavmc console ARGS` with `input` piped to it.
fn piped(host: &Host, args: &[&str], input: &str) -> Cli {
    let mut child = plasmavmc()
        .arg("console")
        .args(args)
        .arg("--run-dir")
        .arg(&host.run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plasmavmc console");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    Cli {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn console_types_into_the_guest_one_writer_at_a_time_and_survives_an_agent_restart() {
    let mut host = Host::new();
    host.write_config(json!({"web": host.vm(json!({}))}));
    host.start_agent();
    let pid = host.wait_running("web");
    host.wait_boot("web");

    let mut terminal = Terminal::attach(&host, "web");
    terminal.wait_for("attached to the console of web");
    // The shell computes the answer, so it cannot be the echo of what was typed.
    terminal.type_keys(b"echo typed-$((6*7))\r");
    terminal.wait_for("typed-42");
    assert!(
        !tcgetattr(terminal.slave.as_fd())
            .unwrap()
            .local_flags
            .contains(LocalFlags::ICANON),
        "the client puts its terminal in raw mode"
    );

    let second = piped(&host, &["web"], "echo intruder\n");
    assert_eq!(second.code, 1, "{second:?}");
    assert!(
        second
            .stderr
            .contains(&format!("in use by pid {}", terminal.child.id())),
        "the refusal names the holder: {second:?}"
    );

    // A reader is never refused; --tail replays the log first.
    let reader = Follower::start(&host, &["console", "web", "--no-stdin", "--tail", "20"]);
    let deadline = Instant::now() + ANSWER;
    while !reader
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("typed-42"))
    {
        assert!(
            Instant::now() < deadline,
            "the reader never showed the tail: {:?}",
            reader.lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(reader);

    terminal.type_keys(&[CTRL_RIGHT_BRACKET]);
    assert_eq!(terminal.wait_exit(), 0, "{}", terminal.screen());
    let modes_after = tcgetattr(terminal.slave.as_fd()).unwrap();
    assert_eq!(
        modes_after.local_flags, terminal.cooked.local_flags,
        "the terminal is restored after the detach"
    );
    assert!(
        host.console("web").contains("typed-42"),
        "the log holds the session"
    );

    host.kill_agent();
    host.start_agent();
    assert_eq!(host.wait_running("web"), pid, "adopted, not restarted");
    let mut holder = Terminal::attach(&host, "web");
    holder.wait_for("attached to the console of web");
    let forced = piped(&host, &["web", "--force"], "echo again-$((2+3))\n");
    assert_eq!(forced.code, 0, "{forced:?}");
    assert!(forced.stdout.contains("again-5"), "{forced:?}");
    holder.wait_for("taken over by");
    holder.wait_exit();

    // What a VM booted by an older agent looks like to the agent that adopts it: a console
    // log, no console socket.
    std::fs::remove_file(host.run_dir.join("vms/web/console.sock")).unwrap();
    host.kill_agent();
    host.start_agent();
    assert_eq!(host.wait_running("web"), pid);
    let old = host.cli(&["console", "web", "--no-stdin"]);
    assert_eq!(old.code, 1, "{old:?}");
    assert!(
        old.stderr.contains("older plasmavmc") && old.stderr.contains("next start"),
        "{old:?}"
    );
    let unknown = host.cli(&["console", "nosuchvm", "--no-stdin"]);
    assert_eq!(unknown.code, 2, "{unknown:?}");
}

/// A command that waits shows on a terminal what it waits for and for how long, a line redrawn
/// every second and erased at the end; piped, its output is the result alone.
#[test]
fn waiting_commands_show_progress_on_a_terminal_only() {
    const STOP_TIMEOUT: &str = "3";
    let mut host = Host::new();
    let cmdline = guest::guest_cmdline_ignoring_powerdown();
    host.write_config(json!({"web": host.vm(json!({"cmdline": cmdline}))}));
    host.start_agent_with(&["--stop-timeout", STOP_TIMEOUT]);
    host.wait_running("web");

    // The guest ignores the power button: each command waits the whole stop timeout.
    let mut terminal = Terminal::run(&host, &["reset", "--soft", "web"]);
    assert_eq!(terminal.wait_exit(), 0, "{}", terminal.screen());
    let screen = terminal.screen();
    for line in [
        "\r\x1b[2Ksoft reset of web: waiting for the guest to shut down (a hard reset if it does not)... 1s",
        "... 2s",
        "\r\x1b[2Kweb: the guest did not shut down within 3s; it was hard-reset instead",
    ] {
        assert!(screen.contains(line), "no {line:?} on the terminal:\n{screen:?}");
    }

    let piped = host
        .cli(&["reset", "--soft", "web"])
        .expect_code(0, "reset --soft, piped");
    assert!(
        piped.stderr.is_empty()
            && piped.stdout.starts_with("web: the guest did not shut down")
            && !piped.stdout.contains('\x1b'),
        "the result alone: {piped:?}"
    );

    let mut terminal = Terminal::run(&host, &["stop", "web"]);
    assert_eq!(terminal.wait_exit(), 0, "{}", terminal.screen());
    let screen = terminal.screen();
    assert!(
        screen.contains("stopping web: waiting for the guest to shut down... 2s"),
        "{screen:?}"
    );
}
