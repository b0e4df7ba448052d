//! Calls the controller makes on the node's heartbeat stream instead of dialling its
//! control address (`Command` in, `CommandAnswer` out; see `HeartbeatStream` in
//! controller.proto): no connection per call, and a node the controller cannot reach
//! (NAT, a firewall) is driven all the same.
//!
//! A command is taken only where the control endpoint would take the same call: on a
//! stream to an `https://` controller (its certificate was checked against the fleet
//! CA), with the node's token in the command when the node has one, or, with neither,
//! from a controller on loopback. Anything else is answered `PERMISSION_DENIED` and
//! changes nothing.
//!
//! No answer is lost with its stream: an answer stays with the stream it was sent on
//! until a beat sent after it is answered (the controller reads a stream in order), and
//! otherwise goes out again on the stream open then, or on the next. A stream's first
//! beat lists the commands still being worked on or answered, so the controller sends
//! again only what never arrived, and a command that arrives twice runs once.
//!
//! To a controller that says it takes them (`status_with_answers`), an answer carries
//! the node's status as it stood when the answer was sent: a beat, which the
//! heartbeat loop then need not send ([`Activity`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fleet_proto::commands::refusal;
use fleet_proto::v1 as pb;
use fleet_proto::v1::command_answer::Answer;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::control::grpc::AgentGrpc;
use crate::supervisor::Supervisor;

/// Commands worked on at once; more are refused (`RESOURCE_EXHAUSTED`). The controller
/// sends a node one call at a time per caller: a handful at most.
const MAX_WORKING: usize = 64;
/// Answers kept for a next stream; past it the oldest is dropped (its caller has long
/// given up: the controller waits a call's limit, not streams without end).
const MAX_OUTBOX: usize = 256;

/// The commands of every stream of this node.
#[derive(Debug)]
pub struct Commands {
    grpc: AgentGrpc,
    token: Option<String>,
    /// Received and not answered yet.
    pub(crate) working: Mutex<HashSet<u64>>,
    /// Answers whose stream ended before a later beat on it was answered: sent again
    /// on the next stream.
    outbox: Mutex<Vec<pb::CommandAnswer>>,
    /// The stream that takes commands now: an answer whose own stream has ended goes
    /// out on it (the controller is waiting for it there, having been told the command
    /// is at work).
    current: Mutex<std::sync::Weak<Line>>,
    supervisor: Arc<Supervisor>,
    activity: watch::Sender<Activity>,
}

/// What the heartbeat loop needs to know of the commands to leave out a beat that an
/// answer's status makes needless.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// Commands taken and not answered yet (`Commands::working`'s size).
    pub working: usize,
    /// When a status last went out with an answer.
    pub status_sent: Option<Instant>,
}

impl Commands {
    pub fn new(supervisor: Arc<Supervisor>) -> Arc<Self> {
        Arc::new(Self {
            token: supervisor.token().map(str::to_string),
            grpc: AgentGrpc::new(supervisor.clone()),
            working: Mutex::default(),
            outbox: Mutex::default(),
            current: Mutex::default(),
            supervisor,
            activity: watch::Sender::new(Activity::default()),
        })
    }

    /// Follows [`Activity`]: commands at work, statuses sent with answers.
    pub fn activity(&self) -> watch::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// The node's status now, as a beat would carry it.
    fn status_now(&self) -> (pb::StatusResponse, u64) {
        let report = self.supervisor.status();
        let in_flight = report.in_flight();
        (crate::control::status_message(report), in_flight)
    }

    /// Whether commands are taken on a stream to the controller at `url`, `tls` when
    /// its certificate is checked against the fleet CA, and on what grounds.
    pub fn taken_from(&self, url: &str, tls: bool) -> Trust {
        if tls {
            Trust::Certificate
        } else if self.token.is_some() || crate::config::loopback_url(url) {
            Trust::Token
        } else {
            Trust::None
        }
    }

