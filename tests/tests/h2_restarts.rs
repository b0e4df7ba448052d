//! Restarts under HTTP/2 load lose nothing. The load is the project's own strict
//! HTTP/2 client (8 connections × 16 concurrent streams, closed loop): across
//! back-to-back restarts of the demo app, every request must get a 2xx and its
//! whole body, no request may take a second, and requests must keep completing
//! inside every restart. The client may only do what RFC 9113 lets a correct client
//! do without a failure (see the module doc of `fleet_tests::loadgen`): move to a
//! new connection after GOAWAY, and re-send a request the server did not process
//! (never sent, refused, or above the GOAWAY's last stream id). Once over cleartext
//! (prior knowledge), once over HTTPS (h2 by ALPN).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_tests::harness::BackToBack;
use fleet_tests::harness::TlsFiles;
use fleet_tests::loadgen::TlsTarget;
use fleet_tests::{Agent, AgentOpts, Load, LoadOptions, LoadReport, LoadSpec, Span, ZeroLoss};

/// Bound on the restarts themselves (a debug build, two cores, other tests running).
const RESTARTS_DEADLINE: Duration = Duration::from_secs(90);
/// No request may take longer, restart or not: a stall of a second is a failure.
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// Each restart, from its trigger to its reply (at least SPAN_FLOOR), must see at
/// least this many requests complete inside it (as in restart_under_load.rs).
const MIN_IN_RESTART: u64 = 3;
/// A restart span lasts at least this long: on two shared cores a few process
/// spawns in a row can starve every client for tens of milliseconds.
const SPAN_FLOOR: Duration = Duration::from_millis(250);
const CONNECTIONS: usize = 8;
const STREAMS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_restarts_under_http2_load_lose_no_request() {
    let agent = Agent::start(AgentOpts::default()).await;
    let run = restarts_under_load(agent, None, 100).await;
    run.check();
}

/// Over HTTPS the client's first streams on a connection race the drain: a
/// connection opened just before a restart must still get its GOAWAY and answers
/// (before the drain left an unserved HTTP/2 connection alone, the old worker closed
/// such a TLS connection without a GOAWAY while its first streams were unanswered, and
/// every run lost hundreds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_restarts_under_https_h2_load_lose_no_request() {
    let certs = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(certs.path());
    let agent = Agent::start_https(&tls).await;
    assert!(agent.servers()[0].tls, "{:?}", agent.servers());
    let target = TlsTarget {
        ca_der: tls.cert_der.clone(),
        server_name: "localhost".into(),
    };
    let run = restarts_under_load(agent, Some(target), 100).await;
    run.check();
}

/// A node restarted back to back under HTTP/2 load, with its figures.
struct Run {
    /// Kept running until the checks are done.
    _agent: Agent,
    report: LoadReport,
    spans: Vec<Span>,
    took: Duration,
}

impl Run {
    fn check(&self) {
        let rules = ZeroLoss {
            // Sized to the load that ran: at least 1 request per millisecond of restarts.
            min_requests: (self.took.as_millis() as u64).max(500),
            spans: self.spans.clone(),
            min_in_span: MIN_IN_RESTART,
            max_latency: MAX_LATENCY,
        };
        if let Err(errors) = self.report.check_zero_loss(&rules) {
            panic!(
                "{errors}\nfailed requests against the restarts:\n{}",
                failures_by_restart(&self.report, &self.spans)
            );
        }
        eprintln!("zero loss: {}", self.report.summary());
        assert!(
            self.report.h2.after_goaway > 0,
            "the restarts moved the clients with GOAWAY: {}",
            self.report.summary()
        );
    }
}

