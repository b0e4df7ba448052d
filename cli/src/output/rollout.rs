//! Rollouts as text: the dry-run plan, `rollout status` and `rollout history`.

use std::collections::BTreeMap;

use fleet_proto::v1::{Rollout, RolloutNode, RolloutProgress, RolloutSpec};

use super::{Table, duration, nodes_count, or_dash, pids, time};

/// The nodes of a rollout grouped by batch, in batch order.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The batch number on the wire.
    pub value: u32,
    /// 1, 2, ... as shown to people.
    pub number: usize,
    pub nodes: Vec<&'a RolloutNode>,
}

pub fn batches(r: &Rollout) -> Vec<Batch<'_>> {
    let mut groups: BTreeMap<u32, Vec<&RolloutNode>> = BTreeMap::new();
    for node in &r.nodes {
        groups.entry(node.batch).or_default().push(node);
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (value, nodes))| Batch {
            value,
            number: i + 1,
            nodes,
        })
        .collect()
}

/// The spec options that differ from the defaults: "canary 1, max-failures 0, auto-rollback".
pub fn options(spec: &RolloutSpec) -> String {
    let mut parts = Vec::new();
    if spec.canary > 0 {
        parts.push(format!("canary {}", spec.canary));
    }
    if spec.pause_after_canary {
        parts.push("pause after canary".to_string());
    }
    if !spec.batches.is_empty() {
        parts.push(format!("batches {}", spec.batches));
    }
    if spec.max_parallel > 0 {
        parts.push(format!("max-parallel {}", spec.max_parallel));
    }
    let texts = [
        ("max-unavailable", &spec.max_unavailable),
        ("max-failures", &spec.max_failures),
        ("health-path", &spec.health_path),
    ];
    for (name, value) in texts {
        if !value.is_empty() {
            parts.push(format!("{name} {value}"));
        }
    }
    // A stored rollout carries the soak it was given or the controller's default: it
    // is shown even when 0 (no soak), so that no "default" is left to guess.
    if spec.min_healthy_set && spec.min_healthy_ms == 0 {
        parts.push("min-healthy 0s (no soak)".to_string());
    } else if spec.min_healthy_ms > 0 {
        parts.push(format!("min-healthy {}", duration(spec.min_healthy_ms)));
    }
    let durations = [
        ("ready-timeout", spec.ready_timeout_ms),
        ("drain-timeout", spec.drain_timeout_ms),
    ];
    for (name, ms) in durations {
        if ms > 0 {
            parts.push(format!("{name} {}", duration(ms)));
        }
    }
    if spec.auto_rollback {
        parts.push("auto-rollback".to_string());
    }
    if !spec.exclude.is_empty() {
        parts.push(format!("exclude {}", spec.exclude.join(" ")));
    }
    if spec.skip_unreachable {
        parts.push("skip-unreachable".to_string());
    }
    if parts.is_empty() {
        "defaults".to_string()
    } else {
        parts.join(", ")
    }
}

/// What a rollout moves the nodes to: its exe, or, for an undo, the previous executables.
pub fn target(r: &Rollout) -> String {
    let exe = r.spec.as_ref().map_or("", |s| s.exe.as_str());
    if r.undo_of.is_empty() {
        return or_dash(exe);
    }
    // The controller may name an undo's target "(previous executables of r1)".
    if exe.is_empty() || exe.starts_with('(') {
        format!("previous executables (undo of {})", r.undo_of)
    } else {
        format!("{exe} (undo of {})", r.undo_of)
    }
}

