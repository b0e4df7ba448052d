//! The load generator must see every failure a restart can cause, must not count a
//! server's polite `Connection: close` as one, and must follow one rule for a close
//! before the write. Each test runs a scripted server that misbehaves in one way.
//! The HTTP/2 rules are proven in `tests/http2.rs`.

mod http2;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// What a scripted server does with the n-th request (1-based) on a connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Answer {
    Ok,
    OkAndClose,
    Status503,
    /// Read the request, then close without answering.
    Drop,
    /// Answer 200 (no `Connection: close`), then close the idle connection after
    /// 10 ms without reading anything more.
    OkThenCloseIdle,
    /// Headers promising 100 bytes, 10 of them, then a reset.
    CutBody,
    /// Read the request and never answer (the connection stays open).
    Hang,
    /// Sleep 300 ms, then answer 200.
    Slow,
}

/// A server that closes every connection as soon as it accepts it.
async fn closing_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    addr
}

async fn scripted_server(script: fn(u64) -> Answer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, script));
        }
    });
    addr
}

async fn serve(mut stream: TcpStream, script: fn(u64) -> Answer) {
    let mut buf = Vec::new();
    for n in 1.. {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        buf.drain(..end);
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        let response: &[u8] = match script(n) {
            Answer::Ok | Answer::OkThenCloseIdle => ok,
            Answer::OkAndClose => {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
            }
            Answer::Status503 => b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            Answer::Drop => return,
            Answer::CutBody => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
            Answer::Hang => {
                // Hold the connection open until the client gives up on it.
                let _ = stream.read(&mut [0u8; 1]).await;
                return;
            }
            Answer::Slow => {
                // The misbehaviour itself (a slow server), not a wait for an event.
                tokio::time::sleep(Duration::from_millis(300)).await;
                ok
            }
        };
        if stream.write_all(response).await.is_err() {
            return;
        }
        match script(n) {
            Answer::OkAndClose => return,
            Answer::OkThenCloseIdle => {
                // The misbehaviour: keep the idle connection a moment, then close it
                // unannounced (the client notices it before its next write).
                tokio::time::sleep(Duration::from_millis(10)).await;
                return;
            }
            Answer::CutBody => {
                // SO_LINGER 0: the close is a reset, mid-body. (Deprecated because a
                // non-zero linger blocks the thread on drop; zero does not.)
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                return;
            }
            _ => {}
        }
    }
}

fn spec(target: SocketAddr, keepalive: usize, fresh: usize) -> LoadSpec {
    LoadSpec {
        target,
        keepalive_connections: keepalive,
        fresh_connections: fresh,
        max_requests: 200,
        max_duration: Duration::from_secs(10),
        ..Default::default()
    }
}

fn kinds(report: &LoadReport) -> Vec<&'static str> {
    report.failures_by_kind().into_keys().collect()
}

impl Load {
    /// Wait until the clients ran out of requests (30 s at most), then report.
    async fn finish_when_done(self) -> LoadReport {
        tokio::time::timeout(Duration::from_secs(30), self.collect())
            .await
            .expect("the load did not end by its bounds")
    }
}

#[tokio::test]
async fn a_request_on_a_reused_connection_answered_by_eof_is_a_failure_never_resent() {
    let addr = scripted_server(|n| if n == 3 { Answer::Drop } else { Answer::Ok }).await;
    let report = Load::start(spec(addr, 1, 0)).finish_when_done().await;
    assert_eq!(report.requests, 200);
    assert!(report.failed > 0, "{}", report.summary());
    assert_eq!(kinds(&report), vec!["reused-conn-closed"]);
    assert!(
        report.records.iter().all(|r| r.attempts == 1),
        "a written request is never re-sent"
    );
}

#[tokio::test]
async fn a_request_written_on_a_new_connection_and_answered_by_eof_is_a_reset() {
    let addr = scripted_server(|_| Answer::Drop).await;
    let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
    assert_eq!(
        (report.requests, report.ok),
        (200, 0),
        "{}",
        report.summary()
    );
    assert_eq!(kinds(&report), vec!["reset"], "{}", report.summary());
    assert!(
        report.records.iter().all(|r| r.attempts == 1),
        "a written request is never re-sent"
    );
}

#[tokio::test]
async fn a_body_cut_by_a_reset_is_a_failure() {
    let addr = scripted_server(|_| Answer::CutBody).await;
    let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
    assert_eq!(
        (report.requests, report.ok),
        (200, 0),
        "{}",
        report.summary()
    );
    assert_eq!(kinds(&report), vec!["reset"], "{}", report.summary());
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.message.contains("body cut short")),
        "{:?}",
        report.failures
    );
}

