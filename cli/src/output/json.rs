//! JSON output: serde mirrors of the proto messages, with the proto's field names
//! (prost types don't derive `Serialize`). Labels are sorted; enums are lowercase words;
//! every `*_unix_ms` has an `*_rfc3339` beside it; batches count from 1 as in the
//! tables. Each `From` destructures its message without `..`, so a field added to
//! the proto fails the build here until the JSON shows it too.

use std::collections::BTreeMap;

use fleet_proto::v1::{
    ControllerInfo, ControllersResponse, CreateTokenResponse, ExeInfo, Node, NodeRefusal,
    NodeRestart, Outcome, PhaseTimings, RestartResponse, Rollout, RolloutNode, RolloutProgress,
    RolloutSpec, StoreMember, TimelineEntry, Token,
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
        let ExeInfo { path, sha256, size } = e;
        ExeJson {
            path,
            sha256,
            size: *size,
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
    /// Its agent takes the controller's calls on its heartbeat stream now.
    pub calls_on_stream: bool,
}

impl<'a> From<&'a Node> for NodeJson<'a> {
    fn from(n: &'a Node) -> Self {
        let Node {
            node_id,
            labels,
            state,
            control_addr,
            admin_url,
            exe,
            generation,
            supervisor_pid,
            worker_pid,
            in_flight,
            last_heartbeat_unix_ms,
            started_at_unix_ms,
            reason,
            static_node,
            calls_on_stream,
        } = n;
        NodeJson {
            node_id,
            labels: labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            state,
            control_addr,
            admin_url,
            exe: exe.as_ref().map(ExeJson::from),
            generation: *generation,
            supervisor_pid: *supervisor_pid,
            worker_pid: *worker_pid,
            in_flight: *in_flight,
            last_heartbeat_unix_ms: *last_heartbeat_unix_ms,
            last_heartbeat_rfc3339: rfc3339(*last_heartbeat_unix_ms),
            started_at_unix_ms: *started_at_unix_ms,
            started_at_rfc3339: rfc3339(*started_at_unix_ms),
            reason,
            static_node: *static_node,
            calls_on_stream: *calls_on_stream,
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
    /// Whether `min_healthy_ms` was asked for (false: the controller's default).
    pub min_healthy_set: bool,
    pub ready_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub health_path: &'a str,
    pub max_failures: &'a str,
    pub auto_rollback: bool,
    pub reason: &'a str,
    pub actor: &'a str,
    pub declared_actor: &'a str,
    pub dry_run: bool,
    /// Nodes left out by name (`--exclude`).
    pub exclude: &'a [String],
    pub skip_unreachable: bool,
    /// Nodes the selector matched that were left out, and why.
    pub left_out: Vec<RefusalJson<'a>>,
}

#[derive(Debug, Serialize)]
pub struct RefusalJson<'a> {
    pub node_id: &'a str,
    pub reason: &'a str,
}

impl<'a> From<&'a NodeRefusal> for RefusalJson<'a> {
    fn from(r: &'a NodeRefusal) -> Self {
        let NodeRefusal { node_id, reason } = r;
        RefusalJson { node_id, reason }
    }
}

