//! Restarting a node as fast as it goes, checking every restart on the way.

use std::time::{Duration, Instant};

use fleet_proto::v1::{Outcome, RestartRequest};

use super::Agent;
use crate::loadgen::Span;

/// What [`Agent::restart_back_to_back`] did.
#[derive(Debug)]
pub struct BackToBack {
    /// One per restart: from its trigger to its reply, at least the floor asked for.
    pub spans: Vec<Span>,
    /// From the first trigger to the last reply.
    pub took: Duration,
    /// The generation and worker PID of the last restart.
    pub generation: u64,
    pub worker: u32,
}

impl Agent {
    /// `restarts` gRPC `Restart`s back to back, each asserted to have replaced the
    /// serving worker by a process never seen before, one generation later; all
    /// within `deadline`. Each span lasts at least `span_floor` (see the zero-loss
    /// checks: on two shared cores a few spawns in a row can starve every client).
    pub async fn restart_back_to_back(
        &self,
        restarts: u64,
        what: &str,
        deadline: Duration,
        span_floor: Duration,
    ) -> BackToBack {
        let first_generation = self.generation().await;
        let mut worker = self.serving_worker().await;
        let mut pids = vec![worker];
        let mut grpc = self.grpc().await;
        let started = Instant::now();
        let mut spans = Vec::new();
        for i in 1..=restarts {
            let trigger = Instant::now();
            let response = grpc
                .restart(self.request(RestartRequest {
                    reason: format!("{what} {i}/{restarts}"),
                    ..Default::default()
                }))
                .await
                .unwrap_or_else(|status| self.fail(&format!("restart {i}: gRPC error {status}")))
                .into_inner();
            spans.push(Span {
                label: format!(
                    "restart {i} (pid {} -> {})",
                    response.old_pid, response.new_pid
                ),
                from: trigger,
                to: Instant::now().max(trigger + span_floor),
            });
            assert_eq!(
                response.outcome(),
                Outcome::Succeeded,
                "restart {i}: {response:?}"
            );
            // The restart really happened: the worker that served was replaced by a
            // process never seen before, one generation later.
            assert_eq!(response.old_pid, worker, "restart {i}: {response:?}");
            assert!(
                !pids.contains(&response.new_pid),
                "restart {i}: a new PID: {response:?}"
            );
            assert_eq!(
                response.generation,
                first_generation + i,
                "restart {i}: {response:?}"
            );
            worker = response.new_pid;
            pids.push(worker);
            assert!(
                started.elapsed() < deadline,
                "only {i} restarts in {deadline:?}"
            );
        }
        BackToBack {
            spans,
            took: started.elapsed(),
            generation: first_generation + restarts,
            worker,
        }
    }
}
