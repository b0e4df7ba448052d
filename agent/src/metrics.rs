//! Prometheus metrics of the supervisor, served on `/metrics` of the control endpoint.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    restarts: Family<OutcomeLabel, Counter>,
    handoff: Histogram,
    drain: Histogram,
    worker_exits: Counter,
    generation: Gauge,
    workers: Gauge,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let restarts = Family::<OutcomeLabel, Counter>::default();
        // 1 ms .. ~65 s
        let handoff = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 17,
        ));
        // 10 ms .. ~10 min
        let drain = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.01, 2.0, 17,
        ));
        let worker_exits = Counter::default();
        let generation = Gauge::default();
        let workers = Gauge::default();
        let in_flight = Gauge::default();
        let mut registry = Registry::with_prefix("fleet_agent");
        registry.register(
            "restarts",
            "Restarts by outcome: succeeded, failed (new generation never got ready), refused (before spawning), reverted (died in probation)",
            restarts.clone(),
        );
        registry.register(
            "handoff_seconds",
            "Time from a restart's trigger until the new generation sent READY=1",
            handoff.clone(),
        );
        registry.register(
            "drain_seconds",
            "Time from SIGTERM until an old generation exited",
            drain.clone(),
        );
        registry.register(
            "unexpected_worker_exits",
            "Serving workers that exited on their own",
            worker_exits.clone(),
        );
        registry.register(
            "generation",
            "The serving worker generation",
            generation.clone(),
        );
        registry.register(
            "workers",
            "Worker processes alive (serving, starting and draining)",
            workers.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests the workers are serving, as they last reported them (every 250 ms at most; 0 from programs that do not report)",
            in_flight.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            restarts,
            handoff,
            drain,
            worker_exits,
            generation,
            workers,
            in_flight,
        }
    }
}

impl Metrics {
    pub fn restart(&self, outcome: &'static str) {
        self.restarts.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn handoff(&self, d: Duration) {
        self.handoff.observe(d.as_secs_f64());
    }

    pub fn drained(&self, d: Duration) {
        self.drain.observe(d.as_secs_f64());
    }

    pub fn worker_exit(&self) {
        self.worker_exits.inc();
    }

    pub fn set_generation(&self, generation: u64, workers: usize) {
        self.generation.set(generation as i64);
        self.workers.set(workers as i64);
    }

    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock");
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
