//! Restarts lose no gRPC call. The example app `grpc-example` (a tonic service served
//! by `fleet_agent::run`, tests/src/bin/grpc-example.rs) restarts 100 times while
//! tonic clients call it over two HTTP/2 connections (two `Channel`s, each shared by
//! several tasks, with a call of a second always in flight on each). Each restart
//! follows the previous one as soon as its new generation answered a call (back to
//! back, a restart takes 10-20 ms here and many generations would never see a call).
//! No call may fail, every generation must answer, no call may take a second longer
//! than it asked for. A second test keeps one long call in flight across a restart
//! and watches its worker drain around it; a third proves that the client's rules
//! below count a call cut by the drain deadline as failed.
//!
//! # What a client may send again
//!
//! tonic never retries a call, and a client may send a call again only when the call
//! provably was not processed by the server (a unary call need not be idempotent):
//!
//! - **never sent**: hyper dropped the call, queued for a connection that closed
//!   before it was written (`hyper::Error::is_canceled`);
//! - **GOAWAY**: the server's GOAWAY reached the client before the stream opened, so
//!   h2 refused to open it; or the stream's id is above the GOAWAY's last-stream-id,
//!   which says the server did not process it (RFC 9113 §6.8). h2 reports both as the
//!   same error: `h2::Error::is_go_away() && is_remote()`;
//! - **REFUSED_STREAM**: the server reset the stream with that reason, which says it
//!   did not process it (RFC 9113 §8.7): `h2::Error::reason()` on the error's chain.
//!
//! Those calls are sent again (at most [`MAX_ATTEMPTS`] times), counted by kind and
//! printed. Anything else is a failed call, never retried: UNAVAILABLE after the
//! request was sent, a connection closed under an open stream, INTERNAL, no answer
//! within [`CALL_TIMEOUT`], a stream reset with another reason, a refused TCP
//! connection (the node's port never closes), a reply that does not echo its payload.
//! A failure is printed with its tonic code, h2 reason, error chain, and time relative
//! to the nearest restart.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleet_proto::v1::{Outcome, Phase, RestartRequest};
use fleet_tests::harness::{eventually, send_signal};
use fleet_tests::{Agent, AgentOpts};
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

mod pb {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("fleet.example.v1");
}

use pb::echo_client::EchoClient;
use pb::{EchoReply, EchoRequest, SleepRequest};

