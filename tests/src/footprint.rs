//! What a process holds, from `/proc/PID`: open file descriptors, threads and
//! memory. The torture test compares a supervisor's footprint before and after a
//! thousand restarts; the benchmarks print the supervisor's and the workers' RSS.

/// Open fds, threads and resident memory of one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Entries of `/proc/PID/fd`.
    pub fds: usize,
    /// `Threads:` of `/proc/PID/status`.
    pub threads: u64,
    /// `VmRSS:` of `/proc/PID/status`, in bytes.
    pub rss: u64,
}

impl Footprint {
    /// The footprint of `pid`, or `None` when it is gone.
    pub fn of(pid: u32) -> Option<Footprint> {
        Some(Footprint {
            fds: open_fds(pid)?,
            threads: status_field(pid, "Threads:")?,
            rss: mem(pid)?.rss,
        })
    }
}

impl std::fmt::Display for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds, {} threads, RSS {} kB",
            self.fds,
            self.threads,
            self.rss / 1024
        )
    }
}

/// How many file descriptors `pid` has open.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// What each open fd of `pid` points to (`socket:[123]`, `pipe:[45]`, a path), for
/// failure messages.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut targets: Vec<String> = entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    targets.sort();
    targets
}

/// Memory of a process from /proc/PID/status, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mem {
    /// VmRSS: resident set.
    pub rss: u64,
    /// VmHWM: peak resident set.
    pub hwm: u64,
    /// RssAnon: private memory (heap, stacks).
    pub anon: u64,
    /// RssFile: resident pages of mapped files (mostly the executable's own code,
    /// shared with the workers, which run the same file).
    pub file: u64,
    /// Pss from /proc/PID/smaps_rollup: shared pages divided among their users.
    pub pss: Option<u64>,
}

/// The memory figures of `pid`, or `None` when it is gone.
pub fn mem(pid: u32) -> Option<Mem> {
    let kb = |v: u64| v * 1024;
    Some(Mem {
        rss: kb(status_field(pid, "VmRSS:")?),
        hwm: kb(status_field(pid, "VmHWM:")?),
        anon: kb(status_field(pid, "RssAnon:").unwrap_or(0)),
        file: kb(status_field(pid, "RssFile:").unwrap_or(0)),
        pss: std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|t| t.lines().find_map(|l| number_after(l, "Pss:")))
            .map(kb),
    })
}

/// The number in a `Name:   123 kB` line of `/proc/PID/status`.
fn status_field(pid: u32, name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| number_after(l, name))
}

fn number_after(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_footprint() {
        let me = Footprint::of(std::process::id()).expect("/proc/self");
        assert!(me.fds >= 3 && me.threads >= 1 && me.rss > 0, "{me}");
        assert_eq!(number_after("VmRSS:\t  6812 kB", "VmRSS:"), Some(6812));
    }
}
