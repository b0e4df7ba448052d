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

/// The controller dashboard's stylesheet, the one file both pages use (compiled in:
/// the admin page loads nothing from anywhere), plus the few rules only this page needs.
const DASHBOARD_CSS: &str = include_str!("../../../controller/src/dashboard/assets/dashboard.css");
const ADMIN_CSS: &str = "#logout-form{margin-left:auto}#result{margin:1rem 0}\
form.action{margin:.5rem 0}form.action label{display:block;margin:.3rem 0}\
#result details pre{background:#f4f4f4;padding:.5rem;white-space:pre-wrap}";

fn style() -> String {
    format!("<style>{DASHBOARD_CSS}{ADMIN_CSS}</style>")
}

/// `42s`, `5m 3s`, `2h 5m`, `3d 4h` (as the dashboard writes them).
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn rfc3339(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "—".into();
    }
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms),
    )
    .to_string()
}

fn micros(us: u64) -> String {
    if us == 0 {
        "—".into()
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn state_span(state: &str) -> String {
    format!("<span class='state state-{0}'>{0}</span>", esc(state))
}

/// The page's live region: re-fetched every two seconds (`?fragment=1`).
fn live_html(s: &crate::supervisor::StatusReport) -> String {
    let now = crate::phase::unix_ms(std::time::SystemTime::now());
    let workers: String = s
        .workers
        .iter()
        .map(|w| {
            format!(
                "<tr data-generation={}><th scope=row>{}</th><td class=num>{}</td><td>{}</td>\
                 <td><span class=path>{}</span></td><td>{}</td><td>{}</td><td class=num>{}</td></tr>",
                w.generation,
                w.generation,
                w.pid,
                state_span(&w.state),
                esc(&w.exe.path.display().to_string()),
                rfc3339(w.started_at_unix_ms),
                rfc3339(w.ready_at_unix_ms),
                w.in_flight,
            )
        })
        .collect();
    let restarts: String = s
        .recent_restarts
        .iter()
        .rev()
        .map(|r| {
            let outcome = if r.succeeded { "succeeded" } else { "failed" };
            format!(
                "<tr class=restart data-outcome={outcome} data-ready-us={} data-drain-us={}>\
                 <th scope=row>{} <span class=note>({} ago)</span></th><td>{}</td><td>{}</td>\
                 <td class=num>{}</td><td class=num>{} → {}</td><td class=num>{}</td><td class=num>{}</td><td>{}</td></tr>",
                r.ready_us,
                r.drain_us,
                rfc3339(r.at_unix_ms),
                ago(now.saturating_sub(r.at_unix_ms)),
                esc(&r.trigger),
                state_span(outcome),
                r.generation,
                r.old_pid,
                r.new_pid,
                micros(r.ready_us),
                if r.drain_us == 0 && r.old_pid != 0 && r.succeeded {
                    "draining…".to_string()
                } else {
                    micros(r.drain_us)
                },
                esc(&r.reason),
            )
        })
        .collect();
    let restarts = if restarts.is_empty() {
        "<tr><td colspan=8>No restart since the agent started.</td></tr>".to_string()
    } else {
        restarts
    };
    let listeners: String = s
        .listeners
        .iter()
        .map(|l| {
            format!(
                "<tr><th scope=row>{}</th><td><code>{}</code></td><td>{}</td></tr>",
                esc(&l.server),
                esc(&l.addr),
                if l.tls { "https" } else { "http" }
            )
        })
        .collect();
    format!(
        "<section class=summary aria-label=Status><p id=node-state data-state={state}>{state_html}{progress}</p>\
<dl class=spec><dt>Up</dt><dd id=uptime data-started={started}>{uptime} (since {since})</dd>\
<dt>Generation</dt><dd id=generation>{generation}</dd><dt>Supervisor PID</dt><dd>{pid}</dd>\
<dt>Executable</dt><dd><span class=path>{exe}</span><br><code>{sha}</code></dd>\
<dt>Version</dt><dd>{version}</dd><dt>Restarts</dt><dd>{ok} succeeded, {failed} failed</dd>\
<dt>Timeouts</dt><dd>ready {ready} s, drain {drain} s</dd></dl></section>\
<h2>Workers</h2><div class=scroll><table id=workers><thead><tr><th>Gen<th>PID<th>State<th>Executable<th>Started<th>Ready<th>In flight</tr></thead><tbody>{workers}</tbody></table></div>\
<h2>Last restarts</h2><p class=note>Newest first, the last {keep} kept in memory. Ready: trigger → READY of the new worker; drain: SIGTERM → exit of the old one.</p>\
<div class=scroll><table id=restarts><thead><tr><th>When<th>Trigger<th>Outcome<th>Gen<th>PID<th>Ready<th>Drain<th>Reason</tr></thead><tbody>{restarts}</tbody></table></div>\
<h2>Listeners</h2><div class=scroll><table><thead><tr><th>Server<th>Address<th>Scheme</tr></thead><tbody>{listeners}</tbody></table></div>",
        state = s.state.as_str(),
        state_html = state_span(s.state.as_str()),
        progress = if s.in_progress.is_empty() {
            String::new()
        } else {
            format!(
                " — <span class=note>in progress: {}</span>",
                esc(&s.in_progress)
            )
        },
        started = s.started_at_unix_ms,
        uptime = ago(now.saturating_sub(s.started_at_unix_ms)),
        since = rfc3339(s.started_at_unix_ms),
        generation = s.generation,
        pid = s.supervisor_pid,
        exe = esc(&s.exe.path.display().to_string()),
        sha = esc(&s.exe.sha256),
        version = esc(&s.version),
        ok = s.restarts_succeeded,
        failed = s.restarts_failed,
        ready = s.ready_timeout.as_secs_f64(),
        drain = s.drain_timeout.as_secs_f64(),
        keep = crate::supervisor::RECENT_RESTARTS,
    )
}

fn login_html(admin: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| {
            format!(
                "<div class='flash error' role=alert><pre>{}</pre></div>",
                esc(e)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>\
         <title>fleet-agent login</title>{style}<header class=top><span class=brand>fleet-agent</span></header>\
         <main><h1>Log in</h1>{error}\
         <form method=post action='{admin}/login'><label>Token <input type=password name=token autofocus></label> \
         <button>Log in</button></form></main>",
        admin = esc(admin),
        style = style()
    )
}

#[derive(Debug, Default, Deserialize)]
struct PageQuery {
    fragment: Option<String>,
}

/// The admin page. Its actions are forms the script posts with `fetch` after a
/// confirmation step on the page itself (no `confirm()` dialog); with a session they
/// carry its CSRF token. Its live region (state, uptime, workers, last restarts) is
/// re-fetched every two seconds and after each action; an action's answer is shown as
/// a sentence, with the raw JSON under it.
async fn page(
    State(access): State<Arc<Access>>,
    session: Option<Extension<Session>>,
    Query(q): Query<PageQuery>,
) -> Response {
    let s = access.supervisor.status();
    if q.fragment.is_some() {
        return (
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            Html(live_html(&s)),
        )
            .into_response();
    }
    let admin = esc(access.admin_path());
    let csrf = session
        .as_ref()
        .map(|Extension(s)| format!("<input type=hidden name=csrf value='{}'>", esc(&s.csrf)))
        .unwrap_or_default();
    let logout = if session.is_some() {
        format!(
            "<form id=logout-form class=logout method=post action='{admin}/logout'>{csrf}<button id=logout>Log out</button></form>"
        )
    } else {
        String::new()
    };
    let html = format!(
        "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width, initial-scale=1'>\
<title>fleet-agent {node}</title>{style}
<header class=top><span class=brand>fleet-agent</span><nav><a href='{admin}/status'>status (JSON)</a><a href='{admin}/metrics'>metrics</a></nav>\
<span id=live-status role=status aria-live=polite data-state=live>live</span>{logout}</header>
<main><h1>Node {node}</h1>
<div id=live data-src='{admin}?fragment=1'>{live}</div>
<h2>Actions</h2>
<form id=restart-form class=action method=post action='{admin}/restart'>{csrf}
<label>New executable (empty: restart the same one) <input type=text name=newExeFilePath placeholder='{exe}'></label>
<label>sha256 (optional) <input type=text name=sha256></label>
<button type=button class=ask id=restart>Restart</button>
<span class=confirm hidden>Restart this node? <button id=confirm-restart>Yes, restart</button> <button type=button class=cancel>Cancel</button></span></form>
<form id=shutdown-form class=action method=post action='{admin}/shutdown'>{csrf}
<button type=button class='ask danger' id=shutdown>Shut down</button>
<span class=confirm hidden>Shut this node down? Its servers stop. <button class=danger id=confirm-shutdown>Yes, shut down</button> <button type=button class=cancel>Cancel</button></span></form>
<div id=result role=status hidden></div></main>
<script>
const live = document.getElementById('live');
const liveStatus = document.getElementById('live-status');
async function refresh() {{
  try {{
    const r = await fetch(live.dataset.src, {{credentials: 'same-origin', cache: 'no-store'}});
    if (!r.ok) throw new Error(r.status);
    live.innerHTML = await r.text();
    liveStatus.dataset.state = 'live'; liveStatus.textContent = 'live';
  }} catch (err) {{ liveStatus.dataset.state = 'reconnecting'; liveStatus.textContent = 'reconnecting…'; }}
}}
setInterval(refresh, 2000);
function el(tag, cls, text) {{ const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }}
function ms(us) {{ return (us / 1000).toFixed(1) + ' ms'; }}
// An action's answer in words; the JSON as it came under it.
function show(out, r, body) {{
  out.replaceChildren();
  let j = null; try {{ j = JSON.parse(body); }} catch (e) {{}}
  const head = el('p', 'status', r.status + ' ' + r.statusText);
  out.append(head);
  let msg = null, ok = r.ok;
  if (j && j.outcome) {{
    ok = j.outcome === 'succeeded';
    msg = ok ? 'Restart succeeded: generation ' + j.generation + ', worker PID ' + j.old_pid + ' → ' + j.new_pid + ', ready in ' + ms(j.timings.ready_us) + '.'
             : 'Restart failed: ' + j.reason + '. The old generation keeps serving.';
  }} else if (j && j.shutting_down) {{ msg = 'Shutting down: ' + (j.message || 'the workers drain, then the agent exits') + '.'; }}
  else if (j && j.error) {{ msg = j.error; ok = false; }}
  const flash = el('div', 'flash ' + (ok ? 'done' : 'error'));
  flash.append(el('pre', null, msg || body));
  out.append(flash);
  if (j && j.stderr_tail && j.stderr_tail.length) {{ out.append(el('pre', 'reason', j.stderr_tail.join('\\n'))); }}
  const raw = el('details'); raw.append(el('summary', null, 'answer as JSON'), el('pre', null, body));
  out.append(raw);
}}
for (const f of document.querySelectorAll('form.action')) {{
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
      show(out, r, await r.text());
    }} catch (err) {{ out.textContent = 'request failed: ' + err; }}
    refresh();
  }});
}}
</script>",
        node = esc(&s.node_id),
        style = style(),
        live = live_html(&s),
        exe = esc(&s.exe.path.display().to_string()),
    );
    (
        // The page carries the session's CSRF token: no cache may keep it.
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Html(html),
    )
        .into_response()
}
