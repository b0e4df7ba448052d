//! Real etcd clusters for the controller's etcd store (Debian's `etcd-server`).
//!
//! [`EtcdCluster::start`] spawns `members` etcd processes on free loopback ports,
//! each with its own data dir (on tmpfs where there is one: etcd syncs each commit)
//! and a cluster token no other cluster has, and returns once every member answers
//! and the cluster has a leader. [`EtcdCluster::kill`] and [`EtcdCluster::restart`]
//! take one member down and up; dropping the cluster kills every member (SIGKILL)
//! and reaps it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::cannot_run;

/// The opt-out for the tests that run etcd.
pub const SKIP_ETCD: &str = "FLEET_TESTS_SKIP_ETCD";
/// `FLEET_TEST_STORE=etcd`: every controller the harness starts with the default
/// store keeps its state in an etcd of its own instead of SQLite.
pub const TEST_STORE: &str = "FLEET_TEST_STORE";
/// How long a cluster may take to elect a leader and answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// util-linux's `setpriv`, to tie each etcd's life to the test's.
const SETPRIV: &str = "/usr/bin/setpriv";
/// How many times [`EtcdCluster::start`] tries fresh ports when a member could not
/// bind the ones it was given (another process took them between probe and bind).
const PORT_ATTEMPTS: u32 = 4;

/// The etcd binary: `FLEET_ETCD`, or `etcd` on the PATH.
pub fn program() -> PathBuf {
    std::env::var_os("FLEET_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "etcd".into())
}

/// Whether etcd can run here. When it cannot, a test fails saying how to install it,
/// unless [`SKIP_ETCD`] is `1` (then `false`: the test returns, NOT RUN printed).
pub fn installed(test: &str) -> bool {
    let found = Command::new(program())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        cannot_run(
            test,
            &format!("{} is not installed", program().display()),
            "apt-get install etcd-server",
            SKIP_ETCD,
        );
    }
    found
}

