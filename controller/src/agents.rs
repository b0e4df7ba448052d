//! Clients for the agents' `AgentService`, one lazily connected channel per node and
//! control address, carrying the fleet token — and, with `--tls`, over mutual TLS that
//! checks the agent's certificate names the node meant (`<node-id>.node.fleet`): a
//! control address a node reported is only where to dial, never who answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fleet_proto::v1 as pb;
use fleet_proto::v1::agent_service_client::AgentServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::inventory::{NodeRecord, STOPPED};

pub mod lines;

use fleet_proto::v1::command::Call;
use fleet_proto::v1::command_answer::Answer;
pub use lines::Lines;

/// The inventory's state of a node that missed its heartbeats (or a static node not polled).
const UNREACHABLE: &str = "unreachable";

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Self(token.and_then(|t| format!("Bearer {t}").parse().ok()))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client =
    AgentServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

#[derive(Debug)]
pub struct Agents {
    token: Bearer,
    /// The same, as commands on a heartbeat stream carry it ("" without one).
    raw_token: String,
    /// Nodes whose agents take calls on their heartbeat streams: called there, not
    /// dialled.
    pub lines: Lines,
    /// The client config with the controller's certificate (`--tls`); swapped when the
    /// controller renews its certificate.
    tls: RwLock<Option<Arc<rustls::ClientConfig>>>,
    /// Open channels by control address, with when each was last used. Capped: a
    /// connection costs tens of KB, and a fleet of 10,000 nodes needs only the ones
    /// in the current batch.
    channels: Mutex<HashMap<String, (Channel, Instant)>>,
    /// Calls to agents in flight, at most [`MAX_CALLS`]: a closed channel's connection
    /// lives as long as a call on it, so without a bound a batch of 10,000 nodes (or a
    /// rollback of 50,000) would open as many connections at once: beside 16,928
    /// heartbeat connections, past a 20,000 descriptor limit. The channels kept plus
    /// the calls in flight stay under 2,048 connections.
    calls: tokio::sync::Semaphore,
}

/// An agent's restart timeouts until it reports its own (its defaults).
const DEFAULT_READY: Duration = Duration::from_secs(30);
/// Beyond an agent's own timeouts, what a call may take: hashing the executable,
/// starting the process, the network.
pub const MARGIN: Duration = Duration::from_secs(60);
/// Calls that do no restart (status, preflight, shutdown).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn first_set(ms: &[u64]) -> Option<Duration> {
    ms.iter()
        .find(|&&m| m > 0)
        .map(|&m| Duration::from_millis(m))
}

/// `call` within `limit`, or `DEADLINE_EXCEEDED` naming the node and the call; a
/// node that cannot be reached at its control address is `UNAVAILABLE` with the node,
/// the address, the cause and what to do, not a bare "tcp connect error".
/// (The dialled calls are boxed by their callers: a tonic call's future is several
/// KB, and inline it would make every caller's future that size, dialled or not — the
/// rollout holds one per node of a batch, 10,000 at a time, nearly all on the stream.)
async fn bounded<T>(
    (node_id, control_addr): (&str, &str),
    what: &str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(Err(status)) if unreached(&status) => Err(tonic::Status::unavailable(format!(
            "cannot reach node {} at its control address {} to call {what} ({}): it takes no \
             calls on its heartbeat stream, so the controller dials that address. Check that its \
             agent runs and that this controller's host reaches that address; or let the node \
             take calls on its stream (an agent without a token that talks to the controller \
             in clear beyond loopback takes none: give the fleet a token, or use --tls)",
            node_id,
            control_addr,
            crate::with_cause(&status)
        ))),
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer to {what} from node {node_id} at {control_addr} within {}",
            humantime::format_duration(limit)
        ))),
    }
}

/// A dialled call that never reached the agent: no connection (a status made from a
/// transport error carries it as its source; an agent's own refusal has none).
fn unreached(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_some()
}

