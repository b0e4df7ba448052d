//! One server under load while it reloads every R ms: fleet-agent (demo app,
//! `SIGUSR1`), nginx (`nginx -s reload`, or a binary upgrade), HAProxy (`SIGUSR2` to
//! the master). The same load, the same schedule and the same window definition for
//! each, so that their figures compare.
//!
//! Schedule: no reload in the first and the last fifth of the run (steady state);
//! in between one every R, but never before the previous one has its new workers
//! up (fleet: READY; nginx and HAProxy: a new worker process seen; an nginx binary
//! upgrade: complete, which nginx requires), while old workers may still drain.
//!
//! A reload window runs from the trigger to the later of (new workers up + 1 s) and
//! (the reload complete: every process it replaces has exited); a request belongs to
//! it by its start time.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use fleet_proto::v1::{Event, Phase, StatusRequest, WatchRequest};
use nix::sys::signal::{Signal, kill};
use tokio::sync::mpsc;

use super::load::{LoadShape, finish_load, run_load};
use super::machine::{cpu_sample, foreign_cpu};
use super::peers::{Haproxy, Nginx, NginxMode, Reload, ReloadTracker};
use super::pid_of;
use super::servers::{FleetAgent, STARTUP_TIMEOUT, serving_worker, start_agent};
use super::stats::{Split, WINDOW_AFTER_EXIT, Windows};
use crate::loadgen::Load;

/// A reload that failed before its new workers were up: its window lasts this long
/// after the trigger.
pub const WINDOW_FAILED: Duration = Duration::from_secs(1);
/// Latency leaves out requests started in the first RAMP_UP of a run.
pub const RAMP_UP: Duration = Duration::from_millis(500);
/// Bound on each step of a reload (a new worker up, the old one gone).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for the last reloads to complete after the load.
const COMPLETION_WAIT: Duration = Duration::from_secs(15);

/// What is reloaded, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// fleet-agent's demo app, `SIGUSR1` to the supervisor.
    Fleet,
    /// nginx, `nginx -s reload`.
    NginxReload,
    /// nginx, binary upgrade: `USR2`, then `QUIT` to the old master.
    NginxUpgrade,
    /// HAProxy `-W`, `SIGUSR2` to the master.
    Haproxy,
}

impl Target {
    pub const ALL: [Target; 4] = [
        Target::Fleet,
        Target::NginxReload,
        Target::NginxUpgrade,
        Target::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Fleet => "fleet",
            Target::NginxReload => "nginx-reload",
            Target::NginxUpgrade => "nginx-upgrade",
            Target::Haproxy => "haproxy",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    /// How it is reloaded and when the reload counts as complete.
    pub fn method(self) -> &'static str {
        match self {
            Target::Fleet => {
                "SIGUSR1 to the supervisor; up = READY on Watch; complete = the old worker exited (DRAINED)"
            }
            Target::NginxReload => {
                "nginx -s reload; up = a new worker process; complete = every old worker exited"
            }
            Target::NginxUpgrade => {
                "USR2 to the master, new master's workers up, QUIT to the old master; complete = old master and its workers exited"
            }
            Target::Haproxy => {
                "SIGUSR2 to the -W master; up = a new worker process; complete = the old worker exited"
            }
        }
    }
}

/// The executables of the targets.
#[derive(Debug, Clone)]
pub struct Exes {
    pub agent: PathBuf,
    pub nginx: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
}

/// One run's settings.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub shape: LoadShape,
    pub duration: Duration,
    pub every: Duration,
    /// Unmeasured load before the run.
    pub warmup: Duration,
}

