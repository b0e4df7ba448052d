//! HTTP admin routes (the `/debug/admin` surface GoFrame users know), `/healthz`
//! and `/metrics`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::auth;
use crate::supervisor::{NodeState, Outcome, RestartRequest, Supervisor, Trigger};

pub fn router(supervisor: Arc<Supervisor>) -> Router {
    let p = supervisor.config().admin.path.clone();
    Router::new()
        .route(&p, get(page))
        .route(&format!("{p}/status"), get(status))
        .route(&format!("{p}/restart"), get(restart).post(restart))
        .route(&format!("{p}/reload"), get(restart).post(restart))
        .route(&format!("{p}/shutdown"), get(shutdown).post(shutdown))
        .route(&format!("{p}/login"), get(login_page).post(login))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(supervisor)
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

async fn restart(State(supervisor): State<Arc<Supervisor>>, request: Request) -> Response {
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
    match supervisor.restart(request).await {
        Ok(report) => {
            let status = match report.outcome {
                Outcome::Succeeded => StatusCode::OK,
                Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(report)).into_response()
        }
        Err(e) => (
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn shutdown(State(supervisor): State<Arc<Supervisor>>) -> Response {
    let workers = supervisor.status().workers.len();
    supervisor.request_shutdown("/debug/admin/shutdown");
    Json(json!({
        "shutting_down": true,
        "message": format!("draining {workers} worker(s); the supervisor exits when they are done"),
    }))
    .into_response()
}

async fn status(State(supervisor): State<Arc<Supervisor>>) -> Response {
    Json(supervisor.status()).into_response()
}

async fn healthz(State(supervisor): State<Arc<Supervisor>>) -> Response {
    match supervisor.status().state {
        NodeState::Serving | NodeState::Restarting => "ok\n".into_response(),
        state => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", state.as_str()),
        )
            .into_response(),
    }
}

async fn metrics(State(supervisor): State<Arc<Supervisor>>) -> Response {
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
    token: String,
}

async fn login_page(State(supervisor): State<Arc<Supervisor>>) -> Html<String> {
    Html(login_html(&supervisor.config().admin.path, None))
}

async fn login(State(supervisor): State<Arc<Supervisor>>, Form(login): Form<Login>) -> Response {
    let admin = supervisor.config().admin.path.clone();
    match supervisor.token() {
        Some(token) if login.token.trim() == token => {
            let cookie = format!(
                "{}={}; HttpOnly; SameSite=Strict; Path=/",
                auth::COOKIE,
                auth::session_value(token)
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to(&admin)).into_response()
        }
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            Html(login_html(&admin, Some("wrong token"))),
        )
            .into_response(),
        None => Redirect::to(&admin).into_response(),
    }
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
.state{font-weight:600}";

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

async fn page(State(supervisor): State<Arc<Supervisor>>) -> Html<String> {
    let s = supervisor.status();
    let admin = esc(&supervisor.config().admin.path);
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
    format!(
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>\
<title>fleet-agent {node}</title><style>{STYLE}</style>
<h1>fleet-agent <small>{node}</small></h1>
<p>State <span class=state>{state}</span>, generation {generation}, supervisor pid {pid}, version {version}.
Restarts: {ok} succeeded, {failed} failed. {progress}</p>
<p>Executable <code>{exe}</code><br>sha256 <code>{sha}</code></p>
<h2>Workers</h2><table><tr><th>Generation<th>PID<th>State<th>Executable</tr>{workers}</table>
<h2>Listeners</h2><table><tr><th>Server<th>Address<th>Scheme</tr>{listeners}</table>
<h2>Actions</h2>
<form method=post action='{admin}/restart' data-confirm='Restart this node?'>
<label>New executable (optional) <input type=text name=newExeFilePath placeholder='{exe}'></label><br>
<label>sha256 (optional) <input type=text name=sha256></label><br>
<button>Restart</button></form>
<form method=post action='{admin}/shutdown' data-confirm='Shut this node down? Its servers stop.'><button>Shut down</button></form>
<pre id=result hidden></pre>
<p><a href='{admin}/status'>status (JSON)</a> · <a href='/metrics'>metrics</a></p>
<script>
for (const f of document.querySelectorAll('form[data-confirm]')) f.addEventListener('submit', async e => {{
  e.preventDefault();
  if (!confirm(f.dataset.confirm)) return;
  const out = document.getElementById('result');
  out.hidden = false; out.textContent = 'working…';
  try {{
    const r = await fetch(f.action, {{method: 'POST', body: new URLSearchParams(new FormData(f)), credentials: 'same-origin'}});
    out.textContent = r.status + ' ' + r.statusText + '\\n' + await r.text();
  }} catch (err) {{ out.textContent = 'request failed: ' + err; }}
}});
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
    )
    .into()
}
