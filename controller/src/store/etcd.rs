//! The etcd v3 store: the SQLite store's JSON documents as keys under a prefix, and
//! one writer task that commits whatever has queued in etcd transactions.
//!
//! Keys (under `--etcd-prefix`, `/fleet/` by default): `nodes/ID`, `rollouts/ID`,
//! `rollout_nodes/ROLLOUT/NODE`, `tokens/ID` with `token_last_used/ID` apart (a
//! transaction compares, so a late write never moves it back), `restarts/NODE/AT-PID`
//! (zero-padded, so a node's restarts sort by time; the newest
//! [`crate::history::KEEP_PER_NODE`] kept) and `restart_times/AT/NODE/AT-PID`, an index
//! of the fleet's newest [`batch::RECENT_KEEP`] restarts.
//!
//! **Fencing.** With several controllers on one etcd, only the leader may write. The
//! election (elsewhere) hands the store its [`Fence`]: a key the leader owns and the
//! revision that created it. With `require_fence`, every write transaction carries
//! `create_revision(fence.key) == fence.create_revision`: once another controller
//! has taken over, the key is gone or new, the compare fails, nothing is written, and
//! the write resolves to [`StoreError::NotLeader`] (never retried).

mod batch;
mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::{mpsc, oneshot};

pub use self::batch::key;
use self::batch::{Known, MAX_TXN_BYTES, MAX_TXN_OPS, Op, RECENT_KEEP, Write};
use super::{Store, StoreError, WriteAck};
use crate::history::RestartRecord;
use crate::inventory::NodeRecord;
use crate::rollout::{Rollout, RolloutNode};
use crate::tokens::TokenRecord;

/// How long [`EtcdStore::connect`] waits for the cluster to answer by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read or a commit keeps trying while etcd is unreachable or has no
/// leader (a member restarting, an election) before it fails.
const RETRY_FOR: Duration = Duration::from_secs(15);
/// Keys read per request when loading everything under a prefix.
const PAGE: i64 = 500;
/// Responses can be large (a page of rollouts with long specs).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// Leadership as the election established it: the key its leader owns, and the
/// revision that created that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub create_revision: i64,
}

/// TLS to etcd (`--etcd-ca-cert`, `--etcd-cert`, `--etcd-key`): PEM files.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificates.
    pub ca_cert: PathBuf,
    /// A client certificate and its key, for an etcd with `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd and where the controller's keys live.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Every key starts with it (`/fleet/`).
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Refuse every write unless a [`Fence`] is set and holds (several controllers).
    pub require_fence: bool,
    /// How long [`EtcdStore::connect`] waits for the cluster to answer.
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/fleet/".into(),
            tls: None,
            require_fence: false,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

/// What the store and its writer task share.
struct Shared {
    client: Client,
    kv: KvClient,
    prefix: String,
    /// The endpoints, for messages.
    endpoints: String,
    /// `HOST:PORT` of each member, as given, and how they are reached (for the
    /// members' health, asked one by one).
    members: Vec<String>,
    tls: Option<EtcdTls>,
    require_fence: bool,
    fence: Mutex<Option<Fence>>,
    /// Bumped by every [`EtcdStore::set_fence`]: the writer then forgets what it knew.
    fence_epoch: AtomicU64,
}