/// What one target did under load while it reloaded.
#[derive(Debug)]
pub struct ReloadRun {
    pub target: Target,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub rps: f64,
    pub reconnects: u64,
    /// What the HTTP/2 clients did that is no failure: connections moved after
    /// GOAWAY or a close, requests the server did not process and that were re-sent.
    pub h2: crate::loadgen::H2Counts,
    pub split: Split,
    pub reloads: Vec<Reload>,
    /// The first few failures of each kind.
    pub examples: BTreeMap<&'static str, Vec<String>>,
    pub foreign_cpu: Option<f64>,
    /// Start of the reloads and their span, from the start of the load.
    pub lead: Duration,
    pub span: Duration,
    /// Earlier runs of the same setting that were repeated because other processes
    /// took the CPUs: their failures still count.
    pub discarded: Vec<Discarded>,
    /// The slowest successful requests inside reload windows, slowest first, each
    /// placed in its reload (see [`Slow`]).
    pub slowest: Vec<Slow>,
}

/// How many of the slowest requests in reload windows a run reports.
const SLOWEST: usize = 5;

/// One slow request inside a reload window, placed in its reload: was it slow while
/// the new workers were starting, at the handoff, or while the old ones drained?
#[derive(Debug, Clone, Copy)]
pub struct Slow {
    pub latency: Duration,
    /// Its start after the reload's trigger.
    pub after_trigger: Duration,
    /// The reload's new workers up (fleet: READY), after its trigger.
    pub up: Option<Duration>,
    /// The reload complete (the replaced processes gone), after its trigger.
    pub complete: Option<Duration>,
}

/// The [`SLOWEST`] slowest successful requests that started inside a reload window
/// (after `ramped`), slowest first; a request in overlapping windows is placed in
/// the latest reload triggered before it started.
fn slowest_in_windows(
    records: &[crate::loadgen::RequestRecord],
    reloads: &[Reload],
    windows: &Windows,
    ramped: Instant,
) -> Vec<Slow> {
    let mut slow: Vec<_> = records
        .iter()
        .filter(|r| r.ok && r.start >= ramped && windows.contains(r.start))
        .collect();
    slow.sort_unstable_by_key(|r| std::cmp::Reverse(r.latency));
    slow.iter()
        .take(SLOWEST)
        .filter_map(|r| {
            let reload = reloads
                .iter()
                .filter(|x| x.trigger <= r.start)
                .max_by_key(|x| x.trigger)?;
            let since = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(reload.trigger));
            Some(Slow {
                latency: r.latency,
                after_trigger: r.start - reload.trigger,
                up: since(reload.ready),
                complete: since(reload.done),
            })
        })
        .collect()
}

/// A run left out of the figures (the machine was busy), kept for its failures.
#[derive(Debug, Clone, Copy)]
pub struct Discarded {
    pub requests: u64,
    pub failed: u64,
    pub foreign_cpu: Option<f64>,
}

impl Discarded {
    pub fn of(run: &ReloadRun) -> Self {
        Self {
            requests: run.requests,
            failed: run.failed,
            foreign_cpu: run.foreign_cpu,
        }
    }
}

impl ReloadRun {
    /// trigger → complete of every completed reload, sorted.
    pub fn completion(&self) -> Vec<Duration> {
        super::stats::sorted(
            self.reloads
                .iter()
                .filter_map(|r| r.done.filter(|_| r.error.is_none()).map(|d| d - r.trigger))
                .collect(),
        )
    }

    /// trigger → new workers up, sorted.
    pub fn up(&self) -> Vec<Duration> {
        super::stats::sorted(
            self.reloads
                .iter()
                .filter_map(|r| r.ready.map(|d| d - r.trigger))
                .collect(),
        )
    }

    pub fn errors(&self) -> Vec<&str> {
        self.reloads
            .iter()
            .filter_map(|r| r.error.as_deref())
            .collect()
    }

    /// Failed requests of this run and of the runs repeated before it.
    pub fn failed_with_discarded(&self) -> u64 {
        self.failed + self.discarded.iter().map(|d| d.failed).sum::<u64>()
    }

    /// Reloads that went through but whose replaced processes were still there when
    /// the run ended: a reload counts only once the old generation is gone.
    pub fn not_completed(&self) -> usize {
        self.reloads
            .iter()
            .filter(|r| r.error.is_none() && r.done.is_none())
            .count()
    }
}

