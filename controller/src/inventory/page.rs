//! A page of the inventory for people (`fleetctl nodes`, gRPC `ListNodes`, the
//! dashboard): the nodes in id order after a cursor, at most a page of them, and the
//! counts over every node the listing matches, by state and by label.
//!
//! A fleet of 100,000 nodes is walked once per page under the read lock, and only the
//! page's records are copied out of it; states and labels are counted from borrowed
//! strings. The lock is held for that walk only, so heartbeats wait no longer than it
//! takes: at 100,000 nodes (release build, `page_at_100k_nodes` below) 13 ms for a page
//! of 5,000; with the labels counted too, 21 ms for two labels a node (11 pairs in
//! all), 55–70 ms when every node has a label of its own (100,000 pairs), which is why
//! `ListNodes` counts them for its first page only.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLockReadGuard;
use std::sync::atomic::Ordering;

use super::{Inventory, NodeRecord, Selector};
use crate::now_ms;

/// The most nodes one page holds, whatever was asked: about 3 MB of gRPC message.
pub const MAX_PAGE: usize = 5_000;

/// Counts by label keep the most common pairs only, so that labels unique to each node
/// (a host name) cannot make a listing as large as the fleet.
pub const TOP_LABELS: usize = 50;

/// The state a node is shown in that no agent reports: it missed its heartbeats.
pub const UNREACHABLE: &str = "unreachable";

/// Whether `state` is one a node can be shown in: one an agent reports
/// ([`fleet_proto::limits::NODE_STATES`]), or `unreachable`.
pub fn known_state(state: &str) -> bool {
    state == UNREACHABLE || fleet_proto::limits::NODE_STATES.contains(&state)
}

/// A state filter as given (`--state`, `?state=`): empty for any; an unknown name is
/// refused with the names there are.
pub fn parse_state(state: &str) -> Result<Option<String>, String> {
    let state = state.trim();
    if state.is_empty() {
        return Ok(None);
    }
    if known_state(state) {
        return Ok(Some(state.to_string()));
    }
    Err(format!(
        "unknown state {}: give one of {}, {UNREACHABLE} (or none for every state)",
        fleet_proto::limits::shown(state),
        fleet_proto::limits::NODE_STATES.join(", ")
    ))
}

/// Which nodes a listing holds, and which of them this page.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub selector: Selector,
    /// Only nodes shown in this state (`unreachable` included); `None`: any.
    pub state: Option<String>,
    /// The page starts after this node id (which need not be a node any more).
    pub after: Option<String>,
    /// At most this many nodes (`None`: every one after the cursor). Callers cap it.
    pub limit: Option<usize>,
    /// Count the nodes by label too (a hash per label of every matching node).
    pub count_labels: bool,
}

/// One page, and what the whole listing holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// As [`Inventory::get`] shows them, in id order.
    pub nodes: Vec<NodeRecord>,
    /// The last id of this page when more nodes follow it: the next page's cursor.
    pub next: Option<String>,
    /// Nodes matching the selector and the state.
    pub total: usize,
    /// Nodes matching the selector, by state, before the state filter.
    pub by_state: BTreeMap<String, usize>,
    /// The same nodes by label pair (`key=value`), the [`TOP_LABELS`] most common,
    /// most common first (ties by name). Empty unless asked for.
    pub by_label: Vec<(String, usize)>,
}

/// The nodes under the inventory's read lock, each with the state it is shown in.
/// Held for one walk (a page, a sort): heartbeats wait while it lives.
#[derive(Debug)]
pub struct View<'a> {
    nodes: RwLockReadGuard<'a, BTreeMap<String, NodeRecord>>,
    inventory: &'a Inventory,
    /// Read once for the whole walk.
    now: u64,
    follower: bool,
}