/// Whether `FLEET_TEST_STORE=etcd` is set.
pub fn test_store_is_etcd() -> bool {
    match std::env::var(TEST_STORE) {
        Ok(v) if v == "etcd" => true,
        Ok(v) if v.is_empty() || v == "sqlite" => false,
        Ok(v) => panic!("{TEST_STORE}={v:?}: write etcd, or sqlite (the default)"),
        Err(_) => false,
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: TempDir,
    token: String,
    members: Mutex<Vec<Member>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A token no other cluster started by any test process has.
fn unique_token() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "fleet-test-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}

impl EtcdCluster {
    /// Start a cluster of `members` and wait until it answers; panics (with the
    /// members' logs) if it does not within [`START_TIMEOUT`], or if etcd is not
    /// installed (`apt-get install etcd-server`).
    pub async fn start(members: usize) -> EtcdCluster {
        assert!(members >= 1, "a cluster has at least one member");
        for attempt in 1..=PORT_ATTEMPTS {
            let shm = Path::new("/dev/shm");
            let mut dir = tempfile::Builder::new();
            dir.prefix("fleet-etcd-test");
            let dir = if shm.is_dir() {
                dir.tempdir_in(shm)
            } else {
                dir.tempdir()
            }
            .expect("a temp dir for etcd");
            let cluster = EtcdCluster {
                dir,
                token: unique_token(),
                members: Mutex::new(
                    (0..members)
                        .map(|i| Member {
                            name: format!("m{i}"),
                            client_port: free_port(),
                            peer_port: free_port(),
                            child: None,
                        })
                        .collect(),
                ),
            };
            for i in 0..members {
                cluster.spawn(i);
            }
            match cluster.wait_ready(START_TIMEOUT).await {
                Ok(()) => return cluster,
                // Dropped: its members killed, its dir removed.
                Err(why) if attempt < PORT_ATTEMPTS && cluster.port_taken() => {
                    eprintln!("[etcd] {why}; a port was taken meanwhile: trying fresh ones");
                }
                Err(why) => cluster.fail(&why),
            }
        }
        unreachable!("the last attempt returns or fails")
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.etcd"))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }

    /// Start member `i` (its data dir, if it has one, carries its state).
    fn spawn(&self, i: usize) {
        let mut members = self.members.lock().unwrap();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &mut members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("open the etcd log");
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        // Under `setpriv --pdeathsig KILL` where there is one (util-linux): a test
        // process killed outright (a runner's timeout) takes its etcd with it, which
        // the drop below cannot do. The signal follows the spawning thread: a runtime
        // worker or the test's own thread, both alive until the test has ended.
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut c = Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program());
            c
        } else {
            Command::new(program())
        };
        let child = command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            // Elections within a test's patience.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the etcd log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; install it with `apt-get install etcd-server`, \
                     or set {SKIP_ETCD}=1 to opt out of the tests that need it",
                    program().display()
                )
            });
        eprintln!(
            "[etcd] member {} pid {} on 127.0.0.1:{}",
            m.name,
            child.id(),
            m.client_port
        );
        m.child = Some(child);
    }

    /// Every member answers a status, one of them is the leader, and a
    /// linearizable read through the cluster succeeds.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(exited) = self.exited() {
                return Err(exited);
            }
            let last = match self.answers().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if started.elapsed() >= timeout {
                return Err(format!(
                    "the etcd cluster did not answer within {timeout:?}: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A member that should run but exited.
    fn exited(&self) -> Option<String> {
        let mut members = self.members.lock().unwrap();
        for m in members.iter_mut() {
            if let Some(child) = &mut m.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Some(format!("etcd member {} exited ({status})", m.name));
            }
        }
        None
    }

    async fn answers(&self) -> Result<(), String> {
        let running: Vec<String> = {
            let members = self.members.lock().unwrap();
            members
                .iter()
                .filter(|m| m.child.is_some())
                .map(|m| format!("http://127.0.0.1:{}", m.client_port))
                .collect()
        };
        let ask = async {
            let mut leader = 0;
            for endpoint in &running {
                let options = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500));
                let mut client = etcd_client::Client::connect([endpoint], Some(options))
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                let status = client
                    .status()
                    .await
                    .map_err(|e| format!("{endpoint}: {e}"))?;
                if status.leader() == 0 {
                    return Err(format!("{endpoint}: no leader yet"));
                }
                leader = status.leader();
                client
                    .get("fleet-test-probe", None)
                    .await
                    .map_err(|e| format!("{endpoint}: read: {e}"))?;
            }
            Ok(leader)
        };
        match tokio::time::timeout(Duration::from_secs(2), ask).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("a member did not answer within 2s".into()),
        }
    }

    /// Whether a member's log says it could not bind its port.
    fn port_taken(&self) -> bool {
        let members = self.members.lock().unwrap().len();
        (0..members).any(|i| {
            std::fs::read_to_string(self.log_path(i))
                .is_ok_and(|log| log.contains("address already in use"))
        })
    }

    fn stop_all(&self) {
        let mut members = self.members.lock().unwrap();
        for m in members.iter_mut() {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Panic with `message` and the last lines of every member's log.
    fn fail(&self, message: &str) -> ! {
        let members = self.members.lock().unwrap().len();
        let mut logs = String::new();
        for i in 0..members {
            let log = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            logs.push_str(&format!("\n  member m{i}:\n    {}", tail.join("\n    ")));
        }
        self.stop_all();
        panic!("{message}{logs}");
    }

    /// `127.0.0.1:PORT` of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,…`: what `fleet-controller --store` takes.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// A client of the whole cluster.
    pub async fn client(&self) -> etcd_client::Client {
        let urls: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        etcd_client::Client::connect(urls, None)
            .await
            .expect("an etcd client")
    }

    /// Every key and value under `prefix`.
    pub async fn dump(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let resp = self
            .client()
            .await
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("read {prefix} from etcd: {e}"));
        resp.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect()
    }

    /// The index of the member that is the leader now, as the members say.
    pub async fn leader(&self) -> usize {
        let endpoints = self.endpoints();
        for endpoint in &endpoints {
            let Ok(mut client) =
                etcd_client::Client::connect([format!("http://{endpoint}")], None).await
            else {
                continue;
            };
            let Ok(status) = client.status().await else {
                continue;
            };
            let Ok(members) = client.member_list().await else {
                continue;
            };
            let leader = members
                .members()
                .iter()
                .find(|m| m.id() == status.leader())
                .map(|m| m.name().to_string());
            let names: Vec<String> = self
                .members
                .lock()
                .unwrap()
                .iter()
                .map(|m| m.name.clone())
                .collect();
            if let Some(i) = leader.and_then(|l| names.iter().position(|n| *n == l)) {
                return i;
            }
        }
        self.fail("no member names a leader")
    }

    /// The process ids of the members running now.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| m.child.as_ref().map(Child::id))
            .collect()
    }

    /// Kill member `i` (SIGKILL) and reap it.
    pub fn kill(&self, i: usize) {
        let mut members = self.members.lock().unwrap();
        let m = &mut members[i];
        if let Some(mut child) = m.child.take() {
            eprintln!("[etcd] SIGKILL member {} pid {}", m.name, child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again on its ports and data dir (after [`EtcdCluster::kill`]);
    /// returns once the cluster answers with it.
    pub async fn restart(&self, i: usize) {
        self.kill(i);
        self.spawn(i);
        if let Err(why) = self.wait_ready(START_TIMEOUT).await {
            self.fail(&why);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
