//! Figures from a load report: latency percentiles of the requests inside and
//! outside a set of time windows (restarts, reloads), failures by kind, and the
//! formatting every benchmark prints them with.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::footprint::Mem;
use crate::loadgen::{LoadReport, RequestRecord};

/// A restart or reload window ends this long after the last process it replaced has
/// exited (clients whose connections it closed reconnect within it). It is short on
/// purpose: a window that outlasts the reload would dilute its latency with steady
/// traffic.
pub const WINDOW_AFTER_EXIT: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyStats {
    pub count: usize,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub p999: Option<Duration>,
    pub max: Option<Duration>,
}

/// Latency of the successful requests that `keep` selects.
pub fn latency_stats(report: &LoadReport, keep: impl Fn(&RequestRecord) -> bool) -> LatencyStats {
    let sel = |r: &RequestRecord| r.ok && keep(r);
    LatencyStats {
        count: report.records.iter().filter(|r| sel(r)).count(),
        p50: report.percentile(50.0, sel),
        p99: report.percentile(99.0, sel),
        p999: report.percentile(99.9, sel),
        max: report.max(sel),
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of a sorted slice (as `LoadReport::percentile`).
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort_unstable();
    v
}

/// Time intervals (restart or reload windows); a request belongs to one by its start.
#[derive(Debug, Clone, Default)]
pub struct Windows(pub Vec<(Instant, Instant)>);

impl Windows {
    pub fn contains(&self, t: Instant) -> bool {
        self.0.iter().any(|(a, b)| *a <= t && t < *b)
    }

    /// Total length covered (overlaps counted once).
    pub fn total(&self) -> Duration {
        let mut w = self.0.clone();
        w.sort_by_key(|x| x.0);
        let mut total = Duration::ZERO;
        let mut cur: Option<(Instant, Instant)> = None;
        for (a, b) in w {
            cur = match cur {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    total += cb - ca;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((a, b)) = cur {
            total += b - a;
        }
        total
    }
}

/// A load report split by a set of windows.
#[derive(Debug, Clone, Default)]
pub struct Split {
    /// Successful requests outside every window (after the ramp-up).
    pub steady: LatencyStats,
    /// Successful requests inside a window (after the ramp-up).
    pub window: LatencyStats,
    pub failed_in_window: u64,
    pub failed_steady: u64,
    /// Failed requests by kind (all of them, inside windows or not).
    pub failures: BTreeMap<&'static str, u64>,
    /// Time covered by the windows.
    pub window_time: Duration,
}

impl Split {
    /// Latency leaves out requests started before `ramped` (every client connecting
    /// at once); failures are counted from the start.
    pub fn of(report: &LoadReport, windows: &Windows, ramped: Instant) -> Split {
        let mut failures = BTreeMap::new();
        let (mut failed_in_window, mut failed_steady) = (0, 0);
        for r in report.records.iter().filter(|r| !r.ok) {
            *failures.entry(r.failure.unwrap_or("other")).or_insert(0) += 1;
            if windows.contains(r.start) {
                failed_in_window += 1;
            } else {
                failed_steady += 1;
            }
        }
        Split {
            steady: latency_stats(report, |r| r.start >= ramped && !windows.contains(r.start)),
            window: latency_stats(report, |r| r.start >= ramped && windows.contains(r.start)),
            failed_in_window,
            failed_steady,
            failures,
            window_time: windows.total(),
        }
    }
}

/// Successful requests per second.
pub fn ok_rps(r: &LoadReport) -> f64 {
    let secs = r.elapsed.as_secs_f64();
    if secs > 0.0 { r.ok as f64 / secs } else { 0.0 }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "n/a".to_string(), |d| format!("{:.2} ms", ms(d)))
}

pub fn json_ms(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| json!((ms(d) * 1000.0).round() / 1000.0))
}

pub fn stats_json(s: &LatencyStats) -> Value {
    json!({"requests_ok": s.count, "p50_ms": json_ms(s.p50), "p99_ms": json_ms(s.p99), "p999_ms": json_ms(s.p999), "max_ms": json_ms(s.max)})
}

pub fn fmt_pct(f: Option<f64>) -> String {
    f.map_or_else(|| "?".to_string(), |f| format!("{:.0}%", f * 100.0))
}

pub fn fmt_bytes(b: Option<u64>) -> String {
    b.map_or_else(
        || "n/a".to_string(),
        |b| format!("{:.2} MB ({} kB)", b as f64 / 1e6, b / 1024),
    )
}

/// Private and file-backed parts of a resident set, and its proportional share.
pub fn fmt_split(m: Option<Mem>) -> String {
    m.map_or_else(
        || "n/a".to_string(),
        |m| {
            format!(
                "anon {} kB + file {} kB; PSS {}",
                m.anon / 1024,
                m.file / 1024,
                m.pss
                    .map_or("?".to_string(), |p| format!("{} kB", p / 1024))
            )
        },
    )
}

/// `a / b`, when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}"))
}

/// One target of a benchmark: met or not, and the figure that decided it.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub pass: bool,
    pub what: String,
    pub figure: String,
}

pub fn verdict(pass: bool, what: impl Into<String>, figure: impl Into<String>) -> Verdict {
    Verdict {
        pass,
        what: what.into(),
        figure: figure.into(),
    }
}

impl Verdict {
    pub fn json(&self) -> Value {
        json!({"pass": self.pass, "target": self.what, "figure": self.figure})
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.pass { "PASS" } else { "FAIL" };
        write!(f, "{mark}  {}: {}", self.what, self.figure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_overlaps_once() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let w = Windows(vec![
            (t, t + s(2)),
            (t + s(1), t + s(3)),
            (t + s(5), t + s(6)),
        ]);
        assert_eq!(w.total(), s(4));
        assert!(w.contains(t + s(2)) && !w.contains(t + s(4)) && !w.contains(t + s(6)));
    }
}