/// `fleetctl rollout --dry-run`: the batches and the nodes in each.
pub fn plan(r: &Rollout) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let (skipped, planned): (Vec<_>, Vec<_>) = r.nodes.iter().partition(|n| n.state == "skipped");
    let planned_rollout = Rollout {
        nodes: planned.into_iter().cloned().collect(),
        ..Default::default()
    };
    let batches = batches(&planned_rollout);
    let mut text = format!(
        "Dry run, nothing was changed: {} to {} in {} {}\n",
        target(r),
        nodes_count(planned_rollout.nodes.len()),
        batches.len(),
        if batches.len() == 1 {
            "batch"
        } else {
            "batches"
        },
    );
    let mut table = Table::default();
    for batch in &batches {
        let mut name = format!("  batch {}/{}", batch.number, batches.len());
        if batch.number == 1 && spec.canary > 0 {
            name.push_str(if spec.pause_after_canary {
                " (canary, then pause)"
            } else {
                " (canary)"
            });
        }
        // A node preflight would refuse is marked `*`, its reason below the table.
        let ids: Vec<String> = batch
            .nodes
            .iter()
            .map(|n| match would_refuse(n) {
                Some(_) => format!("{}*", n.node_id),
                None => n.node_id.clone(),
            })
            .collect();
        table.row([name, nodes_count(ids.len()), ids.join(", ")]);
    }
    text.push_str(&table.render());
    for n in skipped {
        text.push_str(&format!(
            "  skipped: {} ({})\n",
            n.node_id,
            or_dash(&n.reason)
        ));
    }
    for shown in left_out(&spec) {
        text.push_str(&format!("  left out: {shown}\n"));
    }
    let line = |t: &str| t.replace(|c: char| c.is_control(), " ");
    let refused: Vec<(&str, &str)> = r
        .nodes
        .iter()
        .filter_map(|n| would_refuse(n).map(|why| (n.node_id.as_str(), why)))
        .collect();
    if !refused.is_empty() {
        text.push_str(&format!(
            "* preflight would refuse {} of {} node(s), so the real rollout would be refused (exit 2):\n",
            refused.len(),
            r.nodes.len()
        ));
        for (reason, ids) in fleet_proto::rules::group_refusals(refused) {
            let shown = fleet_proto::rules::refusal_line(&line(&reason), &ids, 50);
            text.push_str(&format!("  {shown}\n"));
        }
        text.push_str(
            "  fix them, leave them out with --exclude NODE, or leave unreachable ones out with --skip-unreachable\n",
        );
    }
    text.push_str(&format!("Options: {}\n", options(&spec)));
    text
}

/// The nodes a rollout left out, one line per reason: "1 node: excluded by request
/// (--exclude): web-1".
fn left_out(spec: &RolloutSpec) -> Vec<String> {
    let line = |t: &str| t.replace(|c: char| c.is_control(), " ");
    let left_out: Vec<(String, String)> = spec
        .left_out
        .iter()
        .map(|r| (line(&r.node_id), line(&r.reason)))
        .collect();
    fleet_proto::rules::group_refusals(left_out.iter().map(|(n, r)| (n.as_str(), r.as_str())))
        .iter()
        .map(|(reason, ids)| fleet_proto::rules::refusal_line(reason, ids, 50))
        .collect()
}

/// In a dry run: why preflight would refuse this node, if it would.
pub fn would_refuse(n: &RolloutNode) -> Option<&str> {
    n.reason
        .strip_prefix(fleet_proto::rules::PREFLIGHT_WOULD_REFUSE)
}

/// How many nodes are in each state: "3 healthy, 1 failed, 1 pending", in the order
/// of the node lifecycle.
pub fn state_counts(r: &Rollout) -> String {
    const ORDER: [&str; 8] = [
        "healthy",
        "failed",
        "rolled-back",
        "skipped",
        "restarting",
        "soaking",
        "preflight",
        "pending",
    ];
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &r.nodes {
        *counts.entry(n.state.as_str()).or_default() += 1;
    }
    let mut parts: Vec<String> = ORDER
        .iter()
        .filter_map(|s| counts.remove(s).map(|c| format!("{c} {s}")))
        .collect();
    parts.extend(counts.iter().map(|(s, c)| format!("{c} {}", or_dash(s))));
    if parts.is_empty() {
        "no nodes".to_string()
    } else {
        parts.join(", ")
    }
}