const RESTARTS: u64 = 100;
/// HTTP/2 connections to the node: one tonic `Channel` each.
const CHANNELS: usize = 2;
/// Tasks making `Echo` calls back to back on each channel.
const CALLERS_PER_CHANNEL: usize = 4;
/// The `Sleep` call kept in flight on each channel, and in the second test.
const LONG_CALL: Duration = Duration::from_secs(1);
/// No call may take longer than this beyond what it asked for, restart or not.
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// A call unanswered after this long is a failure (far above the bound, so that a
/// stall shows as a latency first).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Sends of one call, the first included: a call refused this often failed.
const MAX_ATTEMPTS: u32 = 5;
/// Bound on the restarts themselves (a debug build, two cores, other tests running).
const RESTARTS_DEADLINE: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_restarts_under_grpc_load_lose_no_call() {
    let agent = start_node(&[]).await;
    let generation = agent.generation().await;
    let first_worker = agent.serving_worker().await;
    let shared = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        newest_generation: watch::Sender::new(0),
    });
    let mut callers = Vec::new();
    for c in 0..CHANNELS {
        // Each `connect` opens a connection of its own, shared by the channel's tasks.
        let channel = connect(agent.app()).await;
        for t in 0..CALLERS_PER_CHANNEL {
            let (shared, channel) = (shared.clone(), channel.clone());
            callers.push(tokio::spawn(caller(
                shared,
                channel,
                format!("c{c}t{t}"),
                None,
            )));
        }
        let (shared, channel) = (shared.clone(), channel.clone());
        let name = format!("c{c}long");
        callers.push(tokio::spawn(caller(shared, channel, name, Some(LONG_CALL))));
    }
    shared.answered_by(generation).await;

    let mut control = agent.grpc().await;
    let mut restarts = Vec::new();
    let mut workers = vec![first_worker];
    let started = Instant::now();
    for i in 1..=RESTARTS {
        shared.answered_by(generation + i - 1).await;
        let trigger = Instant::now();
        let response = control
            .restart(agent.request(RestartRequest {
                reason: format!("gRPC load restart {i}/{RESTARTS}"),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|status| agent.fail(&format!("restart {i}: gRPC error {status}")))
            .into_inner();
        assert_eq!(
            response.outcome(),
            Outcome::Succeeded,
            "restart {i}: {response:?}"
        );
        assert_eq!(
            response.generation,
            generation + i,
            "restart {i}: {response:?}"
        );
        assert!(
            !workers.contains(&response.new_pid),
            "restart {i}: {response:?}"
        );
        workers.push(response.new_pid);
        restarts.push(Restart {
            number: i,
            trigger,
            ready: Instant::now(),
            generation: response.generation,
        });
        assert!(
            started.elapsed() < RESTARTS_DEADLINE,
            "only {i} restarts in {RESTARTS_DEADLINE:?}"
        );
    }
    let took = started.elapsed();
    shared.answered_by(generation + RESTARTS).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for caller in callers {
        tally.merge(caller.await.expect("a caller task panicked"));
    }

    let report = tally.report(&shared, &restarts);
    let long_across = tally.long_calls_across_a_restart(&restarts);
    eprintln!(
        "{RESTARTS} restarts in {:.1}s under gRPC load:\n{report}",
        took.as_secs_f64()
    );
    assert!(tally.failures.is_empty(), "calls failed:\n{report}");
    let echo_calls = tally.answered.get("Echo").copied().unwrap_or(0);
    assert!(echo_calls >= 10 * RESTARTS, "too few calls:\n{report}");
    let strangers: Vec<_> = tally.pids.keys().filter(|p| !workers.contains(p)).collect();
    assert!(
        strangers.is_empty(),
        "answered by pids no restart reported: {strangers:?}"
    );
    assert_eq!(
        tally.pids.len(),
        workers.len(),
        "every generation answers:\n{report}"
    );
    assert!(
        long_across >= CHANNELS,
        "too few long calls in flight across a restart:\n{report}"
    );
    assert!(
        tally.max_latency <= MAX_LATENCY,
        "latency bound exceeded:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_in_flight_across_a_restart_completes() {
    let agent = start_node(&[]).await;
    let old = agent.serving_worker().await;
    let mut events = agent.watch().await;
    let channel = connect(agent.app()).await;
    let mut client = EchoClient::new(channel.clone());
    let call = tokio::spawn(async move {
        let request = SleepRequest {
            ms: LONG_CALL.as_millis() as u64,
            payload: "long".into(),
        };
        let reply = client.sleep(request).await;
        (reply, unix_ms(SystemTime::now()))
    });
    wait_in_flight(&agent).await;

    send_signal(agent.pid(), Signal::SIGUSR1);
    let draining = events.until_phase(Phase::Draining, WAIT).await;
    assert_eq!(draining.pid, old, "{draining:?}");
    let (reply, answered_ms) = call.await.expect("the call's task");
    let reply = reply.unwrap_or_else(|status| {
        agent.fail(&format!(
            "the long call failed across the restart: {}",
            describe(&status)
        ))
    });
    let reply = reply.into_inner();
    assert_eq!(
        (reply.pid, reply.generation, reply.payload.as_str()),
        (old, 1, "long")
    );
    assert!(
        draining.unix_ms <= answered_ms,
        "the call must still be in flight when its worker is told to drain: draining at \
         {} ms, answered at {answered_ms} ms (a machine too slow for a {LONG_CALL:?} call?)",
        draining.unix_ms
    );
    let drained = events.until_phase(Phase::Drained, WAIT).await;
    assert_eq!(drained.pid, old, "{drained:?}");

    // The same channel's next call goes to the new generation.
    let next = EchoClient::new(channel)
        .echo(EchoRequest {
            payload: "next".into(),
        })
        .await
        .unwrap_or_else(|status| agent.fail(&describe(&status)))
        .into_inner();
    assert_eq!(next.pid, agent.serving_worker().await);
    assert_eq!(next.generation, 2);
}

/// The rules above must not hide a lost call: a call cut when its worker is killed at
/// the drain deadline is a failure, not a call the client may send again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_rules_fail_a_call_cut_by_the_drain_deadline() {
    let agent = start_node(&["--drain-timeout", "300ms"]).await;
    let old = agent.serving_worker().await;
    let mut events = agent.watch().await;
    let mut client = EchoClient::new(connect(agent.app()).await);
    let call = tokio::spawn(async move {
        let request = SleepRequest {
            ms: 10_000,
            payload: "cut".into(),
        };
        client.sleep(request).await
    });
    wait_in_flight(&agent).await;
    send_signal(agent.pid(), Signal::SIGUSR1);
    let drained = events.until_phase(Phase::Drained, WAIT).await;
    assert_eq!(drained.pid, old, "{drained:?}");
    let status = match call.await.expect("the call's task") {
        Ok(reply) => agent.fail(&format!("a cut call was answered: {reply:?}")),
        Err(status) => status,
    };
    eprintln!("the cut call: {}", describe(&status));
    assert_eq!(not_processed(&status), None, "{}", describe(&status));
}

/// Wait until the worker has taken a call: its supervisor counts it in flight.
async fn wait_in_flight(agent: &Agent) {
    eventually(WAIT, "a call in flight at the worker", async || {
        let status = agent.status().await;
        match status["workers"][0]["in_flight"].as_u64() {
            Some(n) if n >= 1 => Ok(()),
            _ => Err(format!("status: {status}")),
        }
    })
    .await;
}

/// The example app on free ports, with more agent flags.
async fn start_node(args: &[&str]) -> Agent {
    Agent::start(AgentOpts {
        program: Some(env!("CARGO_BIN_EXE_grpc-example").into()),
        args: args.iter().map(Into::into).collect(),
        ..Default::default()
    })
    .await
}

/// A channel on a connection of its own.
async fn connect(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("gRPC connect to {addr}: {e}"))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// What the callers share.
#[derive(Debug)]
struct Shared {
    t0: Instant,
    stop: AtomicBool,
    /// The newest generation that answered a call.
    newest_generation: watch::Sender<u64>,
}

impl Shared {
    /// Wait until `generation` (or a newer one) has answered a call.
    async fn answered_by(&self, generation: u64) {
        let mut newest = self.newest_generation.subscribe();
        let answered = newest.wait_for(|g| *g >= generation);
        if tokio::time::timeout(WAIT, answered).await.is_err() {
            panic!(
                "no call answered by generation {generation} within {WAIT:?}; the newest that \
                 answered: {}",
                *self.newest_generation.borrow()
            );
        }
    }
}

/// One restart as the test triggered it.
#[derive(Debug)]
struct Restart {
    number: u64,
    trigger: Instant,
    /// When the reply came: the new generation is ready, the old one drains.
    ready: Instant,
    generation: u64,
}

/// Why a call provably was not processed, so it may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum NotProcessed {
    NeverSent,
    GoAway,
    RefusedStream,
}