struct Job {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

pub struct EtcdStore {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.shared.endpoints)
            .field("prefix", &self.shared.prefix)
            .field("require_fence", &self.shared.require_fence)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and waits until the cluster answers a read (at most
    /// `options.connect_timeout`), then starts the writer task. Call it inside the
    /// (multi-thread) runtime the controller runs on.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        let shown = options.endpoints.join(",");
        let fail = |message: String| StoreError::Etcd {
            endpoints: shown.clone(),
            message,
        };
        if options.endpoints.is_empty() {
            return Err(fail("no endpoint given".into()));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // A member cut off from the others answers at once rather than waiting
            // for a leader it cannot reach.
            .with_require_leader(true);
        let client = connect_client(&options.endpoints, options.tls.as_ref(), connect)
            .await
            .map_err(fail)?;
        let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE);
        let shared = Arc::new(Shared {
            client,
            kv,
            prefix: options.prefix.clone(),
            endpoints: shown.clone(),
            members: options.endpoints.clone(),
            tls: options.tls.clone(),
            require_fence: options.require_fence,
            fence: Mutex::new(None),
            fence_epoch: AtomicU64::new(0),
        });
        // The connection is made on first use; one read proves the cluster answers
        // and has a leader. Members that do not answer are tried in turn.
        let probe = shared.kv.clone();
        let prefix = shared.prefix.clone();
        let started = Instant::now();
        let mut last = String::from("no answer");
        loop {
            let left = options.connect_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(fail(format!(
                    "no member answered within {} (last error: {last}); check that etcd \
                     runs there and is reachable (`etcdctl --endpoints {shown} endpoint \
                     health`), or use the default SQLite store (--db PATH)",
                    humantime::format_duration(options.connect_timeout)
                )));
            }
            let mut kv = probe.clone();
            let get = kv.get(prefix.clone(), Some(GetOptions::new().with_count_only()));
            match tokio::time::timeout(left, get).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => last = describe(&e),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
        let (writer, jobs) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(shared.clone(), jobs));
        tracing::info!(
            "store: etcd at {shown}, keys under {}{}",
            options.prefix,
            if options.require_fence {
                " (writes fenced by leadership)"
            } else {
                ""
            }
        );
        Ok(Self { shared, writer })
    }

    /// Sets (or clears) the leadership every write must still hold, with
    /// `require_fence`. Writes queued after it carry the new fence.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.shared.fence.lock().expect("fence lock") = fence;
        self.shared.fence_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The connection, shared (the election campaigns over it).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// `etcd://HOST:PORT,…` as given to `--store`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.shared.endpoints)
    }

    /// Each member given in `--store`, asked on its own (1 s at most): its name,
    /// whether it answers, and whether it is etcd's raft leader.
    pub async fn members(&self) -> Vec<fleet_proto::v1::StoreMember> {
        let shared = &self.shared;
        let asks = shared.members.iter().map(|endpoint| async move {
            let mut member = fleet_proto::v1::StoreMember {
                endpoint: endpoint.clone(),
                ..Default::default()
            };
            let asked = async {
                let connect = ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(1))
                    .with_timeout(Duration::from_secs(1));
                let mut client =
                    connect_client(std::slice::from_ref(endpoint), shared.tls.as_ref(), connect)
                        .await?;
                let status = client.status().await.map_err(|e| e.to_string())?;
                let id = status.header().map(|h| h.member_id()).unwrap_or(0);
                let name = client
                    .member_list()
                    .await
                    .ok()
                    .and_then(|l| {
                        l.members()
                            .iter()
                            .find(|m| m.id() == id)
                            .map(|m| m.name().to_string())
                    })
                    .unwrap_or_default();
                Ok::<_, String>((name, status.leader() == id && id != 0))
            };
            match tokio::time::timeout(Duration::from_millis(1500), asked).await {
                Ok(Ok((name, leader))) => {
                    member.name = name;
                    member.healthy = true;
                    member.leader = leader;
                }
                Ok(Err(e)) => member.error = e,
                Err(_) => member.error = "no answer within 1.5s".into(),
            }
            member
        });
        futures_util::future::join_all(asks).await
    }

    fn submit(&self, writes: Vec<Write>) -> WriteAck {
        let (done, rx) = oneshot::channel();
        let sent = self.writer.send(Job { writes, done });
        Box::pin(async move {
            if sent.is_err() {
                return Err(StoreError::Stopped);
            }
            rx.await.map_err(|_| StoreError::Stopped)?
        })
    }

    /// Runs `f` to completion from synchronous code (the trait's loads): the
    /// controller's runtime is multi-threaded, so this worker hands its other tasks
    /// to the rest while it waits for etcd.
    fn block_on<T>(&self, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let handle = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        let Some(handle) = handle else {
            return Err(self.shared.error(
                "the etcd store reads from a multi-thread tokio runtime only (a test: \
                 #[tokio::test(flavor = \"multi_thread\")])",
            ));
        };
        tokio::task::block_in_place(|| handle.block_on(f))
    }
}

