//! The connection to the controllers: a tonic `ControllerServiceClient` that adds the
//! bearer token to every call, the choice among several controllers (`failover`), and
//! the mapping of gRPC errors to messages and exit codes.

/// How to connect to one controller.
mod dial;
/// Several controllers: which one a call goes to, and when it may go to another.
mod failover;

use std::fmt;
use std::future::Future;

use anyhow::Result;
use fleet_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ForgetNodeRequest, GetNodeRequest, GetRolloutRequest,
    ListNodesRequest, ListNodesResponse, ListRolloutsRequest, ListTokensRequest, Node,
    RestartNodeRequest, RestartResponse, RevokeTokenRequest, Rollout, RolloutActionRequest,
    RolloutSpec, ShutdownNodeRequest, Token,
};
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Code, Request, Status};

use self::dial::{Api, Dial};
pub use self::failover::{CallError, Delivery, Kind, delivery};
use crate::exit::{Exit, Failure};

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

/// The controllers fleetctl was given, and the one it talks to now: each call goes
/// where the last one was answered, and on to the others only when that is safe
/// (see `failover`).
#[derive(Debug)]
pub struct Controller {
    /// `--controller`, in order (already checked by the argument parser).
    urls: Vec<String>,
    dial: Dial,
    /// The controller calls go to, connected: the last that answered, or a leader a
    /// follower named (which need not be in `urls`).
    current: Option<(String, Api)>,
    /// Where in `urls` the next call starts when there is no `current`.
    next: usize,
    /// Whether the "may be stale" warning of a store without quorum was printed.
    warned_stale: bool,
}

impl Controller {
    /// The controllers at `urls`. Nothing is connected yet; a token that cannot be
    /// sent or an `https://` URL without a readable `--ca-cert` is bad input.
    pub fn new(
        urls: Vec<String>,
        token: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Controller> {
        assert!(!urls.is_empty(), "clap gives at least the default URL");
        let dial = Dial::new(&urls, token, ca_cert)?;
        Ok(Controller {
            urls,
            dial,
            current: None,
            next: 0,
            warned_stale: false,
        })
    }

    /// The controller calls go to now (the first URL before any call).
    pub fn url(&self) -> &str {
        match &self.current {
            Some((url, _)) => url,
            None => &self.urls[self.next],
        }
    }

    /// The failure a gRPC error from the current controller ends fleetctl with.
    pub fn error(&self, status: &Status) -> anyhow::Error {
        status_failure(self.url(), status).into()
    }

    /// Sends `request` with `call`, to whichever controller takes it (see `failover`).
    async fn send<Req, T, F, Fut>(
        &mut self,
        kind: Kind,
        request: Req,
        call: F,
    ) -> Result<T, CallError>
    where
        Req: Clone,
        F: Fn(Api, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call(&kind, |api| call(api, request.clone()))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn get_version(&mut self) -> Result<fleet_proto::v1::VersionResponse> {
        let request = fleet_proto::v1::GetVersionRequest {};
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.get_version(r).await
        });
        Ok(response.await?)
    }