/// The kind of not-processed error `status` carries, if any (see the module's doc).
fn not_processed(status: &tonic::Status) -> Option<NotProcessed> {
    let mut source = status.source();
    while let Some(err) = source {
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return Some(NotProcessed::NeverSent);
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return if h2.is_go_away() && h2.is_remote() {
                Some(NotProcessed::GoAway)
            } else if h2.is_reset()
                && h2.is_remote()
                && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
            {
                Some(NotProcessed::RefusedStream)
            } else {
                None
            };
        }
        source = err.source();
    }
    None
}

/// A failed call, as the client saw it: tonic code, message, h2 reason, error chain.
fn describe(status: &tonic::Status) -> String {
    let mut chain = Vec::new();
    let mut h2_reason = None;
    let mut source = status.source();
    while let Some(err) = source {
        chain.push(err.to_string());
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            h2_reason = Some(format!(
                "{:?}{}{}",
                h2.reason(),
                if h2.is_go_away() { " (GOAWAY)" } else { "" },
                if h2.is_remote() {
                    " from the server"
                } else {
                    ""
                }
            ));
        }
        source = err.source();
    }
    format!(
        "{:?} {:?}; h2 reason {}; chain: [{}]",
        status.code(),
        status.message(),
        h2_reason.as_deref().unwrap_or("none"),
        chain.join(" <- ")
    )
}

/// Calls `Echo` (or `Sleep(sleep)`) back to back until told to stop.
async fn caller(
    shared: Arc<Shared>,
    channel: Channel,
    name: String,
    sleep: Option<Duration>,
) -> Tally {
    let mut client = EchoClient::new(channel);
    let mut tally = Tally::default();
    let rpc = if sleep.is_some() { "Sleep" } else { "Echo" };
    let asked = sleep.unwrap_or_default();
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        seq += 1;
        let payload = format!("{name}#{seq}");
        let started = Instant::now();
        for attempt in 1..=MAX_ATTEMPTS {
            let call = async {
                match sleep {
                    Some(d) => {
                        let ms = d.as_millis() as u64;
                        client
                            .sleep(SleepRequest {
                                ms,
                                payload: payload.clone(),
                            })
                            .await
                    }
                    None => {
                        client
                            .echo(EchoRequest {
                                payload: payload.clone(),
                            })
                            .await
                    }
                }
            };
            let failed = |what: String| Failure {
                call: format!("{rpc} {payload} (attempt {attempt})"),
                started,
                at: Instant::now(),
                what,
            };
            let status = match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    if reply.payload != payload {
                        tally
                            .failures
                            .push(failed(format!("the reply echoes {:?}", reply.payload)));
                    } else {
                        shared.newest_generation.send_if_modified(|g| {
                            let newer = reply.generation > *g;
                            *g = (*g).max(reply.generation);
                            newer
                        });
                        tally.answer(rpc, started, asked, &reply);
                    }
                    break;
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    tally
                        .failures
                        .push(failed(format!("no answer within {CALL_TIMEOUT:?}")));
                    break;
                }
            };
            match not_processed(&status) {
                Some(kind) if attempt < MAX_ATTEMPTS => *tally.resent.entry(kind).or_default() += 1,
                _ => {
                    tally.failures.push(failed(describe(&status)));
                    break;
                }
            }
        }
    }
    tally
}

