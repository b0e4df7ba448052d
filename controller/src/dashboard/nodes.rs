//! The nodes page: every node with its state, executable, generation, PIDs, uptime,
//! load and last heartbeat, a link to its admin URL and its actions; filtered by
//! label and sorted by any column, in the URL so that a live refresh keeps both.

use std::cmp::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router, routing::get};
use maud::{Markup, html};
use serde::Deserialize;

use super::Dashboard;
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Live, Section};
use crate::inventory::{NodeRecord, Selector};
use crate::now_ms;
use crate::tokens::Role;

/// How often the nodes page refreshes without an event: requests in flight change
/// with every heartbeat, and heartbeats are not events (they would be hundreds a
/// second in a large fleet).
const NODES_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

pub fn router() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/", get(page))
        .route("/nodes", get(page))
}

#[derive(Debug, Default, Deserialize)]
pub struct NodesQuery {
    /// A selector, `role=web,zone=a`.
    #[serde(default)]
    label: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    dir: String,
    /// Only the live region.
    #[serde(default)]
    fragment: Option<String>,
}

/// The sortable columns: (query name, header).
const COLUMNS: [(&str, &str); 11] = [
    ("id", "Node"),
    ("state", "State"),
    ("exe", "Executable"),
    ("generation", "Gen"),
    ("supervisor", "Supervisor PID"),
    ("worker", "Worker PID"),
    ("uptime", "Up"),
    ("in_flight", "In flight"),
    ("heartbeat", "Last heartbeat"),
    ("labels", "Labels"),
    ("admin", "Admin"),
];

fn compare(col: &str, a: &NodeRecord, b: &NodeRecord) -> Ordering {
    match col {
        "state" => a.state.cmp(&b.state),
        "exe" => a.exe.path.cmp(&b.exe.path),
        "generation" => a.generation.cmp(&b.generation),
        "supervisor" => a.supervisor_pid.cmp(&b.supervisor_pid),
        "worker" => a.worker_pid.cmp(&b.worker_pid),
        // Longest up first when ascending by uptime means oldest start first.
        "uptime" => b.started_at_unix_ms.cmp(&a.started_at_unix_ms),
        "in_flight" => a.in_flight.cmp(&b.in_flight),
        "heartbeat" => a.last_heartbeat_unix_ms.cmp(&b.last_heartbeat_unix_ms),
        "labels" => a.labels.cmp(&b.labels),
        "admin" => a.admin_url.cmp(&b.admin_url),
        _ => Ordering::Equal,
    }
    .then_with(|| a.node_id.cmp(&b.node_id))
}

/// Sorts by `col` (unknown: by id), descending if `desc`.
pub fn sort(nodes: &mut [NodeRecord], col: &str, desc: bool) {
    nodes.sort_by(|a, b| {
        let o = compare(col, a, b);
        if desc { o.reverse() } else { o }
    });
}

async fn page(
    State(d): State<Arc<Dashboard>>,
    Extension(session): Extension<Session>,
    Query(q): Query<NodesQuery>,
) -> Response {
    let (selector, flash, status) = match Selector::parse(&q.label) {
        Ok(s) => (s, None, StatusCode::OK),
        Err(e) => (
            Selector::default(),
            Some(Flash::Error(format!("label filter: {e}"))),
            StatusCode::BAD_REQUEST,
        ),
    };
    let mut nodes = d.fleet.inventory.list(&selector);
    let col = if COLUMNS.iter().any(|(c, _)| *c == q.sort) {
        q.sort.as_str()
    } else {
        "id"
    };
    let desc = q.dir == "desc";
    sort(&mut nodes, col, desc);
    let content = table(&d, &session, &nodes, &q.label, col, desc);
    if q.fragment.is_some() {
        return (status, content).into_response();
    }
    let live = Live {
        src: format!(
            "/nodes?label={}&sort={col}&dir={}&fragment=1",
            percent_encode(&q.label),
            if desc { "desc" } else { "asc" }
        ),
        events: "node,rollout",
        rollout: None,
        every: Some(NODES_REFRESH),
    };
    let body = html! {
        h1 { "Nodes" }
        form.filter method="get" action="/nodes" role="search" {
            label for="label" { "Filter by label" }
            input #label name="label" type="text" value=(q.label) placeholder="role=web,zone=a";
            input type="hidden" name="sort" value=(col);
            input type="hidden" name="dir" value=(if desc { "desc" } else { "asc" });
            button type="submit" { "Filter" }
            @if !q.label.is_empty() { a href="/nodes" { "clear" } }
        }
        (view::live(&live, content))
        (super::charts::fleet_handoffs(&d.fleet))
    };
    view::with_status(
        status,
        view::page(
            "Nodes",
            Section::Nodes,
            Some(&session),
            d.sessions.token_required(),
            flash.as_ref(),
            body,
        ),
    )
}

