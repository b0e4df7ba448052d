//! Who may use the dashboard: sessions in a cookie, CSRF tokens for every change, and
//! the loopback rule.
//!
//! With a token (`--token-file`) a browser logs in once with that token or any
//! operator token (`fleetctl token create`) and gets a session cookie (`HttpOnly`,
//! `SameSite=Strict`) that remembers the caller: its name and role decide what the
//! pages offer and what the auth layer lets through, and a revoked token ends its
//! sessions at their next request. Without a token the dashboard is served to
//! loopback peers only, and each browser still gets a session, so a change
//! always needs the session's CSRF token. Every change is a `POST` carrying that token
//! (a form field `csrf`, or the header `x-csrf-token`) and, when the browser sends an
//! `Origin`, coming from this very host: a plain cross-site link or form can change
//! nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use fleet_net::browser::{SessionLimits, SessionStore, cookie};

use crate::tokens::{Caller, Role};

/// The session cookie's name.
pub const COOKIE: &str = "fleet_session";
/// How long a session lasts after its last use.
const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; the least recently used goes first (anonymous sessions are
/// created for every new loopback browser, so the map must be bounded).
const MAX_SESSIONS: usize = 4096;

/// One browser's session, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// Must come back with every change.
    pub csrf: String,
    /// Logged in with a token (always false without a token).
    pub authenticated: bool,
    /// Who logged in (`local` on a controller without a token).
    pub caller: Caller,
    /// Created by this request: the response sets the cookie.
    fresh: bool,
}

impl Session {
    /// Whether the caller may make changes an operator makes (the pages show the
    /// buttons and forms for them only then).
    pub fn may(&self, role: Role) -> bool {
        self.caller.role >= role
    }
}

/// What a session holds.
#[derive(Debug, Clone)]
struct Entry {
    csrf: String,
    authenticated: bool,
    caller: Caller,
}

/// The sessions of every browser.
#[derive(Debug)]
pub struct Sessions {
    token_required: bool,
    store: SessionStore<Entry>,
}

impl Sessions {
    /// `token_required`: the controller has a token, and a browser must log in.
    pub fn new(token_required: bool) -> Self {
        Self {
            token_required,
            store: SessionStore::new(SessionLimits {
                idle: IDLE,
                lifetime: None,
                max: MAX_SESSIONS,
            }),
        }
    }

    /// Whether logging in is needed.
    pub fn token_required(&self) -> bool {
        self.token_required
    }

    /// A new session: of the caller who logged in, or an anonymous one (`local`).
    pub fn create(&self, logged_in: Option<Caller>) -> Session {
        let csrf = fleet_net::browser::random_token();
        let authenticated = logged_in.is_some();
        let caller = logged_in.unwrap_or_else(Caller::local);
        let entry = Entry {
            csrf: csrf.clone(),
            authenticated,
            caller: caller.clone(),
        };
        Session {
            id: self.store.create(entry, Instant::now()),
            csrf,
            authenticated,
            caller,
            fresh: true,
        }
    }

    /// The session named by the request's cookie, if it is known and not expired.
    pub fn from_headers(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let entry = self.store.get(id, Instant::now())?;
        Some(Session {
            id: id.to_string(),
            csrf: entry.csrf,
            authenticated: entry.authenticated,
            caller: entry.caller,
            fresh: false,
        })
    }

    /// A logged-in session from the cookie (for the JSON API and the event stream).
    pub fn authenticated(&self, headers: &HeaderMap) -> bool {
        self.from_headers(headers).is_some_and(|s| s.authenticated)
    }

    pub fn remove(&self, id: &str) {
        self.store.remove(id);
    }
}

/// `Set-Cookie` for a session.
pub fn set_cookie(session: &Session) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        session.id,
        IDLE.as_secs()
    ))
    .expect("hex is a valid header value")
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("fleet_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// Whether a browser's `Origin`, when it sends one, is this host (a form posted from
/// another site carries that site's origin).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| !host.is_empty() && o == host)
}

