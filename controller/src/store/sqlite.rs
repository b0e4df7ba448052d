//! The SQLite store: tables of JSON documents, WAL mode, one writer thread.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::{Store, StoreError, WriteAck};
use crate::history::{KEEP_PER_NODE, RestartRecord};
use crate::inventory::NodeRecord;
use crate::rollout::{Rollout, RolloutNode};
use crate::tokens::TokenRecord;

enum Write {
    Node(String, String),
    DeleteNode(String),
    Rollout(String, u64, String),
    RolloutNode(String, String, String),
    Token(String, String),
    TouchToken(String, u64),
    Restart(String, u32, String),
    RestartDrain(String, u32, u64),
}

struct Job {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    reader: Mutex<Connection>,
    writer: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} writes)", self.writes.len())
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Db {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(|e| db_err(path, e))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA busy_timeout = 5000;
         CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, json TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, json TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS rollout_nodes (
             rollout_id TEXT NOT NULL, node_id TEXT NOT NULL, json TEXT NOT NULL,
             PRIMARY KEY (rollout_id, node_id));
         CREATE TABLE IF NOT EXISTS tokens (
             id TEXT PRIMARY KEY, json TEXT NOT NULL, last_used INTEGER NOT NULL DEFAULT 0);",
    )
    .map_err(|e| db_err(path, e))?;
    migrate(&conn).map_err(|e| db_err(path, e))?;
    Ok(conn)
}

/// WAL pages between the writer's automatic checkpoints.
const WAL_CHECKPOINT_PAGES: i64 = 10_000;

/// The schema version this build writes (`PRAGMA user_version`). Version 0 is a
/// database from before the restart history; each step below brings it one further.
const SCHEMA_VERSION: i64 = 1;

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 1 {
        // Both connections open the file; the second finds the table there already.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS restarts (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 node_id TEXT NOT NULL,
                 old_pid INTEGER NOT NULL,
                 drain_us INTEGER NOT NULL DEFAULT 0,
                 json TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS restarts_by_node ON restarts (node_id, seq);
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let reader = open(path)?;
        let mut writer_conn = open(path)?;
        // A checkpoint every 10,000 WAL pages (~40 MB) instead of SQLite's 1,000: a
        // rollout rewrites the same pages (its nodes' rows) in many small commits, and
        // each checkpoint copies a page once however often the WAL holds it. At
        // 100,000 nodes the writer's time in a rollout fell from 6.0-6.9 s to 4.6-5.6 s
        // (BENCHMARKS.md, "Eleventh session"): less work, the same durability.
        writer_conn
            .pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
            .map_err(|e| db_err(path, e))?;
        let (writer, jobs) = mpsc::channel::<Job>();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                while let Ok(first) = jobs.recv() {
                    // Everything queued by now goes into one transaction.
                    let mut batch = vec![first];
                    while let Ok(more) = jobs.try_recv() {
                        batch.push(more);
                    }
                    let started = std::time::Instant::now();
                    let result =
                        commit(&mut writer_conn, &batch).map_err(|e| db_err(&thread_path, e));
                    crate::metrics::global().store_write(started.elapsed());
                    if let Err(e) = &result {
                        tracing::error!("cannot write to the store: {e}");
                    }
                    for job in batch {
                        let _ = job.done.send(result.as_ref().map(|_| ()).map_err(|e| {
                            StoreError::Db {
                                path: thread_path.display().to_string(),
                                message: e.to_string(),
                            }
                        }));
                    }
                }
            })
            .map_err(|e| db_err(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: Mutex::new(reader),
            writer,
        })
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

    fn query_json<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        arg: Option<&str>,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.reader.lock().expect("reader lock");
        let mut stmt = conn.prepare(sql).map_err(|e| db_err(&self.path, e))?;
        let read = |r: &rusqlite::Row<'_>| r.get::<_, String>(0);
        let rows: Vec<String> = match arg {
            Some(a) => stmt
                .query_map(params![a], read)
                .and_then(|rows| rows.collect()),
            None => stmt.query_map([], read).and_then(|rows| rows.collect()),
        }
        .map_err(|e| db_err(&self.path, e))?;
        rows.iter()
            .map(|json| serde_json::from_str(json).map_err(|e| db_err(&self.path, e)))
            .collect()
    }
}