/// The live region: the active rollout (if any), the counts by state, the table.
fn table(
    d: &Dashboard,
    session: &Session,
    nodes: &[NodeRecord],
    label: &str,
    col: &str,
    desc: bool,
) -> Markup {
    let now = now_ms();
    let active = d.fleet.active_rollout();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for n in nodes {
        *counts.entry(n.state.as_str()).or_default() += 1;
    }
    let link = |c: &str| {
        let dir = if c == col && !desc { "desc" } else { "asc" };
        format!("/nodes?label={}&sort={c}&dir={dir}", percent_encode(label))
    };
    html! {
        @if let Some(r) = &active {
            p.banner {
                "Rollout " a href={ "/rollouts/" (r.rollout.id) } { (r.rollout.id) } " is "
                (view::state(r.rollout.state.as_str())) " — "
                (r.nodes.iter().filter(|n| n.state.finished()).count()) " of " (r.nodes.len()) " nodes done"
            }
        }
        p.counts #node-counts {
            (nodes.len()) " node" @if nodes.len() != 1 { "s" }
            @for (state, n) in &counts { " · " (view::state(state)) " " (n) }
        }
        div.scroll {
            table.cards.long #nodes {
                caption.visually-hidden { "Nodes, sorted by " (col) }
                thead { tr {
                    @for (c, name) in COLUMNS {
                        th scope="col" aria-sort=[(c == col).then_some(if desc { "descending" } else { "ascending" })] {
                            a href=(link(c)) { (name) @if c == col { (if desc { " ▼" } else { " ▲" }) } }
                        }
                    }
                    th scope="col" { "Actions" }
                } }
                tbody {
                    @for n in nodes { (row(n, now, session)) }
                    @if nodes.is_empty() {
                        tr { td colspan="12" { "No node matches. Agents appear here once they heartbeat (fleet-agent --controller URL)." } }
                    }
                }
            }
        }
    }
}

/// A node's row; its actions are those the session's role may take.
fn row(n: &NodeRecord, now: u64, session: &Session) -> Markup {
    html! {
        tr #{ "node-" (n.node_id) } data-node=(n.node_id) data-state=(n.state) {
            th scope="row" { a.node-link href={ "/nodes/" (percent_encode(&n.node_id)) } { (n.node_id) } }
            td data-label="State" { (view::state(&n.state))
                @if !n.reason.is_empty() { br; small.reason { (n.reason) } } }
            td.exe data-label="Executable" { span.path { (n.exe.path) } " " (view::short_sha(&n.exe.sha256)) }
            td.num data-col="generation" data-label="Generation" { (n.generation) }
            td.num data-col="supervisor_pid" data-label="Supervisor PID" { (n.supervisor_pid) }
            td.num data-col="worker_pid" data-label="Worker PID" { (n.worker_pid) }
            td data-label="Up" { (view::uptime(n.started_at_unix_ms, now)) }
            td.num data-label="In flight" { (n.in_flight) }
            td data-label="Last heartbeat" { (view::since(n.last_heartbeat_unix_ms, now)) }
            td.labels data-label="Labels" {
                @for (k, v) in &n.labels {
                    a.label href={ "/nodes?label=" (percent_encode(&format!("{k}={v}"))) } { (k) "=" (v) } " "
                }
            }
            td data-label="Admin" { (admin(n)) }
            td.actions {
                @let id = percent_encode(&n.node_id);
                // Only what the node's state allows: a stopped or unreachable node's
                // agent does not answer (the controller refuses before calling it),
                // one shutting down is already going.
                @if crate::agents::takes_actions(n) && session.may(Role::Operator) {
                    a.button href={ "/nodes/" (id) "/restart" } { "Restart" }
                    " "
                    a.button.danger href={ "/nodes/" (id) "/shutdown" } { "Shut down" }
                } @else if session.may(Role::Operator) {
                    span.note.no-actions { "no restart: " (n.state) }
                }
                @if n.forgettable() && session.may(Role::Admin) {
                    " "
                    a.button.danger href={ "/nodes/" (id) "/forget" } { "Forget" }
                }
            }
        }
    }
}