/// Starts `target`, warms it up, runs the load with reloads on `plan`'s schedule,
/// stops it, and reports.
pub async fn run(target: Target, exes: &Exes, plan: &Plan) -> anyhow::Result<ReloadRun> {
    let mut driver = Driver::start(target, exes).await?;
    let addr = driver.addr(plan.shape.is_h2());
    if !plan.warmup.is_zero() {
        run_load(&plan.shape, addr, plan.warmup).await?;
    }
    let lead = plan.duration / 5;
    let span = plan.duration.saturating_sub(2 * lead);
    let max_reloads = (span.as_secs_f64() / plan.every.as_secs_f64()).ceil() as usize + 1;

    let cpu_before = cpu_sample();
    let start = Instant::now();
    let load = Load::start(plan.shape.spec(addr, plan.duration));
    let stop_at = start + lead + span;
    let mut next = start + lead;
    for _ in 0..max_reloads {
        tokio::time::sleep_until(next.into()).await;
        let trigger = Instant::now();
        if trigger >= stop_at {
            break;
        }
        driver.reload(trigger).await;
        next = (trigger + plan.every).max(Instant::now());
    }
    let mut report = finish_load(load, start, plan.duration, plan.shape.requests).await?;
    let foreign_cpu = foreign_cpu(cpu_before, cpu_sample());
    let end = Instant::now();
    let reloads = driver.finish().await;

    let windows = Windows(
        reloads
            .iter()
            .map(|r| {
                if r.error.is_some() && r.ready.is_none() {
                    return (r.trigger, r.trigger + WINDOW_FAILED);
                }
                // Until the replaced processes are gone (the end of the run if they
                // never went), plus the reconnect margin.
                (r.trigger, r.done.unwrap_or(end) + WINDOW_AFTER_EXIT)
            })
            .collect(),
    );
    let split = Split::of(&report, &windows, start + RAMP_UP);
    let slowest = slowest_in_windows(&report.records, &reloads, &windows, start + RAMP_UP);
    let mut examples: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for f in &report.failures {
        let e = examples.entry(f.kind).or_default();
        if e.len() < 3 {
            e.push(f.message.clone());
        }
    }
    let run = ReloadRun {
        target,
        requests: report.requests,
        ok: report.ok,
        failed: report.failed,
        rps: super::stats::ok_rps(&report),
        reconnects: report.reconnects,
        h2: report.h2,
        split,
        reloads,
        examples,
        foreign_cpu,
        lead,
        span,
        discarded: Vec::new(),
        slowest,
    };
    report.records = Vec::new();
    Ok(run)
}

/// A started target and the means to reload it.
enum Driver {
    Fleet(Box<FleetDriver>),
    /// nginx `-s reload` or HAProxy: reloads followed by a tracker.
    Nginx(Nginx, ReloadTracker),
    Haproxy(Haproxy, ReloadTracker),
    NginxUpgrade(Nginx, Vec<Reload>),
}

impl Driver {
    async fn start(target: Target, exes: &Exes) -> anyhow::Result<Driver> {
        let missing = |what: &str| anyhow!("{what} is not installed");
        Ok(match target {
            Target::Fleet => Driver::Fleet(Box::new(FleetDriver::start(&exes.agent).await?)),
            Target::NginxReload => {
                let exe = exes.nginx.as_ref().ok_or_else(|| missing("nginx"))?;
                let nginx = Nginx::start(exe, NginxMode::Foreground).await?;
                let master = nginx.master().context("nginx has no master pid")?;
                Driver::Nginx(nginx, ReloadTracker::start(master))
            }
            Target::NginxUpgrade => {
                let exe = exes.nginx.as_ref().ok_or_else(|| missing("nginx"))?;
                Driver::NginxUpgrade(Nginx::start(exe, NginxMode::Upgradable).await?, Vec::new())
            }
            Target::Haproxy => {
                let exe = exes.haproxy.as_ref().ok_or_else(|| missing("haproxy"))?;
                let haproxy = Haproxy::start(exe).await?;
                let tracker = ReloadTracker::start(haproxy.master());
                Driver::Haproxy(haproxy, tracker)
            }
        })
    }