    /// The commands a new stream's first beat lists: being worked on, or answered on a
    /// stream that ended before the answer was known to be read.
    pub fn listed(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .working
            .lock()
            .expect("working")
            .iter()
            .copied()
            .collect();
        ids.extend(self.outbox.lock().expect("outbox").iter().map(|a| a.id));
        ids.sort_unstable();
        ids
    }

    /// Keeps an answer for the next stream (the oldest goes past [`MAX_OUTBOX`]).
    fn keep(&self, answer: pb::CommandAnswer) {
        let mut outbox = self.outbox.lock().expect("outbox");
        if outbox.len() >= MAX_OUTBOX {
            let dropped = outbox.remove(0);
            tracing::warn!(
                "the answer to command {} was never read by a controller: dropped",
                dropped.id
            );
        }
        outbox.push(answer);
    }

    /// `line` (a new stream, its first beat sent) takes commands from now on: the
    /// answers of ended streams go out on it, and so will any whose stream ends later.
    pub fn taking(&self, line: &Arc<Line>) {
        *self.current.lock().expect("current") = Arc::downgrade(line);
        let answers = std::mem::take(&mut *self.outbox.lock().expect("outbox"));
        for answer in answers {
            line.send_answer(answer);
        }
    }

    /// An answer whose own stream has ended: on the current stream, else kept.
    fn deliver(&self, answer: pb::CommandAnswer) {
        let current = self.current.lock().expect("current").upgrade();
        let unsent = match current {
            Some(line) => line.try_send(answer).err(),
            None => Some(answer),
        };
        if let Some(answer) = unsent {
            self.keep(answer);
        }
    }

    /// Runs `command`, received on `line` (a stream to a controller trusted as
    /// `trust` says, see [`Commands::taken_from`]), and answers it on that line or, if
    /// it has ended by then, on the one open then (else the next). A command already
    /// received runs once.
    pub fn receive(self: &Arc<Self>, command: pb::Command, line: Arc<Line>, trust: Trust) {
        let id = command.id;
        if self
            .outbox
            .lock()
            .expect("outbox")
            .iter()
            .any(|a| a.id == id)
        {
            tracing::debug!("command {id} received again: it runs once");
            return;
        }
        {
            let mut working = self.working.lock().expect("working");
            if working.contains(&id) {
                tracing::debug!("command {id} received again: it runs once");
                return;
            }
            if working.len() >= MAX_WORKING {
                drop(working);
                line.send_answer(pb::CommandAnswer {
                    id,
                    answer: Some(refusal(
                        tonic::Code::ResourceExhausted,
                        &format!(
                            "this node is already working on {MAX_WORKING} commands: try again \
                             once they are answered"
                        ),
                    )),
                });
                return;
            }
            working.insert(id);
            self.activity.send_modify(|a| a.working = working.len());
        }
        let commands = self.clone();
        tokio::spawn(async move {
            let answer = pb::CommandAnswer {
                id,
                answer: Some(commands.answer(command, trust).await),
            };
            // Sent (or kept) before it leaves `working`: a stream opening meanwhile
            // lists it either way, so the controller does not send it again (it would
            // run twice).
            line.send_answer(answer);
            // After the answer (and its status) went out: a beat owed for a change it
            // reports is not sent.
            let mut working = commands.working.lock().expect("working");
            working.remove(&id);
            commands.activity.send_modify(|a| a.working = working.len());
        });
    }

    async fn answer(&self, command: pb::Command, trust: Trust) -> Answer {
        if trust == Trust::None {
            return refusal(
                tonic::Code::PermissionDenied,
                "this node takes no commands on a heartbeat stream to this controller: it is \
                 neither https:// nor on loopback, and the node has no token; call its \
                 control address",
            );
        }
        // Over mutual TLS the stream's far end holds the controller's certificate: it
        // passes as the controller's calls to the control endpoint do, token or not.
        if trust == Trust::Token
            && let Some(token) = &self.token
            && !crate::control::auth::same(&command.token, token)
        {
            return refusal(
                tonic::Code::Unauthenticated,
                "the command does not carry this node's token: give the controller the \
                 fleet's token (--token-file)",
            );
        }
        fleet_proto::commands::answer(&self.grpc, command.call, &Default::default()).await
    }
}

