//! What fleetctl prints: aligned tables and key/value views for people, JSON for
//! programs (see `json`); rollouts in `rollout`. Every function here is pure: it
//! returns the text, with the current time passed in where ages are shown.

pub mod json;
pub mod nodes;
mod rollout;
mod token;
pub mod history;

pub use rollout::{
    batches, history_table, plan, rollout_details, started, state_counts, target, would_refuse,
};
pub use token::{created as token_created, revoked as token_revoked, tokens_table};

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_proto::v1::{Node, RestartResponse};

/// Writes to stdout. A closed pipe (`fleetctl nodes | head -1`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let result = out.write_all(text.as_bytes()).and_then(|()| {
        if text.ends_with('\n') {
            Ok(())
        } else {
            out.write_all(b"\n")
        }
    });
    match result.and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// Rows of cells printed in columns as wide as their widest cell, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        let mut table = Table::default();
        table.row(header.iter().copied());
        table
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The text, one line per row; the last column is not padded, and no line has
    /// trailing spaces. comfy-table measures each cell's display width (wide CJK
    /// characters count two columns, combining marks none), so columns stay aligned in
    /// a terminal whatever the node names and reasons hold.
    pub fn render(&self) -> String {
        let mut table = comfy_table::Table::new();
        table
            .load_style(comfy_table::presets::NOTHING)
            .set_content_arrangement(comfy_table::ContentArrangement::Disabled);
        for row in &self.rows {
            table.add_row(row.iter().map(String::as_str));
        }
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        for (i, column) in table.column_iter_mut().enumerate() {
            // Two spaces between columns, none before the first.
            column.set_padding((0, if i + 1 < columns { 2 } else { 0 }));
        }
        let mut text = String::new();
        for line in table.lines() {
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// "-" for an empty cell, so columns stay readable.
pub(crate) fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// The actor of a rollout as history shows it: who acted (the token's name), and in
/// quotes who it said it acted for, when that is someone else: `ci (as "alice")`.
pub fn actor(actor: &str, declared: &str) -> String {
    if declared.is_empty() || declared == actor {
        actor.to_string()
    } else {
        format!("{actor} (as {declared:?})")
    }
}

/// "role=web,zone=a", sorted by key.
pub fn labels(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A Unix time in milliseconds as RFC 3339 UTC seconds, or "-" for 0.
pub fn time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// "850ms", "4.2s", "41s", "2m 5s".
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => humantime::format_duration(Duration::from_secs(ms / 1000)).to_string(),
    }
}

/// How long ago a Unix time in milliseconds was: "3s ago", or "-" for 0.
pub fn ago(unix_ms: u64, now: SystemTime) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    format!("{} ago", duration(now_ms.saturating_sub(unix_ms)))
}

/// "pid 4100 -> 4321", "pid 4100", or "" when neither is known.
pub fn pids(old: u32, new: u32) -> String {
    match (old, new) {
        (0, 0) => String::new(),
        (old, 0) => format!("pid {old}"),
        (0, new) => format!("pid {new}"),
        (old, new) if old == new => format!("pid {old}"),
        (old, new) => format!("pid {old} -> {new}"),
    }
}

/// "1 node", "3 nodes".
pub fn nodes_count(n: usize) -> String {
    if n == 1 {
        "1 node".to_string()
    } else {
        format!("{n} nodes")
    }
}

fn pid(pid: u32) -> String {
    if pid == 0 {
        "-".to_string()
    } else {
        pid.to_string()
    }
}

/// `fleetctl node NODE`.
pub fn node_details(n: &Node, now: SystemTime) -> String {
    let exe = n.exe.clone().unwrap_or_default();
    let mut table = Table::default();
    table.row(["Node:", &n.node_id]);
    table.row(["State:", &or_dash(&n.state)]);
    if !n.reason.is_empty() {
        table.row(["Reason:", &n.reason]);
    }
    table.row(["Labels:", &or_dash(&labels(&n.labels))]);
    table.row(["Exe:", &or_dash(&exe.path)]);
    table.row(["Sha256:", &or_dash(&exe.sha256)]);
    table.row(["Size:", &format!("{} bytes", exe.size)]);
    table.row(["Generation:", &n.generation.to_string()]);
    table.row(["Supervisor pid:", &pid(n.supervisor_pid)]);
    table.row(["Worker pid:", &pid(n.worker_pid)]);
    table.row(["In flight:", &n.in_flight.to_string()]);
    table.row(["Control:", &or_dash(&n.control_addr)]);
    let calls = if n.calls_on_stream {
        "on its heartbeat stream".to_string()
    } else if n.control_addr.is_empty() {
        "-".to_string()
    } else {
        format!("dialled at {}", n.control_addr)
    };
    table.row(["Calls:", &calls]);
    table.row(["Admin:", &or_dash(&n.admin_url)]);
    table.row(["Started:", &time(n.started_at_unix_ms)]);
    let heartbeat = match n.last_heartbeat_unix_ms {
        0 => "-".to_string(),
        ms => format!("{} ({})", time(ms), ago(ms, now)),
    };
    table.row(["Heartbeat:", &heartbeat]);
    let origin = if n.static_node {
        "static (--node)"
    } else {
        "registered by heartbeat"
    };
    table.row(["Added:", origin]);
    table.render()
}
/// `fleetctl restart NODE`: one line on success; on failure the reason and the last
/// lines the new worker wrote to stderr.
pub fn restart_result(node_id: &str, r: &RestartResponse) -> String {
    let exe = r.exe.as_ref().map_or("", |e| e.path.as_str());
    if json::outcome(r.outcome) == "succeeded" {
        let mut text = format!("node {node_id} restarted: generation {}", r.generation);
        let pids = pids(r.old_pid, r.new_pid);
        if !pids.is_empty() {
            text.push_str(&format!(", {pids}"));
        }
        if !exe.is_empty() {
            text.push_str(&format!(", {exe}"));
        }
        if let Some(t) = r.timings.as_ref().filter(|t| t.ready_us > 0) {
            text.push_str(&format!(" (ready in {})", duration(t.ready_us / 1000)));
        }
        return text;
    }
    let mut text = format!("node {node_id}: the restart failed: {}", or_dash(&r.reason));
    if r.old_pid != 0 {
        text.push_str(&format!(
            "; the old worker (pid {}) keeps serving",
            r.old_pid
        ));
    }
    if !r.stderr_tail.is_empty() {
        text.push_str("\nlast lines of the new worker's stderr:");
        for line in &r.stderr_tail {
            text.push_str(&format!("\n  {line}"));
        }
    }
    text
}

