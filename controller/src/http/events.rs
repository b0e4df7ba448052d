//! `/api/events`: what changed, as Server-Sent Events. By default every change is an
//! event of its own (`node` or `rollout`, with the id as data). With `?coalesce_ms=N`
//! the changes of N milliseconds (from the first one) go out together: one `node`
//! event however many nodes changed (its data the last of them), and one `rollout`
//! event per rollout that changed. The dashboard asks for that: it only needs to know
//! that a page is out of date, and a 100,000-node rollout makes ~400,000 node changes,
//! each an event to format and write per open dashboard.
//!
//! A client too slow to take every change (it lagged behind the channel) is sent
//! `resync`: it missed something and should read again what it shows.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::Change;

/// The longest `coalesce_ms` taken: a page that waits longer looks stale.
pub const MAX_COALESCE: Duration = Duration::from_secs(10);

/// One event as a client is sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Node(String),
    Rollout(String),
    Resync,
}

/// `coalesce_ms` as given in the query: none or 0 is every change on its own.
pub fn parse_coalesce(text: Option<&str>) -> Result<Duration, String> {
    let Some(text) = text else {
        return Ok(Duration::ZERO);
    };
    match text.trim().parse::<u64>() {
        Ok(ms) if Duration::from_millis(ms) <= MAX_COALESCE => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "coalesce_ms={text:?}: give the milliseconds over which changes are gathered \
             into one event each, from 0 (every change its own event) to {}",
            MAX_COALESCE.as_millis()
        )),
    }
}

/// Changes gathered since the first one not yet sent.
#[derive(Debug, Default)]
struct Pending {
    /// The last node that changed.
    node: Option<String>,
    /// Each rollout that changed, in the order of their first change (a handful at
    /// most: rollouts are started by operators, one at a time).
    rollouts: Vec<String>,
    resync: bool,
    /// When what is pending goes out.
    due: Option<Instant>,
}

