//! Every open connection of one server: whether it has a request in progress, since
//! when it has been idle, and the cap that decides who is closed to let a new one in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

/// One connection as its watchdog and the accept loop see it.
#[derive(Debug)]
pub(crate) struct Conn {
    id: u64,
    epoch: Instant,
    /// Requests whose response body has not ended yet.
    in_flight: AtomicUsize,
    /// Of them, calls on a `Limits::held_paths` path.
    held: AtomicUsize,
    /// Nanoseconds after `epoch` of the last response's end (or of the accept).
    idle_since: AtomicU64,
    /// Whether any request has started on this connection.
    first_request: AtomicBool,
    /// Chosen to make room at the cap: close now.
    evicted: AtomicBool,
    pub(crate) evict: Notify,
    /// A request ended: the watchdog of a busy connection starts its idle clock.
    pub(crate) ended: Notify,
}

impl Conn {
    /// `held`: a call on a `Limits::held_paths` path.
    pub(crate) fn request_started(&self, held: bool) {
        if held {
            self.held.fetch_add(1, Ordering::AcqRel);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.first_request.store(true, Ordering::Release);
    }

    pub(crate) fn request_ended(&self, held: bool) {
        if held {
            self.held.fetch_sub(1, Ordering::AcqRel);
        }
        // Stamp first: whoever sees `in_flight == 0` then also sees a fresh stamp, so
        // a connection is never taken for long idle the moment its response ends.
        self.idle_since
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Release);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.ended.notify_one();
        }
    }

    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Busy with held calls only (`Limits::held_paths`): closing it loses no answer
    /// its client waits for.
    pub(crate) fn only_held(&self) -> bool {
        let held = self.held.load(Ordering::Acquire);
        held > 0 && self.in_flight.load(Ordering::Acquire) == held
    }

    pub(crate) fn has_had_a_request(&self) -> bool {
        self.first_request.load(Ordering::Acquire)
    }

    /// How long it has had no request in progress (`None`: one is in progress).
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.busy() {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        Some(self.epoch.elapsed().saturating_sub(since))
    }

    /// When its current idle spell began (`None`: a request is in progress). No clock
    /// is read: comparing these picks the connection idle the longest, at the cost of
    /// two atomic loads each.
    fn idle_since(&self) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        Some(self.epoch + Duration::from_nanos(self.idle_since.load(Ordering::Acquire)))
    }

    /// How long since it was accepted.
    pub(crate) fn age(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// What the accept loop may do with a new connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Below the cap.
    Room,
    /// At the cap: the oldest idle connection was told to close.
    Evicted,
    /// At the cap and every connection busy: close the new one.
    Full,
}

#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Arc<Conn>>,
    /// Evicted but not closed yet: they no longer count against the cap.
    evicting: usize,
    next_id: u64,
}

#[derive(Debug, Default)]
struct Counters {
    evicted: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    header_timeouts: AtomicU64,
}

/// The open connections of one server: a cheap handle to watch them (tests, metrics).
#[derive(Debug, Clone)]
pub struct Connections {
    table: Arc<Mutex<Table>>,
    open: watch::Sender<usize>,
    counters: Arc<Counters>,
}

/// Figures of one server since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub open: usize,
    /// Idle connections closed to let a new one in at the cap.
    pub evicted: u64,
    /// New connections closed at once: at the cap with none idle.
    pub refused: u64,
    /// Closed after `idle_timeout` without a request in progress.
    pub idle_closed: u64,
    /// Closed for not sending a request head within `header_timeout`.
    pub header_timeouts: u64,
}

