//! gRPC `fleet.v1.AgentService`, plus `grpc.health.v1` and server reflection.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::exe::{ExeError, ExeInfo};
use crate::phase::{Event, Phase};
use crate::supervisor::{Outcome, RestartError, RestartReport, StatusReport, Supervisor, Trigger};

pub async fn routes(supervisor: Arc<Supervisor>) -> anyhow::Result<axum::Router> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<AgentServiceServer<AgentGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(
        tonic::service::Routes::new(AgentServiceServer::new(AgentGrpc { supervisor }))
            .add_service(health)
            .add_service(reflection)
            .into_axum_router(),
    )
}

#[derive(Debug)]
pub struct AgentGrpc {
    supervisor: Arc<Supervisor>,
}

impl AgentGrpc {
    /// The service, to call without a connection (commands on the heartbeat stream).
    pub fn new(supervisor: Arc<Supervisor>) -> Self {
        Self { supervisor }
    }
}

fn non_empty(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn millis(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn exe_status(e: &ExeError) -> Status {
    match e.http_status() {
        403 => Status::permission_denied(e.to_string()),
        // A size over restart.max_exe_size: the node's configuration must change.
        412 | 413 => Status::failed_precondition(e.to_string()),
        // The file changed while it was checked: a concurrency conflict, retryable.
        409 => Status::aborted(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        let r = request.into_inner();
        let request = crate::supervisor::RestartRequest {
            exe: non_empty(r.exe).map(PathBuf::from),
            sha256: non_empty(r.sha256),
            reason: r.reason,
            trigger: Trigger::Grpc,
            ready_timeout: millis(r.ready_timeout_ms),
            drain_timeout: millis(r.drain_timeout_ms),
        };
        match self.supervisor.restart(request).await {
            Ok(report) => Ok(Response::new(restart_response(report))),
            Err(RestartError::InProgress(what)) => {
                Err(Status::aborted(RestartError::InProgress(what).to_string()))
            }
            Err(e @ RestartError::ShuttingDown) => Err(Status::unavailable(e.to_string())),
            Err(e @ RestartError::BadRequest(_)) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ RestartError::Lost) => Err(Status::internal(e.to_string())),
            Err(RestartError::Refused(e)) => Err(exe_status(&e)),
        }
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let reason =
            non_empty(request.into_inner().reason).unwrap_or_else(|| "gRPC Shutdown".into());
        self.supervisor.request_shutdown(reason);
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status_response(self.supervisor.status())))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let events = tokio_stream::wrappers::BroadcastStream::new(self.supervisor.subscribe());
        let status = self.supervisor.status();
        let current = status
            .workers
            .iter()
            .find(|w| w.generation == status.generation);
        let snapshot = pb::Event {
            phase: pb::Phase::Snapshot as i32,
            generation: status.generation,
            pid: current.map(|w| w.pid).unwrap_or(0),
            message: format!("state {}", status.state.as_str()),
            exe: status.exe.path.display().to_string(),
            unix_ms: crate::phase::unix_ms(std::time::SystemTime::now()),
            ..Default::default()
        };
        let live = events.filter_map(|e| match e {
            Ok(event) => Some(Ok(event_message(event))),
            // A slow watcher missed some events; it keeps the newer ones.
            Err(_lagged) => None,
        });
        let stream = tokio_stream::once(Ok(snapshot)).chain(live);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn preflight(
        &self,
        request: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightResponse>, Status> {
        let r = request.into_inner();
        let exe = non_empty(r.exe).map(PathBuf::from);
        let sha = non_empty(r.sha256);
        match self
            .supervisor
            .preflight(exe.as_deref(), sha.as_deref())
            .await
        {
            Ok(info) => Ok(Response::new(pb::PreflightResponse {
                exe: Some(exe_message(&info)),
            })),
            Err(e) => Err(exe_status(&e)),
        }
    }
}

fn exe_message(info: &ExeInfo) -> pb::ExeInfo {
    pb::ExeInfo {
        path: info.path.display().to_string(),
        sha256: info.sha256.clone(),
        size: info.size,
    }
}

fn restart_response(r: RestartReport) -> pb::RestartResponse {
    pb::RestartResponse {
        outcome: match r.outcome {
            Outcome::Succeeded => pb::Outcome::Succeeded,
            Outcome::Failed => pb::Outcome::Failed,
        } as i32,
        reason: r.reason,
        stderr_tail: r.stderr_tail,
        generation: r.generation,
        old_pid: r.old_pid,
        new_pid: r.new_pid,
        exe: Some(exe_message(&r.exe)),
        timings: Some(pb::PhaseTimings {
            validate_us: r.timings.validate_us,
            spawn_us: r.timings.spawn_us,
            ready_us: r.timings.ready_us,
        }),
    }
}

pub fn status_response(s: StatusReport) -> pb::StatusResponse {
    pb::StatusResponse {
        node_id: s.node_id,
        labels: s.labels.into_iter().collect(),
        supervisor_pid: s.supervisor_pid,
        state: s.state.as_str().to_string(),
        generation: s.generation,
        exe: Some(exe_message(&s.exe)),
        workers: s
            .workers
            .iter()
            .map(|w| pb::Worker {
                generation: w.generation,
                pid: w.pid,
                exe: Some(exe_message(&w.exe)),
                state: w.state.to_string(),
                started_at_unix_ms: w.started_at_unix_ms,
                ready_at_unix_ms: w.ready_at_unix_ms,
                in_flight: w.in_flight,
            })
            .collect(),
        listeners: s
            .listeners
            .into_iter()
            .map(|l| pb::Listener {
                server: l.server,
                addr: l.addr,
                tls: l.tls,
            })
            .collect(),
        control_addr: s.control_addr,
        admin_url: s.admin_url,
        started_at_unix_ms: s.started_at_unix_ms,
        version: s.version,
        restarts_succeeded: s.restarts_succeeded,
        restarts_failed: s.restarts_failed,
        in_progress: s.in_progress,
        ready_timeout_ms: s.ready_timeout.as_millis() as u64,
        drain_timeout_ms: s.drain_timeout.as_millis() as u64,
        recent_restarts: s
            .recent_restarts
            .iter()
            .map(|r| pb::RecentRestart {
                at_unix_ms: r.at_unix_ms,
                trigger: r.trigger.clone(),
                outcome: if r.succeeded {
                    pb::Outcome::Succeeded
                } else {
                    pb::Outcome::Failed
                } as i32,
                reason: r.reason.clone(),
                generation: r.generation,
                old_pid: r.old_pid,
                new_pid: r.new_pid,
                exe: r.exe.clone(),
                ready_us: r.ready_us,
                drain_us: r.drain_us,
            })
            .collect(),
    }
}

fn event_message(e: Event) -> pb::Event {
    let phase = match e.phase {
        Phase::Validating => pb::Phase::Validating,
        Phase::Spawning => pb::Phase::Spawning,
        Phase::WaitingReady => pb::Phase::WaitingReady,
        Phase::Ready => pb::Phase::Ready,
        Phase::Draining => pb::Phase::Draining,
        Phase::Drained => pb::Phase::Drained,
        Phase::Failed => pb::Phase::Failed,
        Phase::Refused => pb::Phase::Refused,
        Phase::Reverting => pb::Phase::Reverting,
        Phase::WorkerExited => pb::Phase::WorkerExited,
        Phase::ShuttingDown => pb::Phase::ShuttingDown,
        Phase::Stopped => pb::Phase::Stopped,
    };
    pb::Event {
        seq: e.seq,
        unix_ms: e.unix_ms,
        phase: phase as i32,
        generation: e.generation,
        pid: e.pid,
        message: e.message,
        duration_us: e.duration_us,
        exe: e.exe,
    }
}
