//! `fleetctl nodes`: the table (rows added a page at a time), the counts by state and
//! label, the line saying how many nodes were left out, and the JSON array written a
//! page at a time.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::SystemTime;

use fleet_proto::v1::{ListNodesResponse, Node};
use serde::Serialize;

use super::{Table, ago, labels, nodes_count, or_dash, pid};

/// The nodes table. Its columns are as wide as their widest cell, so it is drawn once
/// every page is in; only the cells are kept, not the nodes.
#[derive(Debug)]
pub struct NodesTable {
    rows: Vec<Vec<String>>,
    now: SystemTime,
}

impl NodesTable {
    pub fn new(now: SystemTime) -> NodesTable {
        NodesTable {
            rows: Vec::new(),
            now,
        }
    }

    pub fn push(&mut self, n: &Node) {
        self.rows.push(vec![
            n.node_id.clone(),
            or_dash(&n.state),
            or_dash(&labels(&n.labels)),
            or_dash(n.exe.as_ref().map_or("", |e| e.path.as_str())),
            n.generation.to_string(),
            pid(n.worker_pid),
            n.in_flight.to_string(),
            ago(n.last_heartbeat_unix_ms, self.now),
            or_dash(&n.admin_url),
            n.reason.clone(),
        ]);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The text; a REASON column only when a node has one.
    pub fn render(self) -> String {
        let with_reason = self.rows.iter().any(|r| !r[9].is_empty());
        let mut header = vec![
            "NODE",
            "STATE",
            "LABELS",
            "EXE",
            "GEN",
            "PID",
            "IN-FLIGHT",
            "HEARTBEAT",
            "ADMIN",
        ];
        if with_reason {
            header.push("REASON");
        }
        let mut table = Table::new(&header);
        for mut row in self.rows {
            if !with_reason {
                row.pop();
            }
            table.row(row);
        }
        table.render()
    }
}

/// How many nodes a listing matches, by state and by label.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Nodes matching the selector and the state.
    pub total: u64,
    /// Nodes matching the selector, by state (before the state filter).
    pub counts_by_state: BTreeMap<String, u64>,
    /// The same nodes by "key=value", the most common pairs the controller counted.
    pub counts_by_label: BTreeMap<String, u64>,
}

/// The controller keeps the 50 most common label pairs; a summary counted here keeps
/// as many.
const TOP_LABELS: usize = 50;

impl Summary {
    /// As the controller counted it.
    pub fn of(r: &ListNodesResponse) -> Summary {
        let widen = |m: &std::collections::HashMap<String, u32>| {
            m.iter().map(|(k, v)| (k.clone(), u64::from(*v))).collect()
        };
        Summary {
            total: r.total.into(),
            counts_by_state: widen(&r.counts_by_state),
            counts_by_label: widen(&r.counts_by_label),
        }
    }

    /// Counted here from every node the selector matched (from a controller that sends
    /// them all and no counts), those in `state` making the total.
    pub fn count(nodes: &[Node], state: Option<&str>) -> Summary {
        let mut summary = Summary::default();
        let mut by_label: BTreeMap<String, u64> = BTreeMap::new();
        for n in nodes {
            *summary.counts_by_state.entry(n.state.clone()).or_default() += 1;
            for (k, v) in &n.labels {
                *by_label.entry(format!("{k}={v}")).or_default() += 1;
            }
            if state.is_none_or(|s| s == n.state) {
                summary.total += 1;
            }
        }
        let mut common: Vec<(String, u64)> = by_label.into_iter().collect();
        common.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        common.truncate(TOP_LABELS);
        summary.counts_by_label = common.into_iter().collect();
        summary
    }

    /// "300 nodes: 200 serving, 100 stopped"; with a state filter "100 stopped nodes
    /// (of 300: 200 serving, 100 stopped)".
    pub fn line(&self, state: Option<&str>) -> String {
        let states = self
            .counts_by_state
            .iter()
            .map(|(s, n)| format!("{n} {}", or_dash(s)))
            .collect::<Vec<_>>()
            .join(", ");
        let all: u64 = self.counts_by_state.values().sum();
        match state {
            None if states.is_empty() => nodes_count(0),
            None => format!("{}: {states}", nodes_count(self.total as usize)),
            Some(s) => {
                let noun = if self.total == 1 { "node" } else { "nodes" };
                format!("{} {s} {noun} (of {all}: {states})", self.total)
            }
        }
    }

    /// `fleetctl nodes --summary`: the line, then a table by state and one by label
    /// (most common first).
    pub fn render(&self, state: Option<&str>) -> String {
        let mut text = self.line(state);
        text.push('\n');
        if self.counts_by_state.is_empty() {
            return text;
        }
        let mut by_state = Table::new(&["STATE", "NODES"]);
        for (s, n) in &self.counts_by_state {
            by_state.row([or_dash(s), n.to_string()]);
        }
        text.push('\n');
        text.push_str(&by_state.render());
        if !self.counts_by_label.is_empty() {
            let mut common: Vec<(&String, &u64)> = self.counts_by_label.iter().collect();
            common.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
            let header = if common.len() >= TOP_LABELS {
                format!("LABEL ({} most common)", common.len())
            } else {
                "LABEL".to_string()
            };
            let mut by_label = Table::new(&[header.as_str(), "NODES"]);
            for (l, n) in common {
                by_label.row([l.clone(), n.to_string()]);
            }
            text.push('\n');
            text.push_str(&by_label.render());
        }
        text
    }
}

