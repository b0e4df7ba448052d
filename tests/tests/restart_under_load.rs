//! The promise of the whole project: restarts under load lose nothing. Sixteen
//! clients (8 on keep-alive connections, 8 opening a connection per request) hit
//! the node while it restarts 100 times back to back; every request must get a
//! 2xx and its whole body — no refused connection, no reset, no request written on
//! a kept-alive connection and answered by EOF — no request may take a second, and
//! requests must keep completing inside every restart. The same holds with four
//! listening sockets per port in an `SO_REUSEPORT` group (`--sockets-per-port 4`),
//! where the kernel spreads the new connections over four accept queues. A third test
//! proves those checks catch a new generation that says READY and then stalls for 3 s.

use std::time::Duration;

use fleet_tests::harness::BackToBack;
use fleet_tests::{Agent, AgentOpts, Load, LoadOptions, LoadReport, LoadSpec, Span, ZeroLoss};

const RESTARTS: u64 = 100;
/// Bound on the restarts themselves (a debug build, two cores, other tests running).
const RESTARTS_DEADLINE: Duration = Duration::from_secs(75);
/// No request may take longer, restart or not: a stall of a second is a failure.
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// Each restart, from its trigger to its reply (the new generation READY; at least
/// SPAN_FLOOR), must see at least this many requests complete inside it. The load
/// completes several requests per millisecond, so this leaves a wide margin for a
/// slow machine while a node that stops answering cannot meet it.
const MIN_IN_RESTART: u64 = 3;
/// A restart span lasts at least this long: on two shared cores a few process
/// spawns in a row can starve every client for tens of milliseconds (seen in the
/// torture test), the scheduler's gap rather than the node's.
const SPAN_FLOOR: Duration = Duration::from_millis(250);
/// The test-only fault the second test injects (see agent/src/worker.rs).
const STALL_VAR: &str = "FLEET_TEST_ACCEPT_STALL_MS";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_back_to_back_restarts_under_load_lose_no_request() {
    let run = restarts_under_load(RESTARTS, AgentOpts::default()).await;
    // Sized to the load that ran: at least 1 request per millisecond of restarts.
    let min_requests = (run.took.as_millis() as u64).max(500);
    run.report.assert_zero_loss(&run.rules(min_requests));
    assert_eq!(run.agent.generation().await, run.generation);
    assert_eq!(
        run.agent.worker_pid().await,
        run.worker,
        "the last generation serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_with_a_reuseport_group_of_four_sockets_lose_no_request() {
    let run = restarts_under_load(
        30,
        AgentOpts {
            args: vec!["--sockets-per-port".into(), "4".into()],
            ..AgentOpts::default()
        },
    )
    .await;
    let min_requests = (run.took.as_millis() as u64).max(500);
    run.report.assert_zero_loss(&run.rules(min_requests));
    // Four sockets, one address: the node shows it once.
    let status = fleet_tests::fleet::agent_status(&run.agent).await;
    assert_eq!(status.listeners.len(), 1, "{:?}", status.listeners);
    assert_eq!(
        run.agent
            .count_log("http server 'default' reloaded listening on"),
        30
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zero_loss_checks_catch_a_new_generation_that_stalls_after_ready() {
    let run = restarts_under_load(
        3,
        AgentOpts {
            env: vec![(STALL_VAR.into(), "3000".into())],
            ..AgentOpts::default()
        },
    )
    .await;
    assert_eq!(
        run.agent
            .count_log(&format!("{STALL_VAR}: READY=1 sent, not accepting for 3s")),
        3,
        "every restarted generation stalled"
    );
    let error = run
        .report
        .check_zero_loss(&run.rules(100))
        .expect_err("a 3 s stall after READY must fail the zero-loss checks");
    eprintln!("the checks caught the stall:\n{error}");
    assert!(
        error.contains("latency bound exceeded") && error.contains("the server stalled"),
        "{error}"
    );
    let max = run.report.max_latency().unwrap_or_default();
    assert!(max >= Duration::from_millis(2500), "max latency {max:?}");
}

/// A node restarted `restarts` times back to back under load, with its figures.
struct Run {
    agent: Agent,
    report: LoadReport,
    spans: Vec<Span>,
    took: Duration,
    /// The generation and worker PID of the last restart.
    generation: u64,
    worker: u32,
}

impl Run {
    fn rules(&self, min_requests: u64) -> ZeroLoss {
        ZeroLoss {
            min_requests,
            spans: self.spans.clone(),
            min_in_span: MIN_IN_RESTART,
            max_latency: MAX_LATENCY,
        }
    }
}

async fn restarts_under_load(restarts: u64, opts: AgentOpts) -> Run {
    let agent = Agent::start(opts).await;
    let load = Load::start_with(
        LoadSpec {
            target: agent.app(),
            path: "/".into(),
            keepalive_connections: 8,
            fresh_connections: 8,
            max_requests: 2_000_000,
            max_duration: Duration::from_secs(120),
            ..Default::default()
        },
        LoadOptions {
            // Far above the latency bound, so that a stall shows as a latency.
            request_timeout: Duration::from_secs(10),
            ..LoadOptions::default()
        },
    );
    load.wait_progress(100, Duration::from_secs(20)).await;

    let BackToBack {
        spans,
        took,
        generation,
        worker,
    } = agent
        .restart_back_to_back(
            restarts,
            "back-to-back restart",
            RESTARTS_DEADLINE,
            SPAN_FLOOR,
        )
        .await;
    // The last old workers drain while the load still runs.
    load.wait_progress(200, Duration::from_secs(20)).await;
    let report = load.finish().await;

    let mut inside: Vec<u64> = spans
        .iter()
        .map(|s| report.completed_in(s.from, s.to))
        .collect();
    inside.sort_unstable();
    let mut lengths: Vec<Duration> = spans.iter().map(|s| s.to - s.from).collect();
    lengths.sort_unstable();
    eprintln!(
        "{restarts} restarts in {:.1}s under load: {}\nrequests completed inside a restart: \
         min {} median {}; a restart span lasted median {:?}, max {:?}",
        took.as_secs_f64(),
        report.summary(),
        inside[0],
        inside[inside.len() / 2],
        lengths[lengths.len() / 2],
        lengths[lengths.len() - 1],
    );
    Run {
        agent,
        report,
        spans,
        took,
        generation,
        worker,
    }
}
