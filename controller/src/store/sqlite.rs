//! The SQLite store: tables of JSON documents, WAL mode, one writer thread.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::{Store, StoreError, WriteAck};
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
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) the database file and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let reader = open(path)?;
        let mut writer_conn = open(path)?;
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
        let mut node =
            tx.prepare_cached("INSERT OR REPLACE INTO nodes (id, json) VALUES (?1, ?2)")?;
        let mut forget = tx.prepare_cached("DELETE FROM nodes WHERE id = ?1")?;
        let mut rollout = tx.prepare_cached(
            "INSERT OR REPLACE INTO rollouts (id, seq, json) VALUES (?1, ?2, ?3)",
        )?;
        let mut rollout_node = tx.prepare_cached(
            "INSERT OR REPLACE INTO rollout_nodes (rollout_id, node_id, json) VALUES (?1, ?2, ?3)",
        )?;
        // The record and its last use apart: a lazy write of the last use never
        // undoes a revocation written just before it.
        let mut token = tx.prepare_cached(
            "INSERT INTO tokens (id, json) VALUES (?1, ?2)
             ON CONFLICT (id) DO UPDATE SET json = excluded.json",
        )?;
        let mut touch =
            tx.prepare_cached("UPDATE tokens SET last_used = max(last_used, ?2) WHERE id = ?1")?;
        for write in batch.iter().flat_map(|j| &j.writes) {
            match write {
                Write::Node(id, json) => node.execute(params![id, json])?,
                Write::DeleteNode(id) => forget.execute(params![id])?,
                Write::Rollout(id, seq, json) => rollout.execute(params![id, *seq as i64, json])?,
                Write::RolloutNode(r, n, json) => rollout_node.execute(params![r, n, json])?,
                Write::Token(id, json) => token.execute(params![id, json])?,
                Write::TouchToken(id, at) => touch.execute(params![id, *at as i64])?,
            };
        }
    }
    tx.commit()
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("store records serialize")
}

impl Store for SqliteStore {
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
}
