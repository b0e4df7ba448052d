//! HTTP admin routes (the `/debug/admin` surface GoFrame users know), `/healthz`
//! and `/metrics`. Actions (restart, reload, shutdown, logout) are POST only; the
//! guard in [`super::auth`] decides who may reach any of them.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Extension, FromRequest, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth::{self, Access};
use super::session::{self, Session};
use crate::supervisor::{NodeState, RestartRequest, Trigger};

pub fn router(access: Arc<Access>) -> Router {
    let p = access.admin_path().to_string();
    Router::new()
        .route(&p, get(page))
        .route(&format!("{p}/status"), get(status))
        .route(&format!("{p}/metrics"), get(metrics))
        .route(&format!("{p}/restart"), post(restart).get(use_post))
        .route(&format!("{p}/reload"), post(restart).get(use_post))
        .route(&format!("{p}/shutdown"), post(shutdown).get(use_post))
        .route(&format!("{p}/logout"), post(logout).get(use_post))
        .route(&format!("{p}/login"), get(login_page).post(login))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(access)
}

/// An action asked for by GET (a link, an `<img src>`, a habit): nothing is done.
async fn use_post(request: Request) -> Response {
    let host = auth::request_host(&request).unwrap_or_else(|| "127.0.0.1:7101".into());
    let path = request.uri().path();
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (header::ALLOW, "POST"),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        format!("{path} is an action: use POST, e.g. curl -X POST http://{host}{path}\n"),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestartParams {
    new_exe_file_path: Option<String>,
    sha256: Option<String>,
    reason: Option<String>,
}

impl RestartParams {
    /// From the query string, or from a form body (the admin page's POST).
    async fn from_request(request: Request) -> Result<Self, Response> {
        let form = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| {
                v.as_bytes()
                    .starts_with(b"application/x-www-form-urlencoded")
            });
        let mut params = Query::<RestartParams>::try_from_uri(request.uri())
            .map(|Query(p)| p)
            .map_err(|e| bad_request(format!("{e}: use ?newExeFilePath=PATH&sha256=HEX")))?;
        if form {
            let Form(body) = Form::<RestartParams>::from_request(request, &())
                .await
                .map_err(|e| bad_request(e.to_string()))?;
            params.new_exe_file_path = body.new_exe_file_path.or(params.new_exe_file_path);
            params.sha256 = body.sha256.or(params.sha256);
            params.reason = body.reason.or(params.reason);
        }
        Ok(params)
    }
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": msg }))).into_response()
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

async fn restart(State(access): State<Arc<Access>>, request: Request) -> Response {
    let params = match RestartParams::from_request(request).await {
        Ok(p) => p,
        Err(response) => return response,
    };
    let request = RestartRequest {
        exe: non_empty(params.new_exe_file_path).map(PathBuf::from),
        sha256: non_empty(params.sha256),
        reason: params.reason.unwrap_or_default(),
        trigger: Trigger::Http,
        ..Default::default()
    };
    super::app::restart_answer(access.supervisor.restart(request).await)
}

async fn shutdown(State(access): State<Arc<Access>>) -> Response {
    let supervisor = &access.supervisor;
    let workers = supervisor.status().workers.len();
    supervisor.request_shutdown("/debug/admin/shutdown");
    Json(json!({
        "shutting_down": true,
        "message": format!("draining {workers} worker(s); the supervisor exits when they are done"),
    }))
    .into_response()
}

async fn status(State(access): State<Arc<Access>>) -> Response {
    Json(access.supervisor.status()).into_response()
}

async fn healthz(State(access): State<Arc<Access>>) -> Response {
    match access.supervisor.status().state {
        NodeState::Serving | NodeState::Restarting => "ok\n".into_response(),
        state => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", state.as_str()),
        )
            .into_response(),
    }
}

async fn metrics(State(access): State<Arc<Access>>) -> Response {
    let supervisor = &access.supervisor;
    supervisor
        .metrics()
        .set_in_flight(supervisor.status().in_flight());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        supervisor.metrics().encode(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct Login {
    #[serde(default)]
    token: String,
}

async fn login_page(State(access): State<Arc<Access>>) -> Html<String> {
    Html(login_html(access.admin_path(), None))
}

async fn login(State(access): State<Arc<Access>>, Form(login): Form<Login>) -> Response {
    let admin = access.admin_path();
    let Some(token) = access.supervisor.token() else {
        return Redirect::to(admin).into_response();
    };
    // A global back-off rather than a delay per request: parallel guesses get no more
    // tries than serial ones (see fleet_net::throttle).
    let attempt = match access.throttle.check() {
        Ok(attempt) => attempt,
        Err(wait) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, wait.header_value())],
                Html(login_html(admin, Some(&wait.to_string()))),
            )
                .into_response();
        }
    };
    if auth::same(login.token.trim(), token) {
        attempt.succeeded();
        let session = access.sessions.create();
        (
            [(header::SET_COOKIE, session::set_cookie(&session, admin))],
            Redirect::to(admin),
        )
            .into_response()
    } else {
        attempt.failed();
        tracing::warn!(
            "admin page: a login with a wrong token ({} in a row)",
            access.throttle.failures()
        );
        (
            StatusCode::UNAUTHORIZED,
            Html(login_html(
                admin,
                Some("wrong token: give the contents of the agent's --token-file"),
            )),
        )
            .into_response()
    }
}

