//! What `peer-bench` prints: the tables (text) or one JSON document.

use std::time::Duration;

use fleet_tests::bench::machine::Machine;
use fleet_tests::bench::reload::{RAMP_UP, ReloadRun, Target};
use fleet_tests::bench::stats::WINDOW_AFTER_EXIT;
use fleet_tests::bench::stats::{
    LatencyStats, Verdict, fmt_bytes, fmt_ms, fmt_pct, fmt_ratio, json_ms, ms, percentile, ratio,
    stats_json,
};
use serde_json::{Value, json};

use crate::{Args, KINDS, SettingResult, TP_TARGETS, ThroughputPart, kind_count, median};

pub struct Report<'a> {
    pub args: &'a Args,
    pub machine: &'a Machine,
    pub versions: &'a [(&'a str, String)],
    pub notes: &'a [String],
    pub results: &'a [SettingResult],
    pub tp: Option<&'a ThroughputPart>,
    pub verdicts: &'a [Verdict],
    pub load: (Option<f64>, Option<f64>),
}

fn window_definition() -> String {
    format!(
        "reload window = from the trigger until the reload is complete (the last replaced process gone) + {:?}; \
         a request belongs to it by its start time; latency is of successful requests, leaving out the first {:?} (ramp-up)",
        WINDOW_AFTER_EXIT, RAMP_UP
    )
}

fn dist(v: &[Duration]) -> (Option<Duration>, Option<Duration>, Option<Duration>) {
    (percentile(v, 50.0), percentile(v, 90.0), v.last().copied())
}