/// "1/3 healthy (33%), 1 failed, 1 skipped": only healthy nodes count as done, from
/// the controller's counts (or the nodes, from a controller that sends none).
pub fn progress_line(r: &Rollout) -> String {
    let p = r.progress.unwrap_or_else(|| {
        let mut p = RolloutProgress::default();
        for n in &r.nodes {
            p.total += 1;
            match n.state.as_str() {
                "healthy" => p.healthy += 1,
                "failed" => p.failed += 1,
                "rolled-back" => p.rolled_back += 1,
                "skipped" => p.skipped += 1,
                "restarting" | "soaking" => p.active += 1,
                _ => p.pending += 1,
            }
        }
        p
    });
    let pct = match (p.healthy, p.total) {
        (_, 0) => 0,
        (h, t) if h == t => 100,
        (h, t) => (u64::from(h) * 100 / u64::from(t)).min(99),
    };
    let mut line = format!("{}/{} healthy ({pct}%)", p.healthy, p.total);
    for (count, what) in [
        (p.failed, "failed"),
        (p.rolled_back, "rolled back"),
        (p.skipped, "skipped"),
        (p.active, "in progress"),
        (p.pending, "pending"),
    ] {
        if count > 0 {
            line.push_str(&format!(", {count} {what}"));
        }
    }
    line
}

/// `fleetctl rollout status`: the rollout, then one row per node, and with `timeline`
/// every node's timeline.
pub fn rollout_details(r: &Rollout, timeline: bool) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let batches = batches(r);
    let mut table = Table::default();
    table.row(["Rollout:", &r.id]);
    let state = if r.reason.is_empty() {
        r.state.clone()
    } else {
        format!("{}: {}", r.state, r.reason)
    };
    table.row(["State:", &state]);
    table.row(["Exe:", &target(r)]);
    if !spec.sha256.is_empty() {
        table.row(["Sha256:", &spec.sha256]);
    }
    let selector = if spec.selector.is_empty() {
        "every node"
    } else {
        spec.selector.as_str()
    };
    table.row(["Selector:", selector]);
    for line in left_out(&spec) {
        table.row(["Left out:".to_string(), line]);
    }
    let sizes: Vec<String> = batches.iter().map(|b| b.nodes.len().to_string()).collect();
    let reached = batches
        .iter()
        .filter(|b| b.nodes.iter().any(|n| started(&n.state)))
        .map(|b| b.number)
        .max();
    let mut plan = format!("{} ({})", batches.len(), sizes.join(", "));
    if let Some(reached) = reached {
        plan.push_str(&format!(", reached {reached}/{}", batches.len()));
    }
    table.row(["Batches:", &plan]);
    table.row(["Options:", &options(&spec)]);
    table.row([
        "Actor:",
        &or_dash(&super::actor(&spec.actor, &spec.declared_actor)),
    ]);
    table.row(["Reason:", &or_dash(&spec.reason)]);
    table.row(["Created:", &time(r.created_unix_ms)]);
    let finished = match r.finished_unix_ms {
        0 => "-".to_string(),
        ms => format!(
            "{} (after {})",
            time(ms),
            duration(ms.saturating_sub(r.created_unix_ms))
        ),
    };
    table.row(["Finished:", &finished]);
    for (at, message) in takeovers(r) {
        let when = format!(
            "{} (+{})",
            time(at),
            duration(at.saturating_sub(r.created_unix_ms))
        );
        table.row(["Takeover:".to_string(), format!("{when}: {message}")]);
    }
    table.row(["Progress:", &progress_line(r)]);
    table.row(["Nodes:", &state_counts(r)]);
    let mut text = table.render();
    text.push('\n');

    let spec_exe = spec.exe.as_str();
    let with_target = r
        .nodes
        .iter()
        .any(|n| !n.target_exe.is_empty() && n.target_exe != spec_exe);
    let mut header = vec!["NODE", "BATCH", "STATE", "PIDS"];
    if with_target {
        header.push("TO");
    }
    header.push("REASON");
    let mut nodes = Table::new(&header);
    for batch in &batches {
        for n in &batch.nodes {
            let mut row = vec![
                n.node_id.clone(),
                batch.number.to_string(),
                or_dash(&n.state),
                or_dash(&pids(n.old_pid, n.new_pid).replace("pid ", "")),
            ];
            if with_target {
                row.push(or_dash(&n.target_exe));
            }
            row.push(n.reason.clone());
            nodes.row(row);
        }
    }
    text.push_str(&nodes.render());

    if timeline {
        for batch in &batches {
            for n in &batch.nodes {
                text.push_str(&format!("\n{}:\n", n.node_id));
                let mut entries = Table::default();
                for t in &n.timeline {
                    let at = t.unix_ms.saturating_sub(r.created_unix_ms);
                    entries.row([
                        format!("  +{}", duration(at)),
                        time(t.unix_ms),
                        or_dash(&t.state),
                        if t.pid == 0 {
                            String::new()
                        } else {
                            format!("pid {}", t.pid)
                        },
                        t.message.clone(),
                    ]);
                }
                if n.timeline.is_empty() {
                    entries.row(["  (no entries)"]);
                }
                text.push_str(&entries.render());
            }
        }
    }
    text
}

