//! The nodes page: the counts by state (each a link that filters by it), then a page
//! of 200 nodes with their state, executable, generation, PIDs, uptime, load and last
//! heartbeat, a link to each admin URL and its actions; filtered by label and state and
//! sorted by any column, all in the URL (with the page's start, `after=NODE`) so that
//! a live refresh keeps them. A page costs one walk of the inventory: see `listing`.

/// One page of the table in any column's order.
pub mod listing;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router, routing::get};
use maud::{Markup, html};
use serde::Deserialize;

use self::listing::{COLUMNS, Listing, Order};
use super::Dashboard;
use super::session::{Session, percent_encode};
use super::view::{self, Flash, Live, Section};
use crate::inventory::{NodeRecord, Selector, page::parse_state};
use crate::now_ms;
use crate::tokens::Role;

/// How often the nodes page refreshes without an event: requests in flight change
/// with every heartbeat, and heartbeats are not events (they would be hundreds a
/// second in a large fleet).
const NODES_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Rows on one page of the table: a browser draws them at once, whatever the fleet.
pub const PAGE_ROWS: usize = 200;

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
    /// Only nodes in this state (`unreachable`, `serving`, …).
    #[serde(default)]
    state: String,
    #[serde(default)]
    sort: String,
    #[serde(default)]
    dir: String,
    /// The page starts after this node, in the table's order.
    #[serde(default)]
    after: String,
    /// Only the live region.
    #[serde(default)]
    fragment: Option<String>,
}

/// The filters and order shown, which every link on the page keeps.
#[derive(Debug, Clone, Copy)]
struct Shown<'a> {
    label: &'a str,
    state: &'a str,
    col: &'a str,
    desc: bool,
}

impl Shown<'_> {
    /// `/nodes?…` with these filters and order, from the first page.
    fn href(&self) -> String {
        let mut href = format!("/nodes?label={}", percent_encode(self.label));
        if !self.state.is_empty() {
            href.push_str(&format!("&state={}", percent_encode(self.state)));
        }
        href.push_str(&format!(
            "&sort={}&dir={}",
            self.col,
            if self.desc { "desc" } else { "asc" }
        ));
        href
    }

    /// The same, only nodes in `state` (empty: any).
    fn with_state(&self, state: &str) -> String {
        Shown { state, ..*self }.href()
    }

    /// The same, sorted by `col`: the other way round if it is the current column.
    fn sorted_by(&self, col: &str) -> String {
        let desc = col == self.col && !self.desc;
        Shown { col, desc, ..*self }.href()
    }

    /// The same, from the node after `node_id`.
    fn after(&self, node_id: &str) -> String {
        format!("{}&after={}", self.href(), percent_encode(node_id))
    }
}