/// Refuses to `action` ("restart", "shut down") a node whose agent is known not to
/// answer, before any connection is tried: "node web-3 is stopped (last heartbeat 12s
/// ago at 127.0.0.1:7102): nothing to restart — start its agent again", not a
/// transport error that names neither the node nor the address.
pub fn refuse_if_down(node: &NodeRecord, action: &str) -> Result<(), tonic::Status> {
    let Some(why) = down(node) else {
        return Ok(());
    };
    let todo = if node.state == STOPPED {
        format!("nothing to {action}: start its agent again (it registers at its first heartbeat)")
    } else {
        format!(
            "it cannot be asked to {action}: check that its agent runs and that the controller reaches {}",
            node.control_addr
        )
    };
    Err(tonic::Status::failed_precondition(format!(
        "node {} is {why}; {todo}",
        node.node_id
    )))
}

/// Whether a manual restart or shutdown can be asked of `node` now: not when its
/// agent is known not to answer (stopped, unreachable) or is already going away.
pub fn takes_actions(node: &NodeRecord) -> bool {
    down(node).is_none() && node.state != "shutting-down"
}

/// Why `node` cannot be called ("stopped (last heartbeat 12s ago at ADDR)"), or `None`
/// when its agent is expected to answer.
pub fn down(node: &NodeRecord) -> Option<String> {
    if node.state != STOPPED && node.state != UNREACHABLE {
        return None;
    }
    let last = match node.last_heartbeat_unix_ms {
        0 => "no heartbeat yet".to_string(),
        ms => {
            let secs = crate::now_ms().saturating_sub(ms) / 1000;
            format!(
                "last heartbeat {} ago",
                humantime::format_duration(Duration::from_secs(secs))
            )
        }
    };
    let what = match node.reason.trim() {
        r if node.state == UNREACHABLE && !r.is_empty() => r.to_string(),
        _ => last,
    };
    Some(format!("{} ({what}, at {})", node.state, node.control_addr))
}

/// Most channels kept open at once; the least recently used is closed first.
const MAX_CHANNELS: usize = 1024;
/// Most calls to agents in flight at once (the rest wait their turn).
pub const MAX_CALLS: usize = 1024;

