//! What `/proc` says about processes: alive, zombie, children; and waiting on it.
//! Polling `/proc` every few milliseconds with a deadline is how tests wait for a
//! process to go away (there is no event for a process that is not our child).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often the waits below look at `/proc`.
const POLL: Duration = Duration::from_millis(10);

/// The state letter of `/proc/<pid>/stat` ('R', 'S', 'D', 'Z', ...), or `None` when
/// there is no such process (it exited and was reaped).
pub fn proc_state(pid: u32) -> Option<char> {
    stat_fields(pid).map(|(state, _)| state)
}

/// The parent pid from `/proc/<pid>/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid).map(|(_, ppid)| ppid)
}

fn stat_fields(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parens, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The process exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The process exited but its parent has not reaped it.
pub fn is_zombie(pid: u32) -> bool {
    proc_state(pid) == Some('Z')
}

/// Every process whose parent is `pid` (any thread of it), zombies included.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect();
    children.sort_unstable();
    children
}

/// Children of `pid` that are running (not zombies).
pub fn running_children_of(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|&p| is_running(p))
        .collect()
}

/// `readlink /proc/<pid>/exe`.
pub fn exe_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Send `signal` to `pid`; panics if that fails (the process should exist).
pub fn send_signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// Wait until `/proc/<pid>` is gone (exited and reaped). Returns how long that
/// took, or `None` if it is still there after `timeout`.
pub async fn wait_gone(pid: u32, timeout: Duration) -> Option<Duration> {
    wait_proc(pid, timeout, |p| proc_state(p).is_none()).await
}

/// Wait until the process is no longer running (gone, or a zombie).
pub async fn wait_not_running(pid: u32, timeout: Duration) -> Option<Duration> {
    wait_proc(pid, timeout, |p| !is_running(p)).await
}

async fn wait_proc(pid: u32, timeout: Duration, done: impl Fn(u32) -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done(pid) {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Kill `root` and every process below it. Each process is stopped before its
/// children are listed, so nothing forks or respawns a worker behind our back;
/// then all of them get SIGKILL.
pub fn kill_tree(root: u32) {
    let mut all = Vec::new();
    let mut frontier = vec![root];
    while let Some(pid) = frontier.pop() {
        if all.contains(&pid) {
            continue;
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
        all.push(pid);
        frontier.extend(children_of(pid));
    }
    for pid in all {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Poll `check` every few milliseconds until it returns `Some`, or panic after
/// `timeout` saying what was awaited and what `check` last reported.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => {
                if start.elapsed() >= timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