async fn restarts_under_load(agent: Agent, tls: Option<TlsTarget>, restarts: u64) -> Run {
    let load = Load::start_with(
        LoadSpec {
            target: agent.app(),
            path: "/".into(),
            keepalive_connections: 0,
            fresh_connections: 0,
            h2_connections: CONNECTIONS,
            h2_streams: STREAMS,
            tls,
            max_requests: 5_000_000,
            max_duration: Duration::from_secs(150),
        },
        LoadOptions {
            // Far above the latency bound, so that a stall shows as a latency.
            request_timeout: Duration::from_secs(10),
            ..LoadOptions::default()
        },
    );
    load.wait_progress(200, Duration::from_secs(20)).await;

    let BackToBack {
        spans,
        took,
        worker,
        ..
    } = agent
        .restart_back_to_back(
            restarts,
            "HTTP/2 back-to-back restart",
            RESTARTS_DEADLINE,
            SPAN_FLOOR,
        )
        .await;
    // The last old workers drain while the load still runs.
    load.wait_progress(500, Duration::from_secs(20)).await;
    let report = load.finish().await;
    assert_eq!(
        agent.serving_worker().await,
        worker,
        "the last generation serves"
    );

    let mut inside: Vec<u64> = spans
        .iter()
        .map(|s| report.completed_in(s.from, s.to))
        .collect();
    inside.sort_unstable();
    eprintln!(
        "{restarts} restarts in {:.1}s under HTTP/2 load ({CONNECTIONS} connections x {STREAMS} \
         streams): {}\nrequests completed inside a restart: min {} median {}",
        took.as_secs_f64(),
        report.summary(),
        inside[0],
        inside[inside.len() / 2],
    );
    Run {
        _agent: agent,
        report,
        spans,
        took,
    }
}

/// Every failed request against the restart it fell in (the last one triggered
/// before it ended): how many, of which kinds, and their start and end relative to
/// that restart's trigger; then the sampled failure messages grouped by connection
/// (what it saw: streams opened, GOAWAYs, resets). So a loss can be told apart as
/// the old worker's drain, the new worker's start, or neither.
fn failures_by_restart(report: &LoadReport, spans: &[Span]) -> String {
    let offset = |a: Instant, b: Instant| {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if a >= b { ms(a - b) } else { -ms(b - a) }
    };
    // Per restart: failed, by kind, earliest start, latest end.
    type Failed<'a> = (u64, BTreeMap<&'a str, u64>, f64, f64);
    let mut by_span: BTreeMap<usize, Failed> = BTreeMap::new();
    let mut before_any = 0;
    for r in report.records.iter().filter(|r| !r.ok) {
        let Some(i) = spans.iter().rposition(|s| s.from <= r.end()) else {
            before_any += 1;
            continue;
        };
        let (start, end) = (
            offset(r.start, spans[i].from),
            offset(r.end(), spans[i].from),
        );
        let entry = by_span
            .entry(i)
            .or_insert((0, BTreeMap::new(), f64::MAX, f64::MIN));
        entry.0 += 1;
        *entry.1.entry(r.failure.unwrap_or("?")).or_default() += 1;
        entry.2 = entry.2.min(start);
        entry.3 = entry.3.max(end);
    }
    let mut lines: Vec<String> = by_span
        .iter()
        .map(|(i, (n, kinds, first, last))| {
            format!(
                "  {}: {n} failed {kinds:?}, started from {first:+.1}ms, ended by {last:+.1}ms \
                 after its trigger (span {:.1}ms)",
                spans[*i].label,
                offset(spans[*i].to, spans[*i].from)
            )
        })
        .collect();
    if before_any > 0 {
        lines.push(format!("  {before_any} failed before the first restart"));
    }
    // "HTTP/2 connection 0 #3, stream slot 5 at 192.3ms into the load (CONTEXT): …"
    let mut by_connection: BTreeMap<String, u64> = BTreeMap::new();
    for f in &report.failures {
        let connection = f.message.split(", stream slot").next().unwrap_or_default();
        let context = f
            .message
            .split_once(" into the load (")
            .and_then(|(_, rest)| rest.split_once("): "))
            .map_or("", |(context, _)| context);
        *by_connection
            .entry(format!("[{}] {connection}: {context}", f.kind))
            .or_default() += 1;
    }
    lines.push(format!(
        "sampled failures ({} of {}) by connection:",
        report.failures.len(),
        report.failed
    ));
    lines.extend(by_connection.iter().map(|(k, n)| format!("  {n} x {k}")));
    lines.join("\n")
}