    /// Where the load goes: the HTTP/2 port of a peer for an HTTP/2 load (Fleet's
    /// port speaks both, by the client preface).
    fn addr(&self, h2: bool) -> std::net::SocketAddr {
        match self {
            Driver::Fleet(f) => f.agent.http,
            Driver::Nginx(n, _) | Driver::NginxUpgrade(n, _) if h2 => n.h2_addr,
            Driver::Nginx(n, _) | Driver::NginxUpgrade(n, _) => n.addr,
            Driver::Haproxy(h, _) if h2 => h.h2_addr,
            Driver::Haproxy(h, _) => h.addr,
        }
    }

    /// Triggers one reload and returns once its new workers are up (or it failed).
    async fn reload(&mut self, trigger: Instant) {
        match self {
            Driver::Fleet(f) => f.reload(trigger).await,
            Driver::Nginx(nginx, tracker) => {
                let i = tracker.begin(trigger);
                match nginx.reload().await {
                    Ok(()) => wait_up(tracker, i).await,
                    Err(e) => tracker.failed(i, format!("{e:#}")),
                }
            }
            Driver::Haproxy(haproxy, tracker) => {
                let i = tracker.begin(trigger);
                match haproxy.reload() {
                    Ok(()) => {
                        wait_up(tracker, i).await;
                        // The next reload waits until the master can take it (its
                        // new worker counts as up before that).
                        if !haproxy.wait_accepts_reload(STEP_TIMEOUT).await {
                            eprintln!(
                                "peer-bench: the HAProxy master does not catch SIGUSR2 {STEP_TIMEOUT:?} after a reload"
                            );
                        }
                    }
                    Err(e) => tracker.failed(i, format!("{e:#}")),
                }
            }
            Driver::NginxUpgrade(nginx, reloads) => reloads.push(nginx.upgrade(STEP_TIMEOUT).await),
        }
    }

    /// Waits (bounded) for the last reloads to complete; stops the target.
    async fn finish(self) -> Vec<Reload> {
        match self {
            Driver::Fleet(f) => f.finish().await,
            Driver::Nginx(_nginx, tracker) => tracker.finish(COMPLETION_WAIT).await,
            Driver::Haproxy(_haproxy, tracker) => tracker.finish(COMPLETION_WAIT).await,
            Driver::NginxUpgrade(_nginx, reloads) => reloads,
        }
    }
}