/// A client of `endpoints` (`HOST:PORT`): plain http, or TLS below tonic.
async fn connect_client(
    endpoints: &[String],
    tls: Option<&EtcdTls>,
    connect: ConnectOptions,
) -> Result<Client, String> {
    match tls {
        None => {
            let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
            Client::connect(&urls, Some(connect)).await
        }
        Some(tls) => {
            let config = tls::client_config(tls)?;
            // HOST:PORT without a scheme: http to tonic, TLS below it.
            Client::connect_with_balanced_channel(endpoints, Some(connect), tls::TlsChannel(config))
                .await
        }
    }
    .map_err(|e| e.to_string())
}

impl Shared {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn error(&self, message: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            message: message.to_string(),
        }
    }

    /// Retries `call` while etcd is unreachable or between leaders, for at most
    /// [`RETRY_FOR`]; other errors (a refused request) at once.
    async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match call(self.kv.clone()).await {
                Ok(t) => return Ok(t),
                Err(e) if transient(&e) && started.elapsed() < RETRY_FOR => {
                    tracing::debug!("etcd {what}: {e}; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(self.error(format!("{what}: {}", describe(&e)))),
            }
        }
    }

    /// Every key and value under `prefix` (relative), in key order, read page by
    /// page at one revision.
    async fn range_all(&self, prefix: &str, keys_only: bool) -> Result<Vec<Kv>, StoreError> {
        let full = self.full(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.clone().into_bytes();
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            if keys_only {
                options = options.with_keys_only();
            }
            let mut resp = self
                .retry(&format!("read {full}"), |mut kv| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { kv.get(from, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            out.extend(kvs.into_iter().map(|kv| self.relative(kv)));
            if !more {
                return Ok(out);
            }
        }
    }

    fn relative(&self, kv: etcd_client::KeyValue) -> Kv {
        let create_revision = kv.create_revision();
        let (key, value) = kv.into_key_value();
        let key = String::from_utf8_lossy(&key);
        Kv {
            key: key
                .strip_prefix(self.prefix.as_str())
                .unwrap_or(&key)
                .to_string(),
            value,
            create_revision,
        }
    }

    /// The values of `keys` (relative), `None` for those missing, in one read-only
    /// transaction per [`MAX_TXN_OPS`].
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::get(self.full(k), None))
                .collect();
            let resp = self
                .retry("read", |mut kv| {
                    let txn = Txn::new().and_then(ops.clone());
                    async move { kv.txn(txn).await }
                })
                .await?;
            for op in resp.op_responses() {
                out.push(match op {
                    TxnOpResponse::Get(mut get) => get
                        .take_kvs()
                        .into_iter()
                        .next()
                        .map(|kv| kv.value().to_vec()),
                    _ => None,
                });
            }
        }
        Ok(out)
    }

    /// Each node's restart suffixes, `MAX_TXN_OPS` nodes a transaction.
    async fn list_restarts(&self, nodes: &[String]) -> Result<Vec<Vec<String>>, StoreError> {
        let mut out = Vec::with_capacity(nodes.len());
        for chunk in nodes.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|node| {
                    let prefix = self.full(&key::restarts(node));
                    let end = prefix_end(prefix.as_bytes());
                    TxnOp::get(
                        prefix,
                        Some(GetOptions::new().with_range(end).with_keys_only()),
                    )
                })
                .collect();
            let resp = self
                .retry("read restart keys", |mut kv| {
                    let txn = Txn::new().and_then(ops.clone());
                    async move { kv.txn(txn).await }
                })
                .await?;
            for (node, op) in chunk.iter().zip(resp.op_responses()) {
                let TxnOpResponse::Get(mut get) = op else {
                    out.push(Vec::new());
                    continue;
                };
                let prefix = self.full(&key::restarts(node));
                out.push(
                    get.take_kvs()
                        .iter()
                        .filter_map(|kv| {
                            let key = std::str::from_utf8(kv.key()).ok()?;
                            Some(key.strip_prefix(prefix.as_str())?.to_string())
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    /// The fence a write must carry now: `Ok(None)` when none is required.
    fn fence(&self) -> Result<Option<Fence>, StoreError> {
        if !self.require_fence {
            return Ok(None);
        }
        match self.fence.lock().expect("fence lock").clone() {
            Some(fence) => Ok(Some(fence)),
            None => Err(StoreError::NotLeader(
                "this controller is not the leader (it holds no leadership yet), so nothing \
                 was written"
                    .into(),
            )),
        }
    }

    /// `then`: what follows, e.g. "so nothing was written".
    fn not_leader(&self, fence: &Fence, then: &str) -> StoreError {
        StoreError::NotLeader(format!(
            "this controller is not the leader: its leadership key {} (created at revision \
             {}) is gone or was taken over{then}",
            fence.key, fence.create_revision
        ))
    }

    fn txn_op(&self, op: Op) -> TxnOp {
        match op {
            Op::Put { key, value } => TxnOp::put(self.full(&key), value, None),
            Op::Delete { key } => TxnOp::delete(self.full(&key), None),
            Op::AtLeast {
                key,
                value,
                requires,
            } => {
                // Comparing a value of a missing key fails in etcd: a first write is
                // a second, nested transaction.
                let key = self.full(&key);
                let mut larger = vec![Compare::value(key.clone(), CompareOp::Less, value.clone())];
                let mut first = vec![Compare::version(key.clone(), CompareOp::Equal, 0)];
                if let Some(required) = requires {
                    let exists = Compare::version(self.full(&required), CompareOp::Greater, 0);
                    larger.push(exists.clone());
                    first.push(exists);
                }
                let put = TxnOp::put(key, value, None);
                TxnOp::txn(
                    Txn::new()
                        .when(larger)
                        .and_then(vec![put.clone()])
                        .or_else(vec![TxnOp::txn(Txn::new().when(first).and_then(vec![put]))]),
                )
            }
        }
    }

    /// One group commit: what the plan needs read, then its transactions.
    async fn commit(&self, known: &mut Known, writes: &[Write]) -> Result<(), StoreError> {
        let fence = self.fence()?;
        let nodes = known.unknown_nodes(writes);
        if !nodes.is_empty() {
            for (node, suffixes) in nodes.iter().zip(self.list_restarts(&nodes).await?) {
                known.learn_restarts(node, suffixes);
            }
        }
        if known.needs_recent(writes) {
            let index = self.range_all(key::RESTART_TIMES, true).await?;
            known.learn_recent(index.into_iter().map(|kv| kv.key));
        }
        let mut plan = known.plan(writes);
        if !plan.drains.is_empty() {
            let keys: Vec<String> = plan.drains.iter().map(|(k, _)| k.clone()).collect();
            for (key, record) in keys.iter().zip(self.get_many(&keys).await?) {
                plan.drain_read(key, record.as_deref());
            }
        }
        let txns = plan.into_txns(MAX_TXN_OPS, MAX_TXN_BYTES);
        let of = txns.len();
        let compare: Vec<Compare> = fence
            .iter()
            .map(|f| Compare::create_revision(f.key.clone(), CompareOp::Equal, f.create_revision))
            .collect();
        // The plan puts each key in one transaction only, so they may go at once: a
        // commit waits for one quorum round, not one per transaction (a batch of 1,000
        // node claims is 8 of them).
        let sent = txns.into_iter().map(|ops| {
            let ops: Vec<TxnOp> = ops.into_iter().map(|op| self.txn_op(op)).collect();
            let compare = &compare;
            async move {
                self.retry("write", |mut kv| {
                    let txn = Txn::new().when(compare.clone()).and_then(ops.clone());
                    async move { kv.txn(txn).await }
                })
                .await
                .map(|resp| resp.succeeded())
            }
        });
        let results = futures_util::future::join_all(sent).await;
        let written = results.iter().filter(|r| matches!(r, Ok(true))).count();
        let partly = match written {
            0 => ", so nothing was written".to_string(),
            // Rare: leadership or etcd lost while the transactions of one commit were out.
            n => format!(", so this write was not (only {n} of its {of} etcd transactions were)"),
        };
        for result in results {
            match result {
                Ok(true) => {}
                Ok(false) => {
                    let fence = fence.as_ref().expect("only the fence is compared");
                    return Err(self.not_leader(fence, &partly));
                }
                Err(StoreError::Etcd { endpoints, message }) if written > 0 => {
                    return Err(StoreError::Etcd {
                        endpoints,
                        message: message + &partly,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A key and value read, the key relative to the prefix.
struct Kv {
    key: String,
    value: Vec<u8>,
    create_revision: i64,
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The error in a line: a gRPC status's message and its deepest cause
/// (`tcp connect error: Connection refused (os error 111)`), without the debug dump.
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => crate::with_cause(status),
        e => e.to_string(),
    }
}

/// Worth trying again: etcd unreachable, or between leaders.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    }
}

/// The writer: whatever has queued by the time the last commit ended is the next one.
async fn write_loop(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut known = Known::default();
    let mut epoch = shared.fence_epoch.load(Ordering::SeqCst);
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = jobs.try_recv() {
            batch.push(more);
        }
        let now = shared.fence_epoch.load(Ordering::SeqCst);
        if now != epoch {
            // Leadership changed hands since: another leader may have written.
            known.forget();
            epoch = now;
        }
        let writes: Vec<Write> = batch.iter_mut().flat_map(|j| j.writes.drain(..)).collect();
        let started = Instant::now();
        let result = shared.commit(&mut known, &writes).await;
        crate::metrics::global().store_write(started.elapsed());
        if let Err(e) = &result {
            // What was learned may not hold after a partial commit.
            known.forget();
            match e {
                StoreError::NotLeader(m) => tracing::warn!("store: {m}"),
                e => tracing::error!("cannot write to the store: {e}"),
            }
        }
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(shared: &Shared, kv: &Kv) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        shared.error(format!(
            "{}{}: not a record this controller reads: {e}",
            shared.prefix, kv.key
        ))
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("store records serialize")
}

impl Store for EtcdStore {
    fn url(&self) -> String {
        EtcdStore::url(self)
    }

    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let s = &self.shared;
        self.block_on(async {
            let kvs = s.range_all(key::NODES, false).await?;
            kvs.iter().map(|kv| parse(s, kv)).collect()
        })
    }

    fn load_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let s = &self.shared;
        self.block_on(async {
            let kvs = s.range_all(key::ROLLOUTS, false).await?;
            let mut rollouts: Vec<Rollout> = kvs
                .iter()
                .map(|kv| parse(s, kv))
                .collect::<Result<_, _>>()?;
            rollouts.sort_by_key(|r| r.seq);
            Ok(rollouts)
        })
    }

    fn load_rollout_nodes(&self, rollout_id: &str) -> Result<Vec<RolloutNode>, StoreError> {
        let s = &self.shared;
        self.block_on(async {
            let kvs = s.range_all(&key::rollout_nodes(rollout_id), false).await?;
            kvs.iter().map(|kv| parse(s, kv)).collect()
        })
    }

    fn put_node(&self, node: &NodeRecord) -> WriteAck {
        self.submit(vec![Write::Node(node.node_id.clone(), to_json(node))])
    }

    fn delete_node(&self, node_id: &str) -> WriteAck {
        self.submit(vec![Write::DeleteNode(node_id.to_string())])
    }

    fn put_rollout(&self, rollout: &Rollout) -> WriteAck {
        self.submit(vec![Write::Rollout(rollout.id.clone(), to_json(rollout))])
    }

    fn put_rollout_nodes(&self, rollout_id: &str, nodes: &[RolloutNode]) -> WriteAck {
        self.submit(
            nodes
                .iter()
                .map(|n| Write::RolloutNode(rollout_id.to_string(), n.node_id.clone(), to_json(n)))
                .collect(),
        )
    }

    fn load_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let s = &self.shared;
        self.block_on(async {
            let mut kvs = s.range_all(key::TOKENS, false).await?;
            // In the order they were created, as SQLite's rowid.
            kvs.sort_by_key(|kv| kv.create_revision);
            let used: std::collections::HashMap<String, u64> = s
                .range_all(key::TOKENS_LAST_USED, false)
                .await?
                .into_iter()
                .filter_map(|kv| {
                    let id = kv.key.strip_prefix(key::TOKENS_LAST_USED)?.to_string();
                    let at = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
                    Some((id, at))
                })
                .collect();
            kvs.iter()
                .map(|kv| {
                    let mut token: TokenRecord = parse(s, kv)?;
                    token.last_used_unix_ms = used.get(&token.id).copied().unwrap_or(0);
                    Ok(token)
                })
                .collect()
        })
    }

    fn put_token(&self, token: &TokenRecord) -> WriteAck {
        self.submit(vec![Write::Token(token.id.clone(), to_json(token))])
    }

    fn touch_token(&self, id: &str, last_used_unix_ms: u64) -> WriteAck {
        self.submit(vec![Write::TouchToken(id.to_string(), last_used_unix_ms)])
    }

    fn put_restart(&self, restart: &RestartRecord) -> WriteAck {
        self.submit(vec![Write::Restart {
            node: restart.node_id.clone(),
            at_unix_ms: restart.at_unix_ms,
            old_pid: restart.old_pid,
            json: to_json(restart),
        }])
    }

    fn set_restart_drain(&self, node_id: &str, old_pid: u32, drain_us: u64) -> WriteAck {
        self.submit(vec![Write::RestartDrain(
            node_id.to_string(),
            old_pid,
            drain_us,
        )])
    }

    /// Newest first. The whole fleet's: at most [`RECENT_KEEP`].
    fn load_restarts(
        &self,
        node_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RestartRecord>, StoreError> {
        let s = &self.shared;
        let newest = |prefix: String, limit: usize| {
            let end = prefix_end(prefix.as_bytes());
            let options = GetOptions::new()
                .with_range(end)
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(limit.min(i64::MAX as usize) as i64);
            s.retry("read restarts", move |mut kv| {
                let (prefix, options) = (prefix.clone(), options.clone());
                async move { kv.get(prefix, Some(options)).await }
            })
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.block_on(async {
            match node_id {
                Some(node) => {
                    let mut resp = newest(s.full(&key::restarts(node)), limit).await?;
                    resp.take_kvs()
                        .into_iter()
                        .map(|kv| parse(s, &s.relative(kv)))
                        .collect()
                }
                None => {
                    let mut resp =
                        newest(s.full(key::RESTART_TIMES), limit.min(RECENT_KEEP)).await?;
                    let keys: Vec<String> = resp
                        .take_kvs()
                        .iter()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                        .collect();
                    let mut out = Vec::with_capacity(keys.len());
                    // An index entry whose record a partial commit left out is skipped.
                    for (key, value) in keys.iter().zip(s.get_many(&keys).await?) {
                        if let Some(value) = value {
                            let kv = Kv {
                                key: key.clone(),
                                value,
                                create_revision: 0,
                            };
                            out.push(parse(s, &kv)?);
                        }
                    }
                    Ok(out)
                }
            }
        })
    }

    fn check_fence(&self) -> WriteAck {
        let shared = self.shared.clone();
        Box::pin(async move {
            let Some(fence) = shared.fence()? else {
                return Ok(());
            };
            let compare = Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.create_revision,
            );
            let resp = shared
                .retry("check the leadership fence", |mut kv| {
                    let txn = Txn::new().when(vec![compare.clone()]);
                    async move { kv.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                Ok(())
            } else {
                Err(shared.not_leader(&fence, ""))
            }
        })
    }
}

#[cfg(test)]
mod tests;
