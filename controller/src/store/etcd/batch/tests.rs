use super::*;

fn restart(node: &str, at: u64, old_pid: u32) -> Write {
    let record = RestartRecord {
        node_id: node.into(),
        at_unix_ms: at,
        old_pid,
        kind: "restart".into(),
        ..Default::default()
    };
    Write::Restart {
        node: node.into(),
        at_unix_ms: at,
        old_pid,
        json: serde_json::to_string(&record).unwrap(),
    }
}

/// Plans `writes` as the writer does, with nothing stored before.
fn plan(known: &mut Known, writes: &[Write]) -> Plan {
    for node in known.unknown_nodes(writes) {
        known.learn_restarts(&node, []);
    }
    if known.needs_recent(writes) {
        known.learn_recent([]);
    }
    known.plan(writes)
}

fn keys(plan: Plan) -> Vec<String> {
    plan.into_txns(usize::MAX, usize::MAX)
        .concat()
        .iter()
        .map(|op| op.key().to_string())
        .collect()
}

fn drain_of(op: &Op) -> u64 {
    match op {
        Op::Put { value, .. } => {
            serde_json::from_slice::<RestartRecord>(value)
                .unwrap()
                .drain_us
        }
        other => panic!("not a put: {other:?}"),
    }
}

#[test]
fn keys_sort_in_time_order_and_name_their_pid() {
    let early = key::restart_suffix(999, 7, 0);
    let late = key::restart_suffix(1_000, 3, 0);
    assert!(early < late, "{early} < {late}");
    assert_eq!(early, "00000000000000000999-0000000007");
    assert_eq!(key::suffix_pid(&early), Some(7));
    assert_eq!(key::suffix_pid(&key::restart_suffix(1, 42, 2)), Some(42));
    assert_eq!(
        key::restart_time("web-1", &early),
        "restart_times/00000000000000000999/web-1/00000000000000000999-0000000007"
    );
    // A node id ending in `-1` cannot reach into `web-1`'s keys: the `/` ends it.
    assert!(!key::restart("web-10", &early).starts_with(&key::restarts("web-1")));
    assert!(key::padded(9) < key::padded(10));
}

#[test]
fn a_key_written_twice_in_a_batch_is_one_operation_with_the_last_value() {
    let mut known = Known::default();
    let writes = [
        Write::Node("web-1".into(), "a".into()),
        Write::Node("web-2".into(), "b".into()),
        Write::Node("web-1".into(), "c".into()),
    ];
    let txns = plan(&mut known, &writes).into_txns(MAX_TXN_OPS, MAX_TXN_BYTES);
    assert_eq!(
        txns,
        [vec![
            Op::Put {
                key: "nodes/web-1".into(),
                value: b"c".to_vec()
            },
            Op::Put {
                key: "nodes/web-2".into(),
                value: b"b".to_vec()
            },
        ]]
    );
}

