//! The rules of a rollout spec's amounts, in one place for every client and the
//! controller: `fleetctl` checks its flags with them, the controller (and so the
//! dashboard's form) checks every spec with them, so `--batches 2,1` is refused the
//! same way everywhere.

use std::fmt;

/// A count of nodes or a whole percentage of the targets (`2`, `10%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    Count(u32),
    Percent(u32),
}

impl Amount {
    /// `N` or `N%` (N a whole number; a percentage at most 100).
    pub fn parse(s: &str) -> Result<Amount, String> {
        let s = s.trim();
        let (digits, percent) = match s.strip_suffix('%') {
            Some(d) => (d.trim(), true),
            None => (s, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "{s:?} is neither a node count nor a percentage (write e.g. 2 or 10%)"
            ));
        }
        let n: u32 = digits.parse().map_err(|_| format!("{s:?} is too large"))?;
        if !percent {
            return Ok(Amount::Count(n));
        }
        if n > 100 {
            return Err(format!("{s} is more than every node (at most 100%)"));
        }
        Ok(Amount::Percent(n))
    }

    /// Resolved against `total` targets, rounding percentages up.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(p) => (p as usize * total).div_ceil(100),
        }
    }

    fn is_zero(self) -> bool {
        matches!(self, Amount::Count(0) | Amount::Percent(0))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(n) => write!(f, "{n}%"),
        }
    }
}

const EXAMPLE: &str = "e.g. 1,10%,100%";

/// Cumulative batch sizes, `1,10%,100%`: each entry a count or percentage above 0,
/// each larger than the one of its kind before it, nothing after `100%`. Empty: none.
pub fn parse_batches(s: &str) -> Result<Vec<Amount>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut entries: Vec<Amount> = Vec::new();
    for part in s.split(',') {
        if part.trim().is_empty() {
            return Err(format!(
                "empty entry in {s:?}: list batch sizes separated by commas, {EXAMPLE}"
            ));
        }
        let size = Amount::parse(part).map_err(|e| format!("{e}; {EXAMPLE}"))?;
        if size.is_zero() {
            return Err(format!(
                "a batch of {} restarts no node: sizes start at 1 (or 1%), {EXAMPLE}",
                part.trim()
            ));
        }
        if entries.last() == Some(&Amount::Percent(100)) {
            return Err(format!(
                "nothing can follow 100% in {s:?}: 100% already covers every node"
            ));
        }
        let before = entries.iter().rev().find(|e| {
            matches!(
                (e, size),
                (Amount::Count(_), Amount::Count(_)) | (Amount::Percent(_), Amount::Percent(_))
            )
        });
        if let Some(before) = before {
            let (Amount::Count(a) | Amount::Percent(a)) = *before;
            let (Amount::Count(b) | Amount::Percent(b)) = size;
            if b <= a {
                return Err(format!(
                    "sizes are cumulative (the nodes done so far), so each must be larger \
                     than the one before: {} after {before} in {s:?}; {EXAMPLE}",
                    part.trim()
                ));
            }
        }
        entries.push(size);
    }
    Ok(entries)
}

/// How many targets may be down at once: at least 1 (or 1%).
pub fn parse_max_unavailable(s: &str) -> Result<Amount, String> {
    match Amount::parse(s)? {
        a if a.is_zero() => Err(
            "with no node allowed down, no node can be restarted: give at least 1 (or 1%)".into(),
        ),
        a => Ok(a),
    }
}

/// The failure budget: `0`, `2` or `10%`.
pub fn parse_max_failures(s: &str) -> Result<Amount, String> {
    Amount::parse(s)
}

/// How the reason of a node in a dry run's plan starts when preflight would refuse
/// that node (the refusal follows): the controller writes it, fleetctl marks the node.
pub const PREFLIGHT_WOULD_REFUSE: &str = "preflight would refuse: ";

/// Preflight refusals grouped by reason, the largest group first (then by reason), each
/// group's node ids sorted: what the controller's message and fleetctl print as
/// `3 nodes: exe not found: web-1, web-2, web-3`, so one broken build over a hundred
/// nodes reads as one line, not a hundred.
pub fn group_refusals<'a>(
    refusals: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, Vec<String>)> {
    let mut groups: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (node, reason) in refusals {
        groups.entry(reason).or_default().push(node.to_string());
    }
    let mut groups: Vec<(String, Vec<String>)> = groups
        .into_iter()
        .map(|(reason, mut nodes)| {
            nodes.sort();
            (reason.to_string(), nodes)
        })
        .collect();
    groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    groups
}

/// One group of [`group_refusals`] as a line: `3 nodes: REASON: a, b, c` (`1 node: …`),
/// listing at most `max_ids` ids and then how many more.
pub fn refusal_line(reason: &str, nodes: &[String], max_ids: usize) -> String {
    let count = match nodes.len() {
        1 => "1 node".to_string(),
        n => format!("{n} nodes"),
    };
    let mut ids = nodes
        .iter()
        .take(max_ids)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if nodes.len() > max_ids {
        ids.push_str(&format!(" and {} more", nodes.len() - max_ids));
    }
    format!("{count}: {reason}: {ids}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cumulative_and_end_at_100_percent() {
        let b = parse_batches("1, 10%,100%").unwrap();
        assert_eq!(
            b,
            [Amount::Count(1), Amount::Percent(10), Amount::Percent(100)]
        );
        assert!(parse_batches("").unwrap().is_empty());
        for bad in ["2,1", "10%,5%", "1,,2", "0", "100%,2", "ten", "101%"] {
            assert!(parse_batches(bad).is_err(), "{bad}");
        }
        assert!(parse_batches("2,1").unwrap_err().contains("larger"));
    }

    #[test]
    fn amounts_resolve_rounding_up() {
        assert_eq!(Amount::Percent(10).of(50), 5);
        assert_eq!(Amount::Percent(10).of(51), 6);
        assert_eq!(Amount::Count(3).of(2), 3);
        assert!(
            parse_max_unavailable("0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert_eq!(parse_max_failures("10%").unwrap().to_string(), "10%");
    }

    #[test]
    fn refusals_group_by_reason_largest_first() {
        let groups = group_refusals([
            ("web-3", "exe not found"),
            ("web-1", "exe not found"),
            ("db-1", "unreachable: connection refused"),
            ("web-2", "exe not found"),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(
            refusal_line(&groups[0].0, &groups[0].1, 50),
            "3 nodes: exe not found: web-1, web-2, web-3"
        );
        assert_eq!(
            refusal_line(&groups[1].0, &groups[1].1, 50),
            "1 node: unreachable: connection refused: db-1"
        );
        assert_eq!(
            refusal_line(&groups[0].0, &groups[0].1, 2),
            "3 nodes: exe not found: web-1, web-2 and 1 more"
        );
    }
}
