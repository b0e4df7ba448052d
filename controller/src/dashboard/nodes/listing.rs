//! One page of the nodes table in any column's order, cheap at 100,000 nodes: under
//! the inventory's read lock each matching node gives a borrowed sort key (a number or
//! a string slice, never a copy of the node), the page's rows are selected from those
//! keys in linear time (`select_nth_unstable`, not a sort of every node), and only the
//! page's nodes are copied out. The states are counted in the same walk.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeMap;

use crate::inventory::page::View;
use crate::inventory::{NodeRecord, Selector};

/// The table's columns that sort: (query name, header).
pub const COLUMNS: [(&str, &str); 11] = [
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

/// A node's value in the sorted column, borrowed from the node. One column gives one
/// variant, so the derived order is that column's; ties go by node id beside it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key<'a> {
    /// By id alone.
    Id,
    Num(u64),
    /// Longest up first when ascending by uptime: oldest start first.
    Newest(Reverse<u64>),
    Text(&'a str),
    Labels(&'a BTreeMap<String, String>),
}

fn key<'a>(col: &str, n: &'a NodeRecord, state: &'a str) -> Key<'a> {
    match col {
        "state" => Key::Text(state),
        "exe" => Key::Text(&n.exe.path),
        "generation" => Key::Num(n.generation),
        "supervisor" => Key::Num(n.supervisor_pid.into()),
        "worker" => Key::Num(n.worker_pid.into()),
        "uptime" => Key::Newest(Reverse(n.started_at_unix_ms)),
        "in_flight" => Key::Num(n.in_flight),
        "heartbeat" => Key::Num(n.last_heartbeat_unix_ms),
        "labels" => Key::Labels(&n.labels),
        "admin" => Key::Text(&n.admin_url),
        _ => Key::Id,
    }
}

/// What one page of the table is drawn from.
#[derive(Debug, Default)]
pub struct Listing {
    /// The page's nodes, in the table's order, as the inventory shows them.
    pub nodes: Vec<NodeRecord>,
    /// How many matching nodes come before this page.
    pub before: usize,
    /// Nodes matching the label and state filters.
    pub total: usize,
    /// Nodes matching the label filter, by state (what a state filter would leave).
    pub by_state: BTreeMap<String, usize>,
    /// The last node of this page when more follow: the next page's `after`.
    pub next: Option<String>,
    /// The page was to start after a node that is gone, in an order other than by
    /// id: it starts at the top instead.
    pub lost: bool,
}

/// What the table shows: which nodes, in what order, from where.
#[derive(Debug, Clone, Copy)]
pub struct Order<'a> {
    pub selector: &'a Selector,
    pub state: Option<&'a str>,
    /// A column of [`COLUMNS`] (anything else sorts by id).
    pub col: &'a str,
    pub desc: bool,
    /// The page starts after this node, in this order.
    pub after: Option<&'a str>,
    pub rows: usize,
}

/// One page of `view` in `order`: see the module's comment.
pub fn listing(view: &View<'_>, order: Order<'_>) -> Listing {
    let Order {
        selector,
        state,
        col,
        desc,
        after,
        rows,
    } = order;
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    let mut keys: Vec<(Key<'_>, &str)> = Vec::new();
    for (n, shown) in view.iter() {
        if !selector.matches(&n.labels) {
            continue;
        }
        *by_state.entry(shown).or_default() += 1;
        if state.is_some_and(|s| s != shown) {
            continue;
        }
        keys.push((key(col, n, shown), n.node_id.as_str()));
    }
    let total = keys.len();
    let by_id = !COLUMNS.iter().any(|(c, _)| *c == col && *c != "id");
    let cmp = |a: &(Key<'_>, &str), b: &(Key<'_>, &str)| {
        if desc { b.cmp(a) } else { a.cmp(b) }
    };
    // Where `after` is in this order now: its key as it is now (it may have moved
    // since the previous page was drawn; the page goes on from where it is). A node
    // that is gone has no key, but by id its id is its place.
    let cursor = after.and_then(|id| match view.get(id) {
        Some(n) => Some((key(col, n, view.state(n)), id)),
        None => by_id.then_some((Key::Id, id)),
    });
    let lost = after.is_some() && cursor.is_none();
    if let Some(cursor) = &cursor {
        keys.retain(|k| cmp(k, cursor) == Ordering::Greater);
    }
    let before = total - keys.len();
    let more = keys.len() > rows;
    if more {
        // The `rows` first in order, unsorted, ahead of the rest: linear time.
        keys.select_nth_unstable_by(rows, cmp);
        keys.truncate(rows);
    }
    keys.sort_unstable_by(cmp);
    let next = more.then(|| keys.last().map(|(_, id)| id.to_string()));
    Listing {
        nodes: keys
            .iter()
            .filter_map(|(_, id)| view.get(id))
            .map(|n| view.shown(n))
            .collect(),
        before,
        total,
        by_state: by_state
            .into_iter()
            .map(|(s, n)| (s.to_string(), n))
            .collect(),
        next: next.flatten(),
        lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    fn inventory(dir: &std::path::Path, nodes: &[(&str, u64)]) -> Inventory {
        let inventory = Inventory::for_test(dir);
        for (id, generation) in nodes {
            inventory.insert(NodeRecord::for_test(id, *generation));
        }
        inventory
    }

    fn ids(
        inventory: &Inventory,
        col: &str,
        desc: bool,
        after: Option<&str>,
        rows: usize,
    ) -> (Vec<String>, Listing) {
        let selector = Selector::default();
        let listing = listing(
            &inventory.view(),
            Order {
                selector: &selector,
                state: None,
                col,
                desc,
                after,
                rows,
            },
        );
        let ids = listing.nodes.iter().map(|n| n.node_id.clone()).collect();
        (ids, listing)
    }

    #[test]
    fn sorts_by_a_column_then_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let inventory = inventory(dir.path(), &[("b", 1), ("a", 2), ("c", 1)]);
        assert_eq!(
            ids(&inventory, "generation", false, None, 10).0,
            ["b", "c", "a"]
        );
        assert_eq!(
            ids(&inventory, "generation", true, None, 10).0,
            ["a", "c", "b"]
        );
        assert_eq!(ids(&inventory, "id", true, None, 10).0, ["c", "b", "a"]);
        // Unknown columns sort by id.
        assert_eq!(ids(&inventory, "nope", false, None, 10).0, ["a", "b", "c"]);
    }

    #[test]
    fn a_page_goes_on_after_its_cursor_where_that_node_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = [("a", 5), ("b", 1), ("c", 3), ("d", 2), ("e", 4)];
        let inventory = inventory(dir.path(), &nodes);
        let (first, listing) = ids(&inventory, "generation", false, None, 2);
        assert_eq!(first, ["b", "d"]);
        assert_eq!((listing.before, listing.total), (0, 5));
        assert_eq!(listing.next.as_deref(), Some("d"));
        let (second, listing) = ids(&inventory, "generation", false, Some("d"), 2);
        assert_eq!(second, ["c", "e"]);
        assert_eq!(listing.before, 2);
        let (last, listing) = ids(&inventory, "generation", false, Some("e"), 2);
        assert_eq!((last, listing.next), (vec!["a".to_string()], None));

        // By id, a cursor naming a node that is gone goes on after it in id order.
        let (page, listing) = ids(&inventory, "id", false, Some("bb"), 2);
        assert_eq!(
            (page, listing.lost),
            (vec!["c".to_string(), "d".to_string()], false)
        );
        // In another order its place is unknown: the first page, saying so.
        let (page, listing) = ids(&inventory, "generation", false, Some("bb"), 2);
        assert_eq!(
            (page, listing.lost),
            (vec!["b".to_string(), "d".to_string()], true)
        );
    }
}
