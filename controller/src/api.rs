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
use crate::auth::grpc_caller;
use crate::fleet::{Fleet, RolloutError, Started};
use crate::history::{RestartRecord, Via};
use crate::inventory::{ForgetError, NodeRecord, Selector, page};
use crate::rollout::{NodeVersion, RolloutHandle, RolloutNode, RolloutState, RolloutView, Spec};
use crate::tokens::{Caller, Kind, NewToken, Role, TokenError, TokenRecord, actor_label};

#[derive(Debug)]
pub struct Api {
    pub fleet: Arc<Fleet>,
}

fn rollout_status(e: RolloutError) -> Status {
    match e {
        RolloutError::InvalidSpec(m) => Status::invalid_argument(m),
        RolloutError::Refused(m) | RolloutError::WrongState(m) => Status::failed_precondition(m),
        ref e @ RolloutError::Preflight {
            targets,
            ref refusals,
        } => {
            // Structured for clients (fleetctl reads them), and the same in text.
            let details = pb::PreflightRefusals {
                targets: targets as u32,
                refusals: refusals
                    .iter()
                    .map(|(node_id, reason)| pb::NodeRefusal {
                        node_id: node_id.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
            };
            Status::with_details(
                tonic::Code::FailedPrecondition,
                e.to_string(),
                prost::Message::encode_to_vec(&details).into(),
            )
        }
        e @ RolloutError::NotFound(_) => Status::not_found(e.to_string()),
        RolloutError::Store(e) => Status::internal(e.to_string()),
    }
}

/// One heartbeat, from either call: the inventory and the history take it, and the
/// answer says when to send the next (and, `on_stream`, that a status may ride with
/// the answers to commands).
fn take_beat(
    fleet: &Fleet,
    beat: pb::HeartbeatRequest,
    on_stream: bool,
) -> Result<pb::HeartbeatResponse, Status> {
    let Some(status) = beat.status else {
        crate::metrics::global().heartbeat_refused("invalid");
        return Err(Status::invalid_argument("heartbeat without a status"));
    };
    fleet
        .inventory
        .report(&status, false)
        .map_err(|e| e.status())?;
    fleet.history.heard(&status);
    Ok(pb::HeartbeatResponse {
        interval_ms: (fleet.inventory.ttl().as_millis() / 3).max(100) as u64,
        command: None,
        status_with_answers: on_stream,
    })
}

/// The beats of one `HeartbeatStream` call. What a unary `Heartbeat` has checked
/// once per call (by the layers in front of the handler, and by the handler) is
/// checked here for every beat: this controller still leads, the beat speaks for
/// the node the call began with, and (with --tls) the connection's certificate
/// names that node and has not expired.
///
/// An agent that says `takes_commands` in its first beat is called on the stream
/// ([`crate::agents::lines`]): commands go out between the answers to beats, and the
/// agent's answers to them come in between its beats, checked as beats are.
struct Beats {
    fleet: Arc<Fleet>,
    /// The client certificate the connection presented.
    cert: Option<fleet_net::tls::PeerCertificate>,
    /// The node of the first beat.
    node: Option<String>,
    /// None once the call has ended.
    incoming: Option<tonic::Streaming<pb::HeartbeatRequest>>,
    /// The node's line, when its agent takes commands on this stream.
    line: Option<Arc<crate::agents::lines::Line>>,
}

impl Drop for Beats {
    fn drop(&mut self) {
        self.hang_up();
    }
}

impl Beats {
    /// The next message for the agent: the answer to its next beat, or a command;
    /// None once the agent has closed its side or the call has ended. A refusal ends
    /// the call: nothing more is read after it.
    async fn next(&mut self) -> Option<Result<pb::HeartbeatResponse, Status>> {
        loop {
            let incoming = self.incoming.as_mut()?;
            let message = match &self.line {
                Some(line) => {
                    if let Some(command) = line.pop() {
                        return Some(Ok(pb::HeartbeatResponse {
                            interval_ms: 0,
                            command: Some(command),
                            status_with_answers: false,
                        }));
                    }
                    tokio::select! {
                        message = incoming.message() => message,
                        () = line.ready() => continue,
                    }
                }
                None => incoming.message().await,
            };
            let answer = match message {
                Ok(Some(beat)) => self.take(beat),
                Ok(None) => return None,
                // The agent's side broke (reset, a message over the size bound): the
                // status says so to whoever still listens.
                Err(status) => Err(status),
            };
            match answer {
                // An answer to a command: nothing to say back.
                Ok(None) => continue,
                Ok(Some(response)) => return Some(Ok(response)),
                Err(status) => {
                    self.incoming = None;
                    self.hang_up();
                    return Some(Err(status));
                }
            }
        }
    }

    /// No more commands on this stream (the node is dialled until it opens another).
    fn hang_up(&mut self) {
        if let Some(line) = self.line.take() {
            self.fleet.agents.lines.close(&line);
        }
    }

    /// Takes a beat (the answer to send) or an answer to a command (nothing to send),
    /// with the status it may carry (taken as a beat's, unanswered).
    fn take(
        &mut self,
        mut beat: pb::HeartbeatRequest,
    ) -> Result<Option<pb::HeartbeatResponse>, Status> {
        if let Some(refusal) = self.fleet.not_leader() {
            return Err(refusal);
        }
        if let Some(answer) = beat.answer.take() {
            // Only after a first beat has named the node, and checked as a beat is.
            let Some(node) = self.node.clone() else {
                crate::metrics::global().heartbeat_refused("invalid");
                return Err(Status::invalid_argument(
                    "an answer before the stream's first beat: begin with a beat (its status \
                     names the node)",
                ));
            };
            if self.fleet.agents.tls()
                && let Err(refusal) = crate::join::check_cert(self.cert.as_ref(), &node)
            {
                crate::metrics::global().heartbeat_refused("certificate");
                return Err(refusal);
            }
            self.fleet.agents.lines.answer(&node, answer);
            // The status the agent had as it answered: a beat, but for the answer.
            if let Some(status) = &beat.status {
                same_node(
                    &node,
                    &status.node_id,
                    "an answer's status must be its own node's",
                )?;
                take_beat(&self.fleet, beat, true)?;
                crate::metrics::global().answer_status();
            }
            return Ok(None);
        }
        let id = beat.status.as_ref().map_or("", |s| s.node_id.as_str());
        if let Some(node) = &self.node {
            same_node(node, id, "send each node's beats on a call of its own")?;
        }
        if self.fleet.agents.tls()
            && let Err(refusal) = crate::join::check_cert(self.cert.as_ref(), id)
        {
            crate::metrics::global().heartbeat_refused("certificate");
            return Err(refusal);
        }
        let first = self.node.is_none();
        if first {
            self.node = Some(id.to_string());
        }
        let opens = (first && beat.takes_commands).then(|| (id.to_string(), beat.working.clone()));
        let response = take_beat(&self.fleet, beat, true)?;
        if let Some((id, working)) = opens {
            self.line = Some(self.fleet.agents.lines.open(&id, &working));
        }
        Ok(Some(response))
    }
}

/// A stream speaks for the node its first beat named (`node`), and only for it: a
/// status naming another (`id`) ends the call, `what` saying what to do instead.
fn same_node(node: &str, id: &str, what: &str) -> Result<(), Status> {
    if node == id {
        return Ok(());
    }
    crate::metrics::global().heartbeat_refused("invalid");
    Err(Status::invalid_argument(format!(
        "this heartbeat stream speaks for node {node:?}, not {id:?}: {what}"
    )))
}

#[tonic::async_trait]
impl ControllerService for Api {
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        // With --tls a node speaks only for itself: the node id is the certificate's.
        if self.fleet.agents.tls() {
            let id = request
                .get_ref()
                .status
                .as_ref()
                .map(|s| s.node_id.clone())
                .unwrap_or_default();
            crate::join::check_node_cert(&request, &id)?;
        }
        take_beat(&self.fleet, request.into_inner(), false).map(Response::new)
    }

    type HeartbeatStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let beats = Beats {
            fleet: self.fleet.clone(),
            cert: request
                .extensions()
                .get::<fleet_net::tls::PeerCertificate>()
                .cloned(),
            node: None,
            incoming: Some(request.into_inner()),
            line: None,
        };
        // One beat read, taken and answered at a time: an agent that does not read
        // its answers stops being read (HTTP/2 flow control), and nothing queues.
        let answers = futures_util::stream::unfold(beats, |mut beats| async move {
            Some((beats.next().await?, beats))
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn get_version(
        &self,
        _request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        Ok(Response::new(fleet_proto::build_version!()))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let r = request.into_inner();
        let query = page::Query {
            selector: Selector::parse(&r.selector).map_err(Status::invalid_argument)?,
            state: page::parse_state(&r.state).map_err(Status::invalid_argument)?,
            after: match r.page_token.as_str() {
                "" => None,
                token if token.len() > fleet_proto::limits::MAX_NODE_ID => {
                    return Err(Status::invalid_argument(
                        "page_token is not one this controller gave (longer than any node id): \
                         send back a response's next_page_token as it came, or none for the first page",
                    ));
                }
                token => Some(token.to_string()),
            },
            // 0: every node, as a client from before paging expects.
            limit: match (r.summary_only, r.page_size) {
                (true, _) => Some(0),
                (false, 0) => None,
                (false, n) => Some((n as usize).min(page::MAX_PAGE)),
            },
            // A hash per label of every matching node (tens of milliseconds at
            // 100,000 nodes with a label unique to each): for the first page only,
            // which is where a client reads the counts.
            count_labels: r.page_token.is_empty(),
        };
        let page = self.fleet.inventory.page(&query);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(pb::ListNodesResponse {
            nodes: page
                .nodes
                .into_iter()
                .map(|n| {
                    let on_stream = self.fleet.agents.lines.has(&n.node_id);
                    node_into_message(n, on_stream)
                })
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
            total: count(page.total),
            counts_by_state: page
                .by_state
                .into_iter()
                .map(|(s, n)| (s, count(n)))
                .collect(),
            counts_by_label: page
                .by_label
                .into_iter()
                .map(|(l, n)| (l, count(n)))
                .collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let id = request.into_inner().node_id;
        let node = self.node(&id)?;
        let on_stream = self.fleet.agents.lines.has(&id);
        Ok(Response::new(node_message(&node, on_stream)))
    }

    async fn get_controllers(
        &self,
        _request: Request<pb::GetControllersRequest>,
    ) -> Result<Response<pb::ControllersResponse>, Status> {
        if let Some(ha) = self.fleet.ha() {
            return Ok(Response::new(ha.controllers().await));
        }
        // A store of its own: this controller alone, leading since it started.
        Ok(Response::new(pb::ControllersResponse {
            store: self.fleet.store.url(),
            answered_by: String::new(),
            controllers: vec![pb::ControllerInfo {
                leader: true,
                version: env!("CARGO_PKG_VERSION").to_string(),
                ..Default::default()
            }],
            members: Vec::new(),
            quorum: true,
        }))
    }

    async fn get_node_history(
        &self,
        request: Request<pb::GetNodeHistoryRequest>,
    ) -> Result<Response<pb::NodeHistory>, Status> {
        let r = request.into_inner();
        let node = self.node(&r.node_id)?;
        let limit = match r.limit {
            0 => crate::history::KEEP_PER_NODE,
            n => n as usize,
        };
        let restarts = self
            .fleet
            .history
            .of_node(&r.node_id, limit)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::NodeHistory {
            node: Some(node_message(
                &node,
                self.fleet.agents.lines.has(&node.node_id),
            )),
            restarts: restarts.iter().map(|r| r.to_message()).collect(),
            workers: self.fleet.history.workers(&r.node_id),
        }))
    }

    async fn restart_node(
        &self,
        request: Request<pb::RestartNodeRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        let caller = grpc_caller(&request)?;
        let r = request.into_inner();
        let node = self.node(&r.node_id)?;
        crate::agents::refuse_if_down(&node, "restart")?;
        self.fleet
            .guard_manual(&r.node_id, "restart", r.force, &caller.name)
            .await
            .map_err(|e| Status::failed_precondition(e.0))?;
        let reason = asked_by(&r.reason, &caller);
        tracing::info!("node {}: restart {reason}", r.node_id);
        let sent_at = crate::now_ms();
        let result = self
            .fleet
            .agents
            .restart(
                &node,
                pb::RestartRequest {
                    exe: r.exe,
                    sha256: r.sha256,
                    reason: reason.clone(),
                    ..Default::default()
                },
            )
            .await;
        crate::audit::node_action(
            "restart",
            &r.node_id,
            &caller,
            &reason,
            &crate::audit::restart_outcome(&result),
        );
        self.fleet
            .history
            .record(RestartRecord::restart(
                &r.node_id,
                Via::Grpc,
                &caller.name,
                "",
                sent_at,
                &result,
            ))
            .await;
        Ok(Response::new(result?))
    }

    async fn shutdown_node(
        &self,
        request: Request<pb::ShutdownNodeRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let caller = grpc_caller(&request)?;
        let r = request.into_inner();
        let node = self.node(&r.node_id)?;
        crate::agents::refuse_if_down(&node, "shut down")?;
        self.fleet
            .guard_manual(&r.node_id, "shut down", r.force, &caller.name)
            .await
            .map_err(|e| Status::failed_precondition(e.0))?;
        let reason = asked_by(&r.reason, &caller);
        tracing::info!("node {}: shutdown {reason}", r.node_id);
        let sent_at = crate::now_ms();
        let result = self.fleet.agents.shutdown(&node, reason.clone()).await;
        crate::audit::node_action(
            "shutdown",
            &r.node_id,
            &caller,
            &reason,
            &crate::audit::shutdown_outcome(&result),
        );
        self.fleet
            .history
            .record(RestartRecord::shutdown(
                &r.node_id,
                Via::Grpc,
                &caller.name,
                sent_at,
                &result,
            ))
            .await;
        Ok(Response::new(result?))
    }

    async fn forget_node(
        &self,
        request: Request<pb::ForgetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let caller = grpc_caller(&request)?;
        let id = request.into_inner().node_id;
        match self.fleet.inventory.forget(&id).await {
            Ok(node) => {
                self.fleet.history.forget(&id);
                crate::audit::node_forgotten(&id, &node.state, &caller);
                Ok(Response::new(node_message(&node, false)))
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
        let caller = grpc_caller(&request)?;
        let s = request.into_inner();
        let dry_run = s.dry_run;
        let summary = s.summary_answer;
        let spec = Spec {
            exe: s.exe.trim().to_string(),
            sha256: s.sha256.trim().to_ascii_lowercase(),
            selector: s.selector,
            batches: s.batches.trim().to_string(),
            max_parallel: s.max_parallel,
            max_unavailable: s.max_unavailable.trim().to_string(),
            canary: s.canary,
            pause_after_canary: s.pause_after_canary,
            // Unset (not given, and 0) is the controller's default; an explicit 0 is
            // no soak.
            min_healthy_ms: self.fleet.resolve_min_healthy(
                (s.min_healthy_set || s.min_healthy_ms > 0).then_some(s.min_healthy_ms),
            ),
            ready_timeout_ms: s.ready_timeout_ms,
            drain_timeout_ms: s.drain_timeout_ms,
            health_path: s.health_path.trim().to_string(),
            max_failures: Spec::max_failures_or_default(&s.max_failures),
            auto_rollback: s.auto_rollback,
            reason: s.reason,
            declared_actor: declared(&s.actor, &caller),
            actor: caller.name,
            exclude: s.exclude.iter().map(|id| id.trim().to_string()).collect(),
            skip_unreachable: s.skip_unreachable,
            left_out: Vec::new(),
        };
        let view = self
            .fleet
            .start_rollout(spec, dry_run)
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(match &view {
            Started::Running(handle) if summary => {
                summary_message(handle, &handle.view.lock().expect("view lock"))
            }
            _ => view.with_view(rollout_message),
        }))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let request = request.into_inner();
        // Made from the view under its lock, not from a copy of it: the message is the
        // one copy of 100,000 nodes, and none with summary_only (which does not read
        // an old rollout's nodes back from the store either).
        if request.summary_only {
            let handle = self.fleet.find(&request.id).map_err(rollout_status)?;
            let view = handle.view.lock().expect("view lock");
            return Ok(Response::new(summary_message(&handle, &view)));
        }
        let handle = self.fleet.handle(&request.id).map_err(rollout_status)?;
        let view = handle.view.lock().expect("view lock");
        if request.page_size == 0 {
            return Ok(Response::new(rollout_message(&view)));
        }
        Ok(Response::new(rollout_page(
            &handle,
            &view,
            &request.page_token,
            request.page_size as usize,
        )?))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let request = request.into_inner();
        let mut rollouts = Vec::new();
        for h in self.fleet.rollout_handles(request.limit as usize) {
            rollouts.push(if request.summary_only {
                summary_message(&h, &h.view.lock().expect("view lock"))
            } else {
                let h = self.fleet.full(&h).map_err(rollout_status)?;
                let view = h.view.lock().expect("view lock");
                rollout_message(&view)
            });
        }
        Ok(Response::new(pb::ListRolloutsResponse { rollouts }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;

    async fn watch_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let request = request.into_inner();
        // A summary needs no nodes: an old rollout's are not read back for it.
        let handle = if request.summary_only {
            self.fleet.find(&request.id)
        } else {
            self.fleet.handle(&request.id)
        }
        .map_err(rollout_status)?;
        let id = handle.view.lock().expect("view lock").rollout.id.clone();
        let mut changes = self.fleet.changes.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // With changed_nodes_only: each node's version as last sent (empty: the
            // next message carries every node).
            let mut sent: Vec<NodeVersion> = Vec::new();
            loop {
                let (message, done) = {
                    let view = handle.view.lock().expect("view lock");
                    let message = if request.summary_only {
                        summary_message(&handle, &view)
                    } else if request.changed_nodes_only && sent.len() == view.nodes.len() {
                        changed_nodes_message(&view, &mut sent)
                    } else {
                        if request.changed_nodes_only {
                            sent = view.nodes.iter().map(RolloutNode::version).collect();
                        }
                        rollout_message(&view)
                    };
                    (message, view.rollout.state.finished())
                };
                if tx.send(Ok(message)).await.is_err() || done {
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
        self.act(request, RolloutState::Paused).await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, RolloutState::Running).await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, RolloutState::Aborted).await
    }

    async fn undo_rollout(
        &self,
        request: Request<pb::RolloutActionRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = grpc_caller(&request)?;
        let r = request.into_inner();
        let view = self
            .fleet
            .undo(&r.id, &caller.name, &declared(&r.actor, &caller))
            .await
            .map_err(rollout_status)?;
        Ok(Response::new(view.with_view(rollout_message)))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = grpc_caller(&request)?;
        let r = request.into_inner();
        let kind = match (r.join, r.role.trim()) {
            (true, "") => Kind::Join,
            (true, _) => {
                return Err(Status::invalid_argument(
                    "a join token has no role: give either a role or join",
                ));
            }
            (false, "") => {
                return Err(Status::invalid_argument(
                    "give the token a role (viewer, operator or admin), or ask for a join token",
                ));
            }
            (false, role) => Kind::of(Role::parse(role).map_err(Status::invalid_argument)?),
        };
        let new = NewToken {
            name: r.name,
            kind,
            ttl: (r.ttl_ms > 0).then(|| Duration::from_millis(r.ttl_ms)),
            node_id_prefix: r.node_id_prefix,
            max_uses: r.max_uses,
        };
        let (record, secret) = self
            .fleet
            .tokens
            .create(new, &caller)
            .await
            .map_err(token_status)?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_message(&record)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self.fleet.tokens.list().iter().map(token_message).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let caller = grpc_caller(&request)?;
        let id = request.into_inner().id;
        let record = self
            .fleet
            .tokens
            .revoke(&id, &caller)
            .await
            .map_err(token_status)?;
        Ok(Response::new(token_message(&record)))
    }
}

/// What the request said the actor was, kept when it says something else than the
/// authenticated caller.
fn declared(given: &str, caller: &Caller) -> String {
    let given = given.trim();
    if given == caller.name {
        String::new()
    } else {
        given.to_string()
    }
}

/// A reason for an agent's log that says who asked: "deploy v2 (asked by ci through
/// the controller)".
pub fn asked_by(reason: &str, caller: &Caller) -> String {
    let who = format!("asked by {} through the controller", caller.name);
    match reason.trim() {
        "" => who,
        r => format!("{r} ({who})"),
    }
}

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Invalid(m) => Status::invalid_argument(m),
        e @ (TokenError::NotFound(_) | TokenError::Bootstrap) => Status::not_found(e.to_string()),
        e @ TokenError::Store(_) => Status::internal(e.to_string()),
    }
}

pub fn token_message(t: &TokenRecord) -> pb::Token {
    pb::Token {
        id: t.id.clone(),
        name: t.name.clone(),
        kind: t.kind.as_str().into(),
        created_unix_ms: t.created_unix_ms,
        created_by: t.created_by.clone(),
        expires_unix_ms: t.expires_unix_ms,
        revoked_unix_ms: t.revoked_unix_ms,
        last_used_unix_ms: t.last_used_unix_ms,
        node_id_prefix: t.node_id_prefix.clone(),
        max_uses: t.max_uses,
        uses: t.uses,
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
        request: Request<pb::RolloutActionRequest>,
        wanted: RolloutState,
    ) -> Result<Response<pb::Rollout>, Status> {
        let caller = grpc_caller(&request)?;
        let r = request.into_inner();
        let actor = actor_label(&caller.name, &declared(&r.actor, &caller));
        let handle = self
            .fleet
            .request(&r.id, wanted, &actor)
            .await
            .map_err(rollout_status)?;
        let view = handle.view.lock().expect("view lock");
        Ok(Response::new(rollout_message(&view)))
    }
}

/// `n` as the API shows it; `calls_on_stream`: its agent takes calls on its heartbeat
/// stream now.
pub fn node_message(n: &NodeRecord, calls_on_stream: bool) -> pb::Node {
    node_into_message(n.clone(), calls_on_stream)
}

/// [`node_message`] of a record that is not needed any more (a page's copies).
fn node_into_message(n: NodeRecord, calls_on_stream: bool) -> pb::Node {
    pb::Node {
        node_id: n.node_id,
        labels: n.labels.into_iter().collect(),
        state: n.state,
        control_addr: n.control_addr,
        admin_url: n.admin_url,
        exe: Some(pb::ExeInfo {
            path: n.exe.path,
            sha256: n.exe.sha256,
            size: n.exe.size,
        }),
        generation: n.generation,
        supervisor_pid: n.supervisor_pid,
        worker_pid: n.worker_pid,
        in_flight: n.in_flight,
        last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
        started_at_unix_ms: n.started_at_unix_ms,
        reason: n.reason,
        static_node: n.static_node,
        calls_on_stream,
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

/// The rollout with every node.
pub fn rollout_message(v: &RolloutView) -> pb::Rollout {
    rollout_message_with(v, v.nodes.iter().map(node_progress).collect(), v.progress())
}

/// The rollout with only the nodes whose version differs from `sent` (one per node,
/// in the view's order), which it brings up to date.
fn changed_nodes_message(v: &RolloutView, sent: &mut [NodeVersion]) -> pb::Rollout {
    let nodes = v
        .nodes
        .iter()
        .zip(sent.iter_mut())
        .filter_map(|(node, sent)| {
            let now = node.version();
            (now != *sent).then(|| {
                *sent = now;
                node_progress(node)
            })
        })
        .collect();
    pb::Rollout {
        nodes_changed_only: true,
        ..rollout_message_with(v, nodes, v.progress())
    }
}

/// One page of the rollout's nodes, in its order: at most `size` (at most
/// [`page::MAX_PAGE`]) after the node `token` names (none: from the first), with the
/// token of the next page when more follow. `view` is `handle`'s, locked.
fn rollout_page(
    handle: &RolloutHandle,
    view: &RolloutView,
    token: &str,
    size: usize,
) -> Result<pb::Rollout, Status> {
    let start = match token {
        "" => 0,
        token => handle.find(token).map(|i| i + 1).ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token {token:?} names no node of rollout {}: send back a page's \
                 next_page_token as it came, or none for the first page",
                view.rollout.id
            ))
        })?,
    };
    let end = start
        .saturating_add(size.min(page::MAX_PAGE))
        .min(view.nodes.len());
    let nodes = view.nodes[start..end].iter().map(node_progress).collect();
    let mut message = rollout_message_with(view, nodes, handle.progress(view));
    if end < view.nodes.len() {
        message.next_page_token = view.nodes[end - 1].node_id.clone();
    }
    Ok(message)
}

/// The rollout without its nodes: header, spec and counts (kept by `handle` for an old
/// rollout whose nodes are in the store). `view` is `handle`'s, locked.
fn summary_message(handle: &RolloutHandle, view: &RolloutView) -> pb::Rollout {
    rollout_message_with(view, Vec::new(), handle.progress(view))
}

/// The rollout's header, spec and `progress`, with `nodes` (all, some or none).
fn rollout_message_with(
    v: &RolloutView,
    nodes: Vec<pb::RolloutNode>,
    progress: crate::rollout::Progress,
) -> pb::Rollout {
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
            declared_actor: s.declared_actor.clone(),
            min_healthy_set: true,
            exclude: s.exclude.clone(),
            skip_unreachable: s.skip_unreachable,
            left_out: s
                .left_out
                .iter()
                .map(|(node_id, reason)| pb::NodeRefusal {
                    node_id: node_id.clone(),
                    reason: reason.clone(),
                })
                .collect(),
            summary_answer: false,
        }),
        state: r.state.as_str().into(),
        reason: r.reason.clone(),
        created_unix_ms: r.created_unix_ms,
        finished_unix_ms: r.finished_unix_ms,
        batch_sizes: r.batch_sizes.clone(),
        current_batch: r.current_batch,
        nodes,
        undo_of: r.undo_of.clone(),
        progress: Some(progress_message(progress)),
        nodes_changed_only: false,
        next_page_token: String::new(),
    }
}