fn commit(conn: &mut Connection, batch: &[Job]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        // Upserts rather than INSERT OR REPLACE: an existing row is updated where it
        // is instead of deleted and inserted again with its index entries (a rollout
        // writes each of its nodes two or three times).
        let mut node = tx.prepare_cached(
            "INSERT INTO nodes (id, json) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET json = excluded.json",
        )?;
        let mut forget = tx.prepare_cached("DELETE FROM nodes WHERE id = ?1")?;
        let mut forget_history = tx.prepare_cached("DELETE FROM restarts WHERE node_id = ?1")?;
        let mut rollout = tx.prepare_cached(
            "INSERT INTO rollouts (id, seq, json) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, json = excluded.json",
        )?;
        let mut rollout_node = tx.prepare_cached(
            "INSERT INTO rollout_nodes (rollout_id, node_id, json) VALUES (?1, ?2, ?3)
             ON CONFLICT (rollout_id, node_id) DO UPDATE SET json = excluded.json",
        )?;
        // The record and its last use apart: a lazy write of the last use never
        // undoes a revocation written just before it.
        let mut token = tx.prepare_cached(
            "INSERT INTO tokens (id, json) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET json = excluded.json",
        )?;
        let mut touch =
            tx.prepare_cached("UPDATE tokens SET last_used = max(last_used, ?2) WHERE id = ?1")?;
        let mut restart =
            tx.prepare_cached("INSERT INTO restarts (node_id, old_pid, json) VALUES (?1, ?2, ?3)")?;
        let mut prune = tx.prepare_cached(
            "DELETE FROM restarts WHERE node_id = ?1 AND seq <= (
                 SELECT seq FROM restarts WHERE node_id = ?1
                 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
        )?;
        let mut drain = tx.prepare_cached(
            "UPDATE restarts SET drain_us = ?3 WHERE seq = (
                 SELECT seq FROM restarts WHERE node_id = ?1 AND old_pid = ?2
                 ORDER BY seq DESC LIMIT 1) AND drain_us = 0",
        )?;
        for write in batch.iter().flat_map(|j| &j.writes) {
            match write {
                Write::Node(id, json) => node.execute(params![id, json])?,
                Write::DeleteNode(id) => {
                    forget_history.execute(params![id])?;
                    forget.execute(params![id])?
                }
                Write::Rollout(id, seq, json) => rollout.execute(params![id, *seq as i64, json])?,
                Write::RolloutNode(r, n, json) => rollout_node.execute(params![r, n, json])?,
                Write::Token(id, json) => token.execute(params![id, json])?,
                Write::TouchToken(id, at) => touch.execute(params![id, *at as i64])?,
                Write::Restart(node, old_pid, json) => {
                    restart.execute(params![node, old_pid, json])?;
                    prune.execute(params![node, KEEP_PER_NODE as i64])?
                }
                Write::RestartDrain(node, old_pid, us) => {
                    drain.execute(params![node, old_pid, *us as i64])?
                }
            };
        }
    }
    tx.commit()
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("store records serialize")
}

