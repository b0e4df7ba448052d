//! What an agent may say about itself: the bounds on every field of a `StatusResponse`
//! that the controller accepts in a heartbeat (or from a static node's `Status`), and
//! that the agent checks its own node id and labels against before it starts.
//!
//! The rules live here, in the wire contract, because both sides apply them: the
//! controller refuses a heartbeat over any of them (and keeps nothing of it), the agent
//! refuses to start with a node id or labels the controller would refuse. Every bound is
//! far above what a real agent sends (the largest real heartbeat is a few KiB) and far
//! below what would hurt the controller at 100,000 nodes.

use std::fmt;
use std::net::SocketAddr;

use crate::v1 as pb;

/// The most bytes any one gRPC request to the controller may have. The largest status
/// allowed by the bounds below is 326 KiB (64 workers with 4 KiB paths, 64 labels, 256
/// listeners: see the test at the end), a real agent's a few hundred bytes; every other
/// request (a rollout spec, an id) is a few KiB at most. One bound for the whole service.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// A node id: 1 to 63 of `[A-Za-z0-9._-]`, starting with a letter or digit. It is a
/// DNS label in length and (apart from `.` and `_`) charset, so that it can name the
/// node in a certificate.
pub const MAX_NODE_ID: usize = 63;
/// Labels per node.
pub const MAX_LABELS: usize = 64;
/// A label key: 1 to 63 of `[A-Za-z0-9._/-]`, starting with a letter or digit (like a
/// Kubernetes label name, with an optional `prefix/`).
pub const MAX_LABEL_KEY: usize = 63;
/// A label value, in bytes (no control characters).
pub const MAX_LABEL_VALUE: usize = 256;
/// A `host:port` (control address, listener address): a 253-byte DNS name, or a
/// bracketed IPv6 address, plus the port.
pub const MAX_ADDR: usize = 261;
/// The admin URL.
pub const MAX_URL: usize = 2048;
/// An executable's path.
pub const MAX_PATH: usize = 4096;
/// Workers in one status: the serving generation plus those still draining.
pub const MAX_WORKERS: usize = 64;
/// StatusResponse.recent_restarts (the agent keeps 16).
pub const MAX_RECENT_RESTARTS: usize = 64;
/// Listening sockets (every port of every server).
pub const MAX_LISTENERS: usize = 256;
/// A server's name.
pub const MAX_SERVER_NAME: usize = 63;
/// The agent's version string.
pub const MAX_VERSION: usize = 128;
/// The restart in progress (a sentence naming the executable).
pub const MAX_IN_PROGRESS: usize = MAX_PATH + 256;

/// The states an agent reports for itself (the controller adds `unreachable`).
pub const NODE_STATES: [&str; 6] = [
    "starting",
    "serving",
    "restarting",
    "degraded",
    "shutting-down",
    "stopped",
];
/// The states of one worker.
pub const WORKER_STATES: [&str; 3] = ["starting", "serving", "draining"];

/// A field over its limit: which field, and what is wrong with it (the limit and what
/// was seen). Shows at most a few dozen characters of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `node_id`, `labels`, `label "zone"`, `workers[1].exe.path`, ...
    pub field: String,
    /// `is 70 bytes, over the limit of 63`, ...
    pub problem: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.problem)
    }
}

impl std::error::Error for Refusal {}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> Refusal {
    Refusal {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The start of `s` for a message: quoted, at most 40 characters, `…` when cut.
pub fn shown(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &s[..cut]),
        None => format!("{s:?}"),
    }
}