impl Report<'_> {
    pub fn text(&self) -> String {
        let mut o = String::new();
        let mut line = |s: String| {
            o.push_str(&s);
            o.push('\n');
        };
        line(format!(
            "peer-bench: fleet-agent vs nginx and HAProxy, loopback, {} (shared by the load generator and the servers)",
            self.machine
        ));
        for (name, v) in self.versions {
            line(format!("  {name}: {v}"));
        }
        for note in self.notes {
            line(format!("  NOTE: {note}"));
        }
        let la = |l: Option<f64>| l.map_or("?".to_string(), |l| format!("{l:.2}"));
        line(format!(
            "machine 1-min load average: {} before, {} after",
            la(self.load.0),
            la(self.load.1)
        ));
        line(String::new());
        line("== Reloads under load ==".to_string());
        line(format!(
            "each target: {:?} of closed-loop GET / (after {:?} unmeasured); no reload in the first and last fifth; \
             in between one every R, never before the previous one has its new workers up; busy = CPU taken by other processes during the run (a run above 5% is repeated)",
            self.args.duration, self.args.warmup
        ));
        line(window_definition());
        for t in Target::ALL {
            line(format!("  {:<14} {}", t.name(), t.method()));
        }
        for r in self.results {
            line(String::new());
            line(format!("-- {} --", r.setting.describe()));
            for (t, why) in &r.skipped {
                line(format!("  {} left out: {why}", t.name()));
            }
            line(format!(
                "  {:<14} {:>7} {:>9} {:>8} {:>7} {:>7} {:>6} {:>9} {:>6} {:>7} {:>7} {:>6} {:>6}",
                "target",
                "reloads",
                "requests",
                "req/s",
                "failed",
                "refused",
                "reset",
                "streamrst",
                "unsent",
                "timeout",
                "non-2xx",
                "other",
                "busy"
            ));
            for run in &r.runs {
                let mut row = format!(
                    "  {:<14} {:>7} {:>9} {:>8.0} {:>7}",
                    run.target.name(),
                    run.reloads.len(),
                    run.requests,
                    run.rps,
                    run.failed
                );
                for (i, (_, kinds)) in KINDS.iter().enumerate() {
                    let w = [7, 6, 9, 6, 7, 7, 6][i];
                    row.push_str(&format!(" {:>w$}", kind_count(run, kinds)));
                }
                row.push_str(&format!(" {:>6}", fmt_pct(run.foreign_cpu)));
                line(row);
            }
            line(format!(
                "  {:<14} {:>31} | {:>31} | {:>8}",
                "latency (ms)",
                "steady p50 / p99 / max",
                "in reload windows p50 / p99 / max",
                "windows"
            ));
            let l = |s: &LatencyStats| {
                let f =
                    |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.2}", ms(d)));
                format!("{:>9} {:>9} {:>9}", f(s.p50), f(s.p99), f(s.max))
            };
            for run in &r.runs {
                line(format!(
                    "  {:<14} {:>31} | {:>33} | {:>7.1}s",
                    run.target.name(),
                    l(&run.split.steady),
                    l(&run.split.window),
                    run.split.window_time.as_secs_f64()
                ));
            }
            line(
                "  slowest in reload windows: latency @ its start after the trigger (new workers up, reload complete), ms"
                    .to_string(),
            );
            for run in &r.runs {
                let slow: Vec<String> = run.slowest.iter().map(fmt_slow).collect();
                line(format!("  {:<14} {}", run.target.name(), slow.join("  ")));
            }
            line(format!(
                "  {:<14} {:>28} | {:>28} | {}",
                "reload (ms)",
                "trigger->up p50 / p90 / max",
                "trigger->complete p50 / p90 / max",
                "not through"
            ));
            for run in &r.runs {
                let f =
                    |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.1}", ms(d)));
                let (u, c) = (dist(&run.up()), dist(&run.completion()));
                line(format!(
                    "  {:<14} {:>9} {:>8} {:>9} | {:>10} {:>10} {:>10} | {}",
                    run.target.name(),
                    f(u.0),
                    f(u.1),
                    f(u.2),
                    f(c.0),
                    f(c.1),
                    f(c.2),
                    run.errors().len()
                ));
            }
            if r.setting.shape.is_h2() {
                // What the HTTP/2 clients did that is no failure (the load
                // generator's rules): connections moved, requests re-sent.
                line(format!(
                    "  {:<14} {:>13} {:>11} | {:>15} {:>12} {:>8}",
                    "HTTP/2 (ok)",
                    "moved: GOAWAY",
                    "close",
                    "re-sent: refused",
                    "above GOAWAY",
                    "not sent"
                ));
                for run in &r.runs {
                    let h = &run.h2;
                    line(format!(
                        "  {:<14} {:>13} {:>11} | {:>16} {:>12} {:>8}",
                        run.target.name(),
                        h.after_goaway,
                        h.after_close,
                        h.refused_stream,
                        h.above_goaway,
                        h.not_sent
                    ));
                }
            }
            for run in &r.runs {
                for e in run.errors().iter().take(2) {
                    line(format!("  {} reload error: {e}", run.target.name()));
                }
                for (kind, ex) in &run.examples {
                    for m in ex.iter().take(1) {
                        line(format!("  {} failure [{kind}]: {m}", run.target.name()));
                    }
                }
            }
            if let Some(f) = r.fleet() {
                let peers: Vec<&ReloadRun> = r.peers().collect();
                if !peers.is_empty() {
                    let mut head = format!("  {:<34}", "ratio fleet / peer");
                    for p in &peers {
                        head.push_str(&format!(" {:>14}", p.target.name()));
                    }
                    line(head);
                    for (name, value) in ratio_rows() {
                        let mut row = format!("  {name:<34}");
                        for p in &peers {
                            row.push_str(&format!(" {:>14}", value(f, p).text()));
                        }
                        line(row);
                    }
                }
            }
        }
        if let Some(tp) = self.tp {
            line(String::new());
            line("== Throughput (no reloads), memory, start-up ==".to_string());
            line(format!(
                "{}; {} rounds of {:?}, alternating, best of each (runs during which other processes took > 5% of the CPUs are repeated)",
                tp.shape.describe(),
                self.args.rounds,
                self.args.throughput_duration
            ));
            let ran: Vec<&str> = TP_TARGETS
                .into_iter()
                .filter(|t| tp.tp.runs.iter().any(|r| r.target == *t))
                .collect();
            for t in &ran {
                line(format!(
                    "  {:<11} best {:>7.0} req/s  median {:>7.0}  (runs {}){}",
                    t,
                    tp.tp.best(t),
                    tp.tp.median(t),
                    tp.tp.spread(t),
                    if tp.tp.all_skewed(t) {
                        "  SKEWED: the machine was busy"
                    } else {
                        ""
                    }
                ));
            }
            for t in ran.iter().skip(1) {
                line(format!(
                    "  throughput fleet / {t}: {:.3} (medians: {:.3})",
                    tp.tp.best("fleet") / tp.tp.best(t),
                    tp.tp.median("fleet") / tp.tp.median(t)
                ));
            }
            line("  server CPU (user + system, every process of the server) per million requests, median of the runs:".to_string());
            for t in &ran {
                let cpu = tp.tp.cpu_per_million(t);
                let ratio = match (tp.tp.cpu_per_million("fleet"), cpu) {
                    (Some(f), Some(c)) if *t != "fleet" && c > 0.0 => {
                        format!("  (fleet / {t}: {:.3})", f / c)
                    }
                    _ => String::new(),
                };
                line(format!(
                    "    {t:<11} {}{ratio}",
                    cpu.map_or("n/a".to_string(), |c| format!("{c:.1} s"))
                ));
            }
            line("  resident memory after the load:".to_string());
            for (what, pid, m) in &tp.memory {
                line(format!(
                    "    {what:<24} pid {pid:<7} RSS {}  (private {})",
                    fmt_bytes(m.map(|m| m.rss)),
                    fmt_bytes(m.map(|m| m.anon))
                ));
            }
            line(format!(
                "  start-up, median of {} (spawn -> first 2xx on GET /):",
                self.args.startup_runs
            ));
            for (t, v) in &tp.startup {
                if !v.is_empty() {
                    line(format!("    {t:<11} {}", fmt_ms(median(v))));
                }
            }
            line(format!(
                "    fleet-agent spawn -> READY=1 (sd_notify, what systemd waits for): {}",
                fmt_ms(median(&tp.fleet_ready))
            ));
        }
        line(String::new());
        line("== Verdicts ==".to_string());
        for v in self.verdicts {
            line(v.to_string());
        }
        o
    }

    pub fn json(&self) -> Value {
        let run_json = |run: &ReloadRun| {
            let (u, c) = (dist(&run.up()), dist(&run.completion()));
            json!({
                "target": run.target.name(),
                "method": run.target.method(),
                "reloads": run.reloads.len(),
                "reload_errors": run.errors(),
                "requests": run.requests,
                "ok": run.ok,
                "failed": run.failed,
                "failed_by_kind": KINDS.iter().map(|(n, k)| (n.to_string(), json!(kind_count(run, k)))).collect::<serde_json::Map<_, _>>(),
                "failed_in_windows": run.split.failed_in_window,
                "failure_examples": run.examples,
                "rps": run.rps.round(),
                "polite_reconnects": run.reconnects,
                "h2": {
                    "connections_moved_after_goaway": run.h2.after_goaway,
                    "connections_moved_after_close": run.h2.after_close,
                    "resent_refused_stream": run.h2.refused_stream,
                    "resent_above_goaway": run.h2.above_goaway,
                    "resent_not_sent": run.h2.not_sent,
                },
                "steady": stats_json(&run.split.steady),
                "window": stats_json(&run.split.window),
                "window_time_ms": run.split.window_time.as_millis() as u64,
                "slowest_in_windows": run.slowest.iter().map(|x| json!({
                    "latency_ms": ms(x.latency),
                    "start_after_trigger_ms": ms(x.after_trigger),
                    "up_after_trigger_ms": x.up.map(ms),
                    "complete_after_trigger_ms": x.complete.map(ms),
                })).collect::<Vec<_>>(),
                "trigger_to_up_ms": {"p50": json_ms(u.0), "p90": json_ms(u.1), "max": json_ms(u.2)},
                "trigger_to_complete_ms": {"p50": json_ms(c.0), "p90": json_ms(c.1), "max": json_ms(c.2)},
                "foreign_cpu": run.foreign_cpu,
            })
        };
        let settings: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let ratios: Vec<Value> = match r.fleet() {
                    Some(f) => r
                        .peers()
                        .map(|p| {
                            let rows: serde_json::Map<_, _> = ratio_rows()
                                .into_iter()
                                .map(|(name, value)| (name.to_string(), value(f, p).json()))
                                .collect();
                            json!({"peer": p.target.name(), "fleet_over_peer": rows})
                        })
                        .collect(),
                    None => Vec::new(),
                };
                json!({
                    "reload_every_ms": r.setting.every.as_millis() as u64,
                    "keepalive_percent": r.setting.keepalive_percent,
                    "keepalive": r.setting.shape.keepalive,
                    "fresh": r.setting.shape.fresh,
                    "h2_connections": r.setting.shape.h2_connections,
                    "h2_streams": r.setting.shape.h2_streams,
                    "targets": r.runs.iter().map(run_json).collect::<Vec<_>>(),
                    "left_out": r.skipped.iter().map(|(t, why)| json!({"target": t.name(), "why": why})).collect::<Vec<_>>(),
                    "ratios": ratios,
                })
            })
            .collect();
        let tp = self.tp.map(|tp| {
            json!({
                "keepalive": tp.shape.keepalive,
                "fresh": tp.shape.fresh,
                "runs": tp.tp.runs.iter().map(|r| json!({
                    "target": r.target, "round": r.round, "requests": r.requests, "ok": r.ok,
                    "failed": r.failed, "rps": r.rps.round(), "foreign_cpu": r.foreign_cpu, "skewed": r.skewed,
                    "server_cpu_s": r.server_cpu.map(|d| d.as_secs_f64()),
                })).collect::<Vec<_>>(),
                "best_rps": TP_TARGETS.iter().map(|t| (t.to_string(), json!(tp.tp.best(t).round()))).collect::<serde_json::Map<_, _>>(),
                "server_cpu_s_per_million_requests": TP_TARGETS.iter().map(|t| (t.to_string(), json!(tp.tp.cpu_per_million(t)))).collect::<serde_json::Map<_, _>>(),
                "memory": tp.memory.iter().map(|(what, pid, m)| json!({
                    "process": what, "pid": pid, "rss_bytes": m.map(|m| m.rss),
                    "anon_bytes": m.map(|m| m.anon), "pss_bytes": m.and_then(|m| m.pss),
                })).collect::<Vec<_>>(),
                "startup_to_first_2xx_ms": tp.startup.iter().map(|(t, v)| (t.to_string(), json_ms(median(v)))).collect::<serde_json::Map<_, _>>(),
                "fleet_startup_to_ready_ms": json_ms(median(&tp.fleet_ready)),
            })
        });
        json!({
            "machine": self.machine.json(),
            "versions": self.versions.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "notes": self.notes,
            "duration_ms": self.args.duration.as_millis() as u64,
            "window_definition": window_definition(),
            "settings": settings,
            "throughput": tp,
            "verdicts": self.verdicts.iter().map(Verdict::json).collect::<Vec<_>>(),
            "pass": self.verdicts.iter().all(|v| v.pass),
            "loadavg_1m": [self.load.0, self.load.1],
        })
    }
}