/// After a table that left nodes out: how many, and how to see them.
pub fn left_out(shown: usize, total: u64) -> String {
    format!(
        "showing {shown} of {}: --all, --limit N, -l KEY=VALUE or --state STATE to see others",
        nodes_count(total as usize)
    )
}

/// A JSON array written to stdout an item at a time, byte for byte what
/// `json::to_string` writes for the whole array (pretty, two-space indent, a newline
/// at the end), so memory stays bounded however many items there are. A closed pipe
/// (`fleetctl nodes -o json | head`) ends the writing, not as an error: see `closed`.
#[derive(Debug)]
pub struct JsonArray<W: Write> {
    out: W,
    items: usize,
    closed: bool,
}

impl<W: Write> JsonArray<W> {
    /// Writes the `[`.
    pub fn start(out: W) -> anyhow::Result<JsonArray<W>> {
        let mut array = JsonArray {
            out,
            items: 0,
            closed: false,
        };
        array.write(b"[")?;
        Ok(array)
    }

    /// Whatever reads the output has gone: nothing more need be fetched.
    pub fn closed(&self) -> bool {
        self.closed
    }

    pub fn push<T: Serialize>(&mut self, item: &T) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(item).expect("plain structs serialize");
        // Inside the array every line is indented two more spaces; a JSON string holds
        // no raw newline, so every '\n' is between tokens.
        let mut chunk = String::with_capacity(text.len() + text.len() / 8 + 4);
        chunk.push_str(if self.items == 0 { "\n  " } else { ",\n  " });
        chunk.push_str(&text.replace('\n', "\n  "));
        self.items += 1;
        self.write(chunk.as_bytes())
    }

    /// Writes the `]` and the last newline, and flushes.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let end: &[u8] = if self.items == 0 { b"]\n" } else { b"\n]\n" };
        self.write(end)?;
        if !self.closed {
            match self.out.flush() {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(anyhow::Error::new(e).context("writing to stdout"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self.out.write_all(bytes) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use fleet_proto::v1::ExeInfo;

    use super::*;
    use crate::output::json::{self, NodeJson};

    fn node(id: &str, state: &str, zone: &str) -> Node {
        let mut node = Node {
            node_id: id.into(),
            state: state.into(),
            exe: Some(ExeInfo {
                path: "/opt/app".into(),
                ..Default::default()
            }),
            generation: 2,
            worker_pid: 4321,
            admin_url: format!("http://{id}.invalid/debug/admin"),
            ..Default::default()
        };
        node.labels.insert("zone".into(), zone.into());
        node.labels.insert("role".into(), "web".into());
        node
    }

    fn table(nodes: &[Node], now: SystemTime) -> String {
        let mut table = NodesTable::new(now);
        for n in nodes {
            table.push(n);
        }
        table.render()
    }

    #[test]
    fn nodes_show_labels_state_exe_generation_and_admin_url() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        let mut nodes = vec![node("n1", "serving", "a"), node("node-22", "serving", "a")];
        nodes[1].last_heartbeat_unix_ms = 99_000;
        let text = table(&nodes, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE     STATE    LABELS"), "{text}");
        assert!(lines[1].starts_with("n1       serving  role=web,zone=a  /opt/app  2"));
        assert!(lines[2].contains("1.0s ago"), "{text}");
        assert!(!text.contains("REASON"));

        nodes[0].state = "unreachable".into();
        nodes[0].reason = "no heartbeat since 12:00:00".into();
        let text = table(&nodes, now);
        assert!(text.lines().next().unwrap().ends_with("REASON"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
    }

    #[test]
    fn a_streamed_array_is_byte_for_byte_the_whole_array() {
        let nodes = [node("n1", "serving", "a"), node("n\"2\n", "stopped", "b")];
        for count in 0..=nodes.len() {
            let items: Vec<NodeJson> = nodes[..count].iter().map(NodeJson::from).collect();
            let mut out = Vec::new();
            let mut array = JsonArray::start(&mut out).unwrap();
            for item in &items {
                array.push(item).unwrap();
            }
            array.finish().unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), json::to_string(&items));
        }
    }

    #[test]
    fn a_summary_counts_states_and_the_most_common_labels() {
        let nodes = vec![
            node("a", "serving", "a"),
            node("b", "serving", "b"),
            node("c", "stopped", "b"),
        ];
        let all = Summary::count(&nodes, None);
        assert_eq!(all.total, 3);
        assert_eq!(all.line(None), "3 nodes: 2 serving, 1 stopped");
        let stopped = Summary::count(&nodes, Some("stopped"));
        assert_eq!(
            stopped.line(Some("stopped")),
            "1 stopped node (of 3: 2 serving, 1 stopped)"
        );
        let text = all.render(None);
        assert_eq!(
            text,
            "3 nodes: 2 serving, 1 stopped\n\
             \n\
             STATE    NODES\n\
             serving  2\n\
             stopped  1\n\
             \n\
             LABEL     NODES\n\
             role=web  3\n\
             zone=b    2\n\
             zone=a    1\n"
        );
        assert_eq!(Summary::default().line(None), "0 nodes");
        assert_eq!(
            left_out(100, 100_000),
            "showing 100 of 100000 nodes: --all, --limit N, -l KEY=VALUE or --state STATE to see others"
        );
    }
}