/// Waits until reload `i` has its new workers up; marks it failed after STEP_TIMEOUT.
async fn wait_up(tracker: &ReloadTracker, i: usize) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !tracker.ready(i) {
        if Instant::now() >= deadline {
            tracker.failed(i, format!("no new worker within {STEP_TIMEOUT:?}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// fleet-agent restarted by SIGUSR1, followed on gRPC Watch.
struct FleetDriver {
    agent: FleetAgent,
    events: mpsc::UnboundedReceiver<(Instant, Event)>,
    watcher: tokio::task::JoinHandle<()>,
    /// The serving worker.
    current: u32,
    /// Each reload and the worker it replaced.
    reloads: Vec<(Reload, u32)>,
    /// When each old worker's DRAINED event arrived.
    drained: HashMap<u32, Instant>,
}

impl FleetDriver {
    async fn start(exe: &std::path::Path) -> anyhow::Result<FleetDriver> {
        let agent = start_agent(exe, "127.0.0.1:0", &[]).await?;
        let mut client = agent.grpc().await?;
        let status = tokio::time::timeout(STARTUP_TIMEOUT, client.status(StatusRequest {}))
            .await
            .map_err(|_| anyhow!("Status did not answer"))??
            .into_inner();
        let (current, _) = serving_worker(&status).context("the agent reports no worker")?;
        let mut stream = client.watch(WatchRequest {}).await?.into_inner();
        // The first event (the snapshot) proves the subscription is live.
        match tokio::time::timeout(STARTUP_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(_))) => {}
            _ => bail!("Watch sent no snapshot within {STARTUP_TIMEOUT:?}"),
        }
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                if tx.send((Instant::now(), ev)).is_err() {
                    break;
                }
            }
        });
        Ok(FleetDriver {
            agent,
            events,
            watcher,
            current,
            reloads: Vec::new(),
            drained: HashMap::new(),
        })
    }

    async fn reload(&mut self, trigger: Instant) {
        let mut reload = Reload {
            trigger,
            ready: None,
            done: None,
            error: None,
        };
        let old = self.current;
        if let Err(e) = kill(pid_of(self.agent.proc.pid()), Signal::SIGUSR1) {
            reload.error = Some(format!("kill -USR1: {e}"));
            self.reloads.push((reload, old));
            return;
        }
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let Ok(Some((at, ev))) = tokio::time::timeout_at(deadline, self.events.recv()).await
            else {
                reload.error = Some(format!("no READY within {STEP_TIMEOUT:?} after SIGUSR1"));
                break;
            };
            match ev.phase() {
                Phase::Drained => {
                    self.drained.insert(ev.pid, at);
                }
                Phase::Ready => {
                    reload.ready = Some(at);
                    self.current = ev.pid;
                    break;
                }
                p @ (Phase::Failed | Phase::Refused) => {
                    reload.error = Some(format!("{}: {}", p.as_str_name(), ev.message));
                    break;
                }
                _ => {}
            }
        }
        self.reloads.push((reload, old));
    }

    async fn finish(mut self) -> Vec<Reload> {
        let deadline = tokio::time::Instant::now() + COMPLETION_WAIT;
        let waiting = |s: &Self| {
            s.reloads
                .iter()
                .any(|(r, old)| r.ready.is_some() && !s.drained.contains_key(old))
        };
        while waiting(&self) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some((at, ev))) if ev.phase() == Phase::Drained => {
                    self.drained.insert(ev.pid, at);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.watcher.abort();
        let drained = self.drained;
        self.reloads
            .into_iter()
            .map(|(mut r, old)| {
                if r.ready.is_some() {
                    r.done = drained.get(&old).copied();
                }
                r
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::RequestRecord;

    fn record(start: Instant, latency_ms: u64, ok: bool) -> RequestRecord {
        RequestRecord {
            start,
            latency: Duration::from_millis(latency_ms),
            ok,
            failure: (!ok).then_some("reset"),
            attempts: 1,
        }
    }

    #[test]
    fn the_slowest_requests_in_windows_are_placed_in_their_reload() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let reloads = [
            Reload {
                trigger: at(100),
                ready: Some(at(105)),
                done: Some(at(110)),
                error: None,
            },
            Reload {
                trigger: at(150),
                ready: None,
                done: None,
                error: Some("no READY".into()),
            },
        ];
        let windows = Windows(vec![(at(100), at(210)), (at(150), at(1150))]);
        let mut records = vec![
            record(at(10), 50, true),   // before the ramp-up ends
            record(at(60), 40, true),   // steady state
            record(at(102), 9, true),   // first reload, before its new worker was up
            record(at(120), 30, false), // failed: not a latency
            record(at(140), 3, true),
            record(at(160), 7, true), // in both windows: the later reload's
        ];
        for i in 0..10 {
            records.push(record(at(300 + i), 1, true));
        }
        let slow = slowest_in_windows(&records, &reloads, &windows, at(50));
        assert_eq!(slow.len(), SLOWEST);
        let latencies: Vec<u64> = slow.iter().map(|s| s.latency.as_millis() as u64).collect();
        assert_eq!(latencies, [9, 7, 3, 1, 1]);
        assert_eq!(slow[0].after_trigger, Duration::from_millis(2));
        assert_eq!(slow[0].up, Some(Duration::from_millis(5)));
        assert_eq!(slow[0].complete, Some(Duration::from_millis(10)));
        assert_eq!(slow[1].after_trigger, Duration::from_millis(10));
        assert_eq!((slow[1].up, slow[1].complete), (None, None));
    }
}