#[tokio::test]
async fn a_request_without_an_answer_times_out() {
    let addr = scripted_server(|_| Answer::Hang).await;
    let options = LoadOptions {
        request_timeout: Duration::from_millis(200),
        ..LoadOptions::default()
    };
    let report = Load::start_with(
        LoadSpec {
            max_requests: 6,
            ..spec(addr, 1, 1)
        },
        options,
    )
    .finish_when_done()
    .await;
    assert_eq!((report.requests, report.ok), (6, 0), "{}", report.summary());
    assert_eq!(kinds(&report), vec!["timeout"]);
    for r in &report.records {
        assert!(
            r.latency >= Duration::from_millis(200) && r.latency < Duration::from_secs(2),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn a_non_2xx_status_is_a_failure() {
    let addr = scripted_server(|_| Answer::Status503).await;
    let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
    assert_eq!(report.failed, report.requests);
    assert_eq!(kinds(&report), vec!["status"]);
}

#[tokio::test]
async fn a_refused_connection_is_a_failure() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let report = Load::start(spec(addr, 1, 1)).finish_when_done().await;
    assert!(report.failed > 0 && report.ok == 0, "{}", report.summary());
    assert_eq!(kinds(&report), vec!["connect"]);
}

#[tokio::test]
async fn connection_close_is_honoured_and_counted_as_announced() {
    let addr = scripted_server(|n| {
        if n == 2 {
            Answer::OkAndClose
        } else {
            Answer::Ok
        }
    })
    .await;
    let report = Load::start(spec(addr, 2, 2)).finish_when_done().await;
    assert_eq!(
        (report.requests, report.failed),
        (200, 0),
        "{:?}",
        report.failures
    );
    // Two keep-alive clients share the 200 requests; every second one on a
    // connection is announced as its last.
    assert!(report.announced_closes >= 40, "{}", report.summary());
    assert_eq!(
        report.closed_before_write,
        ClosedBeforeWrite::default(),
        "{}",
        report.summary()
    );
    assert_eq!(report.unsent_retries, 0);
}

#[tokio::test]
async fn an_idle_connection_closed_before_the_write_is_resent_and_counted_as_unannounced() {
    // Open loop at 20 req/s on one keep-alive client: the server closes the idle
    // connection 10 ms after each response, well before the next request (50 ms).
    let addr = scripted_server(|_| Answer::OkThenCloseIdle).await;
    let options = LoadOptions {
        pacing: Pacing::Open { per_second: 20.0 },
        ..LoadOptions::default()
    };
    let report = Load::start_with(
        LoadSpec {
            max_requests: 8,
            ..spec(addr, 1, 0)
        },
        options,
    )
    .finish_when_done()
    .await;
    assert_eq!(
        (report.requests, report.failed),
        (8, 0),
        "{:?}",
        report.failures
    );
    assert_eq!(
        report.closed_before_write,
        ClosedBeforeWrite { reused: 7, new: 0 },
        "{}",
        report.summary()
    );
    assert_eq!((report.unsent_retries, report.announced_closes), (7, 0));
    assert_eq!(report.reconnects, 7);
    let attempts: Vec<u32> = report.records.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, [1, 2, 2, 2, 2, 2, 2, 2]);
}

#[tokio::test]
async fn a_new_connection_closed_at_once_follows_the_same_bounded_rule_in_every_client() {
    let addr = closing_server().await;
    let report = Load::start(spec(addr, 2, 2)).finish_when_done().await;
    assert_eq!(
        (report.requests, report.ok),
        (200, 0),
        "{}",
        report.summary()
    );
    // Whether the close is seen before or after the write is a race the server wins
    // or loses; either way it is a failure of one of these kinds, never a close on
    // a "reused" connection, and re-sends stop at MAX_ATTEMPTS.
    for kind in kinds(&report) {
        assert!(
            ["reset", "closed-before-write"].contains(&kind),
            "{}",
            report.summary()
        );
    }
    assert_eq!(report.closed_before_write.reused, 0, "{}", report.summary());
    for r in &report.records {
        assert!((1..=MAX_ATTEMPTS).contains(&r.attempts), "{r:?}");
        if r.failure == Some("closed-before-write") {
            assert_eq!(r.attempts, MAX_ATTEMPTS, "{r:?}");
        }
    }
    // Each close before the write was either re-sent or ended its request.
    let gave_up = report
        .failures_by_kind()
        .get("closed-before-write")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        report.closed_before_write.new,
        report.unsent_retries + gave_up
    );
    let resent: u64 = report
        .records
        .iter()
        .map(|r| u64::from(r.attempts - 1))
        .sum();
    assert_eq!(resent, report.unsent_retries);
}

#[tokio::test]
async fn re_sends_end_with_the_time_bound() {
    let addr = closing_server().await;
    let started = Instant::now();
    let load = Load::start(LoadSpec {
        max_requests: u64::MAX,
        max_duration: Duration::from_millis(300),
        ..spec(addr, 4, 4)
    });
    let report = load.finish_when_done().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{}",
        report.summary()
    );
    assert!(
        report.requests > 0 && report.ok == 0,
        "{}",
        report.summary()
    );
}