/// `fleetctl controllers`: the store, the controllers (leader first marked), the
/// store's members.
pub fn controllers(group: &fleet_proto::v1::ControllersResponse, now: SystemTime) -> String {
    let mut text = format!("Store: {}", group.store);
    if !group.quorum {
        text.push_str("  NO QUORUM: no controller can change the fleet until a majority of the members is back");
    }
    text.push('\n');
    let mut table = Table::new(&["CONTROLLER", "ROLE", "SINCE", "STARTED", "VERSION"]);
    for c in &group.controllers {
        let url = if c.url.is_empty() || c.url == group.answered_by {
            format!("{} (answered)", or_dash(&c.url))
        } else {
            c.url.clone()
        };
        table.row([
            url,
            if c.leader { "leader" } else { "follower" }.to_string(),
            if c.leader_since_unix_ms > 0 {
                ago(c.leader_since_unix_ms, now)
            } else {
                "-".into()
            },
            if c.started_unix_ms > 0 {
                ago(c.started_unix_ms, now)
            } else {
                "-".into()
            },
            or_dash(&c.version),
        ]);
    }
    text.push_str(&table.render());
    if !group.members.is_empty() {
        let mut table = Table::new(&["MEMBER", "ENDPOINT", "HEALTH", "ETCD LEADER"]);
        for m in &group.members {
            table.row([
                or_dash(&m.name),
                m.endpoint.clone(),
                if m.healthy {
                    "healthy".to_string()
                } else {
                    format!("unhealthy: {}", m.error)
                },
                if m.leader { "yes" } else { "" }.to_string(),
            ]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::v1::{Outcome, PhaseTimings};

    #[test]
    fn columns_are_as_wide_as_the_terminal_shows_them() {
        // "東京" is two characters but four columns wide; "é" is e and a combining
        // accent: two characters, one column.
        let mut table = Table::new(&["NODE", "STATE"]);
        table.row(["東京-1", "serving"]);
        table.row(["cafe\u{301}", "stopped"]);
        assert_eq!(
            table.render(),
            "NODE    STATE\n\
             東京-1  serving\n\
             cafe\u{301}    stopped\n"
        );
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut table = Table::new(&["NODE", "STATE", "REASON"]);
        table.row(["web-1", "serving", ""]);
        table.row(["n2", "unreachable", "no heartbeat for 12s"]);
        assert_eq!(
            table.render(),
            "NODE   STATE        REASON\n\
             web-1  serving\n\
             n2     unreachable  no heartbeat for 12s\n"
        );
    }

    #[test]
    fn alignment_counts_characters_not_bytes() {
        let mut table = Table::default();
        table.row(["é", "x"]);
        table.row(["ab", "y"]);
        assert_eq!(table.render(), "é   x\nab  y\n");
    }

    #[test]
    fn durations_and_pids_read_naturally() {
        assert_eq!(duration(850), "850ms");
        assert_eq!(duration(4_200), "4.2s");
        assert_eq!(duration(41_900), "41s");
        assert_eq!(duration(125_000), "2m 5s");
        assert_eq!(pids(4100, 4321), "pid 4100 -> 4321");
        assert_eq!(pids(4100, 0), "pid 4100");
        assert_eq!(pids(0, 0), "");
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(ago(97_000, now), "3.0s ago");
    }

    #[test]
    fn restart_failures_show_the_reason_and_stderr() {
        let ok = RestartResponse {
            outcome: Outcome::Succeeded as i32,
            generation: 3,
            old_pid: 1,
            new_pid: 2,
            timings: Some(PhaseTimings {
                ready_us: 212_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            restart_result("n1", &ok),
            "node n1 restarted: generation 3, pid 1 -> 2 (ready in 212ms)"
        );
        let failed = RestartResponse {
            outcome: Outcome::Failed as i32,
            reason: "exit status 1".into(),
            old_pid: 1,
            stderr_tail: vec!["panic: boom".into()],
            ..Default::default()
        };
        let text = restart_result("n1", &failed);
        assert!(text.contains("the restart failed: exit status 1"), "{text}");
        assert!(text.ends_with("\n  panic: boom"), "{text}");
    }
}