impl View<'_> {
    /// Every node in id order, with the state it is shown in.
    pub fn iter(&self) -> impl Iterator<Item = (&NodeRecord, &str)> {
        self.nodes.values().map(|n| (n, self.state(n)))
    }

    /// The state `node` is shown in: its own, or `unreachable`.
    pub fn state<'n>(&self, node: &'n NodeRecord) -> &'n str {
        self.inventory.shown_state(node, self.now, self.follower)
    }

    pub fn get(&self, node_id: &str) -> Option<&NodeRecord> {
        self.nodes.get(node_id)
    }

    /// A copy of `node` as [`Inventory::get`] shows it (with why it is unreachable).
    pub fn shown(&self, node: &NodeRecord) -> NodeRecord {
        self.inventory.effective(node)
    }
}

impl Inventory {
    /// The nodes under the read lock, for one walk: see [`View`].
    pub fn view(&self) -> View<'_> {
        View {
            nodes: self.nodes.read().expect("inventory lock"),
            inventory: self,
            now: now_ms(),
            follower: self.follower.load(Ordering::Relaxed),
        }
    }

    /// One page of the nodes `query` matches, in id order, with the counts over all of
    /// them. One walk of the inventory; only the page's nodes are copied.
    pub fn page(&self, query: &Query) -> Page {
        let view = self.view();
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut page = Page::default();
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        let mut by_label: HashMap<(&str, &str), usize> = HashMap::new();
        for (node, state) in view.iter() {
            if !query.selector.matches(&node.labels) {
                continue;
            }
            *by_state.entry(state).or_default() += 1;
            if query.count_labels {
                for (k, v) in &node.labels {
                    *by_label.entry((k, v)).or_default() += 1;
                }
            }
            if query.state.as_deref().is_some_and(|s| s != state) {
                continue;
            }
            page.total += 1;
            if query
                .after
                .as_deref()
                .is_some_and(|after| node.node_id.as_str() <= after)
            {
                continue;
            }
            if page.nodes.len() < limit {
                page.nodes.push(view.shown(node));
            } else if page.next.is_none() {
                // One more matches: the page is full and is not the last.
                page.next = page.nodes.last().map(|n| n.node_id.clone());
            }
        }
        page.by_state = by_state
            .into_iter()
            .map(|(s, n)| (s.to_string(), n))
            .collect();
        page.by_label = top_labels(by_label);
        page
    }
}

