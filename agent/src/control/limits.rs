//! The control socket's limits, and who gets in when they are reached.
//!
//! Rules:
//! - At most `connection_cap(fd limit)` connections are open at once: a quarter of the agent's
//!   file descriptors, at most `MAX_CONNECTIONS`, so QMP sockets, pidfiles and QEMU launches
//!   (a crashed VM's restart) always find descriptors left.
//! - A connection is *idle* until its request line has arrived in full. At the cap, a new
//!   connection evicts the oldest idle one that has been idle for `EVICTABLE_AFTER` (a real
//!   client sends its request at once), so `status` still gets in behind thousands of clients
//!   that connected and said nothing. When every open connection is busy with a request, new
//!   ones wait in the listen backlog until one closes: slower, never refused.
//! - A request line is at most `MAX_REQUEST_BYTES`, must arrive within `IDLE_TIMEOUT`, and the
//!   answer must be taken within `WRITE_TIMEOUT`.
//! - A failing `accept` (out of descriptors) is retried after `ACCEPT_BACKOFF`, never in a
//!   tight loop, and logged at most once per `LOG_INTERVAL` with the count of failures since.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Upper bound of open control connections: many more than clients ask at once in practice
/// (200 concurrent `status` callers fit, none evicted; each costs a descriptor and a few KiB).
pub const MAX_CONNECTIONS: usize = 1024;
/// The fewest connections the cap allows, however low the fd limit.
const MIN_CONNECTIONS: usize = 4;
/// One request line, newline included (a `plan` request carries a whole desired state).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// An idle connection younger than this is never evicted.
pub const EVICTABLE_AFTER: Duration = Duration::from_millis(100);
/// How long a connection may take to send its request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to read its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` before the next one.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this interval about failing accepts or refused connections.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Open connections allowed with `fd_limit` descriptors (the soft `RLIMIT_NOFILE`, read again
/// at every connection).
pub fn connection_cap(fd_limit: u64) -> usize {
    let quarter = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX);
    quarter.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// The open connections: each idle one with when it was accepted, and how many are busy.
#[derive(Debug)]
pub struct Connections {
    cap: usize,
    next_id: u64,
    idle: BTreeMap<u64, Instant>,
    busy: usize,
}

impl Connections {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            next_id: 0,
            idle: BTreeMap::new(),
            busy: 0,
        }
    }

    /// A new cap (the fd limit can be changed while the agent runs: `prlimit`); connections
    /// over it are not closed, only no more are let in.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn open(&self) -> usize {
        self.idle.len() + self.busy
    }

    /// Whether to accept a connection at `now`: below the cap, or when an idle connection can
    /// make room. Else `Err(when)` to look again: when the oldest idle one becomes evictable, or
    /// (`None`) when a connection closes. Meanwhile new clients wait in the listen backlog.
    pub fn may_accept(&self, now: Instant) -> Result<(), Option<Instant>> {
        if self.open() < self.cap {
            return Ok(());
        }
        match self.oldest_idle() {
            Some((_, since)) if now >= since + EVICTABLE_AFTER => Ok(()),
            Some((_, since)) => Err(Some(since + EVICTABLE_AFTER)),
            None => Err(None),
        }
    }

    /// Admits a connection accepted at `now` as idle: its id, and at the cap the idle connection
    /// to close to make room (the oldest, if idle for `EVICTABLE_AFTER`; if none is, this one
    /// is let in over the cap: `may_accept` said yes a moment ago).
    pub fn admit(&mut self, now: Instant) -> (u64, Option<u64>) {
        let id = self.next_id;
        self.next_id += 1;
        let evict = match self.oldest_idle() {
            Some((oldest, since)) if self.open() >= self.cap && now >= since + EVICTABLE_AFTER => {
                self.idle.remove(&oldest);
                Some(oldest)
            }
            _ => None,
        };
        self.idle.insert(id, now);
        (id, evict)
    }

    /// Idle connection `id` sent its request: it can no longer be evicted. False if it was
    /// evicted meanwhile (then it must close without serving).
    pub fn start_request(&mut self, id: u64) -> bool {
        if self.idle.remove(&id).is_none() {
            return false;
        }
        self.busy += 1;
        true
    }

    /// Connection `id` closed, `busy` if it had started a request.
    pub fn close(&mut self, id: u64, busy: bool) {
        if busy {
            self.busy -= 1;
        } else {
            self.idle.remove(&id);
        }
    }

    fn oldest_idle(&self) -> Option<(u64, Instant)> {
        self.idle
            .iter()
            .min_by_key(|(id, accepted)| (**accepted, **id))
            .map(|(id, accepted)| (*id, *accepted))
    }
}

/// Rate limit for a repeated warning: `record` counts an occurrence and says whether to log it
/// now, with how many were suppressed since the last one logged.
#[derive(Debug, Default)]
pub struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_three_quarters_of_the_descriptors() {
        assert_eq!(connection_cap(20_000), MAX_CONNECTIONS);
        assert_eq!(connection_cap(1024), 256);
        assert_eq!(connection_cap(256), 64);
        assert_eq!(connection_cap(8), MIN_CONNECTIONS);
        assert_eq!(connection_cap(u64::MAX), MAX_CONNECTIONS);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room_once_old_enough() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut connections = Connections::new(3);
        let (a, _) = connections.admit(at(0));
        let (b, _) = connections.admit(at(1));
        let (c, _) = connections.admit(at(2));
        assert!(connections.start_request(a));
        // b, the oldest idle one, is too young to be evicted yet: wait until it is not.
        assert_eq!(connections.may_accept(at(50)), Err(Some(at(101))));
        assert_eq!(connections.may_accept(at(101)), Ok(()));
        assert_eq!(connections.admit(at(101)).1, Some(b));
        assert!(
            !connections.start_request(b),
            "an evicted connection is not served"
        );
        assert_eq!(connections.open(), 3);
        assert_eq!(connections.admit(at(200)).1, Some(c));
    }

    #[test]
    fn when_every_connection_is_busy_new_ones_wait_for_a_close() {
        let now = Instant::now();
        let mut connections = Connections::new(2);
        for _ in 0..2 {
            let (id, evicted) = connections.admit(now);
            assert_eq!(evicted, None);
            assert!(connections.start_request(id));
        }
        assert_eq!(connections.may_accept(now), Err(None));
        connections.close(0, true);
        assert_eq!(connections.open(), 1);
        assert_eq!(connections.may_accept(now), Ok(()));
    }

    #[test]
    fn closing_an_idle_connection_frees_its_place() {
        let now = Instant::now();
        let mut connections = Connections::new(1);
        let (id, _) = connections.admit(now);
        assert_eq!(
            connections.may_accept(now),
            Err(Some(now + EVICTABLE_AFTER))
        );
        connections.close(id, false);
        assert_eq!(connections.open(), 0);
        assert_eq!(connections.may_accept(now), Ok(()));
    }

    #[test]
    fn a_repeated_warning_is_logged_once_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut throttle = LogThrottle::default();
        assert_eq!(throttle.record(t0), Some(0));
        for ms in 1..=5 {
            assert_eq!(throttle.record(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(throttle.record(t0 + LOG_INTERVAL), Some(5));
    }
}
