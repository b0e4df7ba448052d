//! What a spawned process prints: every line of its stdout and stderr, kept in
//! order, echoed to the test's stderr, with a way to wait for a line and for the
//! streams' end (the lines a process printed just before it exited arrive after
//! its exit status does).

use std::io::{BufRead, BufReader, Read};
use std::process::Child;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// The lines of one process (over all its runs, for one that is restarted).
#[derive(Debug)]
pub struct ProcessLog {
    lines: Mutex<Vec<String>>,
    /// The number of lines, changed with each new one.
    count: watch::Sender<usize>,
    /// How many captured streams have not reached their end.
    open: watch::Sender<usize>,
}

impl ProcessLog {
    pub fn new() -> Arc<ProcessLog> {
        Arc::new(ProcessLog {
            lines: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            open: watch::channel(0).0,
        })
    }

    /// Read `child`'s piped stdout and stderr (whichever were piped) on threads,
    /// each line prefixed with `name` and its pid when echoed.
    pub fn capture(self: &Arc<Self>, child: &mut Child, name: &str) {
        let pid = child.id();
        if let Some(stderr) = child.stderr.take() {
            self.read(stderr, format!("[{name} {pid}]"));
        }
        if let Some(stdout) = child.stdout.take() {
            self.read(stdout, format!("[{name} {pid} stdout]"));
        }
    }

    fn read(self: &Arc<Self>, stream: impl Read + Send + 'static, prefix: String) {
        self.open.send_modify(|open| *open += 1);
        let log = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while let Ok(1..) = reader.read_until(b'\n', &mut buf) {
                let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                buf.clear();
                eprintln!("{prefix} {line}");
                log.push(line);
            }
            log.open.send_modify(|open| *open -= 1);
        });
    }

    fn push(&self, line: String) {
        let mut lines = self.lines();
        lines.push(line);
        self.count.send_replace(lines.len());
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.lines().clone()
    }

    /// How many lines so far: a mark for [`ProcessLog::find_from`].
    pub fn len(&self) -> usize {
        self.lines().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first line from index `mark` on that contains `needle`.
    pub fn find_from(&self, mark: usize, needle: &str) -> Option<String> {
        self.lines()
            .iter()
            .skip(mark)
            .find(|l| l.contains(needle))
            .cloned()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// A receiver that changes with each new line (subscribe before looking, so
    /// that no line slips between a look and the wait).
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// Once the process has exited: wait until every captured stream has ended, so
    /// that its last lines are in. A stream still held open by a process it left
    /// behind is given up on after `timeout`.
    pub async fn wait_closed(&self, timeout: Duration) {
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(timeout, open.wait_for(|open| *open == 0)).await;
    }
}

/// Remove ANSI colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_sequences_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[2mtime\u{1b}[0m INFO"), "time INFO");
    }

    #[tokio::test]
    async fn the_last_lines_of_a_process_that_exited_are_all_in_once_its_streams_closed() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "for i in 1 2 3 4 5; do echo out $i; echo err $i >&2; done",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = ProcessLog::new();
        log.capture(&mut child, "sh");
        child.wait().unwrap();
        log.wait_closed(Duration::from_secs(5)).await;
        assert_eq!(log.len(), 10, "{:?}", log.all());
        assert_eq!(log.count("err"), 5);
        assert_eq!(log.find_from(0, "out 5").as_deref(), Some("out 5"));
    }
}
