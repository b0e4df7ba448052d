//! Who may use the control endpoint, in front of every route.
//!
//! Token or not, no web page an operator opens can change the node's state:
//! - a request that changes state (any method but GET/HEAD/OPTIONS) is refused when the
//!   browser says it comes from another site (`Sec-Fetch-Site: cross-site|same-site`)
//!   or names another `Origin` than the endpoint itself (`Origin: null` included);
//! - actions take POST only (the routes answer GET with 405 and a curl hint), so an
//!   `<img src>` or a link does nothing;
//! - gRPC is served only as gRPC: HTTP/2 with an `application/grpc*` content type, so a
//!   no-cors `fetch` (HTTP/1.1, `text/plain`) never reaches `Shutdown`;
//! - without a token, the request must be addressed to a loopback name (`Host` or the
//!   HTTP/2 authority: `127.x`, `[::1]`, `localhost`; with `--insecure-control` any IP
//!   literal), which stops DNS rebinding: a rebound name still says its own name.
//!
//! Over mutual TLS (an `https://` controller), a request whose client certificate the
//! fleet CA issued to the controller passes: that is how the controller calls.
//!
//! With a token, a request needs `Authorization: Bearer TOKEN` (HTTP header or gRPC
//! metadata), or, for the HTTP admin routes only, a live browser session of
//! [`super::session`] whose CSRF token every POST carries. `/healthz`, gRPC health
//! checks and the login form are open.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, Method, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::session::{self, Session, Sessions};
use crate::supervisor::Supervisor;

/// What the admin routes and this guard share.
#[derive(Debug)]
pub struct Access {
    pub supervisor: Arc<Supervisor>,
    pub sessions: Sessions,
    /// One back-off on failed logins for the whole agent (control port and app ports).
    pub throttle: fleet_net::LoginThrottle,
}

impl Access {
    pub fn admin_path(&self) -> &str {
        &self.supervisor.config().admin.path
    }
}

/// Marks a request that came through a worker's admin proxy (the owner-only Unix
/// socket) rather than the control port: it was addressed to an app port, which may
/// serve HTTPS.
#[derive(Debug, Clone, Copy)]
pub struct ViaWorker;

pub use fleet_net::browser::same_secret as same;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn refuse(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

pub fn is_grpc_path(path: &str) -> bool {
    path.starts_with("/fleet.v1.AgentService/")
        || path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
}

fn is_grpc_content(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The authority the request was addressed to: the HTTP/2 `:authority` (in the URI)
/// or the HTTP/1.1 `Host` header.
pub fn request_host(request: &Request) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether `host` (an authority, port optional) names this machine by loopback, or,
/// when `any_ip`, is any IP literal. A DNS name other than `localhost` never passes.
fn acceptable_host(host: &str, any_ip: bool) -> bool {
    let Ok(authority) = host.parse::<Authority>() else {
        return false;
    };
    let name = authority.host();
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = match name.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => name.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4),
    };
    ip.is_some_and(|ip| any_ip || ip.to_canonical().is_loopback())
}

/// Refuses a request that changes state on behalf of another site.
fn cross_site(request: &Request) -> Option<Response> {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && (site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site"))
    {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            format!(
                "refused: the browser says this request comes from another site (Sec-Fetch-Site: {site}); \
                 the node's state changes only from its own admin page or from clients such as curl, fleetctl or the controller"
            ),
        ));
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("(not text)");
    let host = request_host(request).unwrap_or_default();
    let https_too = request.extensions().get::<ViaWorker>().is_some();
    let own = !host.is_empty()
        && [Some("http://"), https_too.then_some("https://")]
            .into_iter()
            .flatten()
            .any(|scheme| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|o| o.eq_ignore_ascii_case(&host))
            });
    (!own).then(|| {
        refuse(
            StatusCode::FORBIDDEN,
            format!(
                "refused: Origin {origin} is not this endpoint (http://{host}); the node's state changes only \
                 from its own admin page or from clients such as curl that send no Origin"
            ),
        )
    })
}

