//! gRPC `fleet.v1.ControllerService`: heartbeats from agents, nodes and rollouts for
//! fleetctl.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_server::ControllerService;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Change;
use crate::fleet::{Fleet, RolloutError};
use crate::inventory::{ForgetError, HeartbeatError, NodeRecord, Selector};
use crate::rollout::{RolloutNode, RolloutState, RolloutView, Spec};

#[derive(Debug)]
pub struct Api {
    pub fleet: Arc<Fleet>,
}

fn rollout_status(e: RolloutError) -> Status {
    match e {
        RolloutError::InvalidSpec(m) => Status::invalid_argument(m),
        RolloutError::Refused(m) | RolloutError::WrongState(m) => Status::failed_precondition(m),
        e @ RolloutError::NotFound(_) => Status::not_found(e.to_string()),
        RolloutError::Store(e) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl ControllerService for Api {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let status = r
            .status
            .ok_or_else(|| Status::invalid_argument("heartbeat without a status"))?;
        self.fleet
            .inventory
            .report(&status, false)
            .map_err(|e| match e {
                HeartbeatError::Invalid(m) => Status::invalid_argument(m),
                HeartbeatError::Full(m) => Status::resource_exhausted(m),
            })?;
        Ok(Response::new(pb::HeartbeatResponse {
            interval_ms: (self.fleet.inventory.ttl().as_millis() / 3).max(100) as u64,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let selector =
            Selector::parse(&request.into_inner().selector).map_err(Status::invalid_argument)?;
        let nodes = self
            .fleet
            .inventory
            .list(&selector)
            .iter()
            .map(node_message)
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = request.into_inner().node_id;
        let node = self.node(&id)?;
        Ok(Response::new(node_message(&node)))
    }

    async fn restart_node(
        &self,
        request: Request<pb::RestartNodeRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        let r = request.into_inner();
        let node = self.node(&r.node_id)?;
        let mut client = self.fleet.agents.client(&node.control_addr)?;
        let response = client
            .restart(pb::RestartRequest {
                exe: r.exe,
                sha256: r.sha256,
                reason: r.reason,
                ..Default::default()
            })
            .await?;
        Ok(response)
    }

    async fn shutdown_node(
        &self,
        request: Request<pb::ShutdownNodeRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let r = request.into_inner();
        let node = self.node(&r.node_id)?;
        let mut client = self.fleet.agents.client(&node.control_addr)?;
        client
            .shutdown(pb::ShutdownRequest { reason: r.reason })
            .await
    }

    async fn forget_node(
        &self,
        request: Request<pb::ForgetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = request.into_inner().node_id;
        match self.fleet.inventory.forget(&id).await {
            Ok(node) => {
                tracing::info!("forgot node {id} (it was {})", node.state);
                Ok(Response::new(node_message(&node)))
            }
            Err(e @ ForgetError::NotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ ForgetError::Live(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ ForgetError::Store(_)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn start_rollout(
        &self,
        request: Request<pb::RolloutSpec>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let s = request.into_inner();
        let dry_run = s.dry_run;
        let spec = Spec {
            exe: s.exe.trim().to_string(),
            sha256: s.sha256.trim().to_ascii_lowercase(),
            selector: s.selector,
            batches: s.batches.trim().to_string(),
            max_parallel: s.max_parallel,
            max_unavailable: s.max_unavailable.trim().to_string(),
            canary: s.canary,
            pause_after_canary: s.pause_after_canary,
            min_healthy_ms: s.min_healthy_ms,
            ready_timeout_ms: s.ready_timeout_ms,
            drain_timeout_ms: s.drain_timeout_ms,
            health_path: s.health_path.trim().to_string(),
            max_failures: s.max_failures.trim().to_string(),
            auto_rollback: s.auto_rollback,
            reason: s.reason,
            actor: if s.actor.is_empty() {
                "unknown".into()
            } else {
                s.actor
            },
        };
        let view = self
            .fleet
            .start_rollout(spec, dry_run)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(rollout_message(&view)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let view = self
            .fleet
            .rollout(&request.into_inner().id)
            .map_err(rollout_status)?;
        Ok(Response::new(rollout_message(&view)))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let limit = request.into_inner().limit as usize;
        let rollouts = self
            .fleet
            .rollouts(limit)
            .iter()
            .map(rollout_message)
            .collect();
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let handle = self
            .fleet
            .handle(&request.into_inner().id)
            .map_err(rollout_status)?;
        let id = handle.view.lock().expect("view lock").rollout.id.clone();
        let mut changes = self.fleet.changes.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let view = handle.view.lock().expect("view lock").clone();
                let done = view.rollout.state.finished();
                if tx.send(Ok(rollout_message(&view))).await.is_err() || done {
                    return;
                }
                // Wait for a change to this rollout, then let more arrive for a moment:
                // one message per 50 ms at most, however many nodes change.
                loop {
                    match changes.recv().await {
                        Ok(Change::Rollout(r)) if r == id => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(_) => return,
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
                    changes.try_recv()
                {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request.into_inner(), RolloutState::Paused).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request.into_inner(), RolloutState::Running).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request.into_inner(), RolloutState::Aborted).await
    }

    async fn undo_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let r = request.into_inner();
        let view = self
            .fleet
            .undo(&r.id, &actor(&r.actor))
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(rollout_message(&view)))
    }
}

fn actor(a: &str) -> String {
    if a.is_empty() {
        "unknown".into()
    } else {
        a.to_string()
    }
}

impl Api {
    fn node(&self, id: &str) -> Result<NodeRecord, Status> {
        self.fleet.inventory.get(id).ok_or_else(|| {
            Status::not_found(format!("no node {id:?}: list them with `fleetctl nodes`"))
        })
    }

    async fn act(
        &self,
        r: pb::RolloutActionRequest,
        wanted: RolloutState,
    ) -> Result<Response<pb::Rollout>, Status> {
        let view = self
            .fleet
            .request(&r.id, wanted, &actor(&r.actor))
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(rollout_message(&view)))
    }
}

pub fn node_message(n: &NodeRecord) -> pb::Node {
    pb::Node {
        node_id: n.node_id.clone(),
        labels: n.labels.clone().into_iter().collect(),
        state: n.state.clone(),
        control_addr: n.control_addr.clone(),
        admin_url: n.admin_url.clone(),
        exe: Some(pb::ExeInfo {
            path: n.exe.path.clone(),
            sha256: n.exe.sha256.clone(),
            size: n.exe.size,
        }),
        generation: n.generation,
        supervisor_pid: n.supervisor_pid,
        worker_pid: n.worker_pid,
        in_flight: n.in_flight,
        last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
        started_at_unix_ms: n.started_at_unix_ms,
        reason: n.reason.clone(),
        static_node: n.static_node,
    }
}

fn node_progress(n: &RolloutNode) -> pb::RolloutNode {
    pb::RolloutNode {
        node_id: n.node_id.clone(),
        batch: n.batch,
        state: n.state.as_str().into(),
        reason: n.reason.clone(),
        previous_exe: n.previous_exe.clone(),
        previous_sha256: n.previous_sha256.clone(),
        old_pid: n.old_pid,
        new_pid: n.new_pid,
        timeline: n
            .timeline
            .iter()
            .map(|t| pb::TimelineEntry {
                unix_ms: t.unix_ms,
                state: t.state.as_str().into(),
                message: t.message.clone(),
                pid: t.pid,
            })
            .collect(),
        target_exe: n.target_exe.clone(),
        target_sha256: n.target_sha256.clone(),
    }
}

pub fn rollout_message(v: &RolloutView) -> pb::Rollout {
    let r = &v.rollout;
    let s = &r.spec;
    pb::Rollout {
        id: r.id.clone(),
        spec: Some(pb::RolloutSpec {
            exe: s.exe.clone(),
            sha256: s.sha256.clone(),
            selector: s.selector.clone(),
            batches: s.batches.clone(),
            max_parallel: s.max_parallel,
            max_unavailable: s.max_unavailable.clone(),
            canary: s.canary,
            pause_after_canary: s.pause_after_canary,
            min_healthy_ms: s.min_healthy_ms,
            ready_timeout_ms: s.ready_timeout_ms,
            drain_timeout_ms: s.drain_timeout_ms,
            health_path: s.health_path.clone(),
            max_failures: s.max_failures.clone(),
            auto_rollback: s.auto_rollback,
            reason: s.reason.clone(),
            actor: s.actor.clone(),
            dry_run: r.state == RolloutState::Planned,
        }),
        state: r.state.as_str().into(),
        reason: r.reason.clone(),
        created_unix_ms: r.created_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        batch_sizes: r.batch_sizes.clone(),
        current_batch: r.current_batch,
        nodes: v.nodes.iter().map(node_progress).collect(),
        undo_of: r.undo_of.clone(),
    }
}
