//! Simulated agents that register with a controller the way `fleet-agent --controller`
//! does, each on a connection of its own, and then heartbeat on it. No process runs
//! behind them and nothing listens at the control address they report.
//!
//! - Plain: connect (TCP + HTTP/2), first `Heartbeat` with the bootstrap token.
//! - Mutual TLS, as `agent/src/identity.rs` and `agent/src/heartbeat.rs` do: `Join`
//!   with the join token and a CSR on a connection without a client certificate that
//!   trusts only the pinned CA; then a new connection presenting the certificate, and
//!   the first `Heartbeat` without a bearer token. The key and CSR are made beforehand
//!   ([`Csr::new`]) and timed apart; nothing is written to disk (the agent writes its
//!   key, certificate and CA to its identity directory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use fleet_proto::v1 as pb;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use fleet_proto::v1::join_service_client::JoinServiceClient;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::tls_fleet::{CALL_TIMEOUT, CONNECT_TIMEOUT, Target};

/// A node's new key and its certificate request.
#[derive(Debug)]
pub struct Csr {
    key: PrivatePkcs8KeyDer<'static>,
    pem: String,
}

impl Csr {
    /// An ECDSA P-256 key (rcgen's default, as the agent's) and a CSR naming
    /// `<node_id>.node.fleet`.
    pub fn new(node_id: &str) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
        let pem = rcgen::CertificateParams::new(vec![fleet_net::tls::node_name(node_id)])
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .with_context(|| format!("cannot make a certificate request for {node_id}"))?;
        Ok(Self {
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            pem,
        })
    }
}

/// Where registration spent its time.
#[derive(Debug, Clone, Copy)]
pub struct Registration {
    /// First byte out → first heartbeat answered.
    pub total: Duration,
    /// With TLS: the `Join` call, its connection and handshake included.
    pub join: Option<Duration>,
}

/// A registered simulated agent: its connection to the controller and its heartbeat.
#[derive(Debug, Clone)]
pub struct SimAgent {
    pub node_id: String,
    client: ControllerServiceClient<Channel>,
    beat: pb::HeartbeatRequest,
    bearer: Option<MetadataValue<Ascii>>,
}

/// The status a simulated agent reports: serving generation 1 of a fake executable.
pub fn status(node_id: &str, control_addr: &str) -> pb::StatusResponse {
    let exe = pb::ExeInfo {
        path: "/opt/app/app-v1".into(),
        sha256: crate::hollow::fake_sha256("/opt/app/app-v1"),
        size: 8 << 20,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    pb::StatusResponse {
        node_id: node_id.into(),
        labels: [("sim".to_string(), "tls-bench".to_string())].into(),
        supervisor_pid: 1,
        state: "serving".into(),
        generation: 1,
        exe: Some(exe.clone()),
        workers: vec![pb::Worker {
            generation: 1,
            pid: 2,
            exe: Some(exe),
            state: "serving".into(),
            started_at_unix_ms: now,
            ready_at_unix_ms: now,
            in_flight: 0,
        }],
        control_addr: control_addr.into(),
        admin_url: format!("http://{control_addr}/debug/admin"),
        started_at_unix_ms: now,
        version: format!("tls-bench {}", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    }
}

/// Registers simulated agent `node_id` (reporting `control_addr`) with the controller:
/// plain when `csr` is `None`, by joining with `join_token` and `csr` otherwise.
pub async fn register(
    controller: &Target,
    node_id: &str,
    control_addr: &str,
    tls: Option<(&str, Csr)>,
) -> anyhow::Result<(SimAgent, Registration)> {
    let start = Instant::now();
    let endpoint = Endpoint::from_shared(controller.url.clone())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    let (channel, bearer, join) = match (tls, &controller.ca) {
        (None, _) => {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("{node_id}: cannot connect to {}", controller.url))?;
            (channel, Some(controller.bearer.clone()), None)
        }
        (Some((join_token, csr)), Some(ca)) => {
            let config = fleet_net::tls::pinned_client_config(ca.pin)?;
            let join_channel = endpoint
                .clone()
                .connect_with_connector(connector(config)?)
                .await
                .with_context(|| format!("{node_id}: cannot connect to join"))?;
            let joined = JoinServiceClient::new(join_channel)
                .join(pb::JoinRequest {
                    token: join_token.into(),
                    node_id: node_id.into(),
                    csr_pem: csr.pem,
                })
                .await
                .with_context(|| format!("{node_id}: Join"))?
                .into_inner();
            let join = start.elapsed();
            let identity = fleet_net::tls::Identity {
                chain: fleet_net::tls::read_certs(joined.cert_pem.as_bytes())
                    .map_err(|e| anyhow!("{node_id}: the certificate it got is {e}"))?,
                key: PrivateKeyDer::Pkcs8(csr.key),
            };
            let roots = fleet_net::tls::roots(&ca.certs)?;
            let config = fleet_net::tls::client_config(roots, Some(identity))?;
            let channel = endpoint
                .connect_with_connector(connector(config)?)
                .await
                .with_context(|| format!("{node_id}: cannot connect with its certificate"))?;
            (channel, None, Some(join))
        }
        (Some(_), None) => {
            return Err(anyhow!(
                "the controller runs without --tls: nothing to join"
            ));
        }
    };
    let mut agent = SimAgent {
        node_id: node_id.into(),
        client: ControllerServiceClient::new(channel),
        beat: pb::HeartbeatRequest {
            status: Some(status(node_id, control_addr)),
            in_flight: 0,
            ..Default::default()
        },
        bearer,
    };
    agent.beat().await?;
    Ok((
        agent,
        Registration {
            total: start.elapsed(),
            join,
        },
    ))
}

fn connector(config: rustls::ClientConfig) -> anyhow::Result<fleet_net::tls::Connector> {
    fleet_net::tls::Connector::new(Arc::new(config), fleet_net::tls::CONTROLLER_NAME)
        .map_err(|e| anyhow!(e))
}

impl SimAgent {
    /// One heartbeat on this agent's connection.
    pub async fn beat(&mut self) -> anyhow::Result<()> {
        let mut request = tonic::Request::new(self.beat.clone());
        request.set_timeout(CALL_TIMEOUT);
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        self.client
            .heartbeat(request)
            .await
            .with_context(|| format!("{}: Heartbeat", self.node_id))?;
        Ok(())
    }
}
