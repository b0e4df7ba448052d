//! A thousand restarts under load (HTTP/1.1 keep-alive and new-connection clients,
//! and HTTP/2 streams), as fast as the node takes them, one at a time:
//! one in ten into a new executable path, one in twenty into an executable that
//! fails (half exit at start, half hang without ever sending READY=1). Not one
//! request may fail; every failed restart must be reported on every surface (the
//! Restart reply, a FAILED event on Watch, the log, the metrics); afterwards the
//! supervisor holds the same file descriptors, threads and (within a small margin)
//! memory as before, and no zombie or stray process is left — the hung generations
//! were killed, not abandoned.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_proto::v1::{Event, Outcome, Phase, RestartRequest, RestartResponse};
use fleet_tests::footprint::{Footprint, fd_targets};
use fleet_tests::harness::{children_of, copy_agent_binary, eventually, install_fixture, metric};
use fleet_tests::{Agent, AgentOpts, Load, LoadOptions, LoadSpec, Span, ZeroLoss};
use tokio::sync::mpsc;

const RESTARTS: u32 = 1000;
/// Restart `i` goes into a new executable path when `i % NEW_EXE_EVERY == 5`…
const NEW_EXE_EVERY: u32 = 10;
/// …and into a failing executable when `i % BAD_EVERY == 0` (exits / hangs, in turn).
const BAD_EVERY: u32 = 20;
/// A hung generation is given this long to send READY=1 (per call), then killed.
const HANG_READY_TIMEOUT_MS: u64 = 300;
/// The footprint baseline is taken after this many restarts, which include every
/// kind: what is allocated once (a runtime's lazily started parts, the digest cache
/// of each executable) is then in the baseline, and what grows per restart is not.
const WARMUP: u32 = 40;
/// Bound on the thousand restarts (a debug build on two cores, other tests running:
/// 34 s measured alone on such a machine, so over 4 times that). It must fire well
/// before the runner kills the test, so that this test's own message is what a
/// person sees: .config/nextest.toml gives this test 360 s (start and load warm-up
/// ≤ 40 s, this deadline, one last call ≤ the 30 s ready timeout, then the checks'
/// own bounded waits).
const DEADLINE: Duration = Duration::from_secs(150);
/// The supervisor's resident memory may grow by this much over the run (allocator
/// noise: a few pages of heap that were touched once and are kept for reuse).
const RSS_MARGIN: u64 = 1024 * 1024;
/// No request may take longer (a stall of a second is a failure, not a slow pass).
const MAX_LATENCY: Duration = Duration::from_secs(1);
/// Requests that must complete inside each restart span: from the trigger to the
/// reply, and at least SPAN_FLOOR long. A restart takes ~10 ms here (300 ms for a
/// hung one) and the load completes several requests per millisecond; but on two
/// shared cores a few process spawns in a row can starve every client for tens of
/// milliseconds (measured: ~80 ms without a completion across 9 restarts of 5-15 ms),
/// which is the scheduler's gap, not the node's. A stall of the node is caught by
/// this and by MAX_LATENCY.
const MIN_IN_RESTART: u64 = 3;
const SPAN_FLOOR: Duration = Duration::from_millis(250);
/// HTTP/2 clients in the mix: connections, and concurrent streams on each.
const H2_CONNECTIONS: usize = 2;
const H2_STREAMS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// Restart the current executable.
    Same,
    /// Restart into another path (a hard link of the agent binary, as a new
    /// release copied in beside the old one would be).
    NewExe(PathBuf),
    /// An executable that writes a reason to stderr and exits with status 3.
    ExitsAtStart,
    /// An executable that never sends READY=1.
    Hangs,
}

