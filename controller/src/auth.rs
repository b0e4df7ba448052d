//! Who is calling, and whether they may: in front of every route, gRPC and HTTP.
//!
//! The caller is resolved from the bearer token (the controller's `--token-file`
//! token is the bootstrap admin; the others come from `fleetctl token create`) or,
//! in a browser, from the dashboard session it logged in with. Each gRPC method and
//! HTTP route needs a role, written once, in [`ROUTES`]; a gRPC method that is not
//! there is refused. The resolved [`Caller`] goes into the request's extensions,
//! where handlers find it to record who acted. A controller without a token is open
//! (loopback): every caller is `local`, an admin.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::dashboard::session::{self, Sessions};
use crate::tokens::{self, AuthError, Caller, Role, Tokens};

pub use fleet_net::browser::same_secret as same;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone, without a token: health checks, the login page, the stylesheet, the script.
    Anyone,
    /// The agents' credential: the bootstrap token (node certificates will take its place).
    Agent,
    /// A caller of this role or a higher one.
    Role(Role),
}

/// One row of [`ROUTES`].
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET` (which covers `HEAD`), `POST`, or `*` for any.
    pub method: &'static str,
    /// Exact, but for `*`, which stands for one path segment.
    pub path: &'static str,
    pub need: Need,
    /// What a refusal calls it.
    pub name: &'static str,
}

const ANYONE: Need = Need::Anyone;
const VIEWER: Need = Need::Role(Role::Viewer);
const OPERATOR: Need = Need::Role(Role::Operator);
const ADMIN: Need = Need::Role(Role::Admin);

const fn r(method: &'static str, path: &'static str, need: Need, name: &'static str) -> Route {
    Route {
        method,
        path,
        need,
        name,
    }
}

/// Every gRPC method and HTTP route, and who may call it: the one place roles are
/// decided. The first row that matches counts.
pub const ROUTES: &[Route] = &[
    // gRPC fleet.v1.ControllerService.
    r(
        "POST",
        "/fleet.v1.ControllerService/Heartbeat",
        Need::Agent,
        "Heartbeat",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/HeartbeatStream",
        Need::Agent,
        "HeartbeatStream",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ListNodes",
        VIEWER,
        "ListNodes",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/GetNode",
        VIEWER,
        "GetNode",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/GetRollout",
        VIEWER,
        "GetRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ListRollouts",
        VIEWER,
        "ListRollouts",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/WatchRollout",
        VIEWER,
        "WatchRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/RestartNode",
        OPERATOR,
        "RestartNode",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ShutdownNode",
        OPERATOR,
        "ShutdownNode",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/StartRollout",
        OPERATOR,
        "StartRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/PauseRollout",
        OPERATOR,
        "PauseRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ResumeRollout",
        OPERATOR,
        "ResumeRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/AbortRollout",
        OPERATOR,
        "AbortRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/UndoRollout",
        OPERATOR,
        "UndoRollout",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ForgetNode",
        ADMIN,
        "ForgetNode",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/CreateToken",
        ADMIN,
        "CreateToken",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/ListTokens",
        ADMIN,
        "ListTokens",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/RevokeToken",
        ADMIN,
        "RevokeToken",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/GetVersion",
        VIEWER,
        "GetVersion",
    ),
    // gRPC fleet.v1.JoinService (--tls): each checks its caller itself, Join by the
    // join token in the request, Renew by the node's own certificate.
    r("POST", crate::join::JOIN_PATH, ANYONE, "Join"),
    r("POST", crate::join::RENEW_PATH, ANYONE, "Renew"),
    r("POST", "/grpc.health.v1.Health/*", ANYONE, "gRPC health"),
    // HTTP API.
    r("GET", "/healthz", ANYONE, "the health check"),
    r("GET", "/metrics", VIEWER, "GET /metrics"),
    r("GET", "/api/nodes", VIEWER, "GET /api/nodes"),
    r("GET", "/api/nodes/*", VIEWER, "GET /api/nodes/ID"),
    r("GET", "/api/rollouts", VIEWER, "GET /api/rollouts"),
    r("GET", "/api/rollouts/*", VIEWER, "GET /api/rollouts/ID"),
    r("GET", "/api/events", VIEWER, "GET /api/events"),
    // Dashboard: pages, then the confirmation page and the POST of each change.
    r("*", "/login", ANYONE, "the login page"),
    r("GET", "/assets/*", ANYONE, "the dashboard's assets"),
    r("POST", "/logout", VIEWER, "logging out"),
    r("GET", "/", VIEWER, "the nodes page"),
    r("GET", "/nodes", VIEWER, "the nodes page"),
    r("GET", "/rollouts", VIEWER, "the rollouts page"),
    r("*", "/rollouts/new", OPERATOR, "StartRollout"),
    r("GET", "/rollouts/*", VIEWER, "a rollout's page"),
    r("*", "/nodes/*/restart", OPERATOR, "RestartNode"),
    r("*", "/nodes/*/shutdown", OPERATOR, "ShutdownNode"),
    r("*", "/nodes/*/forget", ADMIN, "ForgetNode"),
    r("*", "/rollouts/*/pause", OPERATOR, "PauseRollout"),
    r("*", "/rollouts/*/resume", OPERATOR, "ResumeRollout"),
    r("*", "/rollouts/*/abort", OPERATOR, "AbortRollout"),
    r("*", "/rollouts/*/undo", OPERATOR, "UndoRollout"),
    r("GET", "/nodes/*", VIEWER, "a node's page"),
    r(
        "POST",
        "/fleet.v1.ControllerService/GetNodeHistory",
        VIEWER,
        "GetNodeHistory",
    ),
    r(
        "POST",
        "/fleet.v1.ControllerService/GetControllers",
        VIEWER,
        "GetControllers",
    ),
];

fn path_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

/// The row for a request, if any.
pub fn route(method: &Method, path: &str) -> Option<&'static Route> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES
        .iter()
        .find(|r| (r.method == "*" || r.method == method) && path_matches(r.path, path))
}

/// Why `caller` may not call `route`, if it may not.
pub fn refusal(caller: &Caller, route: &Route) -> Option<String> {
    match route.need {
        Need::Anyone => None,
        Need::Agent if caller.is_agent_credential() => None,
        Need::Agent => Some(format!(
            "{} cannot send {}: heartbeats take the controller's --token-file token (the agents' \
             token) until node certificates replace it",
            caller.describe(),
            route.name
        )),
        Need::Role(need) if caller.role >= need => None,
        Need::Role(need) => Some(format!(
            "token '{}' has role {}; {} needs {need}",
            caller.name, caller.role, route.name
        )),
    }
}

/// The bootstrap token, the other tokens and the dashboard's sessions.
#[derive(Debug)]
pub struct Auth {
    bootstrap: Option<String>,
    pub tokens: Arc<Tokens>,
    pub sessions: Arc<Sessions>,
}

impl Auth {
    /// `bootstrap`: the `--token-file` token; without one the controller is open.
    pub fn new(bootstrap: Option<String>, tokens: Arc<Tokens>) -> Auth {
        let sessions = Arc::new(Sessions::new(bootstrap.is_some()));
        Auth {
            bootstrap,
            tokens,
            sessions,
        }
    }

    /// Whether every caller is `local` unless it presents a Fleet token.
    pub fn open(&self) -> bool {
        self.bootstrap.is_none()
    }

    /// The caller a presented token stands for: the bootstrap token or one of the
    /// tokens.
    pub fn resolve(&self, presented: &str) -> Result<Caller, AuthError> {
        let presented = presented.trim();
        if let Some(bootstrap) = &self.bootstrap
            && same(presented, bootstrap)
        {
            return Ok(Caller::bootstrap());
        }
        if tokens::token_id(presented).is_some() {
            return self.tokens.authenticate(presented);
        }
        if self.open() {
            // An open controller ignores other bearer tokens, as it always did (an
            // agent may carry one the controller does not use).
            return Ok(Caller::local());
        }
        Err(AuthError::Unknown)
    }

    /// The caller of a dashboard session, checked again (its token may have been
    /// revoked since the login).
    fn session_caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, AuthError> {
        let Some(s) = self.sessions.from_headers(headers) else {
            return Ok(None);
        };
        if !s.authenticated {
            return Ok(None);
        }
        let Some(id) = &s.caller.token_id else {
            return Ok(Some(s.caller));
        };
        match self.tokens.recheck(id) {
            Ok(caller) => Ok(Some(caller)),
            Err(e) => {
                self.sessions.remove(&s.id);
                Err(e)
            }
        }
    }

    /// Who is calling; `Ok(None)` when nobody is recognised.
    fn caller(&self, request: &Request, grpc: bool) -> Result<Option<Caller>, AuthError> {
        let path = request.uri().path();
        let dashboard = !grpc && is_page(path);
        if dashboard {
            // Browsers: the session only, never a bearer header.
            return match self.session_caller(request.headers())? {
                Some(c) => Ok(Some(c)),
                None if self.open() => Ok(Some(Caller::local())),
                None => Ok(None),
            };
        }
        let bearer = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(given) = bearer {
            return self.resolve(given).map(Some);
        }
        // The dashboard's script reads the JSON API and the event stream with its
        // session (reads only: a change needs the dashboard's forms and CSRF token).
        if !grpc
            && request.method() == Method::GET
            && let Some(c) = self.session_caller(request.headers())?
        {
            return Ok(Some(c));
        }
        Ok(self.open().then(Caller::local))
    }
}

/// A dashboard page (a browser, with a session), rather than the JSON API or
/// `/metrics` (scripts and scrapers, with a bearer token).
fn is_page(path: &str) -> bool {
    !path.starts_with("/api/") && path != "/metrics"
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn text(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

/// The middleware: find the route's row, resolve the caller, check the role, and
/// hand the [`Caller`] to the handler.
pub async fn authorize(
    State(auth): State<Arc<Auth>>,
    mut request: Request,
    next: Next,
) -> Response {
    // Routes that authenticate their caller themselves: a join token, or the node's
    // own certificate (checked against the node the message is about).
    if crate::join::authenticates_itself(&request) {
        return next.run(request).await;
    }
    let grpc = is_grpc(request.headers());
    let path = request.uri().path().to_string();
    let Some(route) = route(request.method(), &path) else {
        if grpc {
            return tonic::Status::unimplemented(format!(
                "{path} is not a method this controller serves (is the client newer than the controller?)"
            ))
            .into_http();
        }
        return text(
            StatusCode::NOT_FOUND,
            &format!("no page {} {path}", request.method()),
        );
    };
    if route.need == Need::Anyone {
        return next.run(request).await;
    }
    let dashboard = !grpc && is_page(&path);
    let caller = match auth.caller(&request, grpc) {
        Ok(Some(caller)) => caller,
        Ok(None) if dashboard => return session::log_in_first(&request, None),
        Ok(None) => return unauthenticated(grpc, &AuthError::Unknown),
        Err(e @ AuthError::JoinToken { .. }) => return forbidden(grpc, &e.to_string()),
        Err(e) if dashboard => return session::log_in_first(&request, Some(&e.to_string())),
        Err(e) => return unauthenticated(grpc, &e),
    };
    if let Some(why) = refusal(&caller, route) {
        tracing::info!("refused {} {path}: {why}", request.method());
        return forbidden(grpc, &why);
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn unauthenticated(grpc: bool, e: &AuthError) -> Response {
    let msg = e.to_string();
    if grpc {
        return tonic::Status::unauthenticated(msg).into_http();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("{msg}\n"),
    )
        .into_response()
}

fn forbidden(grpc: bool, msg: &str) -> Response {
    if grpc {
        return tonic::Status::permission_denied(msg).into_http();
    }
    text(StatusCode::FORBIDDEN, msg)
}

/// The caller the auth layer put into a gRPC request.
pub fn grpc_caller<T>(request: &tonic::Request<T>) -> Result<Caller, tonic::Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| tonic::Status::internal("no caller: the auth layer is missing"))
}

#[cfg(test)]
mod tests;