/// Everything but the token: the gRPC transport, the Host rule, cross-site requests.
fn browser_rules(request: &Request, token: bool, insecure: bool) -> Option<Response> {
    let path = request.uri().path();
    if is_grpc_path(path) {
        if !is_grpc_content(request.headers()) {
            return Some(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{path} is a gRPC method: send it with a gRPC client (Content-Type: application/grpc over HTTP/2), \
                     e.g. fleetctl or grpcurl; nothing was done"
                ),
            ));
        }
        if request.version() != Version::HTTP_2 {
            return Some(refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "{path} is a gRPC method: gRPC is served over HTTP/2 only; nothing was done"
                ),
            ));
        }
    }
    if !token && let Some(host) = request_host(request) {
        // No Host at all is not a browser (every browser sends one).
        if !acceptable_host(&host, insecure) {
            let allowed = if insecure {
                "127.0.0.1, [::1], localhost or an IP address"
            } else {
                "127.0.0.1, [::1] or localhost"
            };
            return Some(refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "refused: Host {host} is not a loopback address; without a token the control endpoint answers \
                     only requests addressed to {allowed} (a guard against DNS rebinding): use that address, \
                     or set --token-file"
                ),
            ));
        }
    }
    let safe = [Method::GET, Method::HEAD, Method::OPTIONS].contains(request.method());
    if safe { None } else { cross_site(request) }
}

/// The guard in front of every control route (see the module docs).
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if path == "/healthz" {
        return next.run(request).await;
    }
    // The controller, by the certificate the fleet CA gave it (mutual TLS; the
    // handshake checked the chain). A node's certificate does not open anything here.
    if request
        .extensions()
        .get::<fleet_net::tls::PeerCertificate>()
        .is_some_and(|c| c.names(fleet_net::tls::CONTROLLER_NAME))
    {
        return next.run(request).await;
    }
    let supervisor = &access.supervisor;
    let token = supervisor.token();
    let insecure = supervisor.config().control.insecure;
    if let Some(refusal) = browser_rules(&request, token.is_some(), insecure) {
        return refusal;
    }
    let Some(token) = token else {
        return next.run(request).await;
    };
    let admin = access.admin_path();
    if path.starts_with("/grpc.health.v1.Health/") || path == format!("{admin}/login") {
        return next.run(request).await;
    }
    if bearer(request.headers()).is_some_and(|given| same(given, token)) {
        return next.run(request).await;
    }
    if is_grpc_path(&path) {
        // The admin page's cookie never opens gRPC.
        return tonic::Status::unauthenticated(
            "missing or wrong token: send the metadata `authorization: Bearer <token>` (the token is in the agent's --token-file)",
        )
        .into_http();
    }
    match access.sessions.of_request(request.headers()) {
        Some(session) => with_session(session, request, next).await,
        None if path == format!("{admin}/logout") => (
            [(header::SET_COOKIE, session::clear_cookie(admin))],
            Redirect::to(&format!("{admin}/login")),
        )
            .into_response(),
        None if request.method() == Method::GET && path == admin => {
            Redirect::to(&format!("{admin}/login")).into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong token: send the header `Authorization: Bearer <token>` (the token is in the agent's --token-file), \
             or log in on the admin page\n",
        )
            .into_response(),
    }
}

/// A request carrying a live session's cookie: reads are served; a POST must also
/// carry the session's CSRF token (form field `csrf` or header `x-csrf-token`).
async fn with_session(session: Session, request: Request, next: Next) -> Response {
    let mut request = request;
    if ![Method::GET, Method::HEAD, Method::OPTIONS].contains(request.method()) {
        let given = match fleet_net::browser::csrf_token(request).await {
            Ok((whole, given)) => {
                request = whole;
                given.unwrap_or_default()
            }
            Err(e) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        };
        if !same(&given, &session.csrf) {
            return refuse(
                StatusCode::FORBIDDEN,
                "missing or stale CSRF token: reload the admin page and use its buttons \
                 (scripts use Authorization: Bearer instead of the cookie)",
            );
        }
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_only_unless_insecure() {
        for ok in [
            "127.0.0.1:7101",
            "127.3.4.5",
            "[::1]:7101",
            "localhost",
            "LocalHost:80",
        ] {
            assert!(acceptable_host(ok, false), "{ok}");
        }
        for bad in [
            "rebind.example:7101",
            "10.0.0.1:7101",
            "[2001:db8::1]",
            "localhost.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!acceptable_host(bad, false), "{bad}");
        }
        assert!(acceptable_host("10.0.0.1:7101", true));
        assert!(acceptable_host("[2001:db8::1]:7101", true));
        assert!(!acceptable_host("rebind.example", true), "names never");
    }

    #[test]
    fn same_compares_whole_secrets() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cret", "s3cre"));
        assert!(!same("", "x"));
    }

    #[test]
    fn grpc_paths_are_known() {
        assert!(is_grpc_path("/fleet.v1.AgentService/Shutdown"));
        assert!(is_grpc_path(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_grpc_path("/debug/admin/shutdown"));
    }
}