fn kind_of(i: u32, releases: &[PathBuf], exits: &Path, hangs: &Path) -> (Kind, Option<PathBuf>) {
    if i.is_multiple_of(BAD_EVERY) {
        if (i / BAD_EVERY) % 2 == 1 {
            (Kind::ExitsAtStart, Some(exits.to_path_buf()))
        } else {
            (Kind::Hangs, Some(hangs.to_path_buf()))
        }
    } else if i % NEW_EXE_EVERY == 5 {
        let exe = releases[(i / NEW_EXE_EVERY) as usize % releases.len()].clone();
        (Kind::NewExe(exe.clone()), Some(exe))
    } else {
        (Kind::Same, None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_restarts_under_load_lose_no_request_and_leak_nothing() {
    let tag = format!("torture-{}-{}", std::process::id(), unique());
    let releases = tempfile::Builder::new()
        .prefix("fleet-torture-releases")
        .tempdir()
        .expect("create a temp dir");
    // One copy of the agent, and a hard link to it per new-exe restart, all made
    // before the agent starts: a new path each time, but one inode, so the agent
    // hashes it once (its digest cache is keyed by inode, size and times).
    let copy = copy_agent_binary(releases.path(), "fleet-agent-release");
    let links: Vec<PathBuf> = (0..RESTARTS / NEW_EXE_EVERY)
        .map(|n| {
            let link = releases.path().join(format!("fleet-agent-r{n}"));
            std::fs::hard_link(&copy, &link).expect("hard-link the agent binary");
            std::fs::canonicalize(link).expect("canonicalize")
        })
        .collect();
    let exits = install_fixture(releases.path(), "exit3.sh");
    let hangs = install_fixture(releases.path(), "never_ready.sh");

    let agent = Agent::start(AgentOpts {
        env: vec![("FLEET_TORTURE_TAG".into(), tag.clone().into())],
        ..AgentOpts::default()
            .arg("--allowed-exe-dir")
            .arg(releases.path())
    })
    .await;
    let supervisor = agent.pid();
    let mut grpc = agent.grpc().await;
    let (events, mut event_rx) = mpsc::unbounded_channel::<Event>();
    let mut watch = agent.watch().await;
    let watcher = tokio::spawn(async move {
        // Every event, until the stream ends (aborted at the end of the test).
        loop {
            let event = watch.next(Duration::from_secs(3600)).await;
            if events.send(event).is_err() {
                break;
            }
        }
    });
    // Before any HTTP request to the control endpoint: its connection would count.
    let before_any = footprint(supervisor);
    let generation_at_start = agent.generation().await;

    let load = Load::start_with(
        LoadSpec {
            target: agent.app(),
            path: "/".into(),
            keepalive_connections: 4,
            fresh_connections: 4,
            // HTTP/2 beside HTTP/1.1: every restart also drains streams with GOAWAY.
            h2_connections: H2_CONNECTIONS,
            h2_streams: H2_STREAMS,
            max_requests: 20_000_000,
            max_duration: DEADLINE + Duration::from_secs(60),
            ..Default::default()
        },
        LoadOptions {
            // Far above the latency bound, so that a stall shows as a latency.
            request_timeout: Duration::from_secs(10),
            ..LoadOptions::default()
        },
    );
    load.wait_progress(100, Duration::from_secs(20)).await;

    let started = Instant::now();
    let mut baseline = None;
    let mut generation = generation_at_start;
    let (mut succeeded, mut failed) = (0u32, 0u32);
    let mut failed_pids = Vec::new();
    let mut took_each = Vec::new();
    let mut spans = Vec::new();
    let mut worker = agent.worker_pid().await;
    let mut pids = vec![worker];
    for i in 1..=RESTARTS {
        let (kind, exe) = kind_of(i, &links, &exits, &hangs);
        let request = RestartRequest {
            exe: exe.map(|e| e.display().to_string()).unwrap_or_default(),
            reason: format!("torture {i}/{RESTARTS} ({kind:?})"),
            ready_timeout_ms: if kind == Kind::Hangs {
                HANG_READY_TIMEOUT_MS
            } else {
                0
            },
            ..Default::default()
        };
        let call = Instant::now();
        let response = grpc
            .restart(agent.request(request))
            .await
            .unwrap_or_else(|status| agent.fail(&format!("restart {i} ({kind:?}): {status}")))
            .into_inner();
        spans.push(Span {
            label: format!("restart {i} ({kind:?})"),
            from: call,
            to: Instant::now().max(call + SPAN_FLOOR),
        });
        check(&agent, i, &kind, &response, generation);
        if response.outcome() == Outcome::Succeeded {
            // The restart really happened: the serving worker was replaced by a
            // process never seen before.
            if response.old_pid != worker || pids.contains(&response.new_pid) {
                agent.fail(&format!(
                    "restart {i} ({kind:?}): expected pid {worker} replaced by a new one: {response:?}"
                ));
            }
            worker = response.new_pid;
            pids.push(worker);
            took_each.push(call.elapsed());
            succeeded += 1;
            generation = response.generation;
        } else {
            failed += 1;
            failed_pids.push(response.new_pid);
        }
        if i == WARMUP {
            baseline = Some(quiet_footprint(&agent, None).await);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {i} restarts in {DEADLINE:?}"
        );
    }
    let took = started.elapsed();
    // The last old workers drain while the load still runs.
    load.wait_progress(200, Duration::from_secs(20)).await;
    let report = load.finish().await;
    eprintln!(
        "{RESTARTS} restarts ({succeeded} succeeded, {failed} failed as intended) in {:.1} s \
         ({:.1} ms each) under load: {}",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / f64::from(RESTARTS),
        report.summary()
    );
    took_each.sort_unstable();
    let at = |q: usize| took_each[(took_each.len() * q / 100).min(took_each.len() - 1)];
    eprintln!(
        "a successful Restart call took: median {:?}, p90 {:?}, max {:?}",
        at(50),
        at(90),
        at(100)
    );
    // Sized to the load that ran: at least 1 request per millisecond of restarts.
    report.assert_zero_loss(&ZeroLoss {
        min_requests: (took.as_millis() as u64).max(1000),
        spans,
        min_in_span: MIN_IN_RESTART,
        max_latency: MAX_LATENCY,
    });
    let bad = RESTARTS / BAD_EVERY;
    assert_eq!((succeeded, failed), (RESTARTS - bad, bad));
    assert_eq!(
        agent.generation().await,
        generation,
        "the generation of the last successful restart serves"
    );

    // Nothing left behind: the serving worker is the supervisor's only child (no
    // zombie, no old generation), and no other process carries this run's tag — so
    // every hung generation was killed, and nothing it could have started survives.
    let baseline = baseline.expect("taken during the run");
    let after = quiet_footprint(&agent, Some(baseline.0.fds)).await;
    assert_eq!(
        agent.worker_pid().await,
        worker,
        "the last generation serves"
    );
    assert_eq!(
        children_of(supervisor),
        vec![worker],
        "the supervisor's children"
    );
    let mut tagged = tagged_processes(&tag);
    tagged.sort_unstable();
    let mut expected = vec![supervisor, worker];
    expected.sort_unstable();
    assert_eq!(
        tagged, expected,
        "processes of this run (the failed generations were {failed_pids:?})"
    );

    // Every failed restart was reported: the replies (counted above), one FAILED
    // event each, one log line each, the metrics.
    let mut phases = Vec::new();
    eventually(Duration::from_secs(20), "every DRAINED event", async || {
        while let Ok(event) = event_rx.try_recv() {
            phases.push(event.phase());
        }
        let drained = phases.iter().filter(|p| **p == Phase::Drained).count();
        if drained == succeeded as usize {
            Ok(())
        } else {
            Err(format!("{drained} DRAINED events of {succeeded}"))
        }
    })
    .await;
    watcher.abort();
    let count = |phase: Phase| phases.iter().filter(|p| **p == phase).count();
    assert_eq!(count(Phase::Failed), bad as usize, "FAILED events");
    assert_eq!(count(Phase::Ready), succeeded as usize, "READY events");
    assert_eq!(count(Phase::Reverting) + count(Phase::WorkerExited), 0);
    assert_eq!(
        agent.count_log("restart failed:"),
        bad as usize,
        "log lines"
    );
    let metrics = agent.admin("/metrics").await.text();
    let restarts = |outcome| {
        metric(
            &metrics,
            "fleet_agent_restarts_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(restarts("failed"), Some(f64::from(bad)), "{metrics}");
    assert_eq!(
        restarts("succeeded"),
        Some(f64::from(succeeded)),
        "{metrics}"
    );

    // The same footprint after as before.
    eprintln!(
        "supervisor footprint: {before_any} before any restart, {} after {WARMUP} restarts, \
         {} after {RESTARTS}",
        baseline.0, after.0
    );
    assert_eq!(
        after.0.fds,
        baseline.0.fds,
        "open fds after {WARMUP} restarts:\n  {}\nafter {RESTARTS}:\n  {}",
        baseline.1.join("\n  "),
        after.1.join("\n  ")
    );
    assert_eq!(after.0.threads, baseline.0.threads, "threads");
    assert!(
        after.0.rss <= baseline.0.rss + RSS_MARGIN,
        "RSS grew from {} kB to {} kB",
        baseline.0.rss / 1024,
        after.0.rss / 1024
    );
}

/// Checks one Restart reply against what the restart was meant to do.
fn check(agent: &Agent, i: u32, kind: &Kind, response: &RestartResponse, generation: u64) {
    let wrong =
        |what: &str| -> ! { agent.fail(&format!("restart {i} ({kind:?}): {what}: {response:?}")) };
    match kind {
        Kind::Same | Kind::NewExe(_) => {
            // Generation numbers count spawns: a failed generation used one too.
            if response.outcome() != Outcome::Succeeded || response.generation <= generation {
                wrong("expected a new generation to serve");
            }
            if let Kind::NewExe(exe) = kind
                && response.exe.as_ref().map(|e| Path::new(&e.path)) != Some(exe.as_path())
            {
                wrong("expected the new executable");
            }
        }
        Kind::ExitsAtStart | Kind::Hangs => {
            let (reason, stderr) = match kind {
                Kind::ExitsAtStart => ("exited with status 3", "cannot open /etc/app/config.toml"),
                _ => ("did not become ready", "warming caches"),
            };
            if response.outcome() != Outcome::Failed
                || response.generation != generation
                || !response.reason.contains(reason)
                || !response.stderr_tail.iter().any(|l| l.contains(stderr))
            {
                wrong(&format!(
                    "expected a failure saying {reason:?} with {stderr:?} on stderr, the old generation serving"
                ));
            }
        }
    }
}

/// The supervisor's footprint once no old generation is left (its drains and the
/// failed generations' pipes are closed), with what its fds point to. With `fds`,
/// also waits (bounded) until it holds that many: a control connection the test
/// closed a moment ago may still be open on the supervisor's side.
async fn quiet_footprint(agent: &Agent, fds: Option<usize>) -> (Footprint, Vec<String>) {
    let supervisor = agent.pid();
    eventually(
        Duration::from_secs(30),
        "the supervisor to have one child",
        async || match children_of(supervisor) {
            children if children.len() == 1 => Ok(()),
            children => Err(format!("children: {children:?}")),
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = footprint(supervisor);
        if fds.is_none_or(|n| now.fds == n) || Instant::now() >= deadline {
            return (now, fd_targets(supervisor));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn footprint(pid: u32) -> Footprint {
    Footprint::of(pid).unwrap_or_else(|| panic!("/proc/{pid} is gone"))
}

/// Every process whose environment carries `FLEET_TORTURE_TAG=tag` (the supervisor
/// and everything it started inherit it).
fn tagged_processes(tag: &str) -> Vec<u32> {
    let needle = format!("FLEET_TORTURE_TAG={tag}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

/// A number unlike any other test run's (for the tag).
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
