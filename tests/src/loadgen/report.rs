//! What a load run measured, and the checks a zero-loss test makes on it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Pacing;

/// One request as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord {
    /// When its latency starts: the first attempt (closed loop: before connecting,
    /// for fresh clients), or the scheduled time (open loop).
    pub start: Instant,
    /// Until the whole body was read, or until the request failed.
    pub latency: Duration,
    /// 2xx status and the whole body read.
    pub ok: bool,
    /// How it failed (a [`Failure::kind`]); `None` when it succeeded.
    pub failure: Option<&'static str>,
    /// Attempts: 1, plus one per re-send (a close before the write; for HTTP/2 a
    /// request the server did not process).
    pub attempts: u32,
}

impl RequestRecord {
    /// When the request ended (answered or failed).
    pub fn end(&self) -> Instant {
        self.start + self.latency
    }
}

/// A failed request: what kind of failure and the error as text.
#[derive(Debug, Clone)]
pub struct Failure {
    /// One of "connect", "reused-conn-closed", "reset", "timeout", "status",
    /// "closed-before-write", "other"; for HTTP/2 also "tls", "stream-reset" (a
    /// stream reset or ended by the server once it was processing it), and
    /// "refused-stream", "above-goaway", "not-sent" (a request the server did not
    /// process that could not be re-sent: out of attempts or time).
    pub kind: &'static str,
    /// The error, with the client and connection it happened on.
    pub message: String,
}

/// Connections the server closed without announcing it, noticed before a request
/// was written on them (the request then went out on a new connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClosedBeforeWrite {
    /// On a keep-alive connection that had already served requests (closed idle).
    pub reused: u64,
    /// On a brand-new connection, before its first request (any client).
    pub new: u64,
}

impl ClosedBeforeWrite {
    pub fn total(&self) -> u64 {
        self.reused + self.new
    }
}

/// What the HTTP/2 clients did that a correct client may do without a failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct H2Counts {
    /// Connections given up for a new one because the server sent GOAWAY on them.
    pub after_goaway: u64,
    /// Connections given up for a new one because they closed without a GOAWAY.
    pub after_close: u64,
    /// Requests re-sent because the server refused their stream (RST_STREAM
    /// REFUSED_STREAM before any response).
    pub refused_stream: u64,
    /// Requests re-sent because their stream was above the last stream id of the
    /// server's GOAWAY (or could not be opened after it): not processed.
    pub above_goaway: u64,
    /// Requests re-sent because they were never sent: the connection took no more
    /// requests (hyper handed the request back).
    pub not_sent: u64,
}

impl H2Counts {
    /// Every re-send.
    pub fn resent(&self) -> u64 {
        self.refused_stream + self.above_goaway + self.not_sent
    }
}

/// The result of a load run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests that were attempted and ended (ok + failed).
    pub requests: u64,
    /// Requests answered with 2xx and a complete body.
    pub ok: u64,
    /// Every other request.
    pub failed: u64,
    /// The first 100 failures, in the order they happened (counts by kind:
    /// [`LoadReport::failures_by_kind`]).
    pub failures: Vec<Failure>,
    /// Every request, in start order (bounded by `max_requests`).
    pub records: Vec<RequestRecord>,
    /// From the start of the load until every client stopped.
    pub elapsed: Duration,
    /// Responses with `Connection: close` that a keep-alive client honoured by
    /// opening a new connection.
    pub announced_closes: u64,
    /// Unannounced closes noticed before the write, by kind.
    pub closed_before_write: ClosedBeforeWrite,
    /// `announced_closes + closed_before_write.total()` (kept for the benchmarks).
    pub reconnects: u64,
    /// Re-sends after a close before the write (each within [`super::MAX_ATTEMPTS`]).
    pub unsent_retries: u64,
    /// What the HTTP/2 clients re-sent and reconnected, by kind.
    pub h2: H2Counts,
    /// How the requests were paced.
    pub pacing: Pacing,
}

