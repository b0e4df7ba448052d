//! JSON output: serde mirrors of the proto messages, with the proto's field names
//! (prost types don't derive `Serialize`). Labels are sorted; enums are lowercase words.

use std::collections::BTreeMap;

use fleet_proto::v1::{
    CreateTokenResponse, ExeInfo, Node, Outcome, PhaseTimings, RestartResponse, Rollout,
    RolloutNode, RolloutSpec, TimelineEntry, Token,
};
use serde::Serialize;

/// A `*_unix_ms` time as RFC 3339 in UTC with milliseconds, as people and `date -d`
/// read it; `None` for 0, which the proto uses for "not set".
pub fn rfc3339(unix_ms: u64) -> Option<String> {
    (unix_ms > 0).then(|| {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
        humantime::format_rfc3339_millis(time).to_string()
    })
}

/// Pretty JSON of anything here, ending with a newline.
pub fn to_string<T: Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("plain structs serialize");
    text.push('\n');
    text
}

#[derive(Debug, Serialize)]
pub struct ExeJson<'a> {
    pub path: &'a str,
    pub sha256: &'a str,
    pub size: u64,
}

impl<'a> From<&'a ExeInfo> for ExeJson<'a> {
    fn from(e: &'a ExeInfo) -> Self {
        ExeJson {
            path: &e.path,
            sha256: &e.sha256,
            size: e.size,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodeJson<'a> {
    pub node_id: &'a str,
    pub labels: BTreeMap<&'a str, &'a str>,
    pub state: &'a str,
    pub control_addr: &'a str,
    pub admin_url: &'a str,
    pub exe: Option<ExeJson<'a>>,
    pub generation: u64,
    pub supervisor_pid: u32,
    pub worker_pid: u32,
    pub in_flight: u64,
    pub last_heartbeat_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub last_heartbeat_rfc3339: Option<String>,
    pub started_at_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub started_at_rfc3339: Option<String>,
    pub reason: &'a str,
    pub static_node: bool,
}

impl<'a> From<&'a Node> for NodeJson<'a> {
    fn from(n: &'a Node) -> Self {
        NodeJson {
            node_id: &n.node_id,
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            state: &n.state,
            control_addr: &n.control_addr,
            admin_url: &n.admin_url,
            exe: n.exe.as_ref().map(ExeJson::from),
            generation: n.generation,
            supervisor_pid: n.supervisor_pid,
            worker_pid: n.worker_pid,
            in_flight: n.in_flight,
            last_heartbeat_unix_ms: n.last_heartbeat_unix_ms,
            last_heartbeat_rfc3339: rfc3339(n.last_heartbeat_unix_ms),
            started_at_unix_ms: n.started_at_unix_ms,
            started_at_rfc3339: rfc3339(n.started_at_unix_ms),
            reason: &n.reason,
            static_node: n.static_node,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SpecJson<'a> {
    pub exe: &'a str,
    pub sha256: &'a str,
    pub selector: &'a str,
    pub batches: &'a str,
    pub max_parallel: u32,
    pub max_unavailable: &'a str,
    pub canary: u32,
    pub pause_after_canary: bool,
    pub min_healthy_ms: u64,
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub health_path: &'a str,
    pub max_failures: &'a str,
    pub auto_rollback: bool,
    pub reason: &'a str,
    pub actor: &'a str,
    pub declared_actor: &'a str,
    pub dry_run: bool,
}

impl<'a> From<&'a RolloutSpec> for SpecJson<'a> {
    fn from(s: &'a RolloutSpec) -> Self {
        SpecJson {
            exe: &s.exe,
            sha256: &s.sha256,
            selector: &s.selector,
            batches: &s.batches,
            max_parallel: s.max_parallel,
            max_unavailable: &s.max_unavailable,
            canary: s.canary,
            pause_after_canary: s.pause_after_canary,
            min_healthy_ms: s.min_healthy_ms,
            ready_timeout_ms: s.ready_timeout_ms,
            drain_timeout_ms: s.drain_timeout_ms,
            health_path: &s.health_path,
            max_failures: &s.max_failures,
            auto_rollback: s.auto_rollback,
            reason: &s.reason,
            actor: &s.actor,
            declared_actor: &s.declared_actor,
            dry_run: s.dry_run,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TimelineJson<'a> {
    pub unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub rfc3339: Option<String>,
    pub state: &'a str,
    pub message: &'a str,
    pub pid: u32,
}

impl<'a> From<&'a TimelineEntry> for TimelineJson<'a> {
    fn from(t: &'a TimelineEntry) -> Self {
        TimelineJson {
            unix_ms: t.unix_ms,
            rfc3339: rfc3339(t.unix_ms),
            state: &t.state,
            message: &t.message,
            pid: t.pid,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutNodeJson<'a> {
    pub node_id: &'a str,
    pub batch: u32,
    pub state: &'a str,
    pub reason: &'a str,
    pub previous_exe: &'a str,
    pub previous_sha256: &'a str,
    pub old_pid: u32,
    pub new_pid: u32,
    pub timeline: Vec<TimelineJson<'a>>,
    pub target_exe: &'a str,
    pub target_sha256: &'a str,
}

impl<'a> From<&'a RolloutNode> for RolloutNodeJson<'a> {
    fn from(n: &'a RolloutNode) -> Self {
        RolloutNodeJson {
            node_id: &n.node_id,
            batch: n.batch,
            state: &n.state,
            reason: &n.reason,
            previous_exe: &n.previous_exe,
            previous_sha256: &n.previous_sha256,
            old_pid: n.old_pid,
            new_pid: n.new_pid,
            timeline: n.timeline.iter().map(TimelineJson::from).collect(),
            target_exe: &n.target_exe,
            target_sha256: &n.target_sha256,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutJson<'a> {
    pub id: &'a str,
    pub spec: Option<SpecJson<'a>>,
    pub state: &'a str,
    pub reason: &'a str,
    pub created_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub created_rfc3339: Option<String>,
    pub finished_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub finished_rfc3339: Option<String>,
    pub batch_sizes: &'a [u32],
    pub current_batch: u32,
    pub nodes: Vec<RolloutNodeJson<'a>>,
    pub undo_of: &'a str,
}

impl<'a> From<&'a Rollout> for RolloutJson<'a> {
    fn from(r: &'a Rollout) -> Self {
        RolloutJson {
            id: &r.id,
            spec: r.spec.as_ref().map(SpecJson::from),
            state: &r.state,
            reason: &r.reason,
            created_unix_ms: r.created_unix_ms,
            created_rfc3339: rfc3339(r.created_unix_ms),
            finished_unix_ms: r.finished_unix_ms,
            finished_rfc3339: rfc3339(r.finished_unix_ms),
            batch_sizes: &r.batch_sizes,
            current_batch: r.current_batch,
            nodes: r.nodes.iter().map(RolloutNodeJson::from).collect(),
            undo_of: &r.undo_of,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TimingsJson {
    pub validate_us: u64,
    pub spawn_us: u64,
    pub ready_us: u64,
}

impl From<&PhaseTimings> for TimingsJson {
    fn from(t: &PhaseTimings) -> Self {
        TimingsJson {
            validate_us: t.validate_us,
            spawn_us: t.spawn_us,
            ready_us: t.ready_us,
        }
    }
}

/// A node's restart: the agent's `RestartResponse`, and which node it was.
#[derive(Debug, Serialize)]
pub struct RestartJson<'a> {
    pub node_id: &'a str,
    /// "succeeded" or "failed".
    pub outcome: &'static str,
    pub reason: &'a str,
    pub stderr_tail: &'a [String],
    pub generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub exe: Option<ExeJson<'a>>,
    pub timings: Option<TimingsJson>,
}

impl<'a> RestartJson<'a> {
    pub fn new(node_id: &'a str, r: &'a RestartResponse) -> Self {
        RestartJson {
            node_id,
            outcome: outcome(r.outcome),
            reason: &r.reason,
            stderr_tail: &r.stderr_tail,
            generation: r.generation,
            old_pid: r.old_pid,
            new_pid: r.new_pid,
            exe: r.exe.as_ref().map(ExeJson::from),
            timings: r.timings.as_ref().map(TimingsJson::from),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TokenJson<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub kind: &'a str,
    pub created_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub created_rfc3339: Option<String>,
    pub created_by: &'a str,
    pub expires_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub expires_rfc3339: Option<String>,
    pub revoked_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub revoked_rfc3339: Option<String>,
    pub last_used_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub last_used_rfc3339: Option<String>,
    pub node_id_prefix: &'a str,
    pub max_uses: u32,
    pub uses: u32,
}

impl<'a> From<&'a Token> for TokenJson<'a> {
    fn from(t: &'a Token) -> Self {
        TokenJson {
            id: &t.id,
            name: &t.name,
            kind: &t.kind,
            created_unix_ms: t.created_unix_ms,
            created_rfc3339: rfc3339(t.created_unix_ms),
            created_by: &t.created_by,
            expires_unix_ms: t.expires_unix_ms,
            expires_rfc3339: rfc3339(t.expires_unix_ms),
            revoked_unix_ms: t.revoked_unix_ms,
            revoked_rfc3339: rfc3339(t.revoked_unix_ms),
            last_used_unix_ms: t.last_used_unix_ms,
            last_used_rfc3339: rfc3339(t.last_used_unix_ms),
            node_id_prefix: &t.node_id_prefix,
            max_uses: t.max_uses,
            uses: t.uses,
        }
    }
}

/// A new token and its secret (shown once).
#[derive(Debug, Serialize)]
pub struct CreatedTokenJson<'a> {
    pub token: Option<TokenJson<'a>>,
    pub secret: &'a str,
}

impl<'a> From<&'a CreateTokenResponse> for CreatedTokenJson<'a> {
    fn from(r: &'a CreateTokenResponse) -> Self {
        CreatedTokenJson {
            token: r.token.as_ref().map(TokenJson::from),
            secret: &r.secret,
        }
    }
}

/// The agent's restart outcome as a word.
pub fn outcome(value: i32) -> &'static str {
    match Outcome::try_from(value) {
        Ok(Outcome::Succeeded) => "succeeded",
        Ok(Outcome::Failed) => "failed",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_times_come_with_rfc3339_beside_them() {
        assert_eq!(rfc3339(0), None);
        assert_eq!(
            rfc3339(1_796_428_800_123).as_deref(),
            Some("2026-12-05T00:00:00.123Z")
        );
        let node = Node {
            last_heartbeat_unix_ms: 1_796_428_800_123,
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_str(&to_string(&NodeJson::from(&node))).expect("JSON");
        assert_eq!(json["last_heartbeat_rfc3339"], "2026-12-05T00:00:00.123Z");
        assert_eq!(json["started_at_rfc3339"], serde_json::Value::Null);
    }

    #[test]
    fn rollouts_serialize_with_the_proto_field_names() {
        let rollout = Rollout {
            id: "r1".into(),
            state: "running".into(),
            spec: Some(RolloutSpec {
                exe: "/opt/app-v2".into(),
                ..Default::default()
            }),
            nodes: vec![RolloutNode {
                node_id: "n1".into(),
                state: "healthy".into(),
                timeline: vec![TimelineEntry {
                    unix_ms: 5,
                    state: "restarting".into(),
                    message: String::new(),
                    pid: 7,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let value: serde_json::Value =
            serde_json::from_str(&to_string(&RolloutJson::from(&rollout))).unwrap();
        assert_eq!(value["spec"]["exe"], "/opt/app-v2");
        assert_eq!(value["nodes"][0]["node_id"], "n1");
        assert_eq!(value["nodes"][0]["timeline"][0]["pid"], 7);
        assert_eq!(value["undo_of"], "");
    }

    #[test]
    fn node_labels_are_sorted() {
        let mut node = Node {
            node_id: "n1".into(),
            ..Default::default()
        };
        node.labels.insert("zone".into(), "a".into());
        node.labels.insert("role".into(), "web".into());
        let text = to_string(&NodeJson::from(&node));
        assert!(
            text.find("role").unwrap() < text.find("zone").unwrap(),
            "{text}"
        );
        assert_eq!(outcome(Outcome::Failed as i32), "failed");
    }
}