impl Connections {
    pub(crate) fn new() -> Self {
        Self {
            table: Arc::default(),
            open: watch::channel(0).0,
            counters: Arc::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Follows [`Connections::open`].
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.open.subscribe()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            open: self.open(),
            evicted: c.evicted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            idle_closed: c.idle_closed.load(Ordering::Relaxed),
            header_timeouts: c.header_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Decides about a connection just accepted; at the cap, evicts the connection idle
    /// the longest. One lock, so two accepts never pick the same victim.
    pub(crate) fn admit(&self, cap: usize) -> Admission {
        let mut table = self.table.lock().expect("connection table");
        if table.conns.len() - table.evicting < cap {
            return Admission::Room;
        }
        if Self::evict_oldest_idle(&mut table) {
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            Admission::Evicted
        } else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            Admission::Full
        }
    }

    /// Evicts the connection idle the longest, if any (to free a descriptor after
    /// `EMFILE`).
    pub(crate) fn evict_idle(&self) -> bool {
        let mut table = self.table.lock().expect("connection table");
        let evicted = Self::evict_oldest_idle(&mut table);
        if evicted {
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        evicted
    }

    fn evict_oldest_idle(table: &mut Table) -> bool {
        // One pass without a clock read per connection: this runs for each new
        // connection at the cap, over every open one.
        // The idle one idle the longest, else the oldest holding held calls only.
        let victim = table
            .conns
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .filter_map(|c| match c.idle_since() {
                Some(since) => Some(((0, since), c)),
                None => c.only_held().then_some(((1, c.epoch), c)),
            })
            .min_by_key(|(key, _)| *key)
            .map(|(_, c)| c.clone());
        let Some(conn) = victim else { return false };
        conn.evicted.store(true, Ordering::Release);
        table.evicting += 1;
        // `notify_one` keeps the wake-up if the watchdog is not waiting yet.
        conn.evict.notify_one();
        true
    }

    /// Adds a connection; it is removed when the returned guard drops.
    pub(crate) fn register(&self) -> Registered {
        let mut table = self.table.lock().expect("connection table");
        table.next_id += 1;
        let conn = Arc::new(Conn {
            id: table.next_id,
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            first_request: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            ended: Notify::new(),
        });
        table.conns.insert(conn.id, conn.clone());
        self.open.send_replace(table.conns.len());
        Registered {
            conns: self.clone(),
            conn,
        }
    }

    pub(crate) fn count_idle_close(&self) {
        self.counters.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_header_timeout(&self) {
        self.counters
            .header_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection in the table while it is open.
#[derive(Debug)]
pub(crate) struct Registered {
    conns: Connections,
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut table = self.conns.table.lock().expect("connection table");
        if table.conns.remove(&self.conn.id).is_some() && self.conn.evicted.load(Ordering::Acquire)
        {
            table.evicting -= 1;
        }
        self.conns.open.send_replace(table.conns.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_connection_idle_longest_is_evicted_and_busy_ones_never() {
        let conns = Connections::new();
        let old = conns.register();
        let busy = conns.register();
        busy.conn.request_started(false);
        let young = conns.register();
        assert_eq!(conns.admit(4), Admission::Room);
        assert_eq!(conns.admit(3), Admission::Evicted);
        assert!(old.conn.evicted.load(Ordering::Relaxed));
        // The evicted one no longer counts: one more fits without another eviction.
        assert_eq!(conns.admit(3), Admission::Room);
        assert_eq!(conns.admit(2), Admission::Evicted);
        assert!(young.conn.evicted.load(Ordering::Relaxed));
        assert_eq!(conns.admit(1), Admission::Full, "the busy one stays");
        assert!(!busy.conn.evicted.load(Ordering::Relaxed));
        drop((old, young));
        assert_eq!(conns.open(), 1);
        assert_eq!(conns.admit(2), Admission::Room);
        let stats = conns.stats();
        assert_eq!((stats.evicted, stats.refused), (2, 1));
    }

    #[test]
    fn held_calls_keep_a_connection_from_the_idle_timeout_not_from_eviction() {
        let conns = Connections::new();
        let streams_old = conns.register();
        streams_old.conn.request_started(true);
        let streams_young = conns.register();
        streams_young.conn.request_started(true);
        let mixed = conns.register();
        mixed.conn.request_started(true);
        mixed.conn.request_started(false);
        let idle = conns.register();
        for c in [&streams_old, &streams_young, &mixed] {
            assert!(
                c.conn.busy() && c.conn.idle_for().is_none(),
                "no idle clock"
            );
        }
        assert!(streams_old.conn.only_held() && !mixed.conn.only_held());
        // At the cap: the idle one first, then the oldest with held calls only; never
        // one with another request in progress.
        assert_eq!(conns.admit(4), Admission::Evicted);
        assert!(idle.conn.evicted.load(Ordering::Relaxed));
        assert_eq!(conns.admit(3), Admission::Evicted);
        assert!(streams_old.conn.evicted.load(Ordering::Relaxed));
        assert_eq!(conns.admit(2), Admission::Evicted);
        assert!(streams_young.conn.evicted.load(Ordering::Relaxed));
        assert_eq!(conns.admit(1), Admission::Full);
        assert!(!mixed.conn.evicted.load(Ordering::Relaxed));
        // Its other request ends: held calls only now.
        mixed.conn.request_ended(false);
        assert!(mixed.conn.only_held() && mixed.conn.busy());
    }
}