#[test]
fn ten_thousand_transitions_are_a_few_transactions_within_etcds_limits() {
    let mut known = Known::default();
    let doc = "x".repeat(600);
    let writes: Vec<Write> = (0..10_000)
        .map(|i| Write::RolloutNode("r1".into(), format!("node-{i}"), doc.clone()))
        .collect();
    let txns = plan(&mut known, &writes).into_txns(MAX_TXN_OPS, MAX_TXN_BYTES);
    assert_eq!(txns.len(), 10_000usize.div_ceil(MAX_TXN_OPS));
    assert!(txns.iter().all(|t| t.len() <= MAX_TXN_OPS));
    assert_eq!(txns.iter().map(Vec::len).sum::<usize>(), 10_000);
    // Large values are cut by bytes instead: 100 KB each, 10 a transaction.
    let big = "y".repeat(100_000);
    let writes: Vec<Write> = (0..25)
        .map(|i| Write::Rollout(format!("r{i}"), big.clone()))
        .collect();
    let txns = plan(&mut known, &writes).into_txns(MAX_TXN_OPS, MAX_TXN_BYTES);
    assert_eq!(txns.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
}

#[test]
fn a_node_keeps_its_newest_restarts_and_the_time_index_follows() {
    let mut known = Known::default();
    let writes: Vec<Write> = (0..KEEP_PER_NODE as u64 + 5)
        .map(|at| restart("web-1", at, 100))
        .collect();
    let p = plan(&mut known, &writes);
    // Within one batch the five oldest are written and deleted: one operation each.
    let ops = p.into_txns(usize::MAX, usize::MAX).concat();
    let puts = ops.iter().filter(|o| matches!(o, Op::Put { .. })).count();
    let deletes: Vec<&str> = ops
        .iter()
        .filter(|o| matches!(o, Op::Delete { .. }))
        .map(Op::key)
        .collect();
    assert_eq!(puts, 2 * KEEP_PER_NODE);
    assert_eq!(deletes.len(), 2 * 5);
    assert!(deletes.contains(&key::restart("web-1", &key::restart_suffix(0, 100, 0)).as_str()));
    assert!(
        deletes.contains(&key::restart_time("web-1", &key::restart_suffix(4, 100, 0)).as_str())
    );

    // The next batch drops the oldest of what is stored.
    let ops = known
        .plan(&[restart("web-1", 1_000, 100)])
        .into_txns(usize::MAX, usize::MAX)
        .concat();
    let oldest = key::restart_suffix(5, 100, 0);
    assert!(ops.contains(&Op::Delete {
        key: key::restart("web-1", &oldest)
    }));
    assert!(ops.contains(&Op::Delete {
        key: key::restart_time("web-1", &oldest)
    }));
}

#[test]
fn the_time_index_keeps_the_fleets_newest() {
    let mut known = Known::default();
    let writes: Vec<Write> = (0..RECENT_KEEP as u64 + 3)
        .map(|i| restart(&format!("n{i}"), i, 1))
        .collect();
    let ops = plan(&mut known, &writes)
        .into_txns(usize::MAX, usize::MAX)
        .concat();
    let index: Vec<&Op> = ops
        .iter()
        .filter(|o| o.key().starts_with(key::RESTART_TIMES))
        .collect();
    assert_eq!(
        index.iter().filter(|o| matches!(o, Op::Put { .. })).count(),
        RECENT_KEEP
    );
    // The records themselves stay (each node keeps its own).
    assert_eq!(
        ops.iter()
            .filter(|o| o.key().starts_with("restarts/") && matches!(o, Op::Put { .. }))
            .count(),
        RECENT_KEEP + 3
    );
}

#[test]
fn a_second_restart_at_the_same_time_and_pid_gets_its_own_key() {
    let mut known = Known::default();
    let keys = keys(plan(
        &mut known,
        &[restart("web-1", 5, 0), restart("web-1", 5, 0)],
    ));
    assert!(keys.contains(&key::restart("web-1", &key::restart_suffix(5, 0, 0))));
    assert!(keys.contains(&key::restart("web-1", &key::restart_suffix(5, 0, 1))));
}

#[test]
fn forgetting_a_node_deletes_its_restarts_and_their_index_entries() {
    let mut known = Known::default();
    known.learn_restarts(
        "web-1",
        [key::restart_suffix(1, 10, 0), key::restart_suffix(2, 11, 0)],
    );
    known.learn_recent([key::restart_time("web-1", &key::restart_suffix(2, 11, 0))]);
    let writes = [
        Write::Node("web-1".into(), "{}".into()),
        Write::DeleteNode("web-1".into()),
    ];
    let ops = plan(&mut known, &writes)
        .into_txns(usize::MAX, usize::MAX)
        .concat();
    assert!(
        ops.iter().all(|o| matches!(o, Op::Delete { .. })),
        "{ops:?}"
    );
    assert_eq!(ops.len(), 1 + 2 * 2);
    assert!(known.recent.as_ref().unwrap().is_empty());
    // Its history starts again empty.
    assert!(known.unknown_nodes(&[restart("web-1", 3, 1)]).is_empty());
}

#[test]
fn a_drain_goes_to_the_latest_restart_of_that_pid_once() {
    let mut known = Known::default();
    known.learn_restarts(
        "web-1",
        [key::restart_suffix(1, 42, 0), key::restart_suffix(2, 43, 0)],
    );
    known.learn_recent([]);
    // Stored before this batch: the record must be read first.
    let mut p = known.plan(&[
        Write::RestartDrain("web-1".into(), 42, 900),
        Write::RestartDrain("web-1".into(), 42, 5),
        Write::RestartDrain("web-1".into(), 7, 1),
    ]);
    let stored = key::restart("web-1", &key::restart_suffix(1, 42, 0));
    assert_eq!(p.drains, [(stored.clone(), 900)]);
    let record = serde_json::to_vec(&RestartRecord {
        old_pid: 42,
        ..Default::default()
    })
    .unwrap();
    p.drain_read(&stored, Some(&record));
    let ops = p.into_txns(usize::MAX, usize::MAX).concat();
    assert_eq!(ops.len(), 1);
    assert_eq!(drain_of(&ops[0]), 900);

    // Written in the same batch: set on the pending record, without a read.
    let p = known.plan(&[
        restart("web-1", 3, 42),
        Write::RestartDrain("web-1".into(), 42, 700),
        Write::RestartDrain("web-1".into(), 42, 1),
    ]);
    assert!(p.drains.is_empty());
    let ops = p.into_txns(usize::MAX, usize::MAX).concat();
    let newest = key::restart("web-1", &key::restart_suffix(3, 42, 0));
    let op = ops.iter().find(|o| o.key() == newest).unwrap();
    assert_eq!(drain_of(op), 700);

    // A record that already has one keeps it.
    let mut p = known.plan(&[Write::RestartDrain("web-1".into(), 43, 5)]);
    let record = serde_json::to_vec(&RestartRecord {
        old_pid: 43,
        drain_us: 11,
        ..Default::default()
    })
    .unwrap();
    let k = p.drains[0].0.clone();
    p.drain_read(&k, Some(&record));
    assert!(p.is_empty());
}

#[test]
fn touches_keep_the_latest_and_need_the_token_unless_it_was_just_written() {
    let mut known = Known::default();
    let p = known.plan(&[
        Write::TouchToken("t1".into(), 50),
        Write::TouchToken("t1".into(), 20),
        Write::Token("t2".into(), "{}".into()),
        Write::TouchToken("t2".into(), 7),
    ]);
    let ops = p.into_txns(usize::MAX, usize::MAX).concat();
    assert_eq!(
        ops[0],
        Op::AtLeast {
            key: "token_last_used/t1".into(),
            value: key::padded(50),
            requires: Some("tokens/t1".into()),
        }
    );
    assert_eq!(
        ops[2],
        Op::AtLeast {
            key: "token_last_used/t2".into(),
            value: key::padded(7),
            requires: None,
        }
    );
}

#[test]
fn only_nodes_not_known_are_read() {
    let mut known = Known::default();
    known.learn_restarts("web-1", []);
    let writes = [
        restart("web-1", 1, 1),
        restart("web-2", 1, 1),
        Write::RestartDrain("web-3".into(), 1, 1),
        Write::RestartDrain("web-2".into(), 1, 1),
        Write::Node("web-4".into(), "{}".into()),
    ];
    assert_eq!(known.unknown_nodes(&writes), ["web-2", "web-3"]);
    assert!(known.needs_recent(&writes));
    known.forget();
    assert_eq!(known.unknown_nodes(&writes), ["web-1", "web-2", "web-3"]);
}
