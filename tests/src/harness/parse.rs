//! Reading what the agent prints and serves: its log lines, `/pid`, Prometheus
//! text; and writing the admin restart URL.

use std::net::SocketAddr;
use std::path::Path;

use super::{HttpResponse, Server};

/// `... control endpoint listening on 127.0.0.1:PORT ...` → the address.
pub fn parse_control(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("control endpoint listening on ")? + 30..];
    let token = rest.split_whitespace().next()?;
    token
        .trim_matches(|c: char| {
            !(c.is_ascii_alphanumeric() || c == '.' || c == ':' || c == '[' || c == ']')
        })
        .parse()
        .ok()
}

/// `... http server 'NAME' started listening on [A, B]` (or `https server`) → the server.
pub fn parse_server(line: &str) -> Option<Server> {
    let at = line.find(" server '")?;
    let tls = match line[..at].rsplit(' ').next()? {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let name_start = at + " server '".len();
    let name_len = line[name_start..].find('\'')?;
    let name = line[name_start..name_start + name_len].to_string();
    let rest = &line[name_start + name_len..];
    let list = &rest[rest.find("started listening on [")? + "started listening on [".len()..];
    let list = &list[..list.find(']')?];
    let addrs = list
        .split(',')
        .map(|a| a.trim().parse().ok())
        .collect::<Option<Vec<SocketAddr>>>()?;
    Some(Server { name, tls, addrs })
}

/// `/debug/admin/restart[?newExeFilePath=PATH][&sha256=HEX]`, percent-encoded.
pub fn restart_path(exe: Option<&Path>, sha256: Option<&str>) -> String {
    let mut query = Vec::new();
    if let Some(exe) = exe {
        query.push(format!(
            "newExeFilePath={}",
            percent_encode(&exe.display().to_string())
        ));
    }
    if let Some(sha256) = sha256 {
        query.push(format!("sha256={}", percent_encode(sha256)));
    }
    if query.is_empty() {
        "/debug/admin/restart".to_string()
    } else {
        format!("/debug/admin/restart?{}", query.join("&"))
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters and '/'.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the first sample of `name` in a Prometheus text exposition whose
/// labels include every pair in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            if matches { value.parse().ok() } else { None }
        })
}

/// The body of `GET /pid` as a pid.
pub fn parse_pid(response: &HttpResponse) -> Result<u32, String> {
    if !response.status.is_success() {
        return Err(format!(
            "GET /pid: {} {:?}",
            response.status,
            response.text()
        ));
    }
    response
        .text()
        .trim()
        .parse()
        .map_err(|_| format!("GET /pid: not a pid: {:?}", response.text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_log_lines() {
        let control =
            "2025-01-01T00:00:00Z INFO supervisor[7]: control endpoint listening on 127.0.0.1:4567";
        assert_eq!(
            parse_control(control),
            Some("127.0.0.1:4567".parse().unwrap())
        );
        let server = "2025-01-01T00:00:00Z INFO supervisor[7]: https server 'secure' started listening on [127.0.0.1:1, 127.0.0.1:2]";
        assert_eq!(
            parse_server(server),
            Some(Server {
                name: "secure".into(),
                tls: true,
                addrs: vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "127.0.0.1:2".parse().unwrap()
                ],
            })
        );
        let metrics = "# TYPE x counter\nfleet_agent_restarts_total{outcome=\"failed\"} 2\nh_bucket{le=\"+Inf\"} 3\n";
        assert_eq!(
            metric(
                metrics,
                "fleet_agent_restarts_total",
                &[("outcome", "failed")]
            ),
            Some(2.0)
        );
        assert_eq!(metric(metrics, "h_bucket", &[("le", "+Inf")]), Some(3.0));
        assert_eq!(
            restart_path(Some(Path::new("/a b/c")), None),
            "/debug/admin/restart?newExeFilePath=/a%20b/c"
        );
    }
}
