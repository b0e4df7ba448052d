//! The page shell every dashboard page shares, and the small pieces of formatting
//! (states, times, digests) its tables use. Everything is escaped by maud: node ids,
//! labels, paths and reasons come from agents and operators.

use std::time::{Duration, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::session::Session;
use crate::tokens::Role;

/// Which section of the navigation is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Nodes,
    Rollouts,
    NewRollout,
    Login,
}

/// A message shown at the top of a page: what an action did, or why it did not.
#[derive(Debug, Clone)]
pub enum Flash {
    Done(String),
    Error(String),
}

/// What a page declares about itself for `dashboard.js`: where its live region is
/// fetched from and which events refresh it.
#[derive(Debug, Clone)]
pub struct Live {
    /// The fragment URL (the page's own URL with `fragment=1`).
    pub src: String,
    /// `node`, `rollout` or both, comma-separated.
    pub events: &'static str,
    /// Only `rollout` events about this rollout refresh it.
    pub rollout: Option<String>,
    /// Also refresh this often, for what changes without an event (requests in
    /// flight arrive with every heartbeat, which is not an event).
    pub every: Option<Duration>,
}

/// A whole page: header with navigation, the flash, then `body`; the live region
/// (when there is one) wraps `live_body` so that `dashboard.js` can swap it.
pub fn page(
    title: &str,
    section: Section,
    session: Option<&Session>,
    token_required: bool,
    flash: Option<&Flash>,
    body: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Fleet" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { "Fleet" }
                    @if section != Section::Login {
                        nav aria-label="Sections" {
                            a href="/" aria-current=[(section == Section::Nodes).then_some("page")] { "Nodes" }
                            a href="/rollouts" aria-current=[(section == Section::Rollouts).then_some("page")] { "Rollouts" }
                            @if session.is_none_or(|s| s.may(Role::Operator)) {
                                a href="/rollouts/new" aria-current=[(section == Section::NewRollout).then_some("page")] { "New rollout" }
                            }
                        }
                        span #live-status role="status" aria-live="polite" data-state="connecting" { "connecting…" }
                        (role_badge())
                        @if let (true, Some(s)) = (token_required, session) {
                            span #caller data-role=(s.caller.role) title="Logged in as" { (s.caller.name) " · " (s.caller.role) }
                            form.logout method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main {
                    @match flash {
                        Some(Flash::Done(m)) => p.flash.done role="status" { (m) },
                        Some(Flash::Error(m)) => div.flash.error role="alert" { pre { (m) } },
                        None => {},
                    }
                    (body)
                }
            }
        }
    }
}

/// Where this controller stands among several sharing an etcd store: leading, or
/// following (with a link to the leader, which alone takes changes). Nothing for a
/// controller with a store of its own.
fn role_badge() -> Markup {
    let Some(ha) = crate::ha::current() else {
        return html! {};
    };
    match ha.role() {
        crate::ha::Role::Leader { since_unix_ms } => html! {
            span #ha-role data-role="leader" title=(format!("{} leads the controllers", ha.advertise())) {
                "leader since " (crate::tokens::rfc3339(since_unix_ms))
            }
        },
        crate::ha::Role::Follower { leader: Some(url) } => html! {
            span #ha-role data-role="follower" title="This controller serves reads; changes are made by the leader" {
                "follower · leader: "
                a href=(url) { (url) }
            }
        },
        crate::ha::Role::Follower { leader: None } => html! {
            span #ha-role data-role="electing" title="No controller leads right now: changes wait for the election" {
                "no leader elected"
            }
        },
    }
}

/// The live region: its content is replaced by a fresh fragment whenever an event
/// it listens to arrives, and after a lost event stream reconnects.
pub fn live(live: &Live, content: Markup) -> Markup {
    html! {
        div #live data-src=(live.src) data-events=(live.events) data-rollout=[live.rollout.as_deref()]
            data-every=[live.every.map(|d| d.as_millis())] {
            (content)
        }
    }
}

/// A page answered with `status`.
pub fn with_status(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

/// A coloured state word (colour is never the only signal: the word is there).
pub fn state(state: &str) -> Markup {
    html! { span class={ "state state-" (state) } { (state) } }
}

/// A moment, shown as "3s ago" and kept current by `dashboard.js`.
pub fn since(unix_ms: u64, now_ms: u64) -> Markup {
    if unix_ms == 0 {
        return html! { "—" };
    }
    html! {
        time datetime=(rfc3339(unix_ms)) title=(rfc3339(unix_ms)) data-since=(unix_ms) {
            (ago(now_ms.saturating_sub(unix_ms))) " ago"
        }
    }
}

/// How long since a moment, shown as "5m 3s" and kept current by `dashboard.js`.
pub fn uptime(unix_ms: u64, now_ms: u64) -> Markup {
    if unix_ms == 0 {
        return html! { "—" };
    }
    html! {
        time title=(rfc3339(unix_ms)) data-uptime=(unix_ms) { (ago(now_ms.saturating_sub(unix_ms))) }
    }
}

pub fn rfc3339(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// `42s`, `5m 3s`, `2h 5m`, `3d 4h`: two units at most.
pub fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// A span of milliseconds: `850 ms`, `2.4 s`.
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// The first 12 hex digits of a digest, the whole one in a tooltip.
pub fn short_sha(sha: &str) -> Markup {
    html! {
        @if sha.is_empty() { "—" } @else {
            code title=(sha) { (sha.get(..12).unwrap_or(sha)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_person_wrote_them() {
        assert_eq!(ago(999), "0s");
        assert_eq!(ago(61_000), "1m 1s");
        assert_eq!(ago(3_600_000 * 2 + 60_000 * 5), "2h 5m");
        assert_eq!(ago(86_400_000 * 3), "3d 0h");
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(2400), "2.4 s");
    }

    #[test]
    fn text_from_agents_is_escaped() {
        let m = state("<script>");
        assert!(m.into_string().contains("&lt;script&gt;"));
    }
}