#[derive(Debug)]
struct Failure {
    call: String,
    started: Instant,
    at: Instant,
    what: String,
}

/// What the callers saw.
#[derive(Debug, Default)]
struct Tally {
    answered: BTreeMap<&'static str, u64>,
    resent: BTreeMap<NotProcessed, u64>,
    failures: Vec<Failure>,
    /// Calls answered by each worker.
    pids: BTreeMap<u32, u64>,
    generations: BTreeSet<u64>,
    /// How long each `Echo` took, resends included.
    echo_latencies: Vec<Duration>,
    /// The longest call beyond what it asked for.
    max_latency: Duration,
    /// `Sleep` calls: (started, answered, generation that answered).
    long_calls: Vec<(Instant, Instant, u64)>,
}

impl Tally {
    fn answer(&mut self, rpc: &'static str, started: Instant, asked: Duration, reply: &EchoReply) {
        let now = Instant::now();
        let took = now - started;
        *self.answered.entry(rpc).or_default() += 1;
        *self.pids.entry(reply.pid).or_default() += 1;
        self.generations.insert(reply.generation);
        self.max_latency = self.max_latency.max(took.saturating_sub(asked));
        if asked.is_zero() {
            self.echo_latencies.push(took);
        } else {
            self.long_calls.push((started, now, reply.generation));
        }
    }

    fn merge(&mut self, other: Tally) {
        for (rpc, n) in other.answered {
            *self.answered.entry(rpc).or_default() += n;
        }
        for (kind, n) in other.resent {
            *self.resent.entry(kind).or_default() += n;
        }
        for (pid, n) in other.pids {
            *self.pids.entry(pid).or_default() += n;
        }
        self.failures.extend(other.failures);
        self.generations.extend(other.generations);
        self.echo_latencies.extend(other.echo_latencies);
        self.max_latency = self.max_latency.max(other.max_latency);
        self.long_calls.extend(other.long_calls);
    }

    /// Long calls answered by a generation that was told to drain while they ran.
    fn long_calls_across_a_restart(&self, restarts: &[Restart]) -> usize {
        let across = |&&(from, to, generation): &&(Instant, Instant, u64)| {
            // The restart that made the next generation ready told this one to drain.
            restarts
                .iter()
                .any(|r| r.generation == generation + 1 && from < r.ready && r.ready < to)
        };
        self.long_calls.iter().filter(across).count()
    }

    /// The figures, and every failure with its time relative to the restarts.
    fn report(&self, shared: &Shared, restarts: &[Restart]) -> String {
        let mut latencies = self.echo_latencies.clone();
        latencies.sort_unstable();
        let pct = |p: usize| {
            let i = (latencies.len() * p / 100).min(latencies.len().saturating_sub(1));
            latencies.get(i).copied().unwrap_or_default()
        };
        let mut text = format!(
            "calls answered {:?}; resent because not processed {:?}; failed {}\n\
             answered by {} worker pids, generations {:?}..={:?}\n\
             Echo latency p50 {:?} p99 {:?} max {:?}; max beyond what a call asked {:?}\n\
             long calls in flight across a restart: {} of {}",
            self.answered,
            self.resent,
            self.failures.len(),
            self.pids.len(),
            self.generations.first(),
            self.generations.last(),
            pct(50),
            pct(99),
            pct(100),
            self.max_latency,
            self.long_calls_across_a_restart(restarts),
            self.long_calls.len(),
        );
        let mut failures: Vec<&Failure> = self.failures.iter().collect();
        failures.sort_by_key(|f| f.at);
        for f in failures {
            let t = |i: Instant| format!("+{:.3}s", (i - shared.t0).as_secs_f64());
            let near = match restarts.iter().rev().find(|r| r.trigger <= f.at) {
                Some(r) => format!(
                    "{} ms after restart {} was triggered (its generation {} was ready {} ms \
                     after the trigger)",
                    (f.at - r.trigger).as_millis(),
                    r.number,
                    r.generation,
                    (r.ready - r.trigger).as_millis()
                ),
                None => "before the first restart".into(),
            };
            text += &format!(
                "\nFAILED {}: sent at {}, failed at {}, {near}: {}",
                f.call,
                t(f.started),
                t(f.at),
                f.what
            );
        }
        text
    }
}
