//! The node's restart events as a test reads them: a gRPC `Watch` stream, with
//! waits for a phase and the record of every event seen (for failure messages).

use std::time::{Duration, Instant};

use fleet_proto::v1::{Event, Phase};

/// A gRPC `Watch` stream and every event read from it so far.
#[derive(Debug)]
pub struct Events {
    pub(super) stream: tonic::Streaming<Event>,
    /// Every event read so far, in order.
    pub seen: Vec<Event>,
}

impl Events {
    /// The next event; panics if none comes within `timeout` or the stream ends.
    pub async fn next(&mut self, timeout: Duration) -> Event {
        match tokio::time::timeout(timeout, self.stream.message()).await {
            Ok(Ok(Some(event))) => {
                eprintln!("[watch] {event:?}");
                self.seen.push(event.clone());
                event
            }
            Ok(Ok(None)) => panic!("the Watch stream ended; events so far: {:#?}", self.seen),
            Ok(Err(status)) => panic!(
                "the Watch stream failed: {status}; events: {:#?}",
                self.seen
            ),
            Err(_) => panic!(
                "no Watch event within {timeout:?}; events so far: {:#?}",
                self.seen
            ),
        }
    }

    /// Read events until one matches `wanted`; panics after `timeout`.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Event) -> bool,
    ) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} event within {timeout:?}; events: {:#?}",
                    self.seen
                );
            }
            let event = match tokio::time::timeout(left, self.stream.message()).await {
                Ok(Ok(Some(event))) => event,
                Ok(Ok(None)) => panic!(
                    "the Watch stream ended before {what}; events: {:#?}",
                    self.seen
                ),
                Ok(Err(status)) => panic!("the Watch stream failed before {what}: {status}"),
                Err(_) => panic!(
                    "no {what} event within {timeout:?}; events: {:#?}",
                    self.seen
                ),
            };
            eprintln!("[watch] {event:?}");
            self.seen.push(event.clone());
            if wanted(&event) {
                return event;
            }
        }
    }

    /// Read events until one in `phase`.
    pub async fn until_phase(&mut self, phase: Phase, timeout: Duration) -> Event {
        self.until(&format!("{phase:?}"), timeout, |e| e.phase() == phase)
            .await
    }

    /// The phases seen so far.
    pub fn phases(&self) -> Vec<Phase> {
        self.seen.iter().map(|e| e.phase()).collect()
    }
}