impl<'a> From<&'a RolloutSpec> for SpecJson<'a> {
    fn from(s: &'a RolloutSpec) -> Self {
        let RolloutSpec {
            exe,
            sha256,
            selector,
            batches,
            max_parallel,
            max_unavailable,
            canary,
            pause_after_canary,
            min_healthy_ms,
            ready_timeout_ms,
            drain_timeout_ms,
            health_path,
            max_failures,
            auto_rollback,
            reason,
            actor,
            dry_run,
            declared_actor,
            min_healthy_set,
            exclude,
            skip_unreachable,
            left_out,
            // A request's, never set in an answer.
            summary_answer: _,
        } = s;
        SpecJson {
            exe,
            sha256,
            selector,
            batches,
            max_parallel: *max_parallel,
            max_unavailable,
            canary: *canary,
            pause_after_canary: *pause_after_canary,
            min_healthy_ms: *min_healthy_ms,
            min_healthy_set: *min_healthy_set,
            ready_timeout_ms: *ready_timeout_ms,
            drain_timeout_ms: *drain_timeout_ms,
            health_path,
            max_failures,
            auto_rollback: *auto_rollback,
            reason,
            actor,
            declared_actor,
            dry_run: *dry_run,
            exclude,
            skip_unreachable: *skip_unreachable,
            left_out: left_out.iter().map(RefusalJson::from).collect(),
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
        let TimelineEntry {
            unix_ms,
            state,
            message,
            pid,
        } = t;
        TimelineJson {
            unix_ms: *unix_ms,
            rfc3339: rfc3339(*unix_ms),
            state,
            message,
            pid: *pid,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RolloutNodeJson<'a> {
    pub node_id: &'a str,
    /// The node's batch, from 1 (as the tables and the dashboard show it).
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
        let RolloutNode {
            node_id,
            batch,
            state,
            reason,
            previous_exe,
            previous_sha256,
            old_pid,
            new_pid,
            timeline,
            target_exe,
            target_sha256,
        } = n;
        RolloutNodeJson {
            node_id,
            batch: batch + 1,
            state,
            reason,
            previous_exe,
            previous_sha256,
            old_pid: *old_pid,
            new_pid: *new_pid,
            timeline: timeline.iter().map(TimelineJson::from).collect(),
            target_exe,
            target_sha256,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ProgressJson {
    pub total: u32,
    pub healthy: u32,
    pub failed: u32,
    pub rolled_back: u32,
    pub skipped: u32,
    pub active: u32,
    pub pending: u32,
}

impl From<&RolloutProgress> for ProgressJson {
    fn from(p: &RolloutProgress) -> Self {
        let RolloutProgress {
            total,
            healthy,
            failed,
            rolled_back,
            skipped,
            active,
            pending,
        } = *p;
        ProgressJson {
            total,
            healthy,
            failed,
            rolled_back,
            skipped,
            active,
            pending,
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
    /// The number of nodes in batch 1, 2, ….
    pub batch_sizes: &'a [u32],
    /// The batch being worked on, from 1 (the last one once the rollout ended).
    pub current_batch: u32,
    pub nodes: Vec<RolloutNodeJson<'a>>,
    pub undo_of: &'a str,
    /// How many nodes stand where; `null` from a controller that predates it.
    pub progress: Option<ProgressJson>,
}

impl<'a> From<&'a Rollout> for RolloutJson<'a> {
    fn from(r: &'a Rollout) -> Self {
        let Rollout {
            id,
            spec,
            state,
            reason,
            created_unix_ms,
            finished_unix_ms,
            batch_sizes,
            current_batch,
            nodes,
            undo_of,
            progress,
            // Always false here: a watch's partial messages are merged before output.
            nodes_changed_only: _,
            // Pages are merged before output.
            next_page_token: _,
        } = r;
        RolloutJson {
            id,
            spec: spec.as_ref().map(SpecJson::from),
            state,
            reason,
            created_unix_ms: *created_unix_ms,
            created_rfc3339: rfc3339(*created_unix_ms),
            finished_unix_ms: *finished_unix_ms,
            finished_rfc3339: rfc3339(*finished_unix_ms),
            batch_sizes,
            current_batch: current_batch + 1,
            nodes: nodes.iter().map(RolloutNodeJson::from).collect(),
            undo_of,
            progress: progress.as_ref().map(ProgressJson::from),
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
        let PhaseTimings {
            validate_us,
            spawn_us,
            ready_us,
        } = *t;
        TimingsJson {
            validate_us,
            spawn_us,
            ready_us,
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
        let RestartResponse {
            outcome: result,
            reason,
            stderr_tail,
            generation,
            old_pid,
            new_pid,
            exe,
            timings,
        } = r;
        RestartJson {
            node_id,
            outcome: outcome(*result),
            reason,
            stderr_tail,
            generation: *generation,
            old_pid: *old_pid,
            new_pid: *new_pid,
            exe: exe.as_ref().map(ExeJson::from),
            timings: timings.as_ref().map(TimingsJson::from),
        }
    }
}

/// One restart of a node, from its history (`fleetctl node ID`).
#[derive(Debug, Serialize)]
pub struct NodeRestartJson<'a> {
    pub at_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds).
    pub at_rfc3339: Option<String>,
    /// "rollout", "restart", "rollback", ….
    pub kind: &'a str,
    pub rollout_id: &'a str,
    pub actor: &'a str,
    pub via: &'a str,
    pub outcome: &'a str,
    pub reason: &'a str,
    pub generation: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub exe: &'a str,
    /// Trigger → the new worker's READY.
    pub handoff_us: u64,
    /// SIGTERM → the old worker's exit.
    pub drain_us: u64,
}

impl<'a> From<&'a NodeRestart> for NodeRestartJson<'a> {
    fn from(r: &'a NodeRestart) -> Self {
        let NodeRestart {
            at_unix_ms,
            kind,
            rollout_id,
            actor,
            outcome,
            reason,
            generation,
            old_pid,
            new_pid,
            exe,
            handoff_us,
            drain_us,
            via,
        } = r;
        NodeRestartJson {
            at_unix_ms: *at_unix_ms,
            at_rfc3339: rfc3339(*at_unix_ms),
            kind,
            rollout_id,
            actor,
            via,
            outcome,
            reason,
            generation: *generation,
            old_pid: *old_pid,
            new_pid: *new_pid,
            exe,
            handoff_us: *handoff_us,
            drain_us: *drain_us,
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
        let Token {
            id,
            name,
            kind,
            created_unix_ms,
            created_by,
            expires_unix_ms,
            revoked_unix_ms,
            last_used_unix_ms,
            node_id_prefix,
            max_uses,
            uses,
        } = t;
        TokenJson {
            id,
            name,
            kind,
            created_unix_ms: *created_unix_ms,
            created_rfc3339: rfc3339(*created_unix_ms),
            created_by,
            expires_unix_ms: *expires_unix_ms,
            expires_rfc3339: rfc3339(*expires_unix_ms),
            revoked_unix_ms: *revoked_unix_ms,
            revoked_rfc3339: rfc3339(*revoked_unix_ms),
            last_used_unix_ms: *last_used_unix_ms,
            last_used_rfc3339: rfc3339(*last_used_unix_ms),
            node_id_prefix,
            max_uses: *max_uses,
            uses: *uses,
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

/// `fleetctl controllers -o json`.
#[derive(Debug, Serialize)]
pub struct ControllersJson<'a> {
    pub store: &'a str,
    pub answered_by: &'a str,
    pub quorum: bool,
    pub controllers: Vec<ControllerJson<'a>>,
    pub members: Vec<StoreMemberJson<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ControllerJson<'a> {
    pub url: &'a str,
    pub leader: bool,
    pub leader_since_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub leader_since_rfc3339: Option<String>,
    pub version: &'a str,
    pub started_unix_ms: u64,
    /// The same time in RFC 3339 (UTC, milliseconds); null when unset (0).
    pub started_rfc3339: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StoreMemberJson<'a> {
    pub name: &'a str,
    pub endpoint: &'a str,
    pub healthy: bool,
    pub error: &'a str,
    pub leader: bool,
}

impl<'a> From<&'a ControllersResponse> for ControllersJson<'a> {
    fn from(r: &'a ControllersResponse) -> Self {
        let ControllersResponse {
            store,
            answered_by,
            controllers,
            members,
            quorum,
        } = r;
        ControllersJson {
            store,
            answered_by,
            quorum: *quorum,
            controllers: controllers
                .iter()
                .map(|c| {
                    let ControllerInfo {
                        url,
                        leader,
                        leader_since_unix_ms,
                        version,
                        started_unix_ms,
                    } = c;
                    ControllerJson {
                        url,
                        leader: *leader,
                        leader_since_unix_ms: *leader_since_unix_ms,
                        leader_since_rfc3339: rfc3339(*leader_since_unix_ms),
                        version,
                        started_unix_ms: *started_unix_ms,
                        started_rfc3339: rfc3339(*started_unix_ms),
                    }
                })
                .collect(),
            members: members
                .iter()
                .map(|m| {
                    let StoreMember {
                        name,
                        endpoint,
                        healthy,
                        error,
                        leader,
                    } = m;
                    StoreMemberJson {
                        name,
                        endpoint,
                        healthy: *healthy,
                        error,
                        leader: *leader,
                    }
                })
                .collect(),
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
                exclude: vec!["n2".into()],
                left_out: vec![NodeRefusal {
                    node_id: "n3".into(),
                    reason: "unreachable".into(),
                }],
                ..Default::default()
            }),
            progress: Some(RolloutProgress {
                total: 1,
                healthy: 1,
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
        // Batches count from 1, as the tables do.
        assert_eq!(value["nodes"][0]["batch"], 1);
        assert_eq!(value["current_batch"], 1);
        assert_eq!(value["progress"]["healthy"], 1);
        assert_eq!(value["spec"]["exclude"][0], "n2");
        assert_eq!(value["spec"]["left_out"][0]["reason"], "unreachable");
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
