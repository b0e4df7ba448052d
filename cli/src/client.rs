//! The connection to the controller: a tonic `ControllerServiceClient` that adds the
//! bearer token to every call, and the mapping of gRPC errors to messages and exit codes.

use std::fmt;
use std::time::Duration;

use anyhow::Result;
use fleet_proto::v1::controller_service_client::ControllerServiceClient;
use fleet_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ForgetNodeRequest, GetNodeRequest, GetRolloutRequest,
    ListNodesRequest, ListRolloutsRequest, ListTokensRequest, Node, RestartNodeRequest,
    RestartResponse, RevokeTokenRequest, Rollout, RolloutActionRequest, RolloutSpec,
    ShutdownNodeRequest, Token,
};
use std::sync::Arc;
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::exit::{Exit, Failure, bad_input};

/// How long to wait for the TCP connection to the controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds `authorization: Bearer TOKEN` to every call, when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token itself.
        let shown = if self.0.is_some() { "Some(..)" } else { "None" };
        f.debug_tuple("Bearer")
            .field(&format_args!("{shown}"))
            .finish()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connected controller client.
#[derive(Debug, Clone)]
pub struct Controller {
    url: String,
    api: ControllerServiceClient<InterceptedService<Channel, Bearer>>,
}

impl Controller {
    /// Connects to the controller at `url` (already checked by the argument parser).
    pub async fn connect(
        url: &str,
        token: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Controller> {
        let bearer = match token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| bad_input("the token is not valid in a gRPC header"))?,
            ),
            None => None,
        };
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad_input(format!("controller URL {url}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = if url.starts_with("https://") {
            let Some(path) = ca_cert else {
                return Err(bad_input(format!(
                    "{url} speaks TLS with the fleet's own CA: give its certificate with --ca-cert \
                     PATH or FLEET_CA_CERT (ca.crt in the controller's TLS directory)"
                )));
            };
            let pem = std::fs::read(path)
                .map_err(|e| bad_input(format!("cannot read --ca-cert {}: {e}", path.display())))?;
            let ca = fleet_net::tls::read_certs(&pem)
                .map_err(|e| bad_input(format!("--ca-cert {}: {e}", path.display())))?;
            let config = fleet_net::tls::roots(&ca)
                .and_then(|roots| fleet_net::tls::client_config(roots, None))
                .map_err(|e| bad_input(format!("--ca-cert {}: {e}", path.display())))?;
            let connector =
                fleet_net::tls::Connector::new(Arc::new(config), fleet_net::tls::CONTROLLER_NAME)
                    .map_err(bad_input)?;
            endpoint.connect_with_connector(connector).await
        } else {
            endpoint.connect().await
        }
        .map_err(|e| unreachable_error(url, &chain(&e)))?;
        Ok(Controller {
            url: url.to_string(),
            // The controller answers up to 256 MiB (a ListNodes of 100,000 nodes is
            // ~25 MB); tonic's default 4 MiB would fail past ~16,000 nodes.
            api: ControllerServiceClient::with_interceptor(channel, Bearer(bearer))
                .max_decoding_message_size(256 * 1024 * 1024),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The failure a gRPC error from this controller ends fleetctl with.
    pub fn error(&self, status: &Status) -> anyhow::Error {
        status_failure(&self.url, status).into()
    }

    pub async fn get_version(&mut self) -> Result<fleet_proto::v1::VersionResponse> {
        let response = self
            .api
            .get_version(fleet_proto::v1::GetVersionRequest {})
            .await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn get_controllers(&mut self) -> Result<fleet_proto::v1::ControllersResponse> {
        let response = self
            .api
            .get_controllers(fleet_proto::v1::GetControllersRequest {})
            .await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn list_nodes(&mut self, selector: String) -> Result<Vec<Node>> {
        let response = self.api.list_nodes(ListNodesRequest { selector }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner().nodes)
    }

    pub async fn get_node(&mut self, node_id: String) -> Result<Node> {
        let response = self.api.get_node(GetNodeRequest { node_id }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    /// The node with its restart history; None from a controller too old to keep one.
    pub async fn get_node_history(
        &mut self,
        node_id: String,
    ) -> Result<Option<fleet_proto::v1::NodeHistory>> {
        let request = fleet_proto::v1::GetNodeHistoryRequest { node_id, limit: 0 };
        match self.api.get_node_history(request).await {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(self.error(&s)),
        }
    }

    pub async fn restart_node(&mut self, request: RestartNodeRequest) -> Result<RestartResponse> {
        let response = self.api.restart_node(request).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn forget_node(&mut self, node_id: String) -> Result<Node> {
        let response = self.api.forget_node(ForgetNodeRequest { node_id }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn shutdown_node(&mut self, request: ShutdownNodeRequest) -> Result<()> {
        let response = self.api.shutdown_node(request).await;
        response.map_err(|s| self.error(&s))?;
        Ok(())
    }

    /// Starts a rollout (or plans it, with `dry_run`). A preflight refusal lists each
    /// refusing node on a line of its own.
    pub async fn start_rollout(&mut self, spec: RolloutSpec) -> Result<Rollout> {
        let response = self.api.start_rollout(spec).await;
        let response = response.map_err(|s| match s.code() {
            Code::FailedPrecondition => Failure::new(Exit::BadInput, refusal(&s)).into(),
            _ => self.error(&s),
        })?;
        Ok(response.into_inner())
    }

    pub async fn get_rollout(&mut self, id: String) -> Result<Rollout> {
        let response = self.api.get_rollout(GetRolloutRequest { id }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn list_rollouts(&mut self, limit: u32) -> Result<Vec<Rollout>> {
        let response = self.api.list_rollouts(ListRolloutsRequest { limit }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner().rollouts)
    }

    /// The raw stream, so the watcher can tell a lost connection from a refusal.
    pub async fn watch_rollout(&mut self, id: String) -> Result<Streaming<Rollout>, Status> {
        Ok(self
            .api
            .watch_rollout(GetRolloutRequest { id })
            .await?
            .into_inner())
    }

    pub async fn rollout_action(
        &mut self,
        action: Action,
        request: RolloutActionRequest,
    ) -> Result<Rollout> {
        let response = match action {
            Action::Pause => self.api.pause_rollout(request).await,
            Action::Resume => self.api.resume_rollout(request).await,
            Action::Abort => self.api.abort_rollout(request).await,
            Action::Undo => self.api.undo_rollout(request).await,
        };
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn create_token(
        &mut self,
        request: CreateTokenRequest,
    ) -> Result<CreateTokenResponse> {
        let response = self.api.create_token(request).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }

    pub async fn list_tokens(&mut self) -> Result<Vec<Token>> {
        let response = self.api.list_tokens(ListTokensRequest {}).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner().tokens)
    }

    pub async fn revoke_token(&mut self, id: String) -> Result<Token> {
        let response = self.api.revoke_token(RevokeTokenRequest { id }).await;
        Ok(response.map_err(|s| self.error(&s))?.into_inner())
    }
}

/// A refused rollout: the controller's headline, then one indented line per refusing
/// node ("node ID: reason") — from the structured details when the controller sends
/// them (`PreflightRefusals`), else from its text.
fn refusal(status: &Status) -> String {
    if let Ok(details) =
        <fleet_proto::v1::PreflightRefusals as prost::Message>::decode(status.details())
        && !details.refusals.is_empty()
    {
        let mut text = format!(
            "preflight refused on {} of {} node(s); no node was touched:",
            details.refusals.len(),
            details.targets
        );
        // One line per reason with its nodes ("3 nodes: exe not found: web-1, …"),
        // the largest group first, whatever a reason holds.
        let line = |t: &str| t.replace(|c: char| c.is_control(), " ");
        let refusals: Vec<(String, String)> = details
            .refusals
            .iter()
            .map(|r| (line(&r.node_id), line(&r.reason)))
            .collect();
        let groups = fleet_proto::rules::group_refusals(
            refusals.iter().map(|(n, r)| (n.as_str(), r.as_str())),
        );
        for (reason, nodes) in &groups {
            text.push_str("\n  ");
            text.push_str(&fleet_proto::rules::refusal_line(reason, nodes, 50));
        }
        text.push_str(
            "\nfix them, leave them out with --exclude NODE, or leave unreachable ones out with --skip-unreachable",
        );
        return text;
    }
    refusal_text(status.message())
}

fn refusal_text(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut text = match lines.clone().next() {
        Some(first) if !first.starts_with("node ") => {
            lines.next();
            first.to_string()
        }
        _ => "the rollout was refused, no node was touched:".to_string(),
    };
    for line in lines {
        text.push_str("\n  ");
        text.push_str(line);
    }
    text
}

/// The rollout actions that take a `RolloutActionRequest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
    Undo,
}

/// Whether a status says the connection to the controller failed (as opposed to an
/// answer from the controller). A status the controller sends is parsed from headers and
/// has no source; tonic attaches the transport error as the source of the statuses it
/// makes up on this side.
pub fn is_unreachable(status: &Status) -> bool {
    use std::error::Error;
    status.source().is_some()
        || (status.code() == Code::Unknown && status.message().starts_with("Service was not ready"))
        || (status.code() == Code::Internal && status.message().starts_with("Unexpected EOF"))
}

fn unreachable_error(url: &str, detail: &str) -> anyhow::Error {
    Failure::new(
        Exit::Failed,
        format!(
            "cannot reach the controller at {url}: {detail} (set --controller or FLEET_CONTROLLER)"
        ),
    )
    .into()
}

/// The message and exit code for a gRPC error.
pub fn status_failure(url: &str, status: &Status) -> Failure {
    let message = status.message().trim();
    let message = if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        message.to_string()
    };
    if is_unreachable(status) {
        let detail = chain(status);
        return Failure::new(
            Exit::Failed,
            format!(
                "cannot reach the controller at {url}: {detail} (set --controller or FLEET_CONTROLLER)"
            ),
        );
    }
    match status.code() {
        Code::Unauthenticated => {
            let hint = if message.contains("FLEET_TOKEN") {
                ""
            } else {
                " (set FLEET_TOKEN or --token)"
            };
            Failure::new(
                Exit::BadInput,
                format!("the controller at {url} refused the call: {message}{hint}"),
            )
        }
        Code::PermissionDenied => Failure::new(
            Exit::BadInput,
            format!("the controller at {url} refused the call: {message}"),
        ),
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound => {
            Failure::new(Exit::BadInput, message)
        }
        Code::Unimplemented => Failure::new(
            Exit::Failed,
            format!(
                "{url} does not serve this call ({message}): is it a fleet-controller of the same version?"
            ),
        ),
        _ => Failure::new(Exit::Failed, message),
    }
}

/// An error and its sources, "a: b: c", without repeating a source already in the text.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://127.0.0.1:7100";

    #[test]
    fn refusals_are_bad_input_with_the_controllers_message() {
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            let failure = status_failure(URL, &Status::new(code, "node n3: exe missing"));
            assert_eq!(failure.exit, Exit::BadInput, "{code:?}");
            assert!(
                failure.message.contains("node n3: exe missing"),
                "{failure}"
            );
        }
        let failure = status_failure(URL, &Status::unauthenticated("missing token"));
        assert!(failure.message.contains("FLEET_TOKEN"), "{failure}");
    }

    #[test]
    fn a_lost_connection_names_the_controller_and_how_to_set_it() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        // What tonic makes of a failed connection.
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
        assert_eq!(status.code(), Code::Unavailable);
        let failure = status_failure(URL, &status);
        assert_eq!(failure.exit, Exit::Failed);
        assert!(
            failure
                .message
                .starts_with("cannot reach the controller at http://127.0.0.1:7100: "),
            "{failure}"
        );
        assert!(
            failure
                .message
                .ends_with("(set --controller or FLEET_CONTROLLER)")
        );
    }

    #[test]
    fn other_errors_from_the_controller_are_failures() {
        let failure = status_failure(URL, &Status::unavailable("agent n2 unreachable"));
        assert_eq!(failure.exit, Exit::Failed);
        assert_eq!(failure.message, "agent n2 unreachable");
        let failure = status_failure(URL, &Status::internal("database is locked"));
        assert_eq!(failure.exit, Exit::Failed);
    }

    #[test]
    fn a_refusal_lists_each_node_on_its_own_line() {
        let text = |m: &str| refusal(&Status::failed_precondition(m));
        assert_eq!(
            text("preflight refused on 1 of 2 node(s):\nnode n2: no such file\n"),
            "preflight refused on 1 of 2 node(s):\n  node n2: no such file"
        );
        assert_eq!(
            text("node n2: no such file"),
            "the rollout was refused, no node was touched:\n  node n2: no such file"
        );
    }

    #[test]
    fn a_structured_refusal_is_read_from_the_details_not_the_text() {
        let details = fleet_proto::v1::PreflightRefusals {
            targets: 3,
            refusals: vec![fleet_proto::v1::NodeRefusal {
                node_id: "n2".into(),
                // A reason holding a newline and "node" cannot break the layout.
                reason: "exe missing\nnode n9: forged".into(),
            }],
        };
        let status = Status::with_details(
            Code::FailedPrecondition,
            "whatever the text says",
            prost::Message::encode_to_vec(&details).into(),
        );
        assert_eq!(
            refusal(&status),
            "preflight refused on 1 of 3 node(s); no node was touched:\n  1 node: exe missing node n9: forged: n2\n\
             fix them, leave them out with --exclude NODE, or leave unreachable ones out with --skip-unreachable"
        );
    }

    #[test]
    fn refusals_are_grouped_by_reason() {
        let refusal_of = |node: &str, reason: &str| fleet_proto::v1::NodeRefusal {
            node_id: node.into(),
            reason: reason.into(),
        };
        let details = fleet_proto::v1::PreflightRefusals {
            targets: 4,
            refusals: vec![
                refusal_of("web-2", "exe not found"),
                refusal_of("db-1", "unreachable: connection refused"),
                refusal_of("web-1", "exe not found"),
                refusal_of("web-3", "exe not found"),
            ],
        };
        let status = Status::with_details(
            Code::FailedPrecondition,
            "text",
            prost::Message::encode_to_vec(&details).into(),
        );
        let text = refusal(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "  3 nodes: exe not found: web-1, web-2, web-3");
        assert_eq!(lines[2], "  1 node: unreachable: connection refused: db-1");
    }

    #[test]
    fn the_token_goes_in_the_authorization_header() {
        let mut bearer = Bearer(Some("Bearer s3cret".parse().unwrap()));
        let request = bearer.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(!format!("{bearer:?}").contains("s3cret"));
        let request = Bearer(None).call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }
}
