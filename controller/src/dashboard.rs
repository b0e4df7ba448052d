//! The web dashboard: the fleet and its rollouts as they change, and the actions an
//! operator takes on them, without a terminal.
//!
//! Pages are rendered on the server (maud, escaped); `dashboard.js` (a few dozen lines,
//! shipped inside the binary like the stylesheet) listens to `/api/events` (250 ms of
//! changes as one event) and swaps each page's live region for a fresh fragment of the
//! same URL when something it shows changes, and again after a lost event stream
//! reconnects, so that it catches up with what it missed. No front-end build, no external fonts or scripts: it works offline.
//!
//! Modules, in the order a request goes through them:

/// Sessions, login, CSRF tokens and the loopback rule.
pub mod session;
/// The page shell and formatting shared by every page.
pub mod view;
/// The nodes page.
pub mod nodes;
/// The rollouts list and one rollout's page.
pub mod rollouts;
/// The new-rollout form (preview, then start).
pub mod new_rollout;
/// Restart / shut down a node; pause / resume / abort / undo a rollout.
pub mod actions;
/// Server-rendered SVG charts: handoff/drain distributions, rollout timelines.
pub mod charts;
/// A node's page: facts, generations, restart history, events.
pub mod node_page;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use maud::html;
use serde::Deserialize;

use crate::Fleet;
use crate::auth::Auth;
use crate::tokens::AuthError;
use session::{Session, Sessions, safe_next};
use view::{Flash, Section};

/// What every dashboard handler needs.
#[derive(Debug)]
pub struct Dashboard {
    pub fleet: Arc<Fleet>,
    /// What a login is checked against.
    pub auth: Arc<Auth>,
    pub sessions: Arc<Sessions>,
    /// One back-off for every failed login, whoever sends it.
    pub throttle: fleet_net::LoginThrottle,
}

const CSS: &str = include_str!("dashboard/assets/dashboard.css");
const JS: &str = include_str!("dashboard/assets/dashboard.js");

/// Every dashboard route, behind [`session::guard`] (and, in front of that, the auth
/// layer that checks each route's role).
pub fn router(fleet: Arc<Fleet>, auth: Arc<Auth>) -> Router {
    let sessions = auth.sessions.clone();
    let dashboard = Arc::new(Dashboard {
        fleet,
        auth,
        sessions: sessions.clone(),
        throttle: fleet_net::LoginThrottle::default(),
    });
    Router::new()
        .merge(nodes::router())
        .merge(rollouts::router())
        .merge(new_rollout::router())
        .merge(actions::router())
        .merge(node_page::router())
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/dashboard.css", get(|| asset(CSS, "text/css")))
        .route("/assets/dashboard.js", get(|| asset(JS, "text/javascript")))
        .with_state(dashboard)
        .layer(axum::middleware::from_fn_with_state(
            sessions,
            session::guard,
        ))
}

/// The Content-Security-Policy of every page. The pages load one script and one
/// stylesheet from the controller itself and have no inline script, inline style or
/// `style` attribute, so nothing needs `'unsafe-inline'`; `dashboard.js` only fetches
/// from the controller (`connect-src`); forms only post to it; no page may be framed
/// (clickjacking), nor change its base URL, nor embed plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// Adds the browser-hardening headers to every HTTP response of the controller (pages,
/// fragments, assets, JSON, errors): the CSP above, `X-Frame-Options: DENY` for
/// browsers without `frame-ancestors`, `X-Content-Type-Options: nosniff`, and a
/// `Referrer-Policy` that keeps dashboard URLs from other sites (`same-origin`, not
/// `no-referrer`: with that, a browser sends `Origin: null` on the dashboard's own
/// form posts, which the CSRF check refuses). gRPC responses are left alone: no
/// browser renders them, and heartbeats are the controller's most frequent response.
pub async fn security_headers(request: axum::extract::Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let grpc = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let headers = response.headers_mut();
        for (name, value) in [
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    response
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, format!("{kind}; charset=utf-8")),
            (header::CACHE_CONTROL, "max-age=300".to_string()),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: String,
}

#[derive(Debug, Default, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

fn login_form(next: &str, error: Option<&str>) -> Response {
    let flash = error.map(|e| Flash::Error(e.to_string()));
    let body = html! {
        h1 { "Log in" }
        p { "This controller needs a token: the contents of its " code { "--token-file" } ", or a token from " code { "fleetctl token create" } ". A viewer token shows the pages; changes need an operator or admin token." }
        form #login method="post" action="/login" {
            input type="hidden" name="next" value=(safe_next(next));
            p.field {
                label for="token" { "Token" }
                input #token name="token" type="password" autocomplete="current-password" required autofocus;
            }
            p.buttons { button #login-submit type="submit" { "Log in" } }
        }
    };
    let status = if error.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    view::with_status(
        status,
        view::page("Log in", Section::Login, None, true, flash.as_ref(), body),
    )
}