/// Each time a new leader took the rollout over (several controllers on etcd): when,
/// and the note it wrote into the timeline of the nodes it found unfinished (one line
/// per takeover, not per node).
fn takeovers(r: &Rollout) -> Vec<(u64, String)> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    for t in r.nodes.iter().flat_map(|n| &n.timeline) {
        if !t.message.starts_with("leader change:") {
            continue;
        }
        match seen.iter_mut().find(|(_, m)| *m == t.message) {
            Some((at, _)) => *at = (*at).min(t.unix_ms),
            None => seen.push((t.unix_ms, t.message.clone())),
        }
    }
    seen.sort();
    seen
}

/// Whether a node in this rollout state has been touched (its batch has started).
pub fn started(state: &str) -> bool {
    !matches!(state, "pending" | "preflight" | "skipped" | "")
}

/// `fleetctl rollout history`.
pub fn history_table(rollouts: &[Rollout]) -> String {
    let mut table = Table::new(&[
        "ID", "STATE", "CREATED", "TOOK", "ACTOR", "HEALTHY", "EXE", "REASON",
    ]);
    for r in rollouts {
        let spec = r.spec.clone().unwrap_or_default();
        // The counts, when the listing left the nodes out (fleetctl asks it to).
        let (healthy, total) = match &r.progress {
            Some(p) if r.nodes.is_empty() => (p.healthy as usize, p.total as usize),
            _ => (
                r.nodes.iter().filter(|n| n.state == "healthy").count(),
                r.nodes.len(),
            ),
        };
        let took = match r.finished_unix_ms {
            0 => "-".to_string(),
            ms => duration(ms.saturating_sub(r.created_unix_ms)),
        };
        table.row([
            r.id.clone(),
            or_dash(&r.state),
            time(r.created_unix_ms),
            took,
            or_dash(&super::actor(&spec.actor, &spec.declared_actor)),
            format!("{healthy}/{total}"),
            target(r),
            spec.reason,
        ]);
    }
    table.render()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(states: &[(&str, u32, &str)]) -> Rollout {
        Rollout {
            id: "r3".into(),
            state: "running".into(),
            spec: Some(RolloutSpec {
                exe: "/opt/app-v2".into(),
                canary: 1,
                pause_after_canary: true,
                max_failures: "1".into(),
                actor: "alice".into(),
                ..Default::default()
            }),
            created_unix_ms: 1_000,
            nodes: states
                .iter()
                .map(|(id, batch, state)| RolloutNode {
                    node_id: id.to_string(),
                    batch: *batch,
                    state: state.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_plan_lists_each_batch_and_its_nodes() {
        let mut r = rollout(&[
            ("n1", 0, "pending"),
            ("n2", 1, "pending"),
            ("n3", 2, "pending"),
            ("n4", 2, "pending"),
            ("n5", 2, "pending"),
        ]);
        r.state = "planned".into();
        let text = plan(&r);
        assert_eq!(
            text,
            "Dry run, nothing was changed: /opt/app-v2 to 5 nodes in 3 batches\n\
             \x20 batch 1/3 (canary, then pause)  1 node   n1\n\
             \x20 batch 2/3                       1 node   n2\n\
             \x20 batch 3/3                       3 nodes  n3, n4, n5\n\
             Options: canary 1, pause after canary, max-failures 1\n"
        );
    }

    #[test]
    fn a_plan_marks_the_nodes_preflight_would_refuse_and_lists_those_left_out() {
        let mut r = rollout(&[
            ("n1", 0, "pending"),
            ("n2", 1, "pending"),
            ("n3", 1, "pending"),
        ]);
        r.state = "planned".into();
        for n in &mut r.nodes[1..] {
            n.reason = format!("{}exe missing", fleet_proto::rules::PREFLIGHT_WOULD_REFUSE);
        }
        let spec = r.spec.as_mut().unwrap();
        spec.exclude = vec!["n9".into()];
        spec.left_out = vec![fleet_proto::v1::NodeRefusal {
            node_id: "n9".into(),
            reason: "excluded by request (--exclude)".into(),
        }];
        let text = plan(&r);
        assert!(text.contains("n2*, n3*"), "{text}");
        assert!(!text.contains("n1*"), "{text}");
        assert!(
            text.contains("  left out: 1 node: excluded by request (--exclude): n9\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "* preflight would refuse 2 of 3 node(s), so the real rollout would be refused (exit 2):\n\
                 \x20 2 nodes: exe missing: n2, n3\n"
            ),
            "{text}"
        );
        assert!(text.contains("exclude n9"), "{text}");
        assert_eq!(would_refuse(&r.nodes[0]), None);
        assert_eq!(would_refuse(&r.nodes[1]), Some("exe missing"));
    }

    #[test]
    fn status_shows_every_node_with_its_batch_and_reason() {
        let mut r = rollout(&[
            ("n1", 0, "healthy"),
            ("n2", 1, "failed"),
            ("n3", 2, "pending"),
        ]);
        r.nodes[1].reason = "exited with status 1 before READY".into();
        r.nodes[1].old_pid = 10;
        r.nodes[1].new_pid = 11;
        r.nodes[1].timeline.push(fleet_proto::v1::TimelineEntry {
            unix_ms: 3_500,
            state: "restarting".into(),
            message: "new worker started".into(),
            pid: 11,
        });
        let text = rollout_details(&r, true);
        assert!(
            text.contains("Batches:   3 (1, 1, 1), reached 2/3"),
            "{text}"
        );
        assert!(
            text.contains("Nodes:     1 healthy, 1 failed, 1 pending"),
            "{text}"
        );
        assert!(
            text.contains("n2    2      failed   10 -> 11  exited with status 1 before READY"),
            "{text}"
        );
        assert!(text.contains("+2.5s"), "{text}");
        assert!(
            text.contains("Progress:  1/3 healthy (33%), 1 failed, 1 pending"),
            "{text}"
        );
        // No soak given and none stored: nothing claimed; a stored 0 says so.
        assert!(!text.contains("min-healthy"), "{text}");
        r.spec.as_mut().unwrap().min_healthy_set = true;
        assert!(
            rollout_details(&r, false).contains("min-healthy 0s (no soak)"),
            "{text}"
        );
        r.spec.as_mut().unwrap().min_healthy_ms = 10_000;
        assert!(rollout_details(&r, false).contains("min-healthy 10s"));
        assert!(text.contains("pid 11  new worker started"), "{text}");
    }

    #[test]
    fn failed_and_skipped_nodes_are_never_done() {
        let mut r = rollout(&[
            ("n1", 0, "failed"),
            ("n2", 1, "skipped"),
            ("n3", 1, "skipped"),
        ]);
        assert_eq!(progress_line(&r), "0/3 healthy (0%), 1 failed, 2 skipped");
        // The controller's counts win over the nodes.
        r.progress = Some(RolloutProgress {
            total: 200,
            healthy: 199,
            failed: 1,
            ..Default::default()
        });
        assert_eq!(progress_line(&r), "199/200 healthy (99%), 1 failed");
    }

    #[test]
    fn history_has_one_row_per_rollout() {
        let mut undo = rollout(&[("n1", 0, "healthy")]);
        undo.id = "r4".into();
        undo.undo_of = "r3".into();
        undo.spec.as_mut().unwrap().exe = "(previous executables of r3)".into();
        let text = history_table(&[rollout(&[("n1", 0, "healthy")]), undo]);
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains("previous executables (undo of r3)"), "{text}");

        // A listing without the nodes (what fleetctl asks for) counts from `progress`.
        let mut summary = rollout(&[]);
        summary.progress = Some(fleet_proto::v1::RolloutProgress {
            total: 100_000,
            healthy: 99_998,
            ..Default::default()
        });
        let text = history_table(&[summary]);
        assert!(text.contains("99998/100000"), "{text}");
    }
}
