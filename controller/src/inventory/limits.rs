//! What an agent may report: every heartbeat (and static node's status) is checked
//! here before anything of it is kept, so a forged or broken one can neither grow the
//! controller's memory nor break the views of the fleet (a 16 MiB label once took the
//! controller from 9 to 94 MB and made `ListNodes` exceed the gRPC limit).
//!
//! The node id and label rules are `fleet_proto::rules`, which the agent checks at start.

use fleet_proto::rules::{self, shorten};
use fleet_proto::v1 as pb;

/// The states an agent reports.
pub const STATES: [&str; 6] = [
    "starting",
    "serving",
    "restarting",
    "degraded",
    "shutting-down",
    "stopped",
];
/// Longest control address (`host:port`, a DNS name at most 253 bytes).
const MAX_ADDR: usize = 262;
const MAX_URL: usize = 2048;
const MAX_PATH: usize = 4096;
const MAX_TEXT: usize = 1024;
/// Generations at once: the serving one and those draining.
const MAX_WORKERS: usize = 16;
const MAX_LISTENERS: usize = 256;

/// Why a status is refused, naming the field, the limit and what was seen.
pub fn check(status: &pb::StatusResponse) -> Result<(), String> {
    rules::check_node_id(&status.node_id)?;
    let id = &status.node_id;
    rules::check_labels(status.labels.iter()).map_err(|e| format!("node {id}: {e}"))?;
    let field = |name: &str, value: &str, max: usize| {
        if value.len() > max || value.chars().any(char::is_control) {
            Err(format!(
                "node {id}: {name} ({} bytes, {:?}) must be at most {max} bytes of printable text",
                value.len(),
                shorten(value)
            ))
        } else {
            Ok(())
        }
    };
    if status.control_addr.is_empty() {
        return Err(format!("node {id} sent no control address"));
    }
    field("control_addr", &status.control_addr, MAX_ADDR)?;
    if status.control_addr.parse::<std::net::SocketAddr>().is_err()
        && !status
            .control_addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    {
        return Err(format!(
            "node {id}: control_addr {:?} is not HOST:PORT",
            shorten(&status.control_addr)
        ));
    }
    field("admin_url", &status.admin_url, MAX_URL)?;
    let url = &status.admin_url;
    if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "node {id}: admin_url {:?} is neither http:// nor https://",
            shorten(&status.admin_url)
        ));
    }
    if !STATES.contains(&status.state.as_str()) {
        return Err(format!(
            "node {id}: state {:?} is not one of {}",
            shorten(&status.state),
            STATES.join(", ")
        ));
    }
    field("version", &status.version, MAX_TEXT)?;
    field("in_progress", &status.in_progress, MAX_TEXT)?;
    let exes = status
        .exe
        .iter()
        .chain(status.workers.iter().filter_map(|w| w.exe.as_ref()));
    for exe in exes {
        field("exe path", &exe.path, MAX_PATH)?;
        if !(exe.sha256.is_empty()
            || (exe.sha256.len() == 64 && exe.sha256.bytes().all(|b| b.is_ascii_hexdigit())))
        {
            return Err(format!(
                "node {id}: sha256 {:?} is not 64 hex digits",
                shorten(&exe.sha256)
            ));
        }
    }
    if status.workers.len() > MAX_WORKERS {
        return Err(format!(
            "node {id}: {} workers; at most {MAX_WORKERS} are taken",
            status.workers.len()
        ));
    }
    for w in &status.workers {
        field("worker state", &w.state, MAX_TEXT)?;
    }
    if status.listeners.len() > MAX_LISTENERS {
        return Err(format!(
            "node {id}: {} listeners; at most {MAX_LISTENERS} are taken",
            status.listeners.len()
        ));
    }
    for l in &status.listeners {
        field("listener server", &l.server, MAX_TEXT)?;
        field("listener addr", &l.addr, MAX_ADDR)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: "web-1".into(),
            state: "serving".into(),
            control_addr: "127.0.0.1:7101".into(),
            admin_url: "http://127.0.0.1:7101/debug/admin".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_real_status_passes_and_each_excess_is_named() {
        check(&status()).unwrap();
        type Change = Box<dyn Fn(&mut pb::StatusResponse)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.node_id = "bad id".into()), "node id"),
            (
                Box::new(|s| {
                    s.labels.insert("k".into(), "x".repeat(16 << 20));
                }),
                "16777216 bytes",
            ),
            (
                Box::new(|s| s.admin_url = "javascript:alert(1)".into()),
                "neither http",
            ),
            (
                Box::new(|s| s.control_addr = "nowhere".into()),
                "not HOST:PORT",
            ),
            (Box::new(|s| s.state = "owned".into()), "state"),
            (Box::new(|s| s.version = "v".repeat(5000)), "version"),
            (
                Box::new(|s| {
                    s.exe = Some(pb::ExeInfo {
                        sha256: "zz".into(),
                        ..Default::default()
                    })
                }),
                "sha256",
            ),
        ];
        for (change, needle) in cases {
            let mut s = status();
            change(&mut s);
            let err = check(&s).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
            assert!(err.len() < 400, "a refusal quotes little: {err}");
        }
    }
}