impl Pending {
    fn take(&mut self, change: Result<Change, BroadcastStreamRecvError>, window: Duration) {
        match change {
            Ok(Change::Node(id)) => self.node = Some(id),
            Ok(Change::Rollout(id)) => {
                if !self.rollouts.contains(&id) {
                    self.rollouts.push(id);
                }
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => self.resync = true,
        }
        self.due.get_or_insert_with(|| Instant::now() + window);
    }

    /// Everything pending as events, in the order they are sent; empties it.
    fn drain(&mut self) -> std::vec::IntoIter<Sent> {
        let mut out = Vec::with_capacity(self.rollouts.len() + 2);
        if std::mem::take(&mut self.resync) {
            out.push(Sent::Resync);
        }
        out.extend(self.node.take().map(Sent::Node));
        out.extend(self.rollouts.drain(..).map(Sent::Rollout));
        self.due = None;
        out.into_iter()
    }
}

/// The events for `changes`: each on its own when `window` is zero, else gathered as
/// the module says. Ends when `changes` does.
pub fn events<S>(changes: S, window: Duration) -> impl Stream<Item = Sent> + Send
where
    S: Stream<Item = Result<Change, BroadcastStreamRecvError>> + Send + Unpin,
{
    let state = (changes, Pending::default(), Vec::new().into_iter());
    futures_util::stream::unfold(
        state,
        move |(mut changes, mut pending, mut ready)| async move {
            loop {
                if let Some(sent) = ready.next() {
                    return Some((sent, (changes, pending, ready)));
                }
                let due = pending.due;
                tokio::select! {
                    change = changes.next() => match change {
                        None if due.is_none() => return None,
                        // The last changes still go out before the stream ends.
                        None => ready = pending.drain(),
                        Some(change) => {
                            pending.take(change, window);
                            if window.is_zero() {
                                ready = pending.drain();
                            }
                        }
                    },
                    () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                        ready = pending.drain();
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::wrappers::BroadcastStream;

    fn node(id: &str) -> Change {
        Change::Node(id.to_string())
    }

    fn rollout(id: &str) -> Change {
        Change::Rollout(id.to_string())
    }

    /// Without a window every change is its own event, in order, as before.
    #[tokio::test(start_paused = true)]
    async fn without_a_window_each_change_is_an_event() {
        let (tx, rx) = tokio::sync::broadcast::channel(16);
        let mut events = Box::pin(events(BroadcastStream::new(rx), Duration::ZERO));
        for c in [node("a"), rollout("r1"), node("b"), node("a")] {
            tx.send(c).unwrap();
        }
        drop(tx);
        let got: Vec<Sent> = events.by_ref().collect().await;
        assert_eq!(
            got,
            [
                Sent::Node("a".into()),
                Sent::Rollout("r1".into()),
                Sent::Node("b".into()),
                Sent::Node("a".into()),
            ]
        );
    }

    /// A window's changes go out together once the window from its first change has
    /// passed: one node event (the last node) and one event per rollout; nothing
    /// before the window ends; the next change opens a new window.
    #[tokio::test(start_paused = true)]
    async fn a_window_gathers_its_changes() {
        let (tx, rx) = tokio::sync::broadcast::channel(4096);
        let window = Duration::from_millis(250);
        let mut events = Box::pin(events(BroadcastStream::new(rx), window));
        // Read as a server does, at once: each event with when it went out.
        let (out, mut sent) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let _ = out.send((Instant::now(), event));
            }
        });
        let started = Instant::now();
        for i in 0..1000 {
            tx.send(node(&format!("n{i}"))).unwrap();
        }
        tx.send(rollout("r2")).unwrap();
        tx.send(rollout("r1")).unwrap();
        tx.send(rollout("r2")).unwrap();
        let (at, first) = sent.recv().await.unwrap();
        assert_eq!(first, Sent::Node("n999".into()));
        assert_eq!(at - started, window, "sent when the window ends");
        assert_eq!(sent.recv().await.unwrap().1, Sent::Rollout("r2".into()));
        assert_eq!(sent.recv().await.unwrap().1, Sent::Rollout("r1".into()));

        // Nothing pending: nothing is sent, however long it waits.
        let quiet = tokio::time::timeout(Duration::from_secs(5), sent.recv()).await;
        assert!(quiet.is_err(), "{quiet:?}");

        let second = Instant::now();
        tx.send(rollout("r1")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(node("late")).unwrap();
        let (at, event) = sent.recv().await.unwrap();
        assert_eq!(event, Sent::Node("late".into()));
        assert_eq!(at - second, window, "from the window's first change");
        assert_eq!(sent.recv().await.unwrap().1, Sent::Rollout("r1".into()));

        // The stream's end sends what is pending at once, then ends.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let last = Instant::now();
        tx.send(node("last")).unwrap();
        drop(tx);
        let (at, event) = sent.recv().await.unwrap();
        assert_eq!(
            (at - last, event),
            (Duration::ZERO, Sent::Node("last".into()))
        );
        assert!(sent.recv().await.is_none(), "the stream ended");
    }

    /// A client that fell behind the channel is told to read again (once per window),
    /// and what arrived after the gap still goes out.
    #[tokio::test(start_paused = true)]
    async fn a_lagging_client_is_told_to_resync() {
        let (tx, rx) = tokio::sync::broadcast::channel(4);
        let events = Box::pin(events(BroadcastStream::new(rx), Duration::from_millis(100)));
        for i in 0..20 {
            tx.send(node(&format!("n{i}"))).unwrap();
        }
        drop(tx);
        let got: Vec<Sent> = events.collect().await;
        assert_eq!(got, [Sent::Resync, Sent::Node("n19".into())]);
    }

    #[test]
    fn coalesce_ms_is_checked() {
        assert_eq!(parse_coalesce(None), Ok(Duration::ZERO));
        assert_eq!(parse_coalesce(Some("250")), Ok(Duration::from_millis(250)));
        assert_eq!(parse_coalesce(Some("0")), Ok(Duration::ZERO));
        for bad in ["", "-1", "1.5", "10001", "soon"] {
            let e = parse_coalesce(Some(bad)).unwrap_err();
            assert!(
                e.contains("from 0 (every change its own event) to 10000"),
                "{e}"
            );
        }
    }
}
