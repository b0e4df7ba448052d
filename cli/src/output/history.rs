//! `fleetctl node NODE`: the node's restart history under its facts.

use fleet_proto::v1::NodeRestart;

use super::{Table, time};

/// "1.234 ms", or "-" for 0 (not measured, or not reported yet).
fn micros(us: u64) -> String {
    if us == 0 {
        "-".to_string()
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// Who asked and through what: "alice (grpc)", "ci (rollout r3)".
fn origin(r: &NodeRestart) -> String {
    if r.rollout_id.is_empty() {
        format!("{} ({})", r.actor, r.via)
    } else {
        format!("{} ({} {})", r.actor, r.via, r.rollout_id)
    }
}

/// The restarts, newest first, one row each.
pub fn restarts_table(restarts: &[NodeRestart]) -> String {
    if restarts.is_empty() {
        return "Restarts: none recorded by the controller\n".to_string();
    }
    let mut table = Table::default();
    table.row([
        "WHEN", "ACTION", "BY", "OUTCOME", "GEN", "PID", "HANDOFF", "DRAIN", "REASON",
    ]);
    for r in restarts {
        let pids = match (r.old_pid, r.new_pid) {
            (0, 0) => "-".to_string(),
            (old, new) => format!("{old}→{new}"),
        };
        let generation = match r.generation {
            0 => "-".to_string(),
            g => g.to_string(),
        };
        table.row([
            time(r.at_unix_ms),
            r.kind.clone(),
            origin(r),
            r.outcome.clone(),
            generation,
            pids,
            micros(r.handoff_us),
            micros(r.drain_us),
            if r.reason.is_empty() {
                "-".to_string()
            } else {
                r.reason.clone()
            },
        ]);
    }
    format!(
        "Restarts ({}, newest first; handoff: trigger → READY, drain: SIGTERM → exit of the old worker):\n{}",
        restarts.len(),
        table.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_row_shows_who_outcome_and_timings() {
        let r = NodeRestart {
            at_unix_ms: 1_700_000_000_000,
            kind: "restart".into(),
            rollout_id: "r3".into(),
            actor: "ci".into(),
            via: "rollout".into(),
            outcome: "succeeded".into(),
            generation: 4,
            old_pid: 10,
            new_pid: 11,
            handoff_us: 12_345,
            drain_us: 2_000,
            ..Default::default()
        };
        let text = restarts_table(&[r]);
        assert!(text.contains("ci (rollout r3)"), "{text}");
        assert!(text.contains("12.3 ms"), "{text}");
        assert!(text.contains("2.0 ms"), "{text}");
        assert!(text.contains("10→11"), "{text}");
        assert!(text.contains("2023-11-14T22:13:20Z"), "{text}");
        assert!(restarts_table(&[]).contains("none recorded"));
    }
}