fn too_long(field: &str, s: &str, limit: usize) -> Result<(), Refusal> {
    if s.len() > limit {
        return Err(refuse(
            format!("{field} {}", shown(s)),
            format!("is {} bytes, over the limit of {limit}", s.len()),
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9]` then `extra` characters, 1 to `limit` bytes.
fn name(field: &str, s: &str, limit: usize, extra: &str, what: &str) -> Result<(), Refusal> {
    too_long(field, s, limit)?;
    let rule = format!(
        "{what} is 1 to {limit} letters, digits or any of {extra:?}, starting with a letter or digit"
    );
    match s.chars().next() {
        None => return Err(refuse(field, format!("is empty: {rule}"))),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(refuse(
                format!("{field} {}", shown(s)),
                format!("starts with {c:?}: {rule}"),
            ));
        }
        _ => {}
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(*c)))
    {
        return Err(refuse(
            format!("{field} {}", shown(s)),
            format!("holds {c:?}: {rule}"),
        ));
    }
    Ok(())
}

/// No control characters (tabs and newlines included).
fn printable(field: &str, s: &str) -> Result<(), Refusal> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(refuse(
            format!("{field} {}", shown(s)),
            format!("holds the control character {c:?}"),
        ));
    }
    Ok(())
}

/// A node id: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`.
pub fn check_node_id(id: &str) -> Result<(), Refusal> {
    name("node_id", id, MAX_NODE_ID, "._-", "a node id")
}

/// At most [`MAX_LABELS`] labels; keys like Kubernetes label keys (see
/// [`MAX_LABEL_KEY`]), values at most [`MAX_LABEL_VALUE`] bytes without control
/// characters.
pub fn check_labels<'a, I>(labels: I) -> Result<(), Refusal>
where
    I: IntoIterator<Item = (&'a String, &'a String)>,
    I::IntoIter: ExactSizeIterator,
{
    let labels = labels.into_iter();
    if labels.len() > MAX_LABELS {
        return Err(refuse(
            "labels",
            format!(
                "are {} labels, over the limit of {MAX_LABELS}",
                labels.len()
            ),
        ));
    }
    for (key, value) in labels {
        name("label key", key, MAX_LABEL_KEY, "._/-", "a label key")?;
        let field = format!("label {key:?} value");
        too_long(&field, value, MAX_LABEL_VALUE)?;
        printable(&field, value)?;
    }
    Ok(())
}

/// `host:port`: an IP address and port, or a DNS name (`[A-Za-z0-9.-]`) and port; the
/// port is not 0.
pub fn check_host_port(field: &str, addr: &str) -> Result<(), Refusal> {
    too_long(field, addr, MAX_ADDR)?;
    let rule = "must be host:port, e.g. 10.0.0.5:7101, [::1]:7101 or node-1.example:7101";
    let port = match addr.parse::<SocketAddr>() {
        Ok(a) => a.port(),
        Err(_) => {
            let Some((host, port)) = addr.rsplit_once(':') else {
                return Err(refuse(format!("{field} {}", shown(addr)), rule));
            };
            let dns = !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with(['.', '-']);
            match port.parse::<u16>() {
                Ok(port) if dns => port,
                _ => return Err(refuse(format!("{field} {}", shown(addr)), rule)),
            }
        }
    };
    if port == 0 {
        return Err(refuse(
            format!("{field} {}", shown(addr)),
            "has port 0: give the port the agent listens on",
        ));
    }
    Ok(())
}

/// Empty, or an `http://` / `https://` URL of at most [`MAX_URL`] bytes without spaces
/// or control characters.
pub fn check_admin_url(url: &str) -> Result<(), Refusal> {
    const FIELD: &str = "admin_url";
    if url.is_empty() {
        return Ok(());
    }
    too_long(FIELD, url, MAX_URL)?;
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(refuse(
            format!("{FIELD} {}", shown(url)),
            "must start with http:// or https://",
        ));
    }
    if let Some(c) = url.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(refuse(
            format!("{FIELD} {}", shown(url)),
            format!("holds {c:?}: a URL has no spaces or control characters"),
        ));
    }
    Ok(())
}

/// A path of at most [`MAX_PATH`] bytes and a sha256 that is 64 hex digits or empty.
fn check_exe(field: &str, exe: &pb::ExeInfo) -> Result<(), Refusal> {
    too_long(&format!("{field}.path"), &exe.path, MAX_PATH)?;
    if exe.path.contains('\0') {
        return Err(refuse(format!("{field}.path"), "holds a NUL byte"));
    }
    let sha = &exe.sha256;
    if !sha.is_empty() && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(refuse(
            format!("{field}.sha256 {}", shown(sha)),
            format!("must be 64 hex digits or empty (it is {} bytes)", sha.len()),
        ));
    }
    Ok(())
}

fn one_of(field: &str, value: &str, known: &[&str]) -> Result<(), Refusal> {
    if !known.contains(&value) {
        return Err(refuse(
            format!("{field} {}", shown(value)),
            format!("is not one of {}", known.join(", ")),
        ));
    }
    Ok(())
}

