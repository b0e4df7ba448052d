//! Registration with the fleet's controllers: the supervisor sends its status as a
//! heartbeat at the interval the controller asks for (the first at once). A controller
//! that is down is retried quietly; the node keeps serving either way.
//!
//! With several controllers (one store, one leader) heartbeats go to one at a time and
//! move on as [`crate::controllers`] says: to the leader a follower names, if it is
//! one of the configured controllers, else to the next; once every controller has
//! failed, after a backoff. Each switch is logged once.
//!
//! The beats to a controller go on one long-lived `HeartbeatStream` call (a message
//! each, answered in order), opened again after any failure; a controller that does
//! not know that call (UNIMPLEMENTED: older than this agent) gets a `Heartbeat` call
//! per beat.
//!
//! On its stream the controller may also call the node ([`crate::commands`]): a
//! task per stream reads what comes back, hands commands over and passes the answers to
//! beats on.
//!
//! A controller that takes the node's status with its answers to commands hears from
//! the node through them too, so beats it would only repeat are left out
//! ([`Quiet`]): the beat at once after a change that a command at work will report
//! (a restart the controller asked for ends with its answer), and a beat due within
//! half an interval of a status sent with an answer. A rollout's preflight and
//! restart then cost the node two messages, not four (and the controller no answer to
//! write for each).

use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::commands::{Activity, Commands, Line, Trust};
use crate::controllers::{Controllers, Next, backoff, leader_hint};
use crate::phase::Phase;
use crate::supervisor::{NodeState, Supervisor};

/// Until the controller says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How long the first beat may wait for the executable's digest.
const DIGEST_WAIT: Duration = Duration::from_secs(5);
/// The longest wait between rounds when no controller takes heartbeats (unless the
/// controller asked for a longer interval): a controller that comes back hears from
/// every node within it, well inside the grace it gives known nodes (one heartbeat
/// TTL, 10 s by default).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The client config of an `https://` controller, swapped when the certificate renews.
type ClientTls = watch::Receiver<Option<Arc<rustls::ClientConfig>>>;

type Client = ControllerServiceClient<Channel>;

pub async fn run(supervisor: Arc<Supervisor>, urls: Vec<String>, mut tls: Option<ClientTls>) {
    let auth = supervisor
        .token()
        .and_then(|t| format!("Bearer {t}").parse().ok());
    let commands = Commands::new(supervisor.clone());
    let mut beater = match Beater::new(urls, auth, commands) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    // Over mutual TLS: not before the node has its certificate.
    if let Some(rx) = tls.as_mut() {
        if rx.wait_for(Option::is_some).await.is_err() {
            return;
        }
        rx.mark_unchanged();
    }
    let mut events = supervisor.subscribe();
    let mut activity = beater.commands.activity();
    // A node registers once its first worker serves (or it has failed to start).
    while supervisor.status().state == NodeState::Starting {
        if let Err(tokio::sync::broadcast::error::RecvError::Closed) = events.recv().await {
            return;
        }
    }
    // The first beat carries the executable's digest, which is computed while the
    // first worker starts (tens of ms).
    let deadline = tokio::time::Instant::now() + DIGEST_WAIT;
    while supervisor.status().exe.sha256.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    loop {
        // New channels after each renewal (the controller reads the node id from the
        // certificate).
        if let Some(rx) = tls.as_mut()
            && rx.has_changed().unwrap_or(false)
        {
            beater.disconnect();
            rx.mark_unchanged();
        }
        let report = supervisor.status();
        let stopped = report.state == NodeState::Stopped;
        let in_flight = report.in_flight();
        let status = crate::control::status_message(report);
        let request = pb::HeartbeatRequest {
            status: Some(status),
            in_flight,
            ..Default::default()
        };
        let Some(beat) = beater.beat(request, &tls).await else {
            return;
        };
        // Beats an answer's status makes needless are left out only while the beats
        // go through, to a controller that takes statuses with answers.
        let mut quiet = Quiet::new(matches!(beat, Beat::Taken) && beater.status_with_answers());
        let (wait, wake): (Duration, fn(&Phase) -> bool) = match beat {
            // The last beat says the node stopped on purpose, so the controller shows
            // it as stopped rather than unreachable (another controller is tried at
            // once if this one failed). While it drains it keeps beating.
            Beat::Taken if stopped => return,
            // At the interval, or at once when the node changes (a restart ended, a
            // worker died), so the controller's view is fresh.
            Beat::Taken => (beater.interval, changed),
            Beat::Failed(Next::Now, _) => continue,
            Beat::Failed(..) if stopped => return,
            // A failed beat waits its whole backoff but for the node stopping: other
            // changes do not cut it short, or a flapping worker would hammer the
            // controllers.
            Beat::Failed(_, wait) => (wait, stopping),
        };
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => {
                    let now = tokio::time::Instant::now();
                    if quiet.due_is_needless(*activity.borrow(), now, wait) {
                        sleep.as_mut().reset(now + wait);
                        continue;
                    }
                    break;
                }
                event = events.recv() => match event {
                    Ok(e) if wake(&e.phase) => {
                        let now = tokio::time::Instant::now();
                        if stopping(&e.phase) || !quiet.owe(*activity.borrow(), now) {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        (&mut sleep).await;
                        break;
                    }
                },
                changed = activity.changed(), if quiet.owed() => {
                    if changed.is_err() || quiet.still_owed(*activity.borrow_and_update()) {
                        break;
                    }
                }
            }
        }
    }
}

