//! The machine a benchmark runs on: what it is (CPUs, kernel), and how much of it
//! other processes used meanwhile (which skews every figure on a small machine).

use serde_json::{Value, json};

use super::child::descendants;

/// What a benchmark prints about the machine.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        Machine {
            // The machine's, not this process's (peer-bench may pin itself to some).
            cpus: nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
                .ok()
                .flatten()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
            cpu_model,
            kernel,
        }
    }

    pub fn json(&self) -> Value {
        json!({"cpus": self.cpus, "cpu_model": self.cpu_model, "kernel": self.kernel})
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs ({}), Linux {}",
            self.cpus, self.cpu_model, self.kernel
        )
    }
}

/// CPU time (in clock ticks) of the whole machine and of this benchmark's own
/// process tree (itself and everything it started).
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// user + nice + system of every CPU (interrupt time left out: it belongs to
    /// no process).
    busy: u64,
    /// Time the hypervisor gave this machine's CPUs to someone else.
    steal: u64,
    /// Every column of every CPU.
    total: u64,
    /// utime + stime + cutime + cstime of this process and every descendant
    /// (cutime/cstime carry the time of reaped children, e.g. old workers).
    own: u64,
}

/// Ticks of the whole machine from the first line of /proc/stat.
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    /// user + nice + system.
    pub busy: u64,
    pub steal: u64,
    pub total: u64,
}

pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cols: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    if cols.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time
    // is already in user/nice.
    Some(MachineTicks {
        busy: cols[0] + cols[1] + cols[2],
        steal: cols.get(7).copied().unwrap_or(0),
        total: cols.iter().take(8).sum(),
    })
}

pub fn cpu_sample() -> Option<CpuSample> {
    let MachineTicks { busy, steal, total } = machine_ticks()?;
    let me = std::process::id();
    let mut own = 0;
    for pid in std::iter::once(me).chain(descendants(me)) {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = s.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17).
        own += f
            .get(11..15)
            .into_iter()
            .flatten()
            .filter_map(|v| v.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(CpuSample {
        busy,
        steal,
        total,
        own,
    })
}

/// Share of all CPU time between two samples used by processes outside this
/// benchmark (or stolen by the hypervisor).
pub fn foreign_cpu(a: Option<CpuSample>, b: Option<CpuSample>) -> Option<f64> {
    let (a, b) = (a?, b?);
    let total = b.total.checked_sub(a.total)?;
    if total == 0 {
        return None;
    }
    let foreign = (b.busy.saturating_sub(a.busy)).saturating_sub(b.own.saturating_sub(a.own))
        + b.steal.saturating_sub(a.steal);
    Some(foreign as f64 / total as f64)
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
