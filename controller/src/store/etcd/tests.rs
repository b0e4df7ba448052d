//! The etcd store against a real one-member etcd (`/usr/bin/etcd`, Debian's
//! `etcd-server`), spawned per test on free loopback ports. Multi-node clusters and
//! the controller on etcd are tested end to end in `tests/tests/etcd_store.rs`.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::*;
use crate::history::KEEP_PER_NODE;
use crate::store::SqliteStore;

/// A one-member etcd, killed (SIGKILL) and reaped on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `None` (NOT RUN printed) where etcd is missing and FLEET_TESTS_SKIP_ETCD=1.
fn etcd(test: &str) -> Option<Etcd> {
    etcd_with(test, None)
}

/// PEM files for TLS to etcd: `ca.crt`, `server.crt`/`server.key` (for 127.0.0.1),
/// `client.crt`/`client.key`, and `other-ca.crt` (a CA that signed none of them).
fn tls_files(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (cert, Issuer::new(params, key))
    };
    let (ca_cert, issuer) = ca("etcd test CA");
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.crt"), ca("another CA").0.pem()).unwrap();
    for (name, san, usage) in [
        ("server", "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth),
        (
            "client",
            "fleet-controller",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// With `tls` (a dir of [`tls_files`]): https only, client certificates required.
fn etcd_with(test: &str, tls: Option<&std::path::Path>) -> Option<Etcd> {
    let program = std::env::var_os("FLEET_ETCD").unwrap_or_else(|| "etcd".into());
    if Command::new(&program)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        if std::env::var_os("FLEET_TESTS_SKIP_ETCD").is_some_and(|v| v == "1") {
            eprintln!("NOT RUN {test}: etcd is not installed (FLEET_TESTS_SKIP_ETCD=1 is set)");
            return None;
        }
        panic!(
            "{test} needs etcd: `apt-get install etcd-server`; or set \
             FLEET_TESTS_SKIP_ETCD=1 to opt out (the test then proves nothing)"
        );
    }
    // On tmpfs where there is one: etcd syncs every commit.
    let shm = std::path::Path::new("/dev/shm");
    let mut dir = tempfile::Builder::new();
    dir.prefix("fleet-etcd-unit");
    let dir = if shm.is_dir() {
        dir.tempdir_in(shm)
    } else {
        dir.tempdir()
    }
    .expect("a temp dir");
    let (client, peer) = (free_port(), free_port());
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Dies with this test process even if it is killed outright (util-linux).
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let mut command = if setpriv.is_file() {
        let mut c = Command::new(setpriv);
        c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    if let Some(tls) = tls {
        command
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(tls.join("ca.crt"))
            .arg("--cert-file")
            .arg(tls.join("server.crt"))
            .arg("--key-file")
            .arg(tls.join("server.key"));
    }
    let child = command
        .args(["--name", "unit", "--logger", "zap", "--log-level", "error"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg(format!(
            "--listen-client-urls={scheme}://127.0.0.1:{client}"
        ))
        .arg(format!(
            "--advertise-client-urls={scheme}://127.0.0.1:{client}"
        ))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!("--initial-cluster=unit=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-cluster-token=unit-{}-{client}",
            std::process::id()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn etcd");
    Some(Etcd {
        child,
        endpoint: format!("127.0.0.1:{client}"),
        _dir: dir,
    })
}

/// A store on `etcd` under `prefix`; waits for etcd to answer (it just started).
async fn store(etcd: &Etcd, prefix: &str, require_fence: bool) -> EtcdStore {
    EtcdStore::connect(EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        prefix: prefix.into(),
        require_fence,
        connect_timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await
    .expect("connect to etcd")
}

fn restart(node: &str, old_pid: u32, at: u64) -> RestartRecord {
    RestartRecord {
        node_id: node.into(),
        at_unix_ms: at,
        kind: "restart".into(),
        outcome: "succeeded".into(),
        old_pid,
        new_pid: old_pid + 1,
        ..Default::default()
    }
}

fn node(id: &str, generation: u64) -> NodeRecord {
    serde_json::from_value(serde_json::json!({
        "node_id": id, "labels": {}, "state": "serving",
        "control_addr": "127.0.0.1:1", "admin_url": "",
        "exe": {"path": "/bin/app", "sha256": "", "size": 0},
        "generation": generation, "supervisor_pid": 10, "worker_pid": 11, "in_flight": 0,
        "last_heartbeat_unix_ms": 1, "started_at_unix_ms": 1, "reason": "",
        "static_node": false, "listeners": []
    }))
    .expect("a node record")
}

fn rollout(id: &str, seq: u64) -> Rollout {
    serde_json::from_value(serde_json::json!({
        "id": id, "seq": seq, "state": "running", "reason": "", "created_unix_ms": 1,
        "finished_unix_ms": 0, "batch_sizes": [1], "current_batch": 0, "undo_of": "",
        "requested": null,
        "spec": {
            "exe": "/opt/app/v2", "sha256": "", "selector": "", "batches": "1",
            "max_parallel": 0, "max_unavailable": "", "canary": 0,
            "pause_after_canary": false, "min_healthy_ms": 0, "ready_timeout_ms": 0,
            "drain_timeout_ms": 0, "health_path": "", "max_failures": "",
            "auto_rollback": false, "reason": "", "actor": "test"
        }
    }))
    .expect("a rollout")
}

/// The cluster's revision: one more per write transaction.
async fn revision(store: &EtcdStore) -> i64 {
    let resp = store
        .client()
        .kv_client()
        .get("/", Some(GetOptions::new().with_count_only()))
        .await
        .unwrap();
    resp.header().unwrap().revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_new_store_on_the_same_prefix_and_stay_apart_from_others() {
    let Some(etcd) = etcd("records_survive") else {
        return;
    };
    let store = store(&etcd, "/fleet/", false).await;
    store.put_node(&node("web-2", 1)).await.unwrap();
    store.put_node(&node("web-1", 7)).await.unwrap();
    store.put_node(&node("web-3", 1)).await.unwrap();
    store.delete_node("web-3").await.unwrap();
    let mut rollout = rollout("r10", 10);
    store.put_rollout(&rollout).await.unwrap();
    rollout = self::rollout("r9", 9);
    store.put_rollout(&rollout).await.unwrap();
    drop(store);

    let again = self::store(&etcd, "/fleet/", false).await;
    let nodes = again.load_nodes().unwrap();
    let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["web-1", "web-2"]);
    assert_eq!(nodes[0].generation, 7);
    // In order of seq, as SQLite gives them (r10 sorts before r9 as a key).
    let seqs: Vec<u64> = again
        .load_rollouts()
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [9, 10]);

    let other = self::store(&etcd, "/other/", false).await;
    assert!(other.load_nodes().unwrap().is_empty());
    assert!(other.load_rollouts().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_history_keeps_the_newest_per_node_and_a_drain_lands_once() {
    let Some(etcd) = etcd("restart_history") else {
        return;
    };
    let store = store(&etcd, "/fleet/", false).await;
    // Queued together: one commit, as a burst of heartbeats and answers would be.
    let acks: Vec<WriteAck> = (0..KEEP_PER_NODE + 7)
        .map(|i| store.put_restart(&restart("web-1", 100 + i as u32, i as u64)))
        .collect();
    for ack in acks {
        ack.await.unwrap();
    }
    store.put_restart(&restart("web-2", 5, 1)).await.unwrap();
    let web1 = store.load_restarts(Some("web-1"), 1000).unwrap();
    assert_eq!(web1.len(), KEEP_PER_NODE);
    assert_eq!(web1[0].at_unix_ms, KEEP_PER_NODE as u64 + 6);
    assert_eq!(web1.last().unwrap().at_unix_ms, 7);
    assert_eq!(store.load_restarts(None, 3).unwrap().len(), 3);
    assert_eq!(store.load_restarts(None, 3).unwrap()[0].node_id, "web-1");

    // Drain: the latest restart of that old pid, once; another node's untouched.
    store
        .put_restart(&restart("web-3", 42, 1_000))
        .await
        .unwrap();
    store
        .put_restart(&restart("web-3", 43, 1_001))
        .await
        .unwrap();
    store
        .put_restart(&restart("web-2", 42, 1_002))
        .await
        .unwrap();
    store.set_restart_drain("web-3", 42, 900).await.unwrap();
    store.set_restart_drain("web-3", 42, 5).await.unwrap();
    let web3 = store.load_restarts(Some("web-3"), 10).unwrap();
    assert_eq!((web3[0].old_pid, web3[0].drain_us), (43, 0));
    assert_eq!((web3[1].old_pid, web3[1].drain_us), (42, 900));
    assert_eq!(
        store.load_restarts(Some("web-2"), 10).unwrap()[0].drain_us,
        0
    );
    // The fleet's newest first, from the time index.
    let recent = store.load_restarts(None, 2).unwrap();
    assert_eq!(
        recent.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(),
        [1_002, 1_001]
    );

    // A new store (a restarted controller) learns the keys again and keeps pruning.
    drop(store);
    let store = self::store(&etcd, "/fleet/", false).await;
    store
        .put_restart(&restart("web-1", 9, 5_000))
        .await
        .unwrap();
    let web1 = store.load_restarts(Some("web-1"), 1000).unwrap();
    assert_eq!(web1.len(), KEEP_PER_NODE);
    assert_eq!(web1[0].at_unix_ms, 5_000);
    assert_eq!(web1.last().unwrap().at_unix_ms, 8);

    // Forgetting a node drops its history and its index entries.
    store.delete_node("web-3").await.unwrap();
    assert!(store.load_restarts(Some("web-3"), 10).unwrap().is_empty());
    assert!(
        store
            .load_restarts(None, 1000)
            .unwrap()
            .iter()
            .all(|r| r.node_id != "web-3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_last_use_never_goes_back_and_tokens_load_in_creation_order() {
    let Some(etcd) = etcd("token_last_use") else {
        return;
    };
    let store = store(&etcd, "/fleet/", false).await;
    let token = |id: &str| TokenRecord {
        id: id.into(),
        name: format!("{id}-name"),
        kind: crate::tokens::Kind::Viewer,
        hash: "00".into(),
        created_unix_ms: 1,
        created_by: "test".into(),
        expires_unix_ms: 0,
        revoked_unix_ms: 0,
        node_id_prefix: String::new(),
        max_uses: 0,
        uses: 0,
        last_used_unix_ms: 0,
    };
    // Created and used in one commit.
    let acks = [store.put_token(&token("zz")), store.touch_token("zz", 10)];
    for ack in acks {
        ack.await.unwrap();
    }
    store.put_token(&token("aa")).await.unwrap();
    store.touch_token("aa", 50).await.unwrap();
    store.touch_token("aa", 20).await.unwrap();
    // A touch of a token that does not exist writes nothing.
    store.touch_token("nope", 5).await.unwrap();
    // Replacing the record (a revocation) keeps the last use.
    let mut revoked = token("aa");
    revoked.revoked_unix_ms = 99;
    store.put_token(&revoked).await.unwrap();
    let tokens = store.load_tokens().unwrap();
    let got: Vec<(&str, u64, u64)> = tokens
        .iter()
        .map(|t| (t.id.as_str(), t.last_used_unix_ms, t.revoked_unix_ms))
        .collect();
    assert_eq!(got, [("zz", 10, 0), ("aa", 50, 99)]);
}

fn rollout_node(id: String) -> RolloutNode {
    RolloutNode {
        node_id: id,
        batch: 0,
        state: crate::rollout::NodeState::Restarting,
        reason: String::new(),
        target_exe: "/opt/app/v2".into(),
        target_sha256: String::new(),
        previous_exe: "/opt/app/v1".into(),
        previous_sha256: String::new(),
        previous_generation: 1,
        old_pid: 4242,
        new_pid: 0,
        new_generation: 0,
        timeline: vec![crate::rollout::TimelineEntry {
            unix_ms: 1,
            state: crate::rollout::NodeState::Restarting,
            message: "restarting".into(),
            pid: 4242,
        }],
    }
}

/// 10,000 nodes' transitions: as one call (a batch of a rollout) and as 10,000 calls
/// (heartbeats), against SQLite's store on this machine for scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_node_writes_are_a_few_transactions() {
    let Some(etcd) = etcd("ten_thousand") else {
        return;
    };
    let store = store(&etcd, "/fleet/", false).await;
    let nodes: Vec<RolloutNode> = (0..10_000)
        .map(|i| rollout_node(format!("node-{i:05}")))
        .collect();
    let before = revision(&store).await;
    let started = Instant::now();
    store.put_rollout_nodes("r1", &nodes).await.unwrap();
    let one_call = started.elapsed();
    // Every write transaction adds one revision: 10,000 / 128 is 79.
    let txns = revision(&store).await - before;
    assert_eq!(txns as usize, 10_000usize.div_ceil(MAX_TXN_OPS));
    assert_eq!(store.load_rollout_nodes("r1").unwrap().len(), 10_000);

    // Separate calls: each commit takes what queued while the last one ran.
    let before = revision(&store).await;
    let started = Instant::now();
    let acks: Vec<WriteAck> = (0..10_000)
        .map(|i| store.put_node(&node(&format!("node-{i:05}"), 1)))
        .collect();
    for ack in acks {
        ack.await.unwrap();
    }
    let calls = started.elapsed();
    let call_txns = revision(&store).await - before;
    assert!(
        call_txns < 1_000,
        "{call_txns} transactions for 10,000 puts"
    );
    assert_eq!(store.load_nodes().unwrap().len(), 10_000);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
    let started = Instant::now();
    sqlite.put_rollout_nodes("r1", &nodes).await.unwrap();
    let sqlite_one_call = started.elapsed();
    let started = Instant::now();
    let acks: Vec<WriteAck> = (0..10_000)
        .map(|i| sqlite.put_node(&node(&format!("node-{i:05}"), 1)))
        .collect();
    for ack in acks {
        ack.await.unwrap();
    }
    eprintln!(
        "10,000 rollout-node writes in one call: etcd {one_call:?} ({txns} transactions), \
         SQLite {sqlite_one_call:?}; 10,000 put_node calls: etcd {calls:?} ({call_txns} \
         transactions), SQLite {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_fence_required_a_write_lands_only_while_the_fence_holds() {
    let Some(etcd) = etcd("fence") else {
        return;
    };
    let store = store(&etcd, "/fleet/", true).await;
    // No leadership yet.
    let e = store.put_node(&node("web-1", 1)).await.unwrap_err();
    assert!(matches!(e, StoreError::NotLeader(_)), "{e}");
    assert!(e.to_string().contains("not the leader"), "{e}");
    assert!(matches!(
        store.check_fence().await,
        Err(StoreError::NotLeader(_))
    ));

    // The election's key, as a campaign would create it.
    let mut kv = store.client().kv_client();
    let created = kv.put("/election/fleet/1", "me", None).await.unwrap();
    let revision = created.header().unwrap().revision();
    store.set_fence(Some(Fence {
        key: "/election/fleet/1".into(),
        create_revision: revision,
    }));
    store.put_node(&node("web-1", 1)).await.unwrap();
    store.check_fence().await.unwrap();

    // Taken over: the key was deleted (its lease expired) and created again.
    kv.delete("/election/fleet/1", None).await.unwrap();
    kv.put("/election/fleet/1", "another", None).await.unwrap();
    let e = store.put_node(&node("web-1", 2)).await.unwrap_err();
    assert!(e.to_string().contains("nothing was written"), "{e}");
    assert!(matches!(
        store.check_fence().await,
        Err(StoreError::NotLeader(_))
    ));
    assert_eq!(store.load_nodes().unwrap()[0].generation, 1);

    // Without a required fence, writes do not look at one.
    let free = self::store(&etcd, "/fleet/", false).await;
    free.put_node(&node("web-1", 3)).await.unwrap();
    free.check_fence().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_does_not_answer_is_a_clear_error_within_the_timeout() {
    let port = free_port();
    let started = Instant::now();
    let e = EtcdStore::connect(EtcdOptions {
        endpoints: vec![format!("127.0.0.1:{port}")],
        connect_timeout: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = e.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(
        message.contains("no member answered within 800ms"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_etcd_checks_the_members_certificate_and_presents_the_controllers() {
    let files = tempfile::tempdir().unwrap();
    tls_files(files.path());
    let Some(etcd) = etcd_with("tls_to_etcd", Some(files.path())) else {
        return;
    };
    let options = |ca: &str, identity: bool, wait: u64| EtcdOptions {
        endpoints: vec![etcd.endpoint.clone()],
        tls: Some(EtcdTls {
            ca_cert: files.path().join(ca),
            identity: identity.then(|| {
                (
                    files.path().join("client.crt"),
                    files.path().join("client.key"),
                )
            }),
        }),
        connect_timeout: Duration::from_secs(wait),
        ..Default::default()
    };
    let store = EtcdStore::connect(options("ca.crt", true, 20))
        .await
        .unwrap();
    store.put_node(&node("web-1", 4)).await.unwrap();
    assert_eq!(store.load_nodes().unwrap()[0].generation, 4);

    // etcd asks for a client certificate; a server signed by another CA is refused.
    for (ca, identity) in [("ca.crt", false), ("other-ca.crt", true)] {
        let e = EtcdStore::connect(options(ca, identity, 1))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("no member answered within 1s"),
            "{e}"
        );
    }
    // A CA file that is not one: said at once.
    std::fs::write(files.path().join("bad.crt"), "not a certificate").unwrap();
    let e = EtcdStore::connect(options("bad.crt", true, 1))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the etcd CA certificate (--etcd-ca-cert)"),
        "{e}"
    );
}

#[test]
fn a_prefix_range_ends_after_every_key_under_it() {
    assert_eq!(prefix_end(b"/fleet/"), b"/fleet0");
    assert_eq!(prefix_end(b"a\xff"), b"b");
    assert_eq!(prefix_end(b"\xff"), b"\0");
}