    pub async fn get_controllers(&mut self) -> Result<fleet_proto::v1::ControllersResponse> {
        let request = fleet_proto::v1::GetControllersRequest {};
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.get_controllers(r).await
        });
        Ok(response.await?)
    }

    /// One page of nodes (or every node, from a controller that does not page).
    pub async fn list_nodes(&mut self, request: ListNodesRequest) -> Result<ListNodesResponse> {
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.list_nodes(r).await
        });
        Ok(response.await?)
    }

    pub async fn get_node(&mut self, node_id: String) -> Result<Node> {
        let request = GetNodeRequest { node_id };
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.get_node(r).await
        });
        Ok(response.await?)
    }

    /// The node with its restart history; None from a controller too old to keep one.
    pub async fn get_node_history(
        &mut self,
        node_id: String,
    ) -> Result<Option<fleet_proto::v1::NodeHistory>> {
        let request = fleet_proto::v1::GetNodeHistoryRequest { node_id, limit: 0 };
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.get_node_history(r).await
        });
        match response.await {
            Ok(history) => Ok(Some(history)),
            Err(CallError::Answered { status, .. }) if status.code() == Code::Unimplemented => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn restart_node(&mut self, request: RestartNodeRequest) -> Result<RestartResponse> {
        let check = Kind::change(format!("fleetctl node {}", request.node_id));
        let response = self.send(check, request, |mut api, r| async move {
            api.restart_node(r).await
        });
        Ok(response.await?)
    }

    pub async fn forget_node(&mut self, node_id: String) -> Result<Node> {
        let check = Kind::change("fleetctl nodes");
        let request = ForgetNodeRequest { node_id };
        let response = self.send(check, request, |mut api, r| async move {
            api.forget_node(r).await
        });
        Ok(response.await?)
    }

    pub async fn shutdown_node(&mut self, request: ShutdownNodeRequest) -> Result<()> {
        let check = Kind::change(format!("fleetctl node {}", request.node_id));
        let response = self.send(check, request, |mut api, r| async move {
            api.shutdown_node(r).await
        });
        response.await?;
        Ok(())
    }

    /// Starts a rollout (or plans it, with `dry_run`). A preflight refusal lists each
    /// refusing node on a line of its own.
    pub async fn start_rollout(&mut self, spec: RolloutSpec) -> Result<Rollout> {
        // A dry run changes nothing: it may be asked again anywhere.
        let kind = if spec.dry_run {
            Kind::Read
        } else {
            Kind::change("fleetctl rollout history")
        };
        let response = self.send(kind, spec, |mut api, r| async move {
            api.start_rollout(r).await
        });
        response.await.map_err(|e| match e {
            CallError::Answered { status, .. } if status.code() == Code::FailedPrecondition => {
                Failure::new(Exit::BadInput, refusal(&status)).into()
            }
            e => e.into(),
        })
    }

    /// The rollout with every node, read `page_size` nodes at a time (a 100,000-node
    /// rollout is then 20 answers of a few MB instead of one of tens of MB; a controller
    /// from before paging answers them all at once, without a next page).
    pub async fn get_rollout(&mut self, id: String, page_size: u32) -> Result<Rollout> {
        let mut whole: Option<Rollout> = None;
        let mut page_token = String::new();
        loop {
            let request = GetRolloutRequest {
                // The first page names the rollout ("latest" too); the next ones the one
                // it named, should a newer one start meanwhile.
                id: whole.as_ref().map_or(id.clone(), |r| r.id.clone()),
                page_size,
                page_token: page_token.clone(),
                ..Default::default()
            };
            let response = self.send(Kind::Read, request, |mut api, r| async move {
                api.get_rollout(r).await
            });
            let mut page = response.await?;
            let next = std::mem::take(&mut page.next_page_token);
            // A controller that gives an empty page, or the same token again, would
            // keep fleetctl asking forever.
            if !next.is_empty() && (page.nodes.is_empty() || next == page_token) {
                anyhow::bail!(
                    "the controller gave page token {next:?} again or with no nodes while \
                     reading rollout {}: it is not paging; retry, or report it",
                    page.id
                );
            }
            page_token = next;
            let rollout = match whole.as_mut() {
                None => whole.insert(page),
                Some(r) => {
                    // The header and counts as of the last page.
                    let mut nodes = std::mem::take(&mut r.nodes);
                    nodes.append(&mut page.nodes);
                    *r = Rollout { nodes, ..page };
                    r
                }
            };
            if page_token.is_empty() {
                return Ok(std::mem::take(rollout));
            }
        }
    }

    /// Newest first; `summary_only`: without their nodes (counts in `progress`).
    pub async fn list_rollouts(&mut self, limit: u32, summary_only: bool) -> Result<Vec<Rollout>> {
        let request = ListRolloutsRequest {
            limit,
            summary_only,
        };
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.list_rollouts(r).await
        });
        Ok(response.await?.rollouts)
    }

    /// The raw stream, so the watcher can tell a lost connection from a refusal.
    /// The raw stream: the rollout with every node, then only the nodes that changed
    /// (`Rollout.nodes_changed_only`; [`crate::watch::Merged`] puts them together).
    pub async fn watch_rollout(&mut self, id: String) -> Result<Streaming<Rollout>, CallError> {
        let request = GetRolloutRequest {
            id,
            changed_nodes_only: true,
            ..Default::default()
        };
        let response = self.send(Kind::Read, request, |mut api, r| async move {
            api.watch_rollout(r).await
        });
        response.await
    }

    pub async fn rollout_action(
        &mut self,
        action: Action,
        request: RolloutActionRequest,
    ) -> Result<Rollout> {
        let check = Kind::change(match action {
            Action::Undo => "fleetctl rollout history".to_string(),
            _ => format!("fleetctl rollout status {}", request.id),
        });
        let response = self.send(check, request, |mut api, r| async move {
            match action {
                Action::Pause => api.pause_rollout(r).await,
                Action::Resume => api.resume_rollout(r).await,
                Action::Abort => api.abort_rollout(r).await,
                Action::Undo => api.undo_rollout(r).await,
            }
        });
        Ok(response.await?)
    }

    pub async fn create_token(
        &mut self,
        request: CreateTokenRequest,
    ) -> Result<CreateTokenResponse> {
        let check = Kind::change("fleetctl token list");
        let response = self.send(check, request, |mut api, r| async move {
            api.create_token(r).await
        });
        Ok(response.await?)
    }

    pub async fn list_tokens(&mut self) -> Result<Vec<Token>> {
        let response = self.send(Kind::Read, ListTokensRequest {}, |mut api, r| async move {
            api.list_tokens(r).await
        });
        Ok(response.await?.tokens)
    }

    pub async fn revoke_token(&mut self, id: String) -> Result<Token> {
        let check = Kind::change("fleetctl token list");
        let request = RevokeTokenRequest { id };
        let response = self.send(check, request, |mut api, r| async move {
            api.revoke_token(r).await
        });
        Ok(response.await?)
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
/// answer from the controller).
pub fn is_unreachable(status: &Status) -> bool {
    delivery(status) != Delivery::Answered
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