/// The admin cell: a link the dashboard builds itself ([`admin_link`]), or, when the
/// reported URL is not one, the URL as text (escaped, cut short, whole in a tooltip).
fn admin(n: &NodeRecord) -> Markup {
    const SHOWN: usize = 60;
    let url = &n.admin_url;
    html! {
        @if url.is_empty() { "—" }
        @else if let Some(href) = admin_link(url, &n.control_addr) {
            a.admin href=(href) target="_blank" rel="noopener noreferrer" { "admin" }
        } @else {
            span.admin.unlinked title={ "not linked: not an http(s) URL on the node's address " (n.control_addr) ": " (url) } {
                @match url.char_indices().nth(SHOWN) {
                    Some((cut, _)) => { (&url[..cut]) "…" },
                    None => (url),
                }
            }
        }
    }
}

/// The node's admin page as a link: only `http` or `https`, only on the node's own
/// control address (the host:port the controller calls it on), only a plain path. The
/// agent reports `http://CONTROL_ADDR/debug/admin`; anything else (another scheme,
/// another host, user info, a query) is `None`, and the dashboard shows it as text.
pub fn admin_link(admin_url: &str, control_addr: &str) -> Option<String> {
    let (scheme, rest) = admin_url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    fleet_proto::limits::check_host_port("control_addr", control_addr).ok()?;
    // Browsers end an http(s) authority at a backslash too.
    let end = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if !authority.eq_ignore_ascii_case(control_addr) {
        return None;
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-_.~%".contains(c);
    if !(path.is_empty() || path.starts_with('/') && path.chars().all(plain)) {
        return None;
    }
    Some(format!("{scheme}://{control_addr}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::ExeRecord;

    fn node(id: &str, generation: u64) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            labels: Default::default(),
            state: "serving".into(),
            control_addr: String::new(),
            admin_url: String::new(),
            exe: ExeRecord {
                path: "/opt/app".into(),
                sha256: String::new(),
                size: 0,
            },
            generation,
            supervisor_pid: 1,
            worker_pid: 2,
            in_flight: 0,
            last_heartbeat_unix_ms: 0,
            started_at_unix_ms: 0,
            reason: String::new(),
            static_node: false,
            listeners: Vec::new(),
            ready_timeout_ms: 0,
            drain_timeout_ms: 0,
            stale_since_unix_ms: 0,
        }
    }

    #[test]
    fn admin_links_are_http_to_the_nodes_own_address_only() {
        let addr = "10.0.0.5:7101";
        for (url, link) in [
            (
                "http://10.0.0.5:7101/debug/admin",
                Some("http://10.0.0.5:7101/debug/admin"),
            ),
            ("HTTPS://10.0.0.5:7101/x", Some("https://10.0.0.5:7101/x")),
            ("http://10.0.0.5:7101", Some("http://10.0.0.5:7101")),
            ("javascript:alert(1)", None),
            ("javascript://10.0.0.5:7101/%0aalert(1)", None),
            ("data:text/html,<script>alert(1)</script>", None),
            ("http://evil.example/debug/admin", None),
            ("http://10.0.0.5:7101@evil.example/", None),
            ("http://evil.example\\@10.0.0.5:7101/", None),
            ("http://10.0.0.5:7101/a?next=//evil", None),
            ("http://10.0.0.5:7101/\"onmouseover=\"x", None),
            ("//10.0.0.5:7101/debug/admin", None),
        ] {
            assert_eq!(admin_link(url, addr).as_deref(), link, "{url}");
        }
        assert_eq!(admin_link("http://x:1/", "not an address"), None);
    }

    #[test]
    fn an_admin_url_that_is_not_a_link_is_shown_as_escaped_text() {
        let mut n = node("n", 1);
        n.control_addr = "127.0.0.1:7101".into();
        n.admin_url = "javascript:alert('<b>')".into();
        let session = crate::dashboard::session::Sessions::new(false).create(None);
        let html = row(&n, 0, &session).into_string();
        assert!(!html.contains("href=\"javascript"), "{html}");
        assert!(html.contains("javascript:alert('&lt;b&gt;')"), "{html}");
        n.admin_url = "http://127.0.0.1:7101/debug/admin".into();
        let html = row(&n, 0, &session).into_string();
        assert!(
            html.contains("href=\"http://127.0.0.1:7101/debug/admin\""),
            "{html}"
        );
    }

    #[test]
    fn sorts_by_a_column_then_by_id() {
        let mut nodes = vec![node("b", 1), node("a", 2), node("c", 1)];
        sort(&mut nodes, "generation", false);
        let ids: Vec<_> = nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "a"]);
        sort(&mut nodes, "generation", true);
        let ids: Vec<_> = nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "b"]);
    }
}
