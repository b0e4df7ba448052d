//! Agents' heartbeat streams as lines to call them on: a `Command` goes out as a
//! `HeartbeatResponse`, its `CommandAnswer` comes back as a `HeartbeatRequest` (see
//! `HeartbeatStream` in controller.proto). A node whose agent said `takes_commands`
//! is called on its stream; any other node is dialled as before.
//!
//! A stream can end while a command is out. The agent keeps an answer it could not
//! send and sends it on its next stream, whose first beat lists the commands it is
//! still working on or answering (`working`): a command of an earlier stream that is
//! not listed never reached the agent and is sent again on the new stream, so a
//! restart is neither lost nor run twice. A caller waits for its answer within its
//! limit whatever the streams do.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::command::Call;
use fleet_proto::v1::command_answer::Answer;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// Every open line, and the commands waiting for their answers.
#[derive(Debug)]
pub struct Lines {
    inner: Mutex<Inner>,
    /// Ids of commands and of lines, from a random start: a command id of another
    /// controller process that an agent still holds matches none of this one's.
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    by_node: HashMap<String, Node>,
    pending: HashMap<u64, Pending>,
}

/// A node's line, and its commands waiting for answers (so that a stream opening
/// looks at its own node's commands, not at every one in flight).
#[derive(Debug, Default)]
struct Node {
    line: Option<Arc<Line>>,
    pending: Vec<u64>,
}

impl Inner {
    fn line(&self, node: &str) -> Option<Arc<Line>> {
        self.by_node.get(node)?.line.clone()
    }

    fn insert(&mut self, id: u64, pending: Pending) {
        self.by_node
            .entry(pending.node.clone())
            .or_default()
            .pending
            .push(id);
        self.pending.insert(id, pending);
    }

    fn remove(&mut self, id: u64) -> Option<Pending> {
        let pending = self.pending.remove(&id)?;
        if let Some(node) = self.by_node.get_mut(&pending.node) {
            node.pending.retain(|&p| p != id);
            if node.line.is_none() && node.pending.is_empty() {
                self.by_node.remove(&pending.node);
            }
        }
        Some(pending)
    }
}

#[derive(Debug)]
struct Pending {
    node: String,
    /// The line it was sent on.
    line: u64,
    answer: oneshot::Sender<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Answered(Box<Answer>),
    /// The stream it went out on ended before the agent received it.
    NotDelivered,
}

/// One node's stream, open for commands: a few hundred bytes a node (no channel
/// with its preallocated slots: most lines carry no command for hours).
#[derive(Debug)]
pub struct Line {
    id: u64,
    node: String,
    /// Commands to send on the stream (each has a caller waiting for its answer, so
    /// there are at most as many as callers), and whether the stream has ended.
    queue: Mutex<(VecDeque<pb::Command>, bool)>,
    ready: Notify,
}

impl Line {
    /// The next command to send, if one is queued.
    pub fn pop(&self) -> Option<pb::Command> {
        self.queue.lock().expect("line queue").0.pop_front()
    }

    /// Until a command may be queued (check [`Line::pop`] first).
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Queues `command`; false when the stream has ended.
    fn push(&self, command: pb::Command) -> bool {
        let mut queue = self.queue.lock().expect("line queue");
        if queue.1 {
            return false;
        }
        queue.0.push_back(command);
        self.ready.notify_one();
        true
    }
}

/// Takes a waiting command off the books when its caller stops waiting.
struct Waiting<'a> {
    lines: &'a Lines,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.lines.lock().remove(self.id);
    }
}

impl Default for Lines {
    fn default() -> Self {
        let mut start = [0u8; 8];
        getrandom::fill(&mut start).expect("the system's random source");
        Self {
            inner: Mutex::default(),
            // Half the range: no wrap-around in any process's life.
            next_id: AtomicU64::new(u64::from_le_bytes(start) >> 1),
        }
    }
}

