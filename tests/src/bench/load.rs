//! Running the load generator for a benchmark: one bounded run, and alternating
//! throughput rounds over several servers (the best run of each counts; a run during
//! which other processes took the CPUs is repeated).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::child::program_name;
use super::machine::{cpu_sample, foreign_cpu};
use super::stats::{fmt_pct, ok_rps};
use crate::loadgen::{Load, LoadReport, LoadSpec};

/// A run during which processes outside the benchmark used more than this share of
/// the CPUs is skewed.
pub const FOREIGN_CPU_WARN: f64 = 0.05;

/// The clients of a load, whatever it targets.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Closed-loop clients that keep their connection alive.
    pub keepalive: usize,
    /// Closed-loop clients that open a fresh connection for every request.
    pub fresh: usize,
    /// HTTP/2 connections (cleartext, prior knowledge), each with `h2_streams`
    /// closed-loop streams.
    pub h2_connections: usize,
    pub h2_streams: usize,
    /// Upper bound on requests per run.
    pub requests: u64,
}

impl LoadShape {
    pub fn spec(&self, target: SocketAddr, duration: Duration) -> LoadSpec {
        LoadSpec {
            target,
            path: "/".to_string(),
            keepalive_connections: self.keepalive,
            fresh_connections: self.fresh,
            h2_connections: self.h2_connections,
            h2_streams: self.h2_streams,
            max_requests: self.requests,
            max_duration: duration,
            ..Default::default()
        }
    }

    /// Whether it is an HTTP/2 load (the peers then listen for HTTP/2).
    pub fn is_h2(&self) -> bool {
        self.h2_connections > 0
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.keepalive + self.fresh > 0 {
            parts.push(format!(
                "{} keep-alive + {} fresh-connection HTTP/1.1 clients",
                self.keepalive, self.fresh
            ));
        }
        if self.is_h2() {
            parts.push(format!(
                "HTTP/2 (h2c): {} connections x {} streams",
                self.h2_connections, self.h2_streams
            ));
        }
        format!("closed loop, GET /, {}", parts.join(" + "))
    }
}

/// Runs a load to its bound and returns the report (bounded: duration + 35 s).
pub async fn run_load(
    shape: &LoadShape,
    target: SocketAddr,
    duration: Duration,
) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    let load = Load::start(shape.spec(target, duration));
    finish_load(load, started, duration, shape.requests).await
}

/// Lets the load run until its time bound (or its request bound), then stops it and
/// collects the report (`Load::finish` stops at once, so wait first). Bounded.
pub async fn finish_load(
    load: Load,
    started: Instant,
    duration: Duration,
    max_requests: u64,
) -> anyhow::Result<LoadReport> {
    let end = started + duration;
    // Ends at the time bound, or earlier once the request bound is reached.
    while Instant::now() < end && load.snapshot_requests() < max_requests {
        let step = end
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
    }
    tokio::time::timeout(Duration::from_secs(35), load.finish())
        .await
        .map_err(|_| anyhow!("the load generator did not stop within 35 s after its time bound"))
}

/// One throughput run of one server.
#[derive(Debug)]
pub struct Run {
    pub target: &'static str,
    pub round: u32,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub rps: f64,
    /// Share of all CPU time used by processes outside this benchmark during the run.
    pub foreign_cpu: Option<f64>,
    /// Other processes took more than FOREIGN_CPU_WARN: left out of the best-of.
    pub skewed: bool,
    /// CPU time (user + system) of the server's processes during the run: its root
    /// processes and their children, from /proc (ticks of 10 ms); `None` when no root
    /// was given or one exited.
    pub server_cpu: Option<Duration>,
}

/// Every throughput run, in the order they ran.
#[derive(Debug, Default)]
pub struct Throughput {
    pub runs: Vec<Run>,
}

impl Throughput {
    /// The runs of `target` that count: the ones not skewed (all if every one was).
    fn counted(&self, target: &str) -> impl Iterator<Item = &Run> {
        let clean = self.runs.iter().any(|r| r.target == target && !r.skewed);
        self.runs
            .iter()
            .filter(move |r| r.target == target && (!clean || !r.skewed))
    }

    /// Best req/s of `target`.
    pub fn best(&self, target: &str) -> f64 {
        self.counted(target).map(|r| r.rps).fold(0.0_f64, f64::max)
    }