async fn login_page(State(d): State<Arc<Dashboard>>, Query(q): Query<LoginQuery>) -> Response {
    if !d.sessions.token_required() {
        return Redirect::to(safe_next(&q.next)).into_response();
    }
    login_form(&q.next, None)
}

async fn login(
    State(d): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !d.sessions.token_required() {
        return Redirect::to(safe_next(&f.next)).into_response();
    }
    if !session::same_origin(&headers) {
        return login_form(&f.next, Some("this login comes from another site"));
    }
    // A global back-off rather than a delay per request: parallel guesses get no more
    // tries than serial ones (see fleet_net::throttle).
    let attempt = match d.throttle.check() {
        Ok(attempt) => attempt,
        Err(wait) => {
            let mut page = login_form(&f.next, Some(&wait.to_string()));
            *page.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            page.headers_mut()
                .insert(header::RETRY_AFTER, wait.header_value());
            return page;
        }
    };
    let caller = match d.auth.resolve(&f.token) {
        Ok(caller) => caller,
        Err(AuthError::Unknown) => {
            attempt.failed();
            tracing::warn!(
                "dashboard: a login with a wrong token ({} in a row)",
                d.throttle.failures()
            );
            return login_form(
                &f.next,
                Some(
                    "wrong token: give the contents of the controller's --token-file, or a token from `fleetctl token create`",
                ),
            );
        }
        // A real token, but revoked, expired or a join token: say which (the attempt
        // still counts as failed for the back-off).
        Err(e) => {
            attempt.failed();
            return login_form(&f.next, Some(&e.to_string()));
        }
    };
    attempt.succeeded();
    tracing::info!(
        "dashboard: {} logged in (role {})",
        caller.describe(),
        caller.role
    );
    let s = d.sessions.create(Some(caller));
    (
        [(header::SET_COOKIE, session::set_cookie(&s))],
        Redirect::to(safe_next(&f.next)),
    )
        .into_response()
}

async fn logout(State(d): State<Arc<Dashboard>>, Extension(s): Extension<Session>) -> Response {
    d.sessions.remove(&s.id);
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    async fn login(app: &Router, token: &str) -> (StatusCode, HeaderMap, String) {
        let request = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={token}&next=/nodes")))
            .unwrap();
        crate::testing::oneshot(app, request).await
    }

    #[tokio::test]
    async fn every_page_json_and_error_carries_the_browser_hardening_headers() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let fleet = Fleet::new(Arc::new(store), std::time::Duration::from_secs(10), None).unwrap();
        let app = crate::router(fleet, None);
        for (path, status) in [
            ("/", StatusCode::OK),
            ("/nodes?fragment=1", StatusCode::OK),
            ("/rollouts", StatusCode::OK),
            ("/assets/dashboard.js", StatusCode::OK),
            ("/api/nodes", StatusCode::OK),
            ("/api/nodes/nope", StatusCode::NOT_FOUND),
            ("/healthz", StatusCode::OK),
        ] {
            let mut request = Request::get(path).body(Body::empty()).unwrap();
            let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), status, "{path}");
            let h = response.headers();
            assert_eq!(
                h[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY", "{path}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        }
    }

    #[tokio::test]
    async fn failed_logins_earn_a_back_off_that_refuses_even_the_right_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let fleet = Fleet::new(Arc::new(store), std::time::Duration::from_secs(10), None).unwrap();
        let app = crate::router(fleet, Some("right-token".into()));

        // A person mistyping is answered at once (no delay per request any more)...
        let started = std::time::Instant::now();
        for _ in 0..3 {
            let (status, _, body) = login(&app, "wrong").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(body.contains("wrong token"), "{body}");
        }
        assert!(started.elapsed() < std::time::Duration::from_millis(250));
        // ...but after the third failure in a row every attempt is refused until the
        // back-off has passed, the right token too, without comparing it.
        for token in ["wrong", "right-token"] {
            let (status, headers, body) = login(&app, token).await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(headers[header::RETRY_AFTER], "1");
            assert!(
                body.contains("too many failed logins: try again in 1 s"),
                "{body}"
            );
        }
        // Once it has passed (250 ms), the right token logs in.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let (status, headers, _) = login(&app, "right-token").await;
            if status == StatusCode::SEE_OTHER {
                assert!(headers.contains_key(header::SET_COOKIE));
                break;
            }
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert!(std::time::Instant::now() < deadline, "still throttled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