impl Agents {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            token: Bearer::new(token),
            raw_token: token.unwrap_or_default().to_string(),
            lines: Lines::default(),
            tls: RwLock::new(None),
            channels: Mutex::new(HashMap::new()),
            calls: tokio::sync::Semaphore::new(MAX_CALLS),
        }
    }

    /// Calls agents over mutual TLS with `config` from now on (open channels close).
    pub fn set_tls(&self, config: Arc<rustls::ClientConfig>) {
        *self.tls.write().expect("tls lock") = Some(config);
        self.channels.lock().expect("channels lock").clear();
    }

    pub fn tls(&self) -> bool {
        self.tls.read().expect("tls lock").is_some()
    }

    /// A client for node `node_id`'s agent at `control_addr` (`127.0.0.1:7101`).
    pub fn client(&self, node_id: &str, control_addr: &str) -> Result<Client, tonic::Status> {
        let tls = self.tls.read().expect("tls lock").clone();
        let key = format!("{node_id}@{control_addr}");
        let mut channels = self.channels.lock().expect("channels lock");
        let now = Instant::now();
        let channel = match channels.get_mut(&key) {
            Some((c, used)) => {
                *used = now;
                c.clone()
            }
            None => {
                if channels.len() >= MAX_CHANNELS {
                    let oldest = channels
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(addr, _)| addr.clone());
                    if let Some(addr) = oldest {
                        channels.remove(&addr);
                    }
                }
                let endpoint = Endpoint::from_shared(format!("http://{control_addr}"))
                    .map_err(|e| {
                        tonic::Status::invalid_argument(format!(
                            "bad control address {control_addr:?}: {e}"
                        ))
                    })?
                    .connect_timeout(Duration::from_secs(3))
                    .tcp_nodelay(true);
                let channel = match tls {
                    Some(config) => {
                        let name = fleet_net::tls::node_name(node_id);
                        let connector =
                            fleet_net::tls::Connector::new(config, &name).map_err(|e| {
                                tonic::Status::invalid_argument(format!("node {node_id:?}: {e}"))
                            })?;
                        endpoint.connect_with_connector_lazy(connector)
                    }
                    None => endpoint.connect_lazy(),
                };
                channels.insert(key, (channel.clone(), now));
                channel
            }
        };
        Ok(AgentServiceClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }

    /// A turn to call an agent: waits while [`MAX_CALLS`] calls are in flight.
    async fn turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.calls
            .acquire()
            .await
            .expect("the calls semaphore is never closed")
    }

    /// Restarts `node`, waiting as long as the node may take: its ready timeout (the
    /// request's, else the one the agent reported, else the agent's default) plus
    /// [`MARGIN`].
    pub async fn restart(
        &self,
        node: &NodeRecord,
        request: pb::RestartRequest,
    ) -> Result<pb::RestartResponse, tonic::Status> {
        refuse_if_down(node, "restart")?;
        let ready =
            first_set(&[request.ready_timeout_ms, node.ready_timeout_ms]).unwrap_or(DEFAULT_READY);
        let limit = ready + MARGIN;
        let call = Call::Restart(request.clone());
        let on_line = self.on_line(&node.node_id, "Restart", call, limit, |a| match a {
            Answer::Restart(r) => Ok(r),
            other => Err(answer_kind(&other)),
        });
        if let Some(answer) = on_line.await {
            return answer;
        }
        let _turn = self.turn().await;
        let mut client = self.client(&node.node_id, &node.control_addr)?;
        let to = (node.node_id.as_str(), node.control_addr.as_str());
        bounded(to, "Restart", limit, Box::pin(client.restart(request))).await
    }

    /// Calls node `node_id` on its heartbeat stream, if it takes calls there: the
    /// answer `pick` takes (it names any other kind), or the call's error. None: dial
    /// it.
    async fn on_line<T>(
        &self,
        node_id: &str,
        what: &'static str,
        call: Call,
        limit: Duration,
        pick: impl FnOnce(Answer) -> Result<T, &'static str>,
    ) -> Option<Result<T, tonic::Status>> {
        let answer = self.lines.call(node_id, &self.raw_token, call, limit).await;
        let via = if answer.is_some() { "stream" } else { "dial" };
        crate::metrics::global().agent_call(what, via);
        Some(match answer? {
            Ok(Answer::Error(e)) => Err(tonic::Status::new(e.code.into(), e.message)),
            Ok(answer) => pick(answer).map_err(|kind| {
                tonic::Status::internal(format!("node {node_id} answered {what} with {kind}"))
            }),
            Err(lines::Timeout) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer to {what} from node {node_id} on its heartbeat stream within {}",
                humantime::format_duration(limit)
            ))),
        })
    }

    /// Asks `node` to shut down (the agent answers at once and drains on its own).
    pub async fn shutdown(
        &self,
        node: &NodeRecord,
        reason: String,
    ) -> Result<pb::ShutdownResponse, tonic::Status> {
        refuse_if_down(node, "shut down")?;
        let limit = CALL_TIMEOUT;
        let call = Call::Shutdown(pb::ShutdownRequest {
            reason: reason.clone(),
        });
        let on_line = self.on_line(&node.node_id, "Shutdown", call, limit, |a| match a {
            Answer::Shutdown(r) => Ok(r),
            other => Err(answer_kind(&other)),
        });
        if let Some(answer) = on_line.await {
            return answer;
        }
        let _turn = self.turn().await;
        let mut client = self.client(&node.node_id, &node.control_addr)?;
        bounded(
            (&node.node_id, &node.control_addr),
            "Shutdown",
            limit,
            Box::pin(client.shutdown(pb::ShutdownRequest { reason })),
        )
        .await
    }

    /// Asks node `node_id` (at `control_addr` if it takes no calls on its heartbeat
    /// stream) whether it could restart into `request`'s executable.
    pub async fn preflight(
        &self,
        node_id: &str,
        control_addr: &str,
        request: pb::PreflightRequest,
    ) -> Result<pb::PreflightResponse, tonic::Status> {
        let call = Call::Preflight(request.clone());
        let on_line = self.on_line(node_id, "Preflight", call, CALL_TIMEOUT, |a| match a {
            Answer::Preflight(r) => Ok(r),
            other => Err(answer_kind(&other)),
        });
        if let Some(answer) = on_line.await {
            return answer;
        }
        let _turn = self.turn().await;
        let mut client = self.client(node_id, control_addr)?;
        bounded(
            (node_id, control_addr),
            "Preflight",
            CALL_TIMEOUT,
            Box::pin(client.preflight(request)),
        )
        .await
    }

    pub async fn status(
        &self,
        node_id: &str,
        control_addr: &str,
        timeout: Duration,
    ) -> Result<pb::StatusResponse, tonic::Status> {
        let call = Call::Status(pb::StatusRequest {});
        let on_line = self.on_line(node_id, "Status", call, timeout, |a| match a {
            Answer::Status(r) => Ok(r),
            other => Err(answer_kind(&other)),
        });
        if let Some(answer) = on_line.await {
            return answer;
        }
        let call = Box::pin(async {
            let _turn = self.turn().await;
            let mut client = self.client(node_id, control_addr)?;
            client.status(pb::StatusRequest {}).await
        });
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from {control_addr} within {}",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

/// What kind of answer `answer` is, for the error when an agent answered a call with
/// another call's answer (a broken agent).
fn answer_kind(answer: &Answer) -> &'static str {
    match answer {
        Answer::Restart(_) => "a Restart answer",
        Answer::Preflight(_) => "a Preflight answer",
        Answer::Status(_) => "a Status answer",
        Answer::Shutdown(_) => "a Shutdown answer",
        Answer::Error(_) => "an error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dialled call that found no agent is told apart from an agent's own
    /// `UNAVAILABLE` (a draining node says so itself), and is explained with its cause.
    #[tokio::test]
    async fn an_agent_not_reached_is_named_with_its_address_and_cause() {
        let refused =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let mut transport = tonic::Status::unavailable("tcp connect error");
        transport.set_source(Arc::new(refused));
        assert!(unreached(&transport));
        assert_eq!(
            crate::with_cause(&transport),
            "tcp connect error: Connection refused"
        );
        let own = tonic::Status::unavailable("draining");
        assert!(!unreached(&own));
        assert_eq!(crate::with_cause(&own), "draining");

        let node = node("serving", "");
        let to = (node.node_id.as_str(), node.control_addr.as_str());
        let second = Duration::from_secs(1);
        let call = async { Err::<tonic::Response<()>, _>(transport) };
        let e = bounded(to, "Restart", second, call).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        for part in [
            "web-3",
            "127.0.0.1:7102",
            "Restart",
            "Connection refused",
            "--tls",
        ] {
            assert!(e.message().contains(part), "{part}: {}", e.message());
        }
        let call = async { Err::<tonic::Response<()>, _>(tonic::Status::unavailable("draining")) };
        let e = bounded(to, "Restart", second, call).await.unwrap_err();
        assert_eq!(e.message(), "draining");
    }

    fn node(state: &str, reason: &str) -> NodeRecord {
        NodeRecord {
            node_id: "web-3".into(),
            labels: Default::default(),
            state: state.into(),
            control_addr: "127.0.0.1:7102".into(),
            admin_url: String::new(),
            exe: crate::inventory::ExeRecord {
                path: "/opt/app/app".into(),
                sha256: String::new(),
                size: 0,
            },
            generation: 1,
            supervisor_pid: 1,
            worker_pid: 2,
            in_flight: 0,
            last_heartbeat_unix_ms: crate::now_ms() - 12_000,
            started_at_unix_ms: 0,
            reason: reason.into(),
            static_node: false,
            listeners: Vec::new(),
            ready_timeout_ms: 0,
            drain_timeout_ms: 0,
            stale_since_unix_ms: 0,
        }
    }

    #[test]
    fn a_node_that_cannot_answer_is_refused_saying_why_and_where() {
        let stopped = refuse_if_down(&node("stopped", ""), "restart").unwrap_err();
        assert_eq!(stopped.code(), tonic::Code::FailedPrecondition);
        let message = stopped.message();
        assert!(
            message.starts_with("node web-3 is stopped (last heartbeat 12s ago, at 127.0.0.1:7102); nothing to restart: start its agent again"),
            "{message}"
        );
        let cut_off = node("unreachable", "no heartbeat for 40s (ttl 10s)");
        let message = refuse_if_down(&cut_off, "shut down").unwrap_err();
        assert!(
            message.message().starts_with(
                "node web-3 is unreachable (no heartbeat for 40s (ttl 10s), at 127.0.0.1:7102); it cannot be asked to shut down"
            ),
            "{}",
            message.message()
        );
        assert!(refuse_if_down(&node("serving", ""), "restart").is_ok());
        assert!(takes_actions(&node("serving", "")));
        assert!(takes_actions(&node("degraded", "")));
        for state in ["stopped", "unreachable", "shutting-down"] {
            assert!(!takes_actions(&node(state, "")), "{state}");
        }
    }
}