impl Lines {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("lines lock")
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// `node`'s new stream takes commands: it is the node's line from now on, and
    /// the commands that went out on its earlier streams and are not in `working`
    /// are sent again on it. The stream sends what [`Line::pop`] gives.
    pub fn open(&self, node: &str, working: &[u64]) -> Arc<Line> {
        let line = Arc::new(Line {
            id: self.id(),
            node: node.to_string(),
            queue: Mutex::default(),
            ready: Notify::new(),
        });
        let mut inner = self.lock();
        let entry = inner.by_node.entry(node.to_string()).or_default();
        entry.line = Some(line.clone());
        let waiting = entry.pending.clone();
        for id in waiting {
            if !working.contains(&id)
                && inner.pending.get(&id).is_some_and(|p| p.line != line.id)
                && let Some(p) = inner.remove(id)
            {
                let _ = p.answer.send(Outcome::NotDelivered);
            }
        }
        line
    }

    /// `line`'s stream has ended: the node is dialled until it opens another. The
    /// commands it sent still wait for their answers (they may come on the next
    /// stream); those it had not sent yet go another way at once.
    pub fn close(&self, line: &Line) {
        let unsent = {
            let mut queue = line.queue.lock().expect("line queue");
            queue.1 = true;
            std::mem::take(&mut queue.0)
        };
        let mut inner = self.lock();
        for command in unsent {
            if let Some(p) = inner.remove(command.id) {
                let _ = p.answer.send(Outcome::NotDelivered);
            }
        }
        if let Some(node) = inner.by_node.get_mut(&line.node)
            && node.line.as_ref().is_some_and(|l| l.id == line.id)
        {
            node.line = None;
            if node.pending.is_empty() {
                inner.by_node.remove(&line.node);
            }
        }
    }

    /// An answer from `node`'s stream. One to a command this controller did not send
    /// to that node (another process's, or answered already) is dropped.
    pub fn answer(&self, node: &str, answer: pb::CommandAnswer) {
        let mut inner = self.lock();
        if inner
            .pending
            .get(&answer.id)
            .is_some_and(|p| p.node == node)
            && let (Some(p), Some(a)) = (inner.remove(answer.id), answer.answer)
        {
            let _ = p.answer.send(Outcome::Answered(Box::new(a)));
        }
    }

    /// Whether `node` has a line now.
    pub fn has(&self, node: &str) -> bool {
        self.lock().line(node).is_some()
    }

    /// Calls `node` on its line with `call`, waiting at most `limit` for the answer.
    /// None: the node has no line (or its stream ended as the command went out): dial
    /// it.
    pub async fn call(
        &self,
        node: &str,
        token: &str,
        call: Call,
        limit: Duration,
    ) -> Option<Result<Answer, Timeout>> {
        let deadline = Instant::now() + limit;
        loop {
            let line = self.lock().line(node)?;
            let id = self.id();
            let (answer, outcome) = oneshot::channel();
            self.lock().insert(
                id,
                Pending {
                    node: node.to_string(),
                    line: line.id,
                    answer,
                },
            );
            let _waiting = Waiting { lines: self, id };
            let command = pb::Command {
                id,
                token: token.to_string(),
                call: Some(call.clone()),
            };
            if !line.push(command) {
                // The stream has just ended.
                return None;
            }
            match tokio::time::timeout_at(deadline, outcome).await {
                Ok(Ok(Outcome::Answered(answer))) => return Some(Ok(*answer)),
                // Sent again on the node's new line.
                Ok(Ok(Outcome::NotDelivered)) => continue,
                // Not reached: the sender goes only with an outcome or with `_waiting`.
                Ok(Err(_)) => return None,
                Err(_) => return Some(Err(Timeout)),
            }
        }
    }
}

/// No answer within the call's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout;

#[cfg(test)]
mod tests {
    use super::*;

    /// The next command `line` sends.
    async fn sent(line: &Line) -> pb::Command {
        loop {
            if let Some(command) = line.pop() {
                return command;
            }
            line.ready().await;
        }
    }