/// One cell of the ratio table.
pub enum Cell {
    /// Fleet's figure over the peer's.
    Ratio(Option<f64>),
    /// Failed requests of Fleet and of the peer (a ratio of counts near zero says little).
    Counts(u64, u64),
}

impl Cell {
    fn text(&self) -> String {
        match self {
            Cell::Ratio(r) => fmt_ratio(*r),
            Cell::Counts(f, p) => format!("{f} vs {p}"),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Ratio(r) => json!(r.map(|r| (r * 1000.0).round() / 1000.0)),
            Cell::Counts(f, p) => json!({"fleet": f, "peer": p}),
        }
    }
}

pub type RatioRow = (&'static str, fn(&ReloadRun, &ReloadRun) -> Cell);

/// The rows of the ratio table.
pub fn ratio_rows() -> Vec<RatioRow> {
    fn lat(a: Option<Duration>, b: Option<Duration>) -> Cell {
        Cell::Ratio(ratio(a.map(ms), b.map(ms)))
    }
    vec![
        ("failed requests (fleet vs peer)", |f, p| {
            Cell::Counts(f.failed, p.failed)
        }),
        ("p99 in reload windows", |f, p| {
            lat(f.split.window.p99, p.split.window.p99)
        }),
        ("p50 in reload windows", |f, p| {
            lat(f.split.window.p50, p.split.window.p50)
        }),
        ("max in reload windows", |f, p| {
            lat(f.split.window.max, p.split.window.max)
        }),
        ("p99 steady", |f, p| {
            lat(f.split.steady.p99, p.split.steady.p99)
        }),
        ("reload complete, median", |f, p| {
            lat(
                percentile(&f.completion(), 50.0),
                percentile(&p.completion(), 50.0),
            )
        }),
        ("req/s during the run", |f, p| {
            Cell::Ratio(ratio(Some(f.rps), Some(p.rps)))
        }),
    ]
}

/// `10.86 @ +3.1 (6.6, 13.8)`: a slow request's latency, its start after its reload's
/// trigger, and when that reload's new workers were up and it was complete.
fn fmt_slow(x: &fleet_tests::bench::reload::Slow) -> String {
    let f = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", ms(d)));
    format!(
        "{:.2} @ +{:.1} ({}, {})",
        ms(x.latency),
        ms(x.after_trigger),
        f(x.up),
        f(x.complete)
    )
}