/// The [`TOP_LABELS`] most common pairs, most common first, ties by name; the rest are
/// not sorted at all (a selection, not a sort of every pair).
fn top_labels(counts: HashMap<(&str, &str), usize>) -> Vec<(String, usize)> {
    let mut counts: Vec<((&str, &str), usize)> = counts.into_iter().collect();
    let order = |a: &((&str, &str), usize), b: &((&str, &str), usize)| {
        b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
    };
    if counts.len() > TOP_LABELS {
        counts.select_nth_unstable_by(TOP_LABELS, order);
        counts.truncate(TOP_LABELS);
    }
    counts.sort_unstable_by(order);
    counts
        .into_iter()
        .map(|((k, v), n)| (format!("{k}={v}"), n))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::inventory::ExeRecord;

    /// Node `i`: zone a/b/c by i % 3, every fifth stopped, every seventh quiet for a
    /// minute (unreachable, unless stopped), heartbeating now otherwise.
    fn node(i: usize) -> NodeRecord {
        let zone = ["a", "b", "c"][i % 3];
        NodeRecord {
            node_id: format!("node-{i:06}"),
            labels: [
                ("zone".to_string(), zone.to_string()),
                ("host".to_string(), format!("h{i}")),
            ]
            .into(),
            state: if i.is_multiple_of(5) {
                "stopped"
            } else {
                "serving"
            }
            .into(),
            control_addr: "127.0.0.1:7101".into(),
            admin_url: "http://127.0.0.1:7101/debug/admin".into(),
            exe: ExeRecord {
                path: "/opt/app".into(),
                sha256: "ab".repeat(32),
                size: 1,
            },
            generation: (i % 11) as u64,
            supervisor_pid: 1000 + i as u32,
            worker_pid: 2000 + i as u32,
            in_flight: (i % 13) as u64,
            last_heartbeat_unix_ms: if i.is_multiple_of(7) {
                now_ms() - 60_000
            } else {
                now_ms()
            },
            started_at_unix_ms: 1_700_000_000_000 + i as u64,
            ..NodeRecord::for_test("", 0)
        }
    }

    fn filled(dir: &std::path::Path, count: usize) -> Inventory {
        let inventory = Inventory::for_test(dir);
        for i in (0..count).rev() {
            inventory.insert(node(i));
        }
        inventory
    }

    fn shown_state(i: usize) -> &'static str {
        match (i % 5, i % 7) {
            (0, _) => "stopped",
            (_, 0) => "unreachable",
            _ => "serving",
        }
    }

    /// Every page of `query` (its `after` ignored), walked from the start.
    fn all_pages(inventory: &Inventory, query: &Query) -> Vec<Page> {
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = inventory.page(&Query {
                after: after.clone(),
                ..query.clone()
            });
            after = page.next.clone();
            pages.push(page);
            if after.is_none() {
                return pages;
            }
            assert!(pages.len() < 10_000, "the pages never end");
        }
    }

    #[test]
    fn pages_cover_every_matching_node_once_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = filled(dir.path(), 1_000);
        for (selector, state, limit) in [
            ("", None, 1),
            ("", None, 97),
            ("", None, 1_000),
            ("", None, 5_000),
            ("zone=b", None, 33),
            ("", Some("unreachable"), 10),
            ("zone=a", Some("stopped"), 7),
            ("zone=a", Some("serving"), 1),
        ] {
            let query = Query {
                selector: Selector::parse(selector).unwrap(),
                state: state.map(str::to_string),
                limit: Some(limit),
                ..Default::default()
            };
            let expected: Vec<String> = (0..1_000)
                .filter(|i| {
                    selector.is_empty() || selector == format!("zone={}", ["a", "b", "c"][i % 3])
                })
                .filter(|i| state.is_none_or(|s| s == shown_state(*i)))
                .map(|i| node(i).node_id)
                .collect();
            let pages = all_pages(&inventory, &query);
            let listed: Vec<String> = pages
                .iter()
                .flat_map(|p| p.nodes.iter().map(|n| n.node_id.clone()))
                .collect();
            let what = format!("{selector:?} {state:?} by {limit}");
            assert_eq!(listed, expected, "{what}");
            assert_eq!(pages.len(), expected.len().div_ceil(limit).max(1), "{what}");
            for page in &pages {
                assert!(page.nodes.len() <= limit, "{what}");
                assert_eq!(page.total, expected.len(), "{what}: total on every page");
                if let Some(next) = &page.next {
                    assert_eq!(Some(next), page.nodes.last().map(|n| &n.node_id));
                }
                for n in &page.nodes {
                    if let Some(state) = state {
                        assert_eq!(n.state, state, "{what}: {}", n.node_id);
                    }
                }
            }
            // A node shown unreachable says why, as `Inventory::get` does.
            for n in pages.iter().flat_map(|p| &p.nodes) {
                assert_eq!(n.state == "unreachable", !n.reason.is_empty(), "{n:?}");
            }
        }
    }

    #[test]
    fn a_cursor_naming_no_node_continues_after_it_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = filled(dir.path(), 20);
        // Between node-000004 and node-000005; before every node; after every node.
        for (after, first) in [
            ("node-000004x", Some("node-000005")),
            ("", Some("node-000000")),
            ("a", Some("node-000000")),
            ("zzz", None),
        ] {
            let page = inventory.page(&Query {
                after: Some(after.to_string()),
                limit: Some(3),
                ..Default::default()
            });
            assert_eq!(
                page.nodes.first().map(|n| n.node_id.as_str()),
                first,
                "{after:?}"
            );
            assert_eq!(page.total, 20, "{after:?}");
        }
    }

    #[test]
    fn counts_are_over_every_node_the_selector_matches_before_the_state_filter() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = filled(dir.path(), 210);
        let page = inventory.page(&Query {
            selector: Selector::parse("zone=a").unwrap(),
            state: Some("stopped".into()),
            limit: Some(0),
            count_labels: true,
            ..Default::default()
        });
        assert!(page.nodes.is_empty());
        assert_eq!(page.next, None, "an empty page names no next");
        let zone_a: Vec<usize> = (0..210).filter(|i| i % 3 == 0).collect();
        let count = |s: &str| zone_a.iter().filter(|i| shown_state(**i) == s).count();
        assert_eq!(page.total, count("stopped"));
        let expected: BTreeMap<String, usize> = ["serving", "stopped", "unreachable"]
            .into_iter()
            .map(|s| (s.to_string(), count(s)))
            .collect();
        assert_eq!(page.by_state, expected);
        // zone=a on all 70; each host label on one node: the first 49 by name.
        assert_eq!(page.by_label.len(), TOP_LABELS);
        assert_eq!(page.by_label[0], ("zone=a".to_string(), 70));
        let mut hosts: Vec<String> = zone_a.iter().map(|i| format!("host=h{i}")).collect();
        hosts.sort();
        let listed: Vec<&str> = page.by_label[1..].iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(listed, hosts[..TOP_LABELS - 1]);
        assert!(page.by_label[1..].iter().all(|(_, n)| *n == 1));
        // Not asked for: not counted.
        let page = inventory.page(&Query::default());
        assert!(page.by_label.is_empty());
        assert_eq!(page.nodes.len(), 210);
        assert_eq!(page.next, None);
    }

    #[test]
    fn state_filters_name_a_state_nodes_are_shown_in() {
        assert_eq!(parse_state(" ").unwrap(), None);
        assert_eq!(
            parse_state("unreachable").unwrap().as_deref(),
            Some("unreachable")
        );
        assert_eq!(parse_state("stopped").unwrap().as_deref(), Some("stopped"));
        let e = parse_state("down").unwrap_err();
        assert!(
            e.starts_with("unknown state \"down\": give one of starting, serving"),
            "{e}"
        );
        assert!(e.contains("stopped, unreachable"), "{e}");
    }

    /// How long a page takes at 100,000 nodes. Run it in release for the figure:
    /// `cargo test --release -p fleet-controller --lib page_at_100k -- --ignored --nocapture`.
    #[test]
    #[ignore = "a timing: run in release with --ignored --nocapture"]
    fn page_at_100k_nodes() {
        fn time(inventory: &Inventory, what: &str, query: Query) -> Duration {
            let runs = 20;
            let started = Instant::now();
            let mut page = Page::default();
            for _ in 0..runs {
                page = inventory.page(&query);
            }
            let each = started.elapsed() / runs;
            println!(
                "{what}: {each:.2?} a page ({} nodes of {})",
                page.nodes.len(),
                page.total
            );
            each
        }
        let dir = tempfile::tempdir().unwrap();
        let unique = filled(dir.path(), 100_000);
        let first = time(
            &unique,
            "first page of 5,000 with label counts (a label unique to each node)",
            Query {
                limit: Some(MAX_PAGE),
                count_labels: true,
                ..Default::default()
            },
        );
        time(
            &unique,
            "last page of 5,000 without label counts",
            Query {
                limit: Some(MAX_PAGE),
                after: Some(node(94_999).node_id),
                ..Default::default()
            },
        );
        time(
            &unique,
            "summary only, unreachable (a label unique to each node)",
            Query {
                limit: Some(0),
                state: Some("unreachable".into()),
                count_labels: true,
                ..Default::default()
            },
        );
        // As hollow agents are labelled: two labels, 11 pairs in all.
        let dir = tempfile::tempdir().unwrap();
        let hollow = Inventory::for_test(dir.path());
        for i in 0..100_000 {
            let mut n = node(i);
            n.labels = [
                ("sim".to_string(), "hollow".to_string()),
                ("shard".to_string(), (i % 10).to_string()),
            ]
            .into();
            hollow.insert(n);
        }
        time(
            &hollow,
            "summary only, sim=hollow (11 label pairs in all)",
            Query {
                selector: Selector::parse("sim=hollow").unwrap(),
                limit: Some(0),
                count_labels: true,
                ..Default::default()
            },
        );
        assert!(first < Duration::from_millis(500), "{first:?}");
    }
}
