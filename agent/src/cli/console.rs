//! `plasmavmc console NAME`: the client side of the serial console (rules in `crate::console`).
//!
//! On a terminal: raw mode, `Ctrl-]` detaches, and the terminal is restored however the command
//! ends (detach, console closed, SIGTERM/SIGHUP/SIGINT/SIGQUIT, a panic). Piped: the console is
//! copied to stdout and stdin to the guest; when stdin ends, the command waits until the console
//! has been quiet for `--linger` seconds (so the answer to the last line is printed), then ends.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};

use super::EXIT_FAILED;
use crate::console::split_at_escape;
use crate::control::client::{self, ClientError};
use crate::control::protocol::{Request, Response};
use crate::paths::RunDir;

/// How often the output loop looks up from a quiet console (to end a piped session).
const POLL: Duration = Duration::from_millis(100);

pub struct ConsoleOptions {
    pub no_stdin: bool,
    pub force: bool,
    pub tail: usize,
    pub linger: Duration,
}

pub fn console(run_dir: &Path, vm: String, options: ConsoleOptions) -> ExitCode {
    let stdin = std::io::stdin();
    let on_terminal = std::io::IsTerminal::is_terminal(&stdin);
    let interactive = on_terminal && !options.no_stdin;
    let tty = on_terminal
        .then(|| nix::unistd::ttyname(stdin.as_fd()).ok())
        .flatten()
        .map(|path| path.display().to_string());
    let request = Request::Console {
        vm: vm.clone(),
        write: !options.no_stdin,
        force: options.force,
        tail: options.tail,
        tty,
    };
    let socket = RunDir::new(run_dir).control_socket();
    let (stream, mut output) = match attach(&socket, &request) {
        Ok(Ok((stream, output, message))) => {
            let escape = if interactive {
                " (detach with Ctrl-])"
            } else {
                ""
            };
            eprintln!("{message}{escape}");
            (stream, output)
        }
        Ok(Err(response)) => return super::commands::unexpected(response),
        Err(e) => return super::commands::client_failed(e),
    };

    let ended = Arc::new(Ended::default());
    let raw = if interactive {
        match RawMode::enter() {
            Ok(raw) => Some(raw),
            Err(e) => {
                eprintln!("error: putting the terminal in raw mode: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else {
        None
    };
    if interactive {
        if let Err(e) = trap_signals(&stream, &ended) {
            drop(raw);
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    }
    let stdin_done = Arc::new(Mutex::new(None::<Instant>));
    if !options.no_stdin {
        let to_guest = stream.try_clone().expect("cloning a unix socket");
        let (ended, stdin_done) = (ended.clone(), stdin_done.clone());
        std::thread::spawn(move || copy_input(to_guest, interactive, &ended, &stdin_done));
    }
    let result = copy_output(&mut output, options.linger, &stdin_done);
    drop(raw);
    match (result, ended.why()) {
        (Err(e), _) => {
            eprintln!("error: reading the console: {e}");
            ExitCode::from(EXIT_FAILED)
        }
        (Ok(()), Some(Why::Signal(signal))) => {
            eprintln!("\ndetached from the console of {vm} ({signal})");
            ExitCode::from(EXIT_FAILED)
        }
        (Ok(()), Some(Why::Escape)) => {
            eprintln!("\ndetached from the console of {vm}");
            ExitCode::SUCCESS
        }
        (Ok(()), None) => ExitCode::SUCCESS,
    }
}

type Attachment = (UnixStream, BufReader<UnixStream>, String);

/// Sends the request; the stream and the agent's message, or the agent's refusal.
fn attach(socket: &Path, request: &Request) -> Result<Result<Attachment, Response>, ClientError> {
    let (output, response) = client::ask(socket, request)?;
    let stream = output
        .get_ref()
        .try_clone()
        .map_err(|source| ClientError::Io {
            path: socket.to_owned(),
            source,
        })?;
    Ok(match response {
        Response::ConsoleAttached { message } => Ok((stream, output, message)),
        other => Err(other),
    })
}

/// Copies the console to stdout until it ends; after stdin ended (piped), until it has been
/// quiet for `linger`.
fn copy_output(
    output: &mut BufReader<UnixStream>,
    linger: Duration,
    stdin_done: &Mutex<Option<Instant>>,
) -> std::io::Result<()> {
    output.get_ref().set_read_timeout(Some(POLL))?;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 4096];
    let mut last_output = Instant::now();
    loop {
        match output.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                stdout.write_all(&buf[..n])?;
                stdout.flush()?;
                last_output = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let done = *stdin_done.lock().unwrap();
                if done.is_some_and(|at| at.max(last_output).elapsed() >= linger) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Copies stdin to the guest. Interactive: until the escape; piped: until stdin ends.
fn copy_input(
    mut to_guest: UnixStream,
    interactive: bool,
    ended: &Ended,
    stdin_done: &Mutex<Option<Instant>>,
) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (bytes, escape) = if interactive {
            split_at_escape(&buf[..n])
        } else {
            (&buf[..n], false)
        };
        if to_guest.write_all(bytes).is_err() {
            return;
        }
        if escape {
            ended.set(Why::Escape);
            let _ = to_guest.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    *stdin_done.lock().unwrap() = Some(Instant::now());
}

#[derive(Debug, Clone, Copy)]
enum Why {
    Escape,
    Signal(Signal),
}

/// Why the session ended early, set once by whichever thread saw it.
#[derive(Default)]
struct Ended {
    why: Mutex<Option<Why>>,
    set: AtomicBool,
}

impl Ended {
    fn set(&self, why: Why) {
        if !self.set.swap(true, Ordering::SeqCst) {
            *self.why.lock().unwrap() = Some(why);
        }
    }

    fn why(&self) -> Option<Why> {
        *self.why.lock().unwrap()
    }
}

/// Blocks the signals that would end the process with the terminal in raw mode; a thread waits
/// for them and ends the session instead, so the terminal is restored on the way out.
fn trap_signals(stream: &UnixStream, ended: &Arc<Ended>) -> std::io::Result<()> {
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
    ] {
        signals.add(signal);
    }
    signals.thread_block().map_err(std::io::Error::from)?;
    let stream = stream.try_clone()?;
    let ended = ended.clone();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            ended.set(Why::Signal(signal));
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
    Ok(())
}

/// The terminal in raw mode while this lives; restored on drop (unwinding included).
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> nix::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