impl Store for SqliteStore {
    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn load_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.query_json("SELECT json FROM nodes ORDER BY id", None)
    }

    fn load_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.query_json("SELECT json FROM rollouts ORDER BY seq", None)
    }

    fn load_rollout_nodes(&self, rollout_id: &str) -> Result<Vec<RolloutNode>, StoreError> {
        self.query_json(
            "SELECT json FROM rollout_nodes WHERE rollout_id = ?1",
            Some(rollout_id),
        )
    }

    fn put_node(&self, node: &NodeRecord) -> WriteAck {
        self.submit(vec![Write::Node(node.node_id.clone(), to_json(node))])
    }

    fn delete_node(&self, node_id: &str) -> WriteAck {
        self.submit(vec![Write::DeleteNode(node_id.to_string())])
    }

    fn put_rollout(&self, rollout: &Rollout) -> WriteAck {
        self.submit(vec![Write::Rollout(
            rollout.id.clone(),
            rollout.seq,
            to_json(rollout),
        )])
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
        let conn = self.reader.lock().expect("reader lock");
        let mut stmt = conn
            .prepare("SELECT json, last_used FROM tokens ORDER BY rowid")
            .map_err(|e| db_err(&self.path, e))?;
        let rows: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| db_err(&self.path, e))?;
        rows.into_iter()
            .map(|(json, last_used)| {
                let mut token: TokenRecord =
                    serde_json::from_str(&json).map_err(|e| db_err(&self.path, e))?;
                token.last_used_unix_ms = last_used.max(0) as u64;
                Ok(token)
            })
            .collect()
    }

    fn put_token(&self, token: &TokenRecord) -> WriteAck {
        self.submit(vec![Write::Token(token.id.clone(), to_json(token))])
    }

    fn touch_token(&self, id: &str, last_used_unix_ms: u64) -> WriteAck {
        self.submit(vec![Write::TouchToken(id.to_string(), last_used_unix_ms)])
    }

    fn put_restart(&self, restart: &RestartRecord) -> WriteAck {
        self.submit(vec![Write::Restart(
            restart.node_id.clone(),
            restart.old_pid,
            to_json(restart),
        )])
    }

    fn set_restart_drain(&self, node_id: &str, old_pid: u32, drain_us: u64) -> WriteAck {
        self.submit(vec![Write::RestartDrain(
            node_id.to_string(),
            old_pid,
            drain_us,
        )])
    }

    fn check_fence(&self) -> WriteAck {
        // One file, one controller: nobody else can be writing.
        Box::pin(std::future::ready(Ok(())))
    }

    fn load_restarts(
        &self,
        node_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RestartRecord>, StoreError> {
        let conn = self.reader.lock().expect("reader lock");
        let limit = limit.min(i64::MAX as usize) as i64;
        let read = |r: &rusqlite::Row<'_>| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?));
        let rows: Vec<(String, i64)> = match node_id {
            Some(node) => conn
                .prepare(
                    "SELECT json, drain_us FROM restarts WHERE node_id = ?1
                     ORDER BY seq DESC LIMIT ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![node, limit], read)
                        .and_then(|rows| rows.collect())
                }),
            None => conn
                .prepare("SELECT json, drain_us FROM restarts ORDER BY seq DESC LIMIT ?1")
                .and_then(|mut stmt| {
                    stmt.query_map(params![limit], read)
                        .and_then(|rows| rows.collect())
                }),
        }
        .map_err(|e| db_err(&self.path, e))?;
        rows.into_iter()
            .map(|(json, drain_us)| {
                let mut r: RestartRecord =
                    serde_json::from_str(&json).map_err(|e| db_err(&self.path, e))?;
                r.drain_us = r.drain_us.max(drain_us.max(0) as u64);
                Ok(r)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart(node: &str, old_pid: u32, at: u64) -> RestartRecord {
        RestartRecord {
            node_id: node.into(),
            at_unix_ms: at,
            kind: "restart".into(),
            actor: "alice".into(),
            via: "grpc".into(),
            outcome: "succeeded".into(),
            old_pid,
            new_pid: old_pid + 1,
            generation: at,
            handoff_us: 1234,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn history_is_kept_per_node_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        for i in 0..(KEEP_PER_NODE as u64 + 7) {
            store
                .put_restart(&restart("web-1", 100 + i as u32, i))
                .await
                .unwrap();
        }
        store.put_restart(&restart("web-2", 5, 1)).await.unwrap();
        let web1 = store.load_restarts(Some("web-1"), 1000).unwrap();
        assert_eq!(web1.len(), KEEP_PER_NODE);
        // Newest first; the oldest seven were dropped.
        assert_eq!(web1[0].at_unix_ms, KEEP_PER_NODE as u64 + 6);
        assert_eq!(web1.last().unwrap().at_unix_ms, 7);
        assert_eq!(store.load_restarts(Some("web-2"), 1000).unwrap().len(), 1);
        assert_eq!(store.load_restarts(None, 3).unwrap().len(), 3);
        assert_eq!(store.load_restarts(None, 3).unwrap()[0].node_id, "web-2");
    }

    #[tokio::test]
    async fn drain_time_goes_to_the_latest_restart_of_that_old_pid_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        store.put_restart(&restart("web-1", 42, 1)).await.unwrap();
        store.put_restart(&restart("web-1", 43, 2)).await.unwrap();
        store.put_restart(&restart("web-2", 42, 3)).await.unwrap();
        store.set_restart_drain("web-1", 42, 900).await.unwrap();
        // A second report does not overwrite the first.
        store.set_restart_drain("web-1", 42, 5).await.unwrap();
        let web1 = store.load_restarts(Some("web-1"), 10).unwrap();
        assert_eq!((web1[0].old_pid, web1[0].drain_us), (43, 0));
        assert_eq!((web1[1].old_pid, web1[1].drain_us), (42, 900));
        // Another node's restart with the same old pid is untouched.
        assert_eq!(
            store.load_restarts(Some("web-2"), 10).unwrap()[0].drain_us,
            0
        );
    }

    #[tokio::test]
    async fn a_database_from_before_the_history_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        {
            // The schema as the previous release created it (user_version 0).
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE nodes (id TEXT PRIMARY KEY, json TEXT NOT NULL);
                 CREATE TABLE rollouts (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, json TEXT NOT NULL);
                 CREATE TABLE rollout_nodes (
                     rollout_id TEXT NOT NULL, node_id TEXT NOT NULL, json TEXT NOT NULL,
                     PRIMARY KEY (rollout_id, node_id));
                 CREATE TABLE tokens (
                     id TEXT PRIMARY KEY, json TEXT NOT NULL, last_used INTEGER NOT NULL DEFAULT 0);",
            )
            .unwrap();
            let node = serde_json::json!({
                "node_id": "web-1", "labels": {}, "state": "serving",
                "control_addr": "127.0.0.1:1", "admin_url": "",
                "exe": {"path": "/bin/app", "sha256": "", "size": 0},
                "generation": 3, "supervisor_pid": 10, "worker_pid": 11, "in_flight": 0,
                "last_heartbeat_unix_ms": 1, "started_at_unix_ms": 1, "reason": "",
                "static_node": false, "listeners": []
            });
            old.execute(
                "INSERT INTO nodes (id, json) VALUES ('web-1', ?1)",
                params![node.to_string()],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let nodes = store.load_nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].generation, 3);
        assert!(store.load_restarts(Some("web-1"), 10).unwrap().is_empty());
        store.put_restart(&restart("web-1", 11, 5)).await.unwrap();
        assert_eq!(store.load_restarts(Some("web-1"), 10).unwrap().len(), 1);
        let version: i64 = store
            .reader
            .lock()
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(store);
        // Opening it again (already migrated) changes nothing.
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.load_restarts(Some("web-1"), 10).unwrap().len(), 1);
    }
}