fn progress_message(p: crate::rollout::Progress) -> pb::RolloutProgress {
    let n = |c: usize| u32::try_from(c).unwrap_or(u32::MAX);
    pb::RolloutProgress {
        total: n(p.total),
        healthy: n(p.healthy),
        failed: n(p.failed),
        rolled_back: n(p.rolled_back),
        skipped: n(p.skipped),
        active: n(p.active),
        pending: n(p.pending),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::NodeState;

    fn api(nodes: usize) -> (tempfile::TempDir, Api) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let fleet = Fleet::new(Arc::new(store), Duration::from_secs(10), None).unwrap();
        for i in 0..nodes {
            let status = pb::StatusResponse {
                node_id: format!("n{i:02}"),
                labels: [("zone".to_string(), ["a", "b"][i % 2].to_string())].into(),
                state: if i % 4 == 0 { "stopped" } else { "serving" }.into(),
                control_addr: "127.0.0.1:7101".into(),
                ..Default::default()
            };
            fleet.inventory.report(&status, false).unwrap();
        }
        (dir, Api { fleet })
    }

    async fn list(
        api: &Api,
        request: pb::ListNodesRequest,
    ) -> Result<pb::ListNodesResponse, Status> {
        api.list_nodes(Request::new(request))
            .await
            .map(Response::into_inner)
    }

    fn ids(r: &pb::ListNodesResponse) -> Vec<&str> {
        r.nodes.iter().map(|n| n.node_id.as_str()).collect()
    }

    #[test]
    fn a_watch_sends_every_node_once_then_only_those_that_moved() {
        let mut view = RolloutView::for_test(&["n1", "n2", "n3"]);
        let mut sent: Vec<NodeVersion> = view.nodes.iter().map(RolloutNode::version).collect();
        let quiet = changed_nodes_message(&view, &mut sent);
        assert!(quiet.nodes.is_empty() && quiet.nodes_changed_only);
        assert_eq!(
            quiet.progress.unwrap().total,
            3,
            "the counts cover every node"
        );

        view.nodes[1].set(NodeState::Restarting, "restart asked", 0);
        view.nodes[2].new_pid = 4242;
        let moved = changed_nodes_message(&view, &mut sent);
        let ids: Vec<&str> = moved.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["n2", "n3"]);
        assert_eq!(moved.nodes[0].state, "restarting");
        assert_eq!(moved.progress.unwrap().active, 1);
        // The same step again (same state, a new timeline entry) is a change too.
        view.nodes[1].set(NodeState::Restarting, "still restarting", 0);
        let again = changed_nodes_message(&view, &mut sent);
        assert_eq!(again.nodes.len(), 1);
        assert!(changed_nodes_message(&view, &mut sent).nodes.is_empty());

        let full = rollout_message(&view);
        assert!(!full.nodes_changed_only);
        assert_eq!(full.nodes.len(), 3);
    }

    #[tokio::test]
    async fn list_nodes_pages_in_id_order_with_the_counts() {
        let (_dir, api) = api(12);
        // A client from before paging: every node, in one answer.
        let all = list(&api, pb::ListNodesRequest::default()).await.unwrap();
        assert_eq!(all.nodes.len(), 12);
        assert_eq!(all.next_page_token, "");
        assert_eq!(all.total, 12);

        let mut request = pb::ListNodesRequest {
            selector: "zone=a".into(),
            page_size: 2,
            state: "serving".into(),
            ..Default::default()
        };
        let mut pages = Vec::new();
        loop {
            let page = list(&api, request.clone()).await.unwrap();
            assert_eq!(page.total, 3, "zone=a serving: n02, n06, n10");
            assert_eq!(page.counts_by_state["serving"], 3);
            assert_eq!(page.counts_by_state["stopped"], 3);
            if pages.is_empty() {
                assert_eq!(page.counts_by_label["zone=a"], 6);
                assert_eq!(
                    page.counts_by_label.len(),
                    1,
                    "only the selected nodes' labels"
                );
            } else {
                assert!(
                    page.counts_by_label.is_empty(),
                    "labels on the first page only"
                );
            }
            pages.push(ids(&page).join(","));
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        assert_eq!(pages, ["n02,n06", "n10"]);

        let summary = list(
            &api,
            pb::ListNodesRequest {
                summary_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(summary.nodes.is_empty());
        assert_eq!(summary.next_page_token, "");
        assert_eq!((summary.total, summary.counts_by_state["stopped"]), (12, 3));
    }

    #[tokio::test]
    async fn list_nodes_refuses_an_unknown_state_and_a_token_it_never_gave() {
        let (_dir, api) = api(3);
        let e = list(
            &api,
            pb::ListNodesRequest {
                state: "down".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("unknown state \"down\": give one of"),
            "{e}"
        );
        let e = list(
            &api,
            pb::ListNodesRequest {
                page_token: "x".repeat(200),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("next_page_token"), "{e}");
        // A token naming no node (forgotten since): the page goes on after it.
        let page = list(
            &api,
            pb::ListNodesRequest {
                page_token: "n00-gone".into(),
                page_size: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(ids(&page), ["n01"]);
        assert_eq!(page.next_page_token, "n01");
    }
}
