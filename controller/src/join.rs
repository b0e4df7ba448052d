//! gRPC `fleet.v1.JoinService` (with `--tls`): an agent with a join token gets a
//! certificate naming its node id; an agent with its certificate renews it.
//!
//! The join token is the only credential `Join` takes (no bearer token, no client
//! certificate), so the route is open in the token check; `Renew` takes only the
//! node's own certificate.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fleet_net::tls::PeerCertificate;
use fleet_proto::v1 as pb;
use fleet_proto::v1::join_service_server::JoinService;
use tonic::{Request, Response, Status};

use crate::ca::{FleetCa, Issued};
use crate::inventory::Inventory;
use crate::tokens::Tokens;

#[derive(Debug)]
pub struct Join {
    pub ca: Arc<FleetCa>,
    pub tokens: Arc<Tokens>,
    /// How long a node certificate is valid (`--cert-ttl`).
    pub ttl: Duration,
    /// Where the certificates issued are noted: a node id that holds a valid one
    /// cannot be joined again (by an impostor with a join token of its own) while the
    /// node is away.
    pub inventory: Arc<Inventory>,
}

impl Join {
    /// Why `node_id` cannot join now: it is in the inventory and still heartbeating,
    /// or it was given a certificate that has not expired.
    fn taken(&self, node_id: &str) -> Option<String> {
        if let Some(until) = self.inventory.certificate_until(node_id) {
            return Some(format!(
                "node {node_id:?} already joined and its certificate is valid until {}: a node \
                 joins once; to give the name to another machine, stop the node and `fleetctl \
                 forget {node_id}` first",
                humantime::format_rfc3339_seconds(until)
            ));
        }
        let node = self.inventory.get(node_id)?;
        (!node.forgettable()).then(|| {
            format!(
                "node {node_id:?} is {} and heartbeating: a node joins once; to give the name to \
                 another machine, stop the node and `fleetctl forget {node_id}` first",
                node.state
            )
        })
    }
}

/// The gRPC paths that are open in the token check: each authenticates its caller itself.
pub const JOIN_PATH: &str = "/fleet.v1.JoinService/Join";
pub const RENEW_PATH: &str = "/fleet.v1.JoinService/Renew";

fn response(issued: Issued, ca: &FleetCa) -> pb::JoinResponse {
    let ms = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
    };
    pb::JoinResponse {
        cert_pem: issued.cert_pem,
        ca_pem: ca.cert_pem().to_string(),
        not_after_unix_ms: ms(issued.not_after),
        renew_at_unix_ms: ms(issued.renew_at),
    }
}

/// Whether `request` goes to a route that checks its caller itself: `Join` (the join
/// token), and `Renew`, `Heartbeat` or `HeartbeatStream` on a connection with a
/// client certificate (the handler checks that it names the node).
pub fn authenticates_itself<B>(request: &http::Request<B>) -> bool {
    let path = request.uri().path();
    path == JOIN_PATH
        || (request.extensions().get::<PeerCertificate>().is_some()
            && (path == RENEW_PATH || path == HEARTBEAT_PATH || path == HEARTBEAT_STREAM_PATH))
}

pub const HEARTBEAT_PATH: &str = "/fleet.v1.ControllerService/Heartbeat";
pub const HEARTBEAT_STREAM_PATH: &str = "/fleet.v1.ControllerService/HeartbeatStream";

/// Checks that the request's client certificate names `node_id` and is current.
pub fn check_node_cert<T>(request: &Request<T>, node_id: &str) -> Result<(), Status> {
    check_cert(request.extensions().get::<PeerCertificate>(), node_id)
}

/// [`check_node_cert`] with the certificate the connection presented, kept by a
/// long-lived call that checks every message.
pub fn check_cert(cert: Option<&PeerCertificate>, node_id: &str) -> Result<(), Status> {
    let Some(cert) = cert else {
        return Err(Status::unauthenticated(format!(
            "no node certificate: node {node_id:?} must call with the certificate it got by \
             joining (fleet-agent --join-token-file … --ca-hash …)"
        )));
    };
    if cert.expired() {
        return Err(Status::unauthenticated(format!(
            "the client certificate expired at {}: the node must join again with a new join token",
            humantime::format_rfc3339_seconds(cert.not_after)
        )));
    }
    let name = fleet_net::tls::node_name(node_id);
    if !cert.names(&name) {
        return Err(Status::permission_denied(format!(
            "the client certificate does not name node {node_id:?} ({name}): a node speaks only \
             for itself"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl JoinService for Join {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let r = request.into_inner();
        fleet_net::tls::check_node_name(&r.node_id).map_err(Status::invalid_argument)?;
        // The request is checked before the token is spent.
        let csr = r.csr_pem;
        if csr.is_empty() {
            return Err(Status::invalid_argument("no certificate request (csr_pem)"));
        }
        if let Some(why) = self.taken(&r.node_id) {
            tracing::warn!("join refused for node {:?} from {peer}: {why}", r.node_id);
            return Err(Status::already_exists(why));
        }
        let grant = match self.tokens.redeem_join(&r.token, &r.node_id).await {
            Ok(grant) => grant,
            Err(e) => {
                tracing::warn!("join refused for node {:?} from {peer}: {e}", r.node_id);
                return Err(e.status());
            }
        };
        let issued = self
            .ca
            .issue_node(&r.node_id, &csr, self.ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.inventory
            .note_certificate(&r.node_id, issued.not_after);
        crate::audit::certificate_issued(
            &r.node_id,
            "join",
            &format!("join token {}", grant.token_id),
            issued.not_after,
        );
        tracing::info!(
            "node {:?} joined from {peer} with join token {} ({:?}); its certificate expires {}",
            r.node_id,
            grant.token_id,
            grant.token_name,
            humantime::format_rfc3339_seconds(issued.not_after)
        );
        Ok(Response::new(response(issued, &self.ca)))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let node_id = request.get_ref().node_id.clone();
        check_node_cert(&request, &node_id)?;
        let issued = self
            .ca
            .issue_node(&node_id, &request.into_inner().csr_pem, self.ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.inventory.note_certificate(&node_id, issued.not_after);
        crate::audit::certificate_issued(&node_id, "renew", &node_id, issued.not_after);
        Ok(Response::new(response(issued, &self.ca)))
    }
}
