//! The CPU time of another process, from /proc: `utime + stime` of
//! `/proc/PID/stat` (the whole process, every thread that ever ran, in clock ticks of
//! 10 ms), and beside it the run time of each live thread from
//! `/proc/PID/task/TID/schedstat` (nanoseconds). The ticks are the figure; the
//! nanoseconds resolve the small deltas a tick cannot (a rollout of five nodes costs
//! the controller a few ticks), as long as no thread exited in between.

use std::collections::BTreeMap;
use std::time::Duration;

/// One reading of a process's CPU time.
#[derive(Debug, Clone)]
pub struct CpuReading {
    /// utime + stime, in clock ticks.
    ticks: u64,
    /// Run time of each live thread, in ns.
    threads: BTreeMap<u32, u64>,
}

/// The CPU a process used between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUsed {
    /// From utime + stime: whole ticks, so ± one tick.
    pub ticks: Duration,
    /// From the threads' run time; `None` when a thread that ran before is gone (its
    /// time would be missing).
    pub precise: Option<Duration>,
}

impl CpuUsed {
    /// The precise figure where there is one, the ticks otherwise.
    pub fn best(&self) -> Duration {
        self.precise.unwrap_or(self.ticks)
    }
}

/// Clock ticks per second (`CLK_TCK`, 100 on Linux).
pub fn clk_tck() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime + stime of `pid`, in clock ticks.
pub fn ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(3) ... utime(14) stime(15).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn threads(pid: u32) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let ns = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            out.insert(tid, ns);
        }
    }
    out
}

/// Reads `pid`'s CPU time now; `None` once it is gone.
pub fn read(pid: u32) -> Option<CpuReading> {
    Some(CpuReading {
        ticks: ticks(pid)?,
        threads: threads(pid),
    })
}

impl CpuReading {
    /// What the process used from `self` to `later`.
    pub fn until(&self, later: &CpuReading) -> CpuUsed {
        let tick = Duration::from_secs(1) / clk_tck() as u32;
        let ticks = tick * later.ticks.saturating_sub(self.ticks) as u32;
        let lost = self
            .threads
            .keys()
            .any(|tid| !later.threads.contains_key(tid));
        let precise = (!lost && !later.threads.is_empty()).then(|| {
            let ns: u64 = later
                .threads
                .iter()
                .map(|(tid, ns)| ns.saturating_sub(self.threads.get(tid).copied().unwrap_or(0)))
                .sum();
            Duration::from_nanos(ns)
        });
        CpuUsed { ticks, precise }
    }
}

/// `VmRSS` of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_and_both_figures_see_it() {
        let me = std::process::id();
        let before = read(me).expect("/proc/self");
        // Burn CPU until the process has used 60 ms more (or 10 s went by: a machine
        // too busy to give it that), checking every few thousand rounds.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut used = before.until(&before);
        for i in 0..u64::MAX {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            if i % 65_536 == 0 {
                used = before.until(&read(me).expect("/proc/self"));
                if used.best() >= Duration::from_millis(60) || start.elapsed().as_secs() >= 10 {
                    break;
                }
            }
        }
        std::hint::black_box(x);
        assert!(used.best() >= Duration::from_millis(60), "{used:?}");
        // Other tests' threads may exit meanwhile: then there is no precise figure.
        if let Some(precise) = used.precise {
            assert!(
                used.ticks + Duration::from_millis(30) >= precise,
                "{used:?}"
            );
            assert!(
                used.ticks <= precise + Duration::from_millis(30),
                "{used:?}"
            );
        }
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
    }
}