#[tokio::test]
async fn open_loop_shows_a_stall_on_every_request_scheduled_during_it() {
    // One keep-alive client at 50 req/s; the 3rd answer takes 300 ms. Closed loop
    // would show one slow request; open loop shows the ~15 scheduled behind it.
    let addr = scripted_server(|n| if n == 3 { Answer::Slow } else { Answer::Ok }).await;
    let options = LoadOptions {
        pacing: Pacing::Open { per_second: 50.0 },
        ..LoadOptions::default()
    };
    let report = Load::start_with(
        LoadSpec {
            max_requests: 30,
            ..spec(addr, 1, 0)
        },
        options,
    )
    .finish_when_done()
    .await;
    assert_eq!(
        (report.requests, report.failed),
        (30, 0),
        "{}",
        report.summary()
    );
    let slow = report
        .records
        .iter()
        .filter(|r| r.latency >= Duration::from_millis(100))
        .count();
    assert!(slow >= 5, "{slow} slow requests: {}", report.summary());
    // The schedule kept its rate: 30 requests at 50/s take about 0.6 s.
    assert!(
        report.elapsed >= Duration::from_millis(550),
        "{}",
        report.summary()
    );

    let closed = scripted_server(|n| if n == 3 { Answer::Slow } else { Answer::Ok }).await;
    let report = Load::start(LoadSpec {
        max_requests: 30,
        ..spec(closed, 1, 0)
    })
    .finish_when_done()
    .await;
    let slow = report
        .records
        .iter()
        .filter(|r| r.latency >= Duration::from_millis(100))
        .count();
    assert_eq!(slow, 1, "{}", report.summary());
}

fn record(start: Instant, at_ms: u64, latency_ms: u64) -> RequestRecord {
    RequestRecord {
        start: start + Duration::from_millis(at_ms),
        latency: Duration::from_millis(latency_ms),
        ok: true,
        failure: None,
        attempts: 1,
    }
}

#[test]
fn the_zero_loss_check_names_a_stall_and_an_empty_span() {
    let t = Instant::now();
    // A request every 10 ms for a second, except that nothing completes between
    // 400 and 700 ms and one request takes 350 ms.
    let mut records: Vec<RequestRecord> = (0..100)
        .filter(|i| !(40..70).contains(i))
        .map(|i| record(t, i * 10, 2))
        .collect();
    records.push(record(t, 380, 350));
    let report = LoadReport {
        requests: records.len() as u64,
        ok: records.len() as u64,
        records,
        ..LoadReport::default()
    };
    let span = |label: &str, from: u64, to: u64| Span {
        label: label.into(),
        from: t + Duration::from_millis(from),
        to: t + Duration::from_millis(to),
    };
    assert_eq!(report.completed_in(t, t + Duration::from_millis(95)), 10);
    assert_eq!(report.max_latency(), Some(Duration::from_millis(350)));
    let mut rules = ZeroLoss {
        min_requests: 50,
        spans: vec![span("restart 1", 100, 200), span("restart 2", 450, 600)],
        min_in_span: 3,
        max_latency: Duration::from_millis(200),
    };
    let error = report.check_zero_loss(&rules).unwrap_err();
    assert!(
        error.contains("latency bound exceeded") && error.contains("stalled"),
        "{error}"
    );
    assert!(
        error.contains("restart 2: 0 in 150.0ms") && !error.contains("restart 1:"),
        "{error}"
    );
    rules.max_latency = Duration::from_secs(1);
    rules.spans.pop();
    report.check_zero_loss(&rules).unwrap();
    rules.min_requests = 1000;
    assert!(
        report
            .check_zero_loss(&rules)
            .unwrap_err()
            .contains("only 71 requests")
    );
}

#[test]
fn percentiles_use_the_nearest_rank() {
    let start = Instant::now();
    let report = LoadReport {
        records: (1..=100)
            .map(|ms| RequestRecord {
                ok: ms % 2 == 0,
                failure: (ms % 2 != 0).then_some("status"),
                ..record(start, 0, ms)
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(
        report.percentile(50.0, |_| true),
        Some(Duration::from_millis(50))
    );
    assert_eq!(
        report.percentile(99.0, |_| true),
        Some(Duration::from_millis(99))
    );
    assert_eq!(
        report.percentile(100.0, |_| true),
        Some(Duration::from_millis(100))
    );
    assert_eq!(report.max(|r| !r.ok), Some(Duration::from_millis(99)));
    assert_eq!(report.percentile(50.0, |_| false), None);
    assert_eq!(report.failures_by_kind().get("status"), Some(&50));
}