/// Ends the session of the cookie (the guard checked its CSRF token).
async fn logout(
    State(access): State<Arc<Access>>,
    session: Option<Extension<Session>>,
) -> Response {
    let admin = access.admin_path();
    if let Some(Extension(session)) = session {
        access.sessions.remove(&session.id);
    }
    let to = if access.supervisor.token().is_some() {
        format!("{admin}/login")
    } else {
        admin.to_string()
    };
    (
        [(header::SET_COOKIE, session::clear_cookie(admin))],
        Redirect::to(&to),
    )
        .into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "body{font:15px system-ui,sans-serif;margin:2rem;max-width:60rem;color:#222}\
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}\
code{font-size:13px}form{margin:.5rem 0}input[type=text]{width:28rem}pre{background:#f4f4f4;padding:.7rem;white-space:pre-wrap}\
.state{font-weight:600}#logout-form{float:right;margin-top:-3.2rem}";

fn login_html(admin: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p role=alert>{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>\
         <title>fleet-agent login</title><style>{STYLE}</style><h1>fleet-agent</h1>{error}\
         <form method=post action='{admin}/login'><label>Token <input type=password name=token autofocus></label> \
         <button>Log in</button></form>",
        admin = esc(admin)
    )
}

/// The admin page. Its actions are forms the script posts with `fetch` after a
/// confirmation step on the page itself (no `confirm()` dialog); with a session they
/// carry its CSRF token.
async fn page(State(access): State<Arc<Access>>, session: Option<Extension<Session>>) -> Response {
    let s = access.supervisor.status();
    let admin = esc(access.admin_path());
    let csrf = session
        .as_ref()
        .map(|Extension(s)| format!("<input type=hidden name=csrf value='{}'>", esc(&s.csrf)))
        .unwrap_or_default();
    let logout = if session.is_some() {
        format!(
            "<form id=logout-form method=post action='{admin}/logout'>{csrf}<button id=logout>Log out</button></form>"
        )
    } else {
        String::new()
    };
    let workers: String = s
        .workers
        .iter()
        .map(|w| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                w.generation,
                w.pid,
                w.state,
                esc(&w.exe.path.display().to_string())
            )
        })
        .collect();
    let listeners: String = s
        .listeners
        .iter()
        .map(|l| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&l.server),
                esc(&l.addr),
                if l.tls { "https" } else { "http" }
            )
        })
        .collect();
    let html = format!(
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>\
<title>fleet-agent {node}</title><style>{STYLE}</style>
<h1>fleet-agent <small>{node}</small></h1>{logout}
<p>State <span class=state>{state}</span>, generation {generation}, supervisor pid {pid}, version {version}.
Restarts: {ok} succeeded, {failed} failed. {progress}</p>
<p>Executable <code>{exe}</code><br>sha256 <code>{sha}</code></p>
<h2>Workers</h2><table><tr><th>Generation<th>PID<th>State<th>Executable</tr>{workers}</table>
<h2>Listeners</h2><table><tr><th>Server<th>Address<th>Scheme</tr>{listeners}</table>
<h2>Actions</h2>
<form id=restart-form method=post action='{admin}/restart'>{csrf}
<label>New executable (optional) <input type=text name=newExeFilePath placeholder='{exe}'></label><br>
<label>sha256 (optional) <input type=text name=sha256></label><br>
<button type=button class=ask id=restart>Restart</button>
<span class=confirm hidden>Restart this node? <button id=confirm-restart>Yes, restart</button> <button type=button class=cancel>Cancel</button></span></form>
<form id=shutdown-form method=post action='{admin}/shutdown'>{csrf}
<button type=button class=ask id=shutdown>Shut down</button>
<span class=confirm hidden>Shut this node down? Its servers stop. <button id=confirm-shutdown>Yes, shut down</button> <button type=button class=cancel>Cancel</button></span></form>
<pre id=result hidden></pre>
<p><a href='{admin}/status'>status (JSON)</a> · <a href='{admin}/metrics'>metrics</a></p>
<script>
for (const f of document.querySelectorAll('form[id$=\"-form\"]:not(#logout-form)')) {{
  const ask = f.querySelector('.confirm');
  f.querySelector('.ask').addEventListener('click', () => {{ ask.hidden = false; }});
  f.querySelector('.cancel').addEventListener('click', () => {{ ask.hidden = true; }});
  f.addEventListener('submit', async e => {{
    e.preventDefault();
    // Enter in a text field submits too: it only opens the confirmation.
    if (ask.hidden) {{ ask.hidden = false; return; }}
    ask.hidden = true;
    const out = document.getElementById('result');
    out.hidden = false; out.textContent = 'working…';
    try {{
      const r = await fetch(f.action, {{method: 'POST', body: new URLSearchParams(new FormData(f)), credentials: 'same-origin'}});
      out.textContent = r.status + ' ' + r.statusText + '\\n' + await r.text();
    }} catch (err) {{ out.textContent = 'request failed: ' + err; }}
  }});
}}
</script>",
        node = esc(&s.node_id),
        state = s.state.as_str(),
        generation = s.generation,
        pid = s.supervisor_pid,
        version = esc(&s.version),
        ok = s.restarts_succeeded,
        failed = s.restarts_failed,
        progress = if s.in_progress.is_empty() {
            String::new()
        } else {
            format!("In progress: {}.", esc(&s.in_progress))
        },
        exe = esc(&s.exe.path.display().to_string()),
        sha = esc(&s.exe.sha256),
    );
    (
        // The page carries the session's CSRF token: no cache may keep it.
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Html(html),
    )
        .into_response()
}