impl Default for LoadReport {
    fn default() -> Self {
        LoadReport {
            requests: 0,
            ok: 0,
            failed: 0,
            failures: Vec::new(),
            records: Vec::new(),
            elapsed: Duration::ZERO,
            announced_closes: 0,
            closed_before_write: ClosedBeforeWrite::default(),
            reconnects: 0,
            unsent_retries: 0,
            h2: H2Counts::default(),
            pacing: Pacing::Closed,
        }
    }
}

/// A stretch of time a zero-loss test cares about, e.g. one restart from its
/// trigger to its end.
#[derive(Debug, Clone)]
pub struct Span {
    pub label: String,
    pub from: Instant,
    pub to: Instant,
}

/// What a zero-loss test requires of a load run ([`LoadReport::check_zero_loss`]).
#[derive(Debug, Clone)]
pub struct ZeroLoss {
    /// At least this many requests ran, all of them successful.
    pub min_requests: u64,
    /// Each span saw at least `min_in_span` successful requests complete in it.
    pub spans: Vec<Span>,
    pub min_in_span: u64,
    /// No request (successful or not) took longer than this.
    pub max_latency: Duration,
}

impl LoadReport {
    /// The `p`-th percentile (`p` in 0..=100, e.g. 50.0, 99.0, 99.9) of the latency
    /// of the records that `keep` selects; `None` when none is selected.
    pub fn percentile(&self, p: f64, keep: impl Fn(&RequestRecord) -> bool) -> Option<Duration> {
        let mut latencies: Vec<Duration> = self
            .records
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.latency)
            .collect();
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let p = p.clamp(0.0, 100.0);
        // Nearest-rank: the smallest value with at least p% of the samples at or below it.
        let rank = ((p / 100.0) * latencies.len() as f64).ceil() as usize;
        Some(latencies[rank.clamp(1, latencies.len()) - 1])
    }

    /// The largest latency among the records that `keep` selects.
    pub fn max(&self, keep: impl Fn(&RequestRecord) -> bool) -> Option<Duration> {
        self.records
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.latency)
            .max()
    }

    /// The largest latency of any request, successful or not.
    pub fn max_latency(&self) -> Option<Duration> {
        self.max(|_| true)
    }

    /// Successful requests that completed (whole body read) within `[from, to]`.
    pub fn completed_in(&self, from: Instant, to: Instant) -> u64 {
        self.records
            .iter()
            .filter(|r| r.ok && (from..=to).contains(&r.end()))
            .count() as u64
    }

    /// Failed requests by kind, counted over every record.
    pub fn failures_by_kind(&self) -> BTreeMap<&'static str, u64> {
        let mut kinds = BTreeMap::new();
        for kind in self.records.iter().filter_map(|r| r.failure) {
            *kinds.entry(kind).or_default() += 1;
        }
        kinds
    }

    /// Completed requests per second over the whole run.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// Panic, listing the first failures, unless every request succeeded and at
    /// least `min_requests` ran. (Zero-loss tests use [`LoadReport::assert_zero_loss`],
    /// which also bounds latency and looks inside each restart.)
    pub fn assert_no_failures(&self, min_requests: u64) {
        let errors: Vec<String> = [self.failures_error(), self.count_error(min_requests)]
            .into_iter()
            .flatten()
            .collect();
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    /// Every way the run falls short of `rules`, one paragraph each; `Ok` with a
    /// line of figures when none does.
    pub fn check_zero_loss(&self, rules: &ZeroLoss) -> Result<String, String> {
        let mut errors: Vec<String> = [self.failures_error(), self.count_error(rules.min_requests)]
            .into_iter()
            .flatten()
            .collect();
        let max = self.max_latency().unwrap_or_default();
        if max > rules.max_latency {
            let slowest = self
                .records
                .iter()
                .max_by_key(|r| r.latency)
                .expect("a maximum");
            errors.push(format!(
                "latency bound exceeded: the slowest request took {} (p99.9 {}), over the bound of {}: \
                 the server stalled; it started {} into the load",
                ms(max),
                self.p(99.9),
                ms(rules.max_latency),
                ms(slowest.start.saturating_duration_since(self.origin())),
            ));
        }
        let mut thin = Vec::new();
        for span in &rules.spans {
            let n = self.completed_in(span.from, span.to);
            if n < rules.min_in_span {
                thin.push(format!(
                    "  {}: {n} in {} (from {} to {} into the load)",
                    span.label,
                    ms(span.to.saturating_duration_since(span.from)),
                    ms(span.from.saturating_duration_since(self.origin())),
                    ms(span.to.saturating_duration_since(self.origin())),
                ));
            }
        }
        if !thin.is_empty() {
            errors.push(format!(
                "{} of {} spans saw fewer than {} successful requests complete inside them \
                 (the server stalled or stopped answering during them):\n{}",
                thin.len(),
                rules.spans.len(),
                rules.min_in_span,
                thin.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
            ));
        }
        if errors.is_empty() {
            let inside: Vec<u64> = rules
                .spans
                .iter()
                .map(|s| self.completed_in(s.from, s.to))
                .collect();
            Ok(format!(
                "{}; inside each of {} spans: min {} requests",
                self.summary(),
                rules.spans.len(),
                inside.iter().min().map_or("-".into(), u64::to_string)
            ))
        } else {
            Err(format!("{}\n{}", errors.join("\n"), self.summary()))
        }
    }

    /// Panic with every shortfall unless the run meets `rules`; print the figures.
    pub fn assert_zero_loss(&self, rules: &ZeroLoss) {
        match self.check_zero_loss(rules) {
            Ok(figures) => eprintln!("zero loss: {figures}"),
            Err(errors) => panic!("{errors}"),
        }
    }

    /// A one-line summary for test output.
    pub fn summary(&self) -> String {
        let pacing = match self.pacing {
            Pacing::Closed => "closed loop".to_string(),
            Pacing::Open { per_second } => format!("open loop at {per_second:.0} req/s"),
        };
        let kinds: Vec<String> = self
            .failures_by_kind()
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        format!(
            "{} requests ({} ok, {} failed{}) in {:.1}s = {:.0} req/s ({pacing}); p50 {} p99 {} \
             p99.9 {} max {}; {} announced closes, {} closed before the write \
             ({} reused, {} new), {} re-sent{}",
            self.requests,
            self.ok,
            self.failed,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(": {}", kinds.join(", "))
            },
            self.elapsed.as_secs_f64(),
            self.rps(),
            self.p(50.0),
            self.p(99.0),
            self.p(99.9),
            self.p(100.0),
            self.announced_closes,
            self.closed_before_write.total(),
            self.closed_before_write.reused,
            self.closed_before_write.new,
            self.unsent_retries,
            self.h2_summary()
        )
    }

    fn h2_summary(&self) -> String {
        let h2 = &self.h2;
        if *h2 == H2Counts::default() {
            return String::new();
        }
        format!(
            "; HTTP/2: {} connections replaced after GOAWAY, {} after a close; re-sent {} \
             refused streams, {} above GOAWAY's last stream id, {} not sent",
            h2.after_goaway, h2.after_close, h2.refused_stream, h2.above_goaway, h2.not_sent
        )
    }

    fn p(&self, q: f64) -> String {
        self.percentile(q, |_| true).map_or_else(|| "-".into(), ms)
    }

    /// The earliest record's start, as the origin for times in messages.
    fn origin(&self) -> Instant {
        self.records
            .iter()
            .map(|r| r.start)
            .min()
            .unwrap_or_else(Instant::now)
    }

    fn failures_error(&self) -> Option<String> {
        (self.failed > 0).then(|| {
            let samples: Vec<String> = self
                .failures
                .iter()
                .take(20)
                .map(|f| format!("  [{}] {}", f.kind, f.message))
                .collect();
            format!(
                "{} of {} requests failed ({:?}); first failures:\n{}",
                self.failed,
                self.requests,
                self.failures_by_kind(),
                samples.join("\n")
            )
        })
    }

    fn count_error(&self, min_requests: u64) -> Option<String> {
        (self.requests < min_requests).then(|| {
            format!(
                "the load ran only {} requests (expected at least {min_requests}): {}",
                self.requests,
                self.summary()
            )
        })
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}