    fn status_call() -> Call {
        Call::Status(pb::StatusRequest {})
    }

    fn answered(id: u64) -> pb::CommandAnswer {
        pb::CommandAnswer {
            id,
            answer: Some(Answer::Status(pb::StatusResponse {
                node_id: "web-1".into(),
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn a_node_without_a_line_is_dialled() {
        let lines = Lines::default();
        let call = lines.call("web-1", "", status_call(), Duration::from_secs(1));
        assert!(call.await.is_none());
    }

    #[tokio::test]
    async fn a_command_goes_out_on_the_line_and_its_answer_comes_back() {
        let lines = Arc::new(Lines::default());
        let line = lines.open("web-1", &[]);
        let agent = {
            let (lines, line) = (lines.clone(), line.clone());
            tokio::spawn(async move {
                let command = sent(&line).await;
                assert_eq!(command.token, "s3cret");
                // Another node's answer to it is dropped.
                lines.answer("web-2", answered(command.id));
                lines.answer("web-1", answered(command.id));
                command.id
            })
        };
        let answer = lines
            .call("web-1", "s3cret", status_call(), Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(answer, Answer::Status(s) if s.node_id == "web-1"));
        agent.await.unwrap();
        assert!(lines.lock().pending.is_empty());
        lines.close(&line);
        assert!(!lines.has("web-1"));
        assert!(lines.lock().by_node.is_empty(), "nothing kept for the node");
    }

    #[tokio::test]
    async fn no_answer_within_the_limit_is_a_timeout_and_leaves_nothing_waiting() {
        let lines = Lines::default();
        let _line = lines.open("web-1", &[]);
        let call = lines.call("web-1", "", status_call(), Duration::from_millis(50));
        assert_eq!(call.await, Some(Err(Timeout)));
        assert!(lines.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn a_command_the_agent_never_got_goes_out_again_on_its_next_stream_and_one_it_got_does_not()
     {
        let lines = Arc::new(Lines::default());
        let old = lines.open("web-1", &[]);
        let call = {
            let lines = lines.clone();
            tokio::spawn(async move {
                lines
                    .call("web-1", "", status_call(), Duration::from_secs(5))
                    .await
            })
        };
        let lost = sent(&old).await;
        // The stream ends with the command on it; the agent's new stream lists nothing.
        lines.close(&old);
        let second = lines.open("web-1", &[]);
        let again = sent(&second).await;
        assert_ne!(again.id, lost.id);
        assert!(matches!(again.call, Some(Call::Status(_))));
        // This one the agent got: its next stream lists it, and it is not sent again;
        // its answer comes on that stream.
        let third = lines.open("web-1", &[again.id]);
        lines.answer("web-1", answered(again.id));
        let answer = call.await.unwrap().unwrap().unwrap();
        assert!(matches!(answer, Answer::Status(_)));
        assert!(third.pop().is_none());
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_leaves_nothing_waiting() {
        let lines = Lines::default();
        let line = lines.open("web-1", &[]);
        {
            let call = lines.call("web-1", "", status_call(), Duration::from_secs(5));
            tokio::pin!(call);
            tokio::select! {
                _ = &mut call => panic!("no answer was sent"),
                _ = sent(&line) => {}
            }
        }
        assert!(lines.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn a_command_still_queued_when_its_stream_ends_is_dialled_at_once() {
        let lines = Arc::new(Lines::default());
        let line = lines.open("web-1", &[]);
        let call = {
            let lines = lines.clone();
            tokio::spawn(async move {
                lines
                    .call("web-1", "", status_call(), Duration::from_secs(60))
                    .await
            })
        };
        line.ready().await;
        lines.close(&line);
        // None: the caller dials the node, well before its limit.
        let outcome = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(outcome.unwrap().unwrap().is_none());
        assert!(lines.lock().by_node.is_empty());
    }
}