/// Which beats a status sent with an answer makes needless, between two beats.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    /// The controller takes statuses with answers (else every beat goes out).
    enabled: bool,
    /// A change worth a beat at once happened then, while commands were at work: the
    /// beat waits for their answers, whose status reports it.
    owed_since: Option<tokio::time::Instant>,
}

impl Quiet {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            owed_since: None,
        }
    }

    /// A change worth a beat at once, at `now`: true when the beat may wait for the
    /// answers of the commands at work (it is owed until one of them goes out).
    fn owe(&mut self, activity: Activity, now: tokio::time::Instant) -> bool {
        if !self.enabled || activity.working == 0 {
            return false;
        }
        self.owed_since.get_or_insert(now);
        true
    }

    fn owed(&self) -> bool {
        self.owed_since.is_some()
    }

    /// After `activity` changed: true when the owed beat must go now (the commands
    /// are all answered, none with a status taken after the change); false when it
    /// is still owed, or no longer (an answer's status reported the change).
    fn still_owed(&mut self, activity: Activity) -> bool {
        let Some(since) = self.owed_since else {
            return false;
        };
        if activity.status_sent.is_some_and(|sent| sent >= since) {
            self.owed_since = None;
            return false;
        }
        activity.working == 0
    }

    /// The periodic beat, due at `now`: needless when a status went out with an
    /// answer less than half an `interval` ago (the controller then hears from the
    /// node at least every 1.5 intervals, half its TTL) and no beat is owed.
    fn due_is_needless(
        &self,
        activity: Activity,
        now: tokio::time::Instant,
        interval: Duration,
    ) -> bool {
        self.enabled
            && self.owed_since.is_none()
            && activity
                .status_sent
                .is_some_and(|sent| now.saturating_duration_since(sent) < interval / 2)
    }
}

/// The changes that are worth a heartbeat at once.
fn changed(phase: &Phase) -> bool {
    matches!(
        phase,
        Phase::Ready
            | Phase::Failed
            | Phase::Reverting
            | Phase::WorkerExited
            | Phase::ShuttingDown
            | Phase::Stopped
    )
}

fn stopping(phase: &Phase) -> bool {
    matches!(phase, Phase::ShuttingDown | Phase::Stopped)
}

/// What one beat came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beat {
    /// A controller took it.
    Taken,
    /// It failed: where the next goes, and after how long (nothing for [`Next::Now`]).
    Failed(Next, Duration),
}

/// An open `HeartbeatStream` call: beats (and answers to commands) go out on `line`,
/// the answers to beats come back in order from the task that reads the stream.
#[derive(Debug)]
struct BeatStream {
    line: Arc<Line>,
    acks: mpsc::Receiver<Result<pb::HeartbeatResponse, tonic::Status>>,
    reader: tokio::task::JoinHandle<()>,
    /// No beat sent yet: the first says whether the node takes commands.
    fresh: bool,
    /// Whether and why commands are taken on this stream ([`Commands::taken_from`]).
    trust: Trust,
}

impl Drop for BeatStream {
    fn drop(&mut self) {
        self.reader.abort();
        self.line.close();
    }
}

/// How beats reach one controller.
#[derive(Debug)]
enum Call {
    /// Not known yet: a stream is tried.
    Untried,
    Stream(Box<BeatStream>),
    /// The controller does not know `HeartbeatStream`: a `Heartbeat` per beat, until
    /// one fails (it may have been restarted as a newer build: a stream is tried again).
    Unary,
}

