//! The serial console, pure parts: who may type, the detach escape, the tail of the log.
//!
//! Rules (the shell is `daemon::console` on the agent side and `cli::console` on the client):
//! - QEMU writes every byte the guest prints to `console.log` itself (chardev `logfile=`), whether
//!   or not anyone is attached and whether or not the agent runs. Its `console.sock` takes one
//!   client: the agent, which fans the output out to any number of attached readers.
//! - One writer at a time. A second writer is refused with who holds the console; `force` takes
//!   it over, and the previous writer is told and detached. Readers are never refused.
//! - `Ctrl-]` typed on an interactive client detaches it (as in virsh); the byte never reaches
//!   the guest.
//! - The log is rotated by size (copy to `console.log.1`, truncate): QEMU opened it with
//!   `O_APPEND`, so it keeps writing at the new end.

use serde::{Deserialize, Serialize};

/// `Ctrl-]`: detaches an interactive client.
pub const ESCAPE: u8 = 0x1d;
/// The log is rotated once it grows past this many bytes.
pub const LOG_ROTATE_BYTES: u64 = 4 * 1024 * 1024;

/// The bytes to send to the guest from one read of the terminal, and whether the escape was
/// typed (everything from the escape on is dropped).
pub fn split_at_escape(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == ESCAPE) {
        Some(at) => (&input[..at], true),
        None => (input, false),
    }
}

/// The last `lines` lines of `log` (a last line without its newline counts as one).
pub fn tail_lines(log: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &[];
    }
    let body = log.strip_suffix(b"\n").unwrap_or(log);
    match body
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'\n')
        .nth(lines - 1)
    {
        Some((at, _)) => &log[at + 1..],
        None => log,
    }
}

/// An attached client that may type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Writer {
    /// The agent's number for the connection.
    pub client: u64,
    /// Who it is, for the one refused: `pid 123 (uid 0) on /dev/pts/3 since 12:00:01 UTC`.
    pub who: String,
}

/// What a client asking to write gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The console was free: the client writes now.
    Granted,
    /// The client took over from `previous`, which must be told and detached.
    TookOver { previous: Writer },
    /// Someone else writes; the client is refused.
    Refused { holder: Writer },
}

/// Decides a client's request to write, given the current writer; the new writer is
/// `candidate` unless refused.
pub fn claim(current: Option<&Writer>, candidate: &Writer, force: bool) -> Claim {
    match current {
        None => Claim::Granted,
        Some(holder) if holder.client == candidate.client => Claim::Granted,
        Some(holder) if force => Claim::TookOver {
            previous: holder.clone(),
        },
        Some(holder) => Claim::Refused {
            holder: holder.clone(),
        },
    }
}

/// The writer after `client` detached: the seat is free if it held it.
pub fn release(current: Option<Writer>, client: u64) -> Option<Writer> {
    current.filter(|holder| holder.client != client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(client: u64) -> Writer {
        Writer {
            client,
            who: format!("pid {client}"),
        }
    }

    #[test]
    fn the_escape_detaches_and_never_reaches_the_guest() {
        assert_eq!(split_at_escape(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_at_escape(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_escape(b"\x1d"), (&b""[..], true));
        assert_eq!(split_at_escape(b""), (&b""[..], false));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let log = b"one\ntwo\nthree\n";
        assert_eq!(tail_lines(log, 2), b"two\nthree\n");
        assert_eq!(tail_lines(log, 3), log);
        assert_eq!(tail_lines(log, 10), log);
        assert_eq!(tail_lines(log, 0), b"");
        assert_eq!(tail_lines(b"one\ntwo\nprompt# ", 1), b"prompt# ");
        assert_eq!(tail_lines(b"one\ntwo\nprompt# ", 2), b"two\nprompt# ");
        assert_eq!(tail_lines(b"", 3), b"");
    }

    #[test]
    fn one_writer_at_a_time_and_force_takes_over() {
        assert_eq!(claim(None, &writer(1), false), Claim::Granted);
        assert_eq!(
            claim(Some(&writer(1)), &writer(2), false),
            Claim::Refused { holder: writer(1) }
        );
        assert_eq!(
            claim(Some(&writer(1)), &writer(2), true),
            Claim::TookOver {
                previous: writer(1)
            }
        );
        assert_eq!(claim(Some(&writer(1)), &writer(1), false), Claim::Granted);
    }

    #[test]
    fn only_the_holder_frees_the_seat() {
        assert_eq!(release(Some(writer(1)), 2), Some(writer(1)));
        assert_eq!(release(Some(writer(1)), 1), None);
        assert_eq!(release(None, 1), None);
    }
}