    /// Median req/s of `target` (a second view, less moved by one lucky run).
    pub fn median(&self, target: &str) -> f64 {
        let mut v: Vec<f64> = self.counted(target).map(|r| r.rps).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The server's CPU seconds per million answered requests, the median over the
    /// counted runs of `target` that measured it: comparable between servers even where
    /// the load generator, not the server, limits the req/s.
    pub fn cpu_per_million(&self, target: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .counted(target)
            .filter(|r| r.ok > 0)
            .filter_map(|r| Some(r.server_cpu?.as_secs_f64() * 1e6 / r.ok as f64))
            .collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// Every run of `target` was skewed by other processes.
    pub fn all_skewed(&self, target: &str) -> bool {
        self.runs
            .iter()
            .filter(|r| r.target == target)
            .all(|r| r.skewed)
    }

    /// "lo..hi" req/s of the runs of `target`.
    pub fn spread(&self, target: &str) -> String {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.target == target)
            .map(|r| r.rps)
            .collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0_f64, f64::max);
        format!("{lo:.0}..{hi:.0}")
    }
}

/// The processes of a server: `roots` and their children, as they are now.
fn server_processes(roots: &[u32]) -> Vec<u32> {
    roots
        .iter()
        .flat_map(|&root| std::iter::once(root).chain(super::child::children(root)))
        .collect()
}

/// user + system clock ticks of `pids` together; `None` when one is gone or none given.
fn ticks_of(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| super::proc_cpu::ticks(p)).sum()
}

/// One server to measure: its name, its address, and its root processes (whose CPU,
/// with their children's, is measured; empty: not measured).
pub type ThroughputTarget = (&'static str, SocketAddr, Vec<u32>);

/// Throughput without restarts: `targets` in turn, `rounds` times, after an unmeasured
/// warm-up of each. A run during which other processes took more than
/// FOREIGN_CPU_WARN of the CPUs is marked skewed and repeated, at most `rounds` extra
/// runs in all.
pub async fn throughput(
    shape: &LoadShape,
    targets: &[ThroughputTarget],
    rounds: u32,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<Throughput> {
    let me = program_name();
    if !warmup.is_zero() {
        for (name, addr, _) in targets {
            eprintln!("{me}: warm-up {name} ({warmup:?}, not measured)");
            run_load(shape, *addr, warmup).await?;
        }
    }
    let mut tp = Throughput::default();
    let mut repeats_left = rounds;
    for round in 1..=rounds {
        for (name, addr, roots) in targets {
            loop {
                eprintln!("{me}: throughput round {round}/{rounds} {name} ({duration:?})");
                let servers = server_processes(roots);
                let server_before = ticks_of(&servers);
                let cpu_before = cpu_sample();
                let r = run_load(shape, *addr, duration).await?;
                let foreign_cpu = foreign_cpu(cpu_before, cpu_sample());
                let tick = Duration::from_secs(1) / super::proc_cpu::clk_tck() as u32;
                let server_cpu = server_before
                    .zip(ticks_of(&servers))
                    .map(|(before, after)| tick * after.saturating_sub(before) as u32);
                let skewed = foreign_cpu.is_some_and(|f| f > FOREIGN_CPU_WARN);
                tp.runs.push(Run {
                    target: name,
                    round,
                    requests: r.requests,
                    ok: r.ok,
                    failed: r.failed,
                    rps: ok_rps(&r),
                    foreign_cpu,
                    skewed,
                    server_cpu,
                });
                if skewed && repeats_left > 0 {
                    repeats_left -= 1;
                    eprintln!(
                        "{me}: other processes took {} of the CPUs during that run; repeating it",
                        fmt_pct(foreign_cpu)
                    );
                    continue;
                }
                break;
            }
        }
    }
    Ok(tp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(target: &'static str, ok: u64, cpu_ms: Option<u64>, skewed: bool) -> Run {
        Run {
            target,
            round: 1,
            requests: ok,
            ok,
            failed: 0,
            rps: ok as f64,
            foreign_cpu: None,
            skewed,
            server_cpu: cpu_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn server_cpu_per_million_is_the_median_of_the_counted_runs() {
        let tp = Throughput {
            runs: vec![
                // 1 s for 100,000 requests: 10 s a million; 2 s: 20; 3 s: 30.
                run("fleet", 100_000, Some(1_000), false),
                run("fleet", 100_000, Some(3_000), false),
                run("fleet", 100_000, Some(2_000), false),
                // A skewed run does not count while clean ones exist.
                run("fleet", 100_000, Some(90_000), true),
                run("nginx", 200_000, Some(1_000), false),
                run("hello-peer", 100_000, None, false),
            ],
        };
        assert_eq!(tp.cpu_per_million("fleet"), Some(20.0));
        assert_eq!(tp.cpu_per_million("nginx"), Some(5.0));
        assert_eq!(tp.cpu_per_million("hello-peer"), None, "not measured");
        assert_eq!(tp.cpu_per_million("haproxy"), None, "did not run");
    }
}