/// Every field of a status as an agent reports it: the node id, labels, addresses, URL,
/// executables, states, counts and free text, each within its bound.
pub fn check_status(s: &pb::StatusResponse) -> Result<(), Refusal> {
    check_node_id(&s.node_id)?;
    check_labels(&s.labels)?;
    one_of("state", &s.state, &NODE_STATES)?;
    check_host_port("control_addr", &s.control_addr)?;
    check_admin_url(&s.admin_url)?;
    if let Some(exe) = &s.exe {
        check_exe("exe", exe)?;
    }
    if s.workers.len() > MAX_WORKERS {
        return Err(refuse(
            "workers",
            format!(
                "are {} workers, over the limit of {MAX_WORKERS}",
                s.workers.len()
            ),
        ));
    }
    for (i, w) in s.workers.iter().enumerate() {
        one_of(&format!("workers[{i}].state"), &w.state, &WORKER_STATES)?;
        if let Some(exe) = &w.exe {
            check_exe(&format!("workers[{i}].exe"), exe)?;
        }
    }
    if s.listeners.len() > MAX_LISTENERS {
        return Err(refuse(
            "listeners",
            format!(
                "are {} listeners, over the limit of {MAX_LISTENERS}",
                s.listeners.len()
            ),
        ));
    }
    for (i, l) in s.listeners.iter().enumerate() {
        name(
            &format!("listeners[{i}].server"),
            &l.server,
            MAX_SERVER_NAME,
            "._-",
            "a server name",
        )?;
        check_host_port(&format!("listeners[{i}].addr"), &l.addr)?;
    }
    if s.recent_restarts.len() > MAX_RECENT_RESTARTS {
        return Err(refuse(
            "recent_restarts",
            format!(
                "are {} restarts, over the limit of {MAX_RECENT_RESTARTS}",
                s.recent_restarts.len()
            ),
        ));
    }
    too_long("version", &s.version, MAX_VERSION)?;
    printable("version", &s.version)?;
    too_long("in_progress", &s.in_progress, MAX_IN_PROGRESS)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: "web-1.zone-a_x".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            state: "serving".into(),
            exe: Some(pb::ExeInfo {
                path: "/opt/app/v1".into(),
                sha256: "ab".repeat(32),
                size: 1,
            }),
            workers: vec![pb::Worker {
                state: "serving".into(),
                ..Default::default()
            }],
            listeners: vec![pb::Listener {
                server: "default".into(),
                addr: "127.0.0.1:8199".into(),
                tls: false,
            }],
            control_addr: "127.0.0.1:7101".into(),
            admin_url: "http://127.0.0.1:7101/debug/admin".into(),
            version: "0.1.0".into(),
            ..Default::default()
        }
    }

    fn refused(s: &pb::StatusResponse) -> String {
        check_status(s).unwrap_err().to_string()
    }

    #[test]
    fn an_agents_own_status_passes() {
        check_status(&status()).unwrap();
        let mut s = status();
        s.admin_url.clear();
        s.exe = None;
        s.workers.clear();
        s.control_addr = "[::1]:7101".into();
        check_status(&s).unwrap();
        s.control_addr = "node-1.example.com:7101".into();
        check_status(&s).unwrap();
    }

    #[test]
    fn node_ids_are_dns_label_like() {
        for ok in ["a", "node-1", "web_2.zone-a", "0", &"x".repeat(63)] {
            check_node_id(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for (bad, why) in [
            ("", "is empty"),
            ("-a", "starts with '-'"),
            (".a", "starts with '.'"),
            ("a b", "holds ' '"),
            ("a/b", "holds '/'"),
            ("nöde", "holds 'ö'"),
            ("<script>", "starts with '<'"),
        ] {
            let e = check_node_id(bad).unwrap_err().to_string();
            assert!(e.starts_with("node_id"), "{e}");
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = check_node_id(&"x".repeat(64)).unwrap_err().to_string();
        assert!(e.contains("is 64 bytes, over the limit of 63"), "{e}");
        // A huge id is not echoed back whole.
        let e = check_node_id(&"x".repeat(1 << 20)).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("1048576 bytes"), "{e}");
    }

    #[test]
    fn labels_are_bounded_in_count_key_and_value() {
        let mut s = status();
        s.labels = (0..64).map(|i| (format!("k{i}"), "v".into())).collect();
        check_status(&s).unwrap();
        s.labels.insert("one-more".into(), "v".into());
        assert_eq!(refused(&s), "labels are 65 labels, over the limit of 64");

        let mut s = status();
        s.labels = [("big".to_string(), "v".repeat(16 << 20))].into();
        let e = refused(&s);
        assert!(
            e.starts_with("label \"big\" value \"vvvv"),
            "the field and the start of the value: {e}"
        );
        assert!(
            e.ends_with("is 16777216 bytes, over the limit of 256"),
            "{e}"
        );
        assert!(e.len() < 200, "{e}");

        s.labels = [("v".to_string(), "tab\there".to_string())].into();
        assert!(refused(&s).contains("control character '\\t'"));

        for (key, why) in [
            ("", "label key is empty"),
            ("a=b", "holds '='"),
            ("a,b", "holds ','"),
            ("/x", "starts with '/'"),
        ] {
            s.labels = [(key.to_string(), "v".to_string())].into();
            let e = refused(&s);
            assert!(e.contains(why), "{key:?}: {e}");
        }
        s.labels = [("x".repeat(64), "v".to_string())].into();
        assert!(refused(&s).contains("64 bytes, over the limit of 63"));
        s.labels = [("example.com/zone".to_string(), "a b/c".to_string())].into();
        check_status(&s).unwrap();
    }

    #[test]
    fn addresses_urls_and_executables_are_checked() {
        let mut s = status();
        for bad in ["", "7101", "host", "a b:1", "h:99999", "h:0", "-h:1", ":1"] {
            s.control_addr = bad.into();
            let e = refused(&s);
            assert!(e.starts_with("control_addr"), "{bad:?}: {e}");
        }
        let mut s = status();
        for bad in [
            "javascript:alert(1)",
            "data:text/html,x",
            "//evil.example/",
            "http://a b/",
            "http://a\n/",
        ] {
            s.admin_url = bad.into();
            assert!(refused(&s).starts_with("admin_url"), "{bad:?}");
        }
        s.admin_url = format!("https://h:1/{}", "a".repeat(MAX_URL));
        assert!(refused(&s).contains("over the limit of 2048"));
        s.admin_url = "HTTPS://h:1/".into();
        check_status(&s).unwrap();

        let mut s = status();
        s.exe.as_mut().unwrap().path = "/".repeat(MAX_PATH + 1);
        assert!(refused(&s).starts_with("exe.path"));
        let mut s = status();
        s.exe.as_mut().unwrap().sha256 = "z".repeat(64);
        assert!(refused(&s).contains("must be 64 hex digits or empty"));
        let mut s = status();
        s.workers[0].exe = Some(pb::ExeInfo {
            sha256: "ab".into(),
            ..Default::default()
        });
        assert!(refused(&s).starts_with("workers[0].exe.sha256"));
    }

    #[test]
    fn states_and_counts_are_bounded() {
        let mut s = status();
        s.state = "pwned".into();
        assert!(refused(&s).contains("is not one of starting, serving"));
        let mut s = status();
        s.workers[0].state = "zombie".into();
        assert!(refused(&s).starts_with("workers[0].state"));
        let mut s = status();
        s.workers = vec![s.workers[0].clone(); MAX_WORKERS + 1];
        assert_eq!(refused(&s), "workers are 65 workers, over the limit of 64");
        let mut s = status();
        s.listeners = vec![s.listeners[0].clone(); MAX_LISTENERS + 1];
        assert!(refused(&s).starts_with("listeners are 257"));
        let mut s = status();
        s.listeners[0].addr = "nowhere".into();
        assert!(refused(&s).starts_with("listeners[0].addr"));
        let mut s = status();
        s.version = "v".repeat(MAX_VERSION + 1);
        assert!(refused(&s).starts_with("version"));
        let mut s = status();
        s.in_progress = "x".repeat(MAX_IN_PROGRESS + 1);
        assert!(refused(&s).starts_with("in_progress"));
        let mut s = status();
        s.recent_restarts = vec![pb::RecentRestart::default(); MAX_RECENT_RESTARTS];
        assert!(check_status(&s).is_ok());
        s.recent_restarts.push(pb::RecentRestart::default());
        assert_eq!(
            refused(&s),
            "recent_restarts are 65 restarts, over the limit of 64"
        );
    }

    #[test]
    fn the_largest_allowed_status_fits_in_one_message() {
        use prost::Message as _;
        let worker = pb::Worker {
            generation: u64::MAX,
            pid: u32::MAX,
            exe: Some(pb::ExeInfo {
                path: "/".repeat(MAX_PATH),
                sha256: "a".repeat(64),
                size: u64::MAX,
            }),
            state: "draining".into(),
            started_at_unix_ms: u64::MAX,
            ready_at_unix_ms: u64::MAX,
            in_flight: u64::MAX,
        };
        let s = pb::StatusResponse {
            node_id: "n".repeat(MAX_NODE_ID),
            labels: (0..MAX_LABELS)
                .map(|i| (format!("{i:0>63}"), "v".repeat(MAX_LABEL_VALUE)))
                .collect(),
            state: "shutting-down".into(),
            exe: worker.exe.clone(),
            workers: vec![worker; MAX_WORKERS],
            listeners: vec![
                pb::Listener {
                    server: "s".repeat(MAX_SERVER_NAME),
                    addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
                    tls: true,
                };
                MAX_LISTENERS
            ],
            control_addr: format!("{}:65535", "h".repeat(253)),
            admin_url: format!("https://{}", "u".repeat(MAX_URL - 8)),
            version: "v".repeat(MAX_VERSION),
            in_progress: "p".repeat(MAX_IN_PROGRESS),
            ..Default::default()
        };
        check_status(&s).unwrap();
        let request = pb::HeartbeatRequest {
            status: Some(s),
            in_flight: u64::MAX,
            ..Default::default()
        };
        let size = request.encoded_len();
        assert!(size < MAX_MESSAGE / 2, "{size} bytes");
    }
}