/// The peer's address, where the server recorded it.
pub fn peer(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response()
}

/// Where a login may send the browser back to: a path on this host only.
pub fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

/// In front of every dashboard page and action: loopback rule, session (a login with
/// a token, an anonymous one without), then, for a change, same origin and the CSRF
/// token. The handlers find the [`Session`] in the request's extensions.
pub async fn guard(
    State(sessions): State<Arc<Sessions>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    if !sessions.token_required() && !peer(&request).is_some_and(|p| p.ip().is_loopback()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "without a token the dashboard is served on loopback only: start the controller with --token-file and log in",
        );
    }
    if path.starts_with("/assets/") || path == "/login" {
        return next.run(request).await;
    }
    // The auth layer in front has let this request through already; a session is
    // still required here, so that no page is served without one.
    let session = match sessions.from_headers(request.headers()) {
        Some(s) if s.authenticated || !sessions.token_required() => s,
        _ if sessions.token_required() => return log_in_first(&request, None),
        _ => sessions.create(None),
    };
    let mut request = request;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if !same_origin(request.headers()) {
            return refuse(
                StatusCode::FORBIDDEN,
                "this change comes from another site: use the dashboard's own forms",
            );
        }
        let given = match fleet_net::browser::csrf_token(request).await {
            Ok((whole, given)) => {
                request = whole;
                given.unwrap_or_default()
            }
            Err(e) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string()),
        };
        if session.fresh || !crate::auth::same(&given, &session.csrf) {
            return refuse(
                StatusCode::FORBIDDEN,
                "missing or stale CSRF token: reload the page and submit its form again",
            );
        }
    }
    let fresh = session.fresh.then(|| set_cookie(&session));
    request.extensions_mut().insert(session);
    let mut response = next.run(request).await;
    if let Some(cookie) = fresh {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer to a browser without a (valid) session: a page is sent to the login
/// page, which comes back to it; a change is refused (401) saying why.
pub fn log_in_first(request: &Request, why: Option<&str>) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        let wanted = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let to = format!("/login?next={}", percent_encode(wanted));
        return Redirect::to(&to).into_response();
    }
    refuse(
        StatusCode::UNAUTHORIZED,
        why.unwrap_or("log in first: open /login and enter your token"),
    )
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the guard answers a GET of `/` from `peer`.
    async fn get_from(sessions: Sessions, peer: &str) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "page" }))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(sessions),
                guard,
            ));
        let mut request = Request::new(axum::body::Body::empty());
        let peer: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|l| l.to_str().unwrap().to_string());
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body).into_owned();
        (status, location.unwrap_or(text))
    }

    #[tokio::test]
    async fn without_a_token_only_loopback_peers_are_served() {
        let (status, _) = get_from(Sessions::new(false), "127.0.0.1:40000").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = get_from(Sessions::new(false), "[::1]:40000").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = get_from(Sessions::new(false), "10.1.2.3:40000").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("--token-file"), "{body}");
        // With a token, a remote browser is sent to log in instead.
        let (status, location) = get_from(Sessions::new(true), "10.1.2.3:40000").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert!(location.starts_with("/login?next="), "{location}");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; fleet_session=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn sessions_expire_and_are_bounded() {
        let s = Sessions::new(true);
        let a = s.create(Some(Caller::bootstrap()));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("{COOKIE}={}", a.id).parse().unwrap(),
        );
        assert!(s.authenticated(&h));
        assert_eq!(s.from_headers(&h).unwrap().caller, Caller::bootstrap());
        s.remove(&a.id);
        assert!(!s.authenticated(&h));
        for _ in 0..MAX_SESSIONS + 10 {
            s.create(None);
        }
        assert!(s.store.len() <= MAX_SESSIONS);
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:7100".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:7100".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
    }

    #[test]
    fn next_stays_on_this_host() {
        assert_eq!(safe_next("/rollouts/r1"), "/rollouts/r1");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("http://evil.example/"), "/");
    }
}