/// Why the commands on a stream are taken, if they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Not taken: a plain-text controller elsewhere, and no token to check.
    None,
    /// The node's token, when it has one, must be in each command (a controller on
    /// loopback, or one that knows the fleet's token).
    Token,
    /// The stream is mutual TLS to a holder of the controller's certificate.
    Certificate,
}

/// The sending side of one open stream: beats and answers go out in order, and the
/// answers stay here until a beat sent after them is answered.
#[derive(Debug)]
pub struct Line {
    out: mpsc::UnboundedSender<pb::HeartbeatRequest>,
    sent: Mutex<Sent>,
    commands: Arc<Commands>,
    /// The controller takes a status sent with an answer as a beat (it said so in its
    /// answers to beats).
    with_status: AtomicBool,
}

#[derive(Debug, Default)]
struct Sent {
    /// The stream has ended: answers go to the outbox.
    closed: bool,
    /// Sent, not known to be read.
    answers: Vec<pb::CommandAnswer>,
}

impl Line {
    pub fn new(out: mpsc::UnboundedSender<pb::HeartbeatRequest>, commands: Arc<Commands>) -> Self {
        Self {
            out,
            sent: Mutex::default(),
            commands,
            with_status: AtomicBool::new(false),
        }
    }

    /// What the controller said in its last answer to a beat on this stream.
    pub fn set_status_with_answers(&self, taken: bool) {
        self.with_status.store(taken, Ordering::Relaxed);
    }

    /// Answers on this stream carry the node's status.
    pub fn status_with_answers(&self) -> bool {
        self.with_status.load(Ordering::Relaxed)
    }

    /// Sends a beat; the mark to [`Line::confirm`] once it is answered.
    pub fn send_beat(&self, beat: pb::HeartbeatRequest) -> usize {
        let sent = self.sent.lock().expect("sent");
        // A send fails only once the call is over: the beat's answer says why.
        let _ = self.out.send(beat);
        sent.answers.len()
    }

    /// The beat sent at `mark` was answered: the answers sent before it were read.
    pub fn confirm(&self, mark: usize) {
        let mut sent = self.sent.lock().expect("sent");
        let read = mark.min(sent.answers.len());
        sent.answers.drain(..read);
    }

    /// Sends an answer, or, when this stream has ended, on the current one (else it
    /// is kept for the next).
    pub fn send_answer(&self, answer: pb::CommandAnswer) {
        if let Err(answer) = self.try_send(answer) {
            self.commands.deliver(answer);
        }
    }

    /// Sends an answer on this stream; gives it back when the stream has ended.
    #[allow(clippy::result_large_err)]
    fn try_send(&self, answer: pb::CommandAnswer) -> Result<(), pb::CommandAnswer> {
        let (status, in_flight) = match self.status_with_answers() {
            true => {
                let (status, in_flight) = self.commands.status_now();
                (Some(status), in_flight)
            }
            false => (None, 0),
        };
        let with_status = status.is_some();
        let mut sent = self.sent.lock().expect("sent");
        let message = pb::HeartbeatRequest {
            answer: Some(answer.clone()),
            status,
            in_flight,
            ..Default::default()
        };
        if !sent.closed && self.out.send(message).is_ok() {
            sent.answers.push(answer);
            if with_status {
                let now = Instant::now();
                self.commands
                    .activity
                    .send_modify(|a| a.status_sent = Some(now));
            }
            Ok(())
        } else {
            Err(answer)
        }
    }
}

impl Line {
    /// The stream is over: what it may not have delivered, and every answer still to
    /// come, goes out on the next one.
    pub fn close(&self) {
        let unread = {
            let mut sent = self.sent.lock().expect("sent");
            sent.closed = true;
            std::mem::take(&mut sent.answers)
        };
        for answer in unread {
            self.commands.deliver(answer);
        }
    }
}