async fn page(
    State(d): State<Arc<Dashboard>>,
    Extension(session): Extension<Session>,
    Query(q): Query<NodesQuery>,
) -> Response {
    let mut refused = Vec::new();
    let selector = Selector::parse(&q.label).unwrap_or_else(|e| {
        refused.push(format!("label filter: {e}"));
        Selector::default()
    });
    let state = parse_state(&q.state).unwrap_or_else(|e| {
        refused.push(format!("state filter: {e}"));
        None
    });
    let (flash, status) = if refused.is_empty() {
        (None, StatusCode::OK)
    } else {
        (
            Some(Flash::Error(refused.join("; "))),
            StatusCode::BAD_REQUEST,
        )
    };
    let col = if COLUMNS.iter().any(|(c, _)| *c == q.sort) {
        q.sort.as_str()
    } else {
        "id"
    };
    let shown = Shown {
        label: &q.label,
        state: state.as_deref().unwrap_or(""),
        col,
        desc: q.dir == "desc",
    };
    let after = Some(q.after.as_str()).filter(|a| !a.is_empty());
    let listing = listing::listing(
        &d.fleet.inventory.view(),
        Order {
            selector: &selector,
            state: state.as_deref(),
            col,
            desc: shown.desc,
            after,
            rows: PAGE_ROWS,
        },
    );
    let content = table(&d, &session, &listing, &shown, after);
    if q.fragment.is_some() {
        return (status, content).into_response();
    }
    let live = Live {
        src: match after {
            Some(after) => format!("{}&fragment=1", shown.after(after)),
            None => format!("{}&fragment=1", shown.href()),
        },
        events: "node,rollout",
        rollout: None,
        every: Some(NODES_REFRESH),
    };
    let body = html! {
        h1 { "Nodes" }
        form.filter method="get" action="/nodes" role="search" {
            label for="label" { "Filter by label" }
            input #label name="label" type="text" value=(q.label) placeholder="role=web,zone=a";
            @if !shown.state.is_empty() { input type="hidden" name="state" value=(shown.state); }
            input type="hidden" name="sort" value=(col);
            input type="hidden" name="dir" value=(if shown.desc { "desc" } else { "asc" });
            button type="submit" { "Filter" }
            @if !q.label.is_empty() || !shown.state.is_empty() { a href="/nodes" { "clear" } }
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

/// The live region: the active rollout (if any), the counts by state, a page of the
/// table and the links to the other pages.
fn table(
    d: &Dashboard,
    session: &Session,
    listing: &Listing,
    shown: &Shown<'_>,
    after: Option<&str>,
) -> Markup {
    let now = now_ms();
    let active = d.fleet.active_rollout();
    let nodes = &listing.nodes;
    let matching: usize = listing.by_state.values().sum();
    let (col, desc) = (shown.col, shown.desc);
    html! {
        @if let Some(r) = &active {
            p.banner {
                "Rollout " a href={ "/rollouts/" (r.rollout.id) } { (r.rollout.id) } " is "
                (view::state(r.rollout.state.as_str())) " — "
                (r.nodes.iter().filter(|n| n.state.finished()).count()) " of " (r.nodes.len()) " nodes done"
            }
        }
        p.counts #node-counts {
            (matching) " node" @if matching != 1 { "s" }
            @for (state, n) in &listing.by_state {
                " · "
                a.state-filter href=(shown.with_state(state)) data-state=(state)
                    aria-current=[(state == shown.state).then_some("true")] {
                    (view::state(state)) " " (n)
                }
            }
            @if !shown.state.is_empty() {
                " · " a.state-filter href=(shown.with_state("")) { "every state" }
            }
        }
        @if listing.lost {
            p.note { "The node this page started after is gone: showing the first page." }
        }
        div.scroll {
            table.cards.long #nodes {
                caption.visually-hidden { "Nodes, sorted by " (col) }
                thead { tr {
                    @for (c, name) in COLUMNS {
                        th scope="col" aria-sort=[(c == col).then_some(if desc { "descending" } else { "ascending" })] {
                            a href=(shown.sorted_by(c)) { (name) @if c == col { (if desc { " ▼" } else { " ▲" }) } }
                        }
                    }
                    th scope="col" { "Actions" }
                } }
                tbody {
                    @for n in nodes { (row(n, now, session)) }
                    @if nodes.is_empty() && listing.total > 0 {
                        tr { td colspan="12" { "No more nodes after this page: " a href=(shown.href()) { "back to the first" } "." } }
                    } @else if nodes.is_empty() {
                        tr { td colspan="12" { "No node matches. Agents appear here once they heartbeat (fleet-agent --controller URL)." } }
                    }
                }
            }
        }
        @if listing.total > nodes.len() {
            nav.pager #node-pages aria-label="Pages of nodes" {
                @if nodes.is_empty() {
                    "None of " (listing.total)
                } @else {
                    "Showing " (listing.before + 1) "–" (listing.before + nodes.len()) " of " (listing.total)
                }
                @if after.is_some() { " · " a.first href=(shown.href()) { "first page" } }
                @if let Some(next) = &listing.next {
                    " · " a.next rel="next" href=(shown.after(next)) { "next " (PAGE_ROWS) " →" }
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
        let mut n = NodeRecord::for_test("n", 1);
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

    /// A dashboard over `count` nodes (`node-000000`…): generation i % 7, zone a/b/c
    /// by i % 3, every fifth stopped; heartbeating now.
    fn dashboard(count: usize) -> (tempfile::TempDir, axum::Router) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let fleet = crate::Fleet::new(Arc::new(store), ttl, None).unwrap();
        for i in 0..count {
            let mut n = NodeRecord::for_test(&format!("node-{i:06}"), (i % 7) as u64);
            n.labels = [
                ("zone".to_string(), ["a", "b", "c"][i % 3].to_string()),
                ("host".to_string(), format!("h{i}")),
            ]
            .into();
            n.state = if i.is_multiple_of(5) {
                "stopped"
            } else {
                "serving"
            }
            .into();
            n.last_heartbeat_unix_ms = now_ms();
            n.started_at_unix_ms = 1_700_000_000_000 + i as u64;
            n.control_addr = "127.0.0.1:7101".into();
            n.admin_url = "http://127.0.0.1:7101/debug/admin".into();
            fleet.inventory.insert(n);
        }
        (dir, crate::router(fleet, None))
    }

    async fn get(app: &axum::Router, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, _, body) = crate::testing::oneshot(app, request).await;
        (status, body)
    }

    /// The ids of the rows on a page, in order.
    fn rows(html: &str) -> Vec<&str> {
        html.split("data-node=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect()
    }

    /// The href of the link of class `class` (`&amp;` as `&`).
    fn link(html: &str, class: &str) -> Option<String> {
        let at = html.find(&format!("class=\"{class}\""))?;
        let rest = &html[at..];
        let href = rest.split("href=\"").nth(1)?.split('"').next()?;
        Some(href.replace("&amp;", "&"))
    }

    #[tokio::test]
    async fn the_table_pages_by_200_and_its_links_keep_the_filters_and_the_order() {
        let (_dir, app) = dashboard(450);
        let first = "/nodes?label=zone%3Db&sort=generation&dir=desc";
        let (status, html) = get(&app, first).await;
        assert_eq!(status, StatusCode::OK);
        // 150 nodes in zone b: 30 stopped, 120 serving; a page holds all of them.
        assert!(html.contains("150 nodes"), "{html}");
        assert_eq!(rows(&html).len(), 150);
        assert!(
            !html.contains("id=\"node-pages\""),
            "one page needs no pager"
        );
        assert!(
            html.contains(
                "href=\"/nodes?label=zone%3Db&amp;state=stopped&amp;sort=generation&amp;dir=desc\""
            ),
            "the stopped count links to the filter, keeping label and order: {html}"
        );

        let mut path = "/nodes?sort=generation&dir=desc".to_string();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let (status, html) = get(&app, &path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            pages += 1;
            let ids = rows(&html);
            assert!(ids.len() <= PAGE_ROWS, "{path}: {} rows", ids.len());
            assert!(
                html.contains(&format!(
                    "Showing {}–{} of 450",
                    seen.len() + 1,
                    seen.len() + ids.len()
                )),
                "{path}"
            );
            seen.extend(ids.iter().map(|id| id.to_string()));
            match link(&html, "next") {
                Some(next) => {
                    assert!(
                        next.starts_with("/nodes?label=&sort=generation&dir=desc&after=node-"),
                        "{next}"
                    );
                    path = next;
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        let mut expected: Vec<(u64, String)> = (0..450)
            .map(|i| ((i % 7) as u64, format!("node-{i:06}")))
            .collect();
        expected.sort();
        expected.reverse();
        let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
        assert_eq!(
            seen, expected,
            "every node once, by generation descending then id"
        );

        // The state filter: only stopped nodes, and a link back to every state.
        let (status, html) = get(&app, "/nodes?state=stopped").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(rows(&html).len(), 90);
        assert!(html.contains("every state"), "{html}");
        assert!(html.contains("data-src=\"/nodes?label=&amp;state=stopped&amp;sort=id&amp;dir=asc&amp;fragment=1\""), "{html}");
    }

    #[tokio::test]
    async fn an_unknown_state_filter_is_refused_with_the_states_there_are() {
        let (_dir, app) = dashboard(3);
        let (status, html) = get(&app, "/nodes?state=down").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            html.contains("state filter: unknown state &quot;down&quot;: give one of"),
            "{html}"
        );
        assert_eq!(rows(&html).len(), 3, "shown unfiltered");
    }

    /// How long the nodes page takes at 100,000 nodes, whole (the router, the
    /// session, the page shell and the charts too). Run it in release for the figure:
    /// `cargo test --release -p fleet-controller --lib nodes_page_at_100k -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "a timing: run in release with --ignored --nocapture"]
    async fn nodes_page_at_100k_nodes() {
        let (_dir, app) = dashboard(100_000);
        let mut worst = std::time::Duration::ZERO;
        for path in [
            "/nodes",
            "/nodes?after=node-050000",
            "/nodes?sort=generation&dir=desc",
            "/nodes?sort=labels&after=node-050000",
            "/nodes?sort=exe",
            "/nodes?label=zone%3Db&sort=uptime",
            "/nodes?state=stopped&sort=heartbeat&dir=desc",
        ] {
            let runs = 10;
            let started = std::time::Instant::now();
            let mut html = String::new();
            for _ in 0..runs {
                html = get(&app, path).await.1;
            }
            let each = started.elapsed() / runs;
            worst = worst.max(each);
            println!(
                "{path}: {each:.2?} a page ({} rows, {} KiB)",
                rows(&html).len(),
                html.len() / 1024
            );
        }
        assert!(worst < std::time::Duration::from_millis(100), "{worst:?}");
    }
}