/// Sends each beat to the controller [`Controllers`] points at, and logs what a
/// person would want to know: a failure once per streak, each switch once.
#[derive(Debug)]
struct Beater {
    controllers: Controllers,
    endpoints: Vec<Endpoint>,
    /// One lazily connected client per controller, made when first needed (dropped
    /// when the node's certificate renews).
    clients: Vec<Option<Client>>,
    /// How the beats reach each controller (a stream is opened again after any
    /// failure).
    calls: Vec<Call>,
    /// "Takes no heartbeat stream" was logged for the controller (once, not at each
    /// try after a failed beat).
    said_unary: Vec<bool>,
    auth: Option<MetadataValue<Ascii>>,
    commands: Arc<Commands>,
    /// As the controller asks.
    interval: Duration,
    /// The controller that took the last beat.
    serving: Option<usize>,
    /// A failure was logged since the last beat a controller took.
    failing: bool,
    /// "No controller takes heartbeats" was logged in this streak.
    all_failing: bool,
}

impl Beater {
    fn new(
        urls: Vec<String>,
        auth: Option<MetadataValue<Ascii>>,
        commands: Arc<Commands>,
    ) -> Result<Beater, String> {
        let endpoints = urls
            .iter()
            .map(|url| {
                Endpoint::from_shared(url.clone())
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(3))
                            .timeout(Duration::from_secs(10))
                    })
                    .map_err(|e| format!("controller URL {url:?} is not valid: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Beater {
            clients: vec![None; urls.len()],
            calls: urls.iter().map(|_| Call::Untried).collect(),
            said_unary: vec![false; urls.len()],
            controllers: Controllers::new(urls),
            endpoints,
            auth,
            commands,
            interval: DEFAULT_INTERVAL,
            serving: None,
            failing: false,
            all_failing: false,
        })
    }

    /// Forgets every connection (and every open stream): the next beats connect anew,
    /// with the node's renewed certificate.
    fn disconnect(&mut self) {
        self.clients.fill(None);
        for call in &mut self.calls {
            if matches!(call, Call::Stream(_)) {
                *call = Call::Untried;
            }
        }
    }

    /// The client of controller `i`. Over mutual TLS every controller is checked
    /// against the same fleet CA and must hold the controller certificate, whatever
    /// its address. None: the TLS config cannot be used (logged).
    fn client(&mut self, i: usize, tls: &Option<ClientTls>) -> Option<Client> {
        if let Some(client) = &self.clients[i] {
            return Some(client.clone());
        }
        let endpoint = &self.endpoints[i];
        let client = match tls {
            None => Client::new(endpoint.connect_lazy()),
            Some(rx) => {
                let config = rx.borrow().clone()?;
                match fleet_net::tls::Connector::new(config, fleet_net::tls::CONTROLLER_NAME) {
                    Ok(c) => Client::new(endpoint.connect_with_connector_lazy(c)),
                    Err(e) => {
                        tracing::error!("{e}");
                        return None;
                    }
                }
            }
        };
        self.clients[i] = Some(client.clone());
        Some(client)
    }

    /// Sends one beat to the current controller. None: heartbeats cannot go on.
    async fn beat(&mut self, beat: pb::HeartbeatRequest, tls: &Option<ClientTls>) -> Option<Beat> {
        let at = self.controllers.index();
        let client = self.client(at, tls)?;
        let url = self.controllers.current().to_string();
        // A controller that takes the connection but does not answer (stopped, hung,
        // cut off mid-way) costs one interval (1 s to 10 s), not the channel's 10 s:
        // the node's heartbeats must reach another controller within the TTL.
        let wait = self
            .interval
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let tls = tls.is_some();
        let answer = match tokio::time::timeout(wait, self.send(at, client, beat, tls)).await {
            Ok(answer) => answer,
            Err(_) => {
                // The stream may still owe the answer to this beat: a new one.
                self.calls[at] = Call::Untried;
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {}",
                    humantime::format_duration(wait)
                )))
            }
        };
        match answer {
            Ok(response) => {
                self.controllers.succeeded();
                if self.serving != Some(at) && (self.serving.is_some() || self.several()) {
                    let leader = if self.controllers.is_leader() {
                        " (the leader)"
                    } else {
                        ""
                    };
                    tracing::info!("heartbeats now go to {url}{leader}");
                } else if self.failing {
                    tracing::info!("controller {url} reachable again");
                }
                self.serving = Some(at);
                self.failing = false;
                self.all_failing = false;
                let asked = response.interval_ms;
                if asked > 0 {
                    self.interval = Duration::from_millis(asked);
                }
                Some(Beat::Taken)
            }
            Err(status) => {
                let next = self.controllers.failed(&status);
                let wait = match next {
                    Next::Now => Duration::ZERO,
                    Next::Stay => self.interval,
                    Next::RoundOver { rounds } => {
                        backoff(self.interval, rounds, self.max_backoff())
                    }
                };
                // A follower pointing at the leader is no failure worth a warning: the
                // switch is logged when the leader takes the beat.
                if !self.failing && leader_hint(&status).is_none() {
                    let then = match next {
                        Next::Now => format!("trying {}", self.controllers.current()),
                        _ => format!(
                            "retrying every {}",
                            humantime::format_duration(self.interval)
                        ),
                    };
                    tracing::warn!(
                        "heartbeat to the controller {url} failed: {}; {then}",
                        status.message()
                    );
                    self.failing = true;
                }
                if matches!(next, Next::RoundOver { .. }) && self.several() && !self.all_failing {
                    tracing::warn!(
                        "no controller takes heartbeats ({}): retrying, backing off up to {}",
                        self.controllers.urls().join(", "),
                        humantime::format_duration(self.max_backoff().max(self.interval))
                    );
                    self.all_failing = true;
                    self.failing = true;
                }
                Some(Beat::Failed(next, wait))
            }
        }
    }

    /// Sends `beat` to controller `at` on its stream (opened first if need be), or as
    /// a `Heartbeat` call to a controller without streams. A failed stream is
    /// forgotten, to be opened again by the next beat. `tls`: the controllers are
    /// `https://` (their certificate is checked).
    async fn send(
        &mut self,
        at: usize,
        mut client: Client,
        mut beat: pb::HeartbeatRequest,
        tls: bool,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        if let Call::Untried = self.calls[at] {
            let (out, queue) = mpsc::unbounded_channel();
            match client
                .heartbeat_stream(self.request(UnboundedReceiverStream::new(queue)))
                .await
            {
                Ok(answers) => {
                    if std::mem::take(&mut self.said_unary[at]) {
                        tracing::info!(
                            "controller {} takes heartbeat streams now",
                            self.controllers.urls()[at]
                        );
                    }
                    let trust = self.commands.taken_from(&self.controllers.urls()[at], tls);
                    let line = Arc::new(Line::new(out, self.commands.clone()));
                    let (acks_tx, acks) = mpsc::channel(1);
                    let (commands, taken_on) = (self.commands.clone(), line.clone());
                    let reader = tokio::spawn(fleet_proto::commands::read_stream(
                        answers.into_inner(),
                        acks_tx,
                        move |command| commands.receive(command, taken_on.clone(), trust),
                    ));
                    self.calls[at] = Call::Stream(Box::new(BeatStream {
                        line,
                        acks,
                        reader,
                        fresh: true,
                        trust,
                    }))
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    if !std::mem::replace(&mut self.said_unary[at], true) {
                        tracing::info!(
                            "controller {} takes no heartbeat stream (it is older than this \
                             agent): sending a call per beat",
                            self.controllers.urls()[at]
                        );
                    }
                    self.calls[at] = Call::Unary;
                }
                Err(status) => return Err(status),
            }
        }
        let Call::Stream(stream) = &mut self.calls[at] else {
            let answer = client
                .heartbeat(self.request(beat))
                .await
                .map(tonic::Response::into_inner);
            if answer.is_err() {
                self.calls[at] = Call::Untried;
            }
            return answer;
        };
        let fresh = std::mem::take(&mut stream.fresh);
        if fresh {
            beat.takes_commands = stream.trust != Trust::None;
            beat.working = self.commands.listed();
        }
        let mark = stream.line.send_beat(beat);
        if fresh && stream.trust != Trust::None {
            self.commands.taking(&stream.line);
        }
        let answer = stream
            .acks
            .recv()
            .await
            .unwrap_or_else(|| Err(fleet_proto::commands::ended()));
        match &answer {
            Ok(response) => {
                stream.line.confirm(mark);
                stream
                    .line
                    .set_status_with_answers(response.status_with_answers);
            }
            Err(_) => self.calls[at] = Call::Untried,
        }
        answer
    }

    /// The controller that took the last beat takes statuses with answers on the
    /// stream open to it.
    fn status_with_answers(&self) -> bool {
        self.serving
            .and_then(|at| match &self.calls[at] {
                Call::Stream(stream) => Some(stream.line.status_with_answers()),
                _ => None,
            })
            .unwrap_or(false)
    }

    /// A request with the node's credential.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.auth {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    /// The longest wait between rounds: [`MAX_BACKOFF`], but no more than one and a
    /// half intervals (half the controller's heartbeat TTL; 500 ms at least), so that
    /// a node whose controllers are between leaders reaches the new one within the
    /// one TTL of grace it gives every node.
    fn max_backoff(&self) -> Duration {
        MAX_BACKOFF
            .min(self.interval * 3 / 2)
            .max(Duration::from_millis(500))
    }

    fn several(&self) -> bool {
        self.controllers.urls().len() > 1
    }
}

#[cfg(test)]
mod tests;
