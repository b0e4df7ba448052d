//! The value parsers behind the flags: each checks one value and says how to write it
//! when it is wrong (clap adds which flag it came from, and exits with code 2).

use std::path::Path;
use std::time::Duration;

use fleet_proto::rules;

pub fn parse_controller_url(s: &str) -> Result<String, String> {
    const HOW: &str = "write the controller as http://HOST:PORT (https:// for one started with \
                       --tls), e.g. http://127.0.0.1:7100";
    let s = s.trim();
    let (scheme, rest) = s.split_once("://").unwrap_or(("http", s));
    if scheme != "http" && scheme != "https" {
        return Err(format!("unknown scheme {scheme:?}: {HOW}"));
    }
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty()
        || host_port.contains(['/', '?', '#'])
        || host_port.contains(char::is_whitespace)
    {
        return Err(format!("{s:?} is not HOST:PORT: {HOW}"));
    }
    if let Some((_, port)) = host_port.rsplit_once(':')
        && !port.contains(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("{port:?} is not a port number: {HOW}"));
    }
    let url = format!("{scheme}://{host_port}");
    url.parse::<tonic::transport::Uri>()
        .map_err(|e| format!("{s:?}: {e}; {HOW}"))?;
    Ok(url)
}

pub fn parse_token(s: &str) -> Result<String, String> {
    let token = s.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token is printable ASCII without spaces".into());
    }
    Ok(token.to_string())
}

pub fn parse_exe(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("give the path of the executable on the nodes".into());
    }
    if !Path::new(s).is_absolute() {
        return Err(format!(
            "{s:?} is relative: give the absolute path of the executable on the nodes, \
             e.g. /opt/app/app-v2 (the agents resolve it, not this machine)"
        ));
    }
    Ok(s.to_string())
}

pub fn parse_sha256(s: &str) -> Result<String, String> {
    let hex = s.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "a sha256 is 64 hex digits (as `sha256sum FILE` prints), got {} characters",
            hex.len()
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// `--exclude NODE`: a node id as agents register them (the controller then checks
/// that a node has it).
pub fn parse_node_id(s: &str) -> Result<String, String> {
    let id = s.trim();
    fleet_proto::limits::check_node_id(id)
        .map_err(|e| format!("{e}: give a node id as `fleetctl nodes` lists it"))?;
    Ok(id.to_string())
}

/// One `-l` value: "key=value[,key=value...]", returned with the spaces around terms removed.
pub fn parse_selector(s: &str) -> Result<String, String> {
    let mut terms = Vec::new();
    for term in s.split(',').map(str::trim) {
        match term.split_once('=') {
            Some((key, value))
                if !key.trim().is_empty() && !value.contains('=') && !key.contains('!') =>
            {
                terms.push(format!("{}={}", key.trim(), value.trim()));
            }
            _ => {
                return Err(format!(
                    "selector term {term:?} is not KEY=VALUE: write e.g. zone=a or zone=a,role=web"
                ));
            }
        }
    }
    Ok(terms.join(","))
}

/// `--batches`: the controller's own rule (`fleet_proto::rules`), and not empty.
pub fn parse_batches(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("no batch sizes: list them separated by commas, e.g. 1,10%,100%".into());
    }
    Ok(rules::parse_batches(s)?
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(","))
}

pub fn parse_max_failures(s: &str) -> Result<String, String> {
    rules::parse_max_failures(s).map(|a| a.to_string())
}

pub fn parse_max_unavailable(s: &str) -> Result<String, String> {
    rules::parse_max_unavailable(s).map(|a| a.to_string())
}

pub fn parse_max_parallel(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("batches of 0 nodes restart nothing: give at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of nodes, e.g. 2")),
    }
}

pub fn parse_canary(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(
            "a canary needs nodes: give how many go first, e.g. --canary 1 (or leave it out)"
                .into(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of nodes, e.g. --canary 1")),
    }
}

pub fn parse_health_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(char::is_whitespace) {
        return Err(format!(
            "{s:?} is not a URL path: write it with a leading slash, e.g. /healthz"
        ));
    }
    Ok(s.to_string())
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 30s or 2m"))?;
    if d.is_zero() {
        return Err("must be more than 0 (leave the option out for the default), e.g. 30s".into());
    }
    Ok(d)
}
/// `--min-healthy`: a duration, where 0 is allowed and means no soak (the option
/// left out is the controller's default).
pub fn parse_soak(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. 30s, 2m, or 0s for no soak")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_syntax() {
        assert_eq!(parse_batches("1,10%,100%").unwrap(), "1,10%,100%");
        assert_eq!(parse_batches(" 2 , 5 ,50% ").unwrap(), "2,5,50%");
        for (bad, says) in [
            ("1,,100%", "empty entry"),
            ("1,x", "neither a node count nor a percentage"),
            ("1,150%", "at most 100%"),
            ("0,100%", "sizes start at 1"),
            ("50%,10%", "cumulative"),
            ("5,3", "cumulative"),
            ("100%,5", "nothing can follow 100%"),
            ("1.5", "neither"),
        ] {
            let err = parse_batches(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn budgets_are_counts_or_percentages() {
        assert_eq!(parse_max_failures("0").unwrap(), "0");
        assert_eq!(parse_max_failures("10%").unwrap(), "10%");
        assert!(parse_max_failures("-1").is_err());
        assert!(
            parse_max_failures("ten")
                .unwrap_err()
                .contains("e.g. 2 or 10%")
        );
        assert!(
            parse_max_unavailable("0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert_eq!(parse_max_unavailable("25%").unwrap(), "25%");
    }

    #[test]
    fn selectors_are_key_value_terms() {
        assert_eq!(parse_selector("zone=a").unwrap(), "zone=a");
        assert_eq!(
            parse_selector("zone = a ,role=web").unwrap(),
            "zone=a,role=web"
        );
        for bad in ["zone", "=a", "zone=a,", "zone!=a", "a=b=c", ""] {
            let err = parse_selector(bad).unwrap_err();
            assert!(err.contains("KEY=VALUE"), "{bad}: {err}");
        }
    }

    #[test]
    fn paths_hashes_and_durations() {
        assert!(parse_exe("app-v2").unwrap_err().contains("absolute"));
        assert!(parse_sha256("abc").unwrap_err().contains("64 hex digits"));
        assert!(
            parse_health_path("healthz")
                .unwrap_err()
                .contains("/healthz")
        );
        assert!(parse_duration("soon").unwrap_err().contains("30s"));
        assert!(parse_duration("0s").unwrap_err().contains("more than 0"));
        assert_eq!(parse_soak("0s"), Ok(Duration::ZERO));
        assert!(parse_soak("soon").unwrap_err().contains("0s for no soak"));
    }

    #[test]
    fn controller_urls() {
        assert_eq!(
            parse_controller_url("127.0.0.1:7100").unwrap(),
            "http://127.0.0.1:7100"
        );
        assert_eq!(
            parse_controller_url("http://ctl:7100/").unwrap(),
            "http://ctl:7100"
        );
        assert_eq!(
            parse_controller_url("https://ctl:7100").unwrap(),
            "https://ctl:7100"
        );
        assert!(parse_controller_url("ftp://ctl").is_err());
        assert!(parse_controller_url("http://").is_err());
        assert!(parse_controller_url("http://ctl:7100/api").is_err());
        assert!(parse_controller_url("ctl:port").is_err());
        assert_eq!(
            parse_controller_url("[::1]:7100").unwrap(),
            "http://[::1]:7100"
        );
    }
}
