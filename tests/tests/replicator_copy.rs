//! The replicator copies the active peer's streams and consumer groups into the standby,
//! with the same ids, and only while the roles allow it.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use system_tests::replicator::{
    add_events, entries, groups, set_role, wait_groups_equal, wait_streams_equal, Pair, Replicator,
};
use system_tests::{eventually, wait_until};

const DEADLINE: Duration = Duration::from_secs(20);

async fn xreadgroup(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let v: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await
        .expect("XREADGROUP");
    let reply: redis::streams::StreamReadReply =
        redis::from_redis_value(v).expect("XREADGROUP reply");
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids.into_iter().map(|i| i.id))
        .collect()
}

async fn cmd(conn: &mut MultiplexedConnection, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[tokio::test]
async fn copies_entries_with_identical_ids_and_discovers_new_streams() {
    // Given an active peer with events and a standby
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    add_events(&mut peer, "tandem:events", 0, 250).await;

    // When the replicator runs
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then the standby holds the same entries with the same ids
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;

    // And entries written later follow, as does a stream that did not exist at start
    add_events(&mut peer, "tandem:events", 250, 50).await;
    add_events(&mut peer, "tandem:dlq", 0, 3).await;
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;
    wait_streams_equal(&peer, &local, "tandem:dlq", DEADLINE).await;

    // And the progress is checkpointed per stream
    let top: String = redis::cmd("HGET")
        .arg("tandem:replication:checkpoint")
        .arg("tandem:dlq")
        .query_async(&mut local)
        .await
        .unwrap();
    let peer_top = entries(&mut peer, "tandem:dlq")
        .await
        .last()
        .unwrap()
        .0
        .clone();
    assert_eq!(top, peer_top);

    // And the readiness and copy counters say so
    let ready = rep.ready().await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.json["copying"], true);
    assert!(
        ready.json["lag"]["tandem:events"]["events"].is_number(),
        "{}",
        ready.text
    );
    let copied = rep
        .metric("tandem_replicator_events_copied_total{stream=\"tandem:events\"}")
        .await;
    assert_eq!(copied, Some(300.0));
}

#[tokio::test]
async fn consumer_group_state_is_copied_and_acks_reach_the_standby() {
    // Given an active peer whose groups have positions and pending entries
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:events";
    add_events(&mut peer, s, 0, 40).await;
    cmd(&mut peer, &["XGROUP", "CREATE", s, "workflow", "0"]).await;
    cmd(
        &mut peer,
        &["XGROUP", "CREATE", s, "projector", "$", "ENTRIESREAD", "40"],
    )
    .await;
    let c1 = xreadgroup(&mut peer, s, "workflow", "node-a-1", 10).await;
    let c2 = xreadgroup(&mut peer, s, "workflow", "node-a-2", 5).await;
    cmd(&mut peer, &["XACK", s, "workflow", &c1[0], &c1[1], &c1[2]]).await;

    // When the replicator runs
    let _rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then last-delivered id, entries-read and the pending entries with their consumers match
    wait_groups_equal(&peer, &local, s, DEADLINE).await;
    let g = groups(&mut local, s).await;
    let workflow = g
        .iter()
        .find(|g| g.name == "workflow")
        .expect("workflow group copied");
    assert_eq!(workflow.last_delivered, c2[4]);
    assert_eq!(workflow.entries_read, Some(15));
    assert_eq!(workflow.pending.len(), 12);
    assert!(workflow
        .pending
        .iter()
        .any(|(id, c, _)| id == &c2[0] && c == "node-a-2"));
    let checkpoint: String = redis::cmd("HGET")
        .arg("tandem:replication:checkpoint")
        .arg("groups:tandem:events")
        .query_async(&mut local)
        .await
        .unwrap();
    let checkpoint: serde_json::Value = serde_json::from_str(&checkpoint).unwrap();
    assert_eq!(checkpoint["workflow"]["lastDeliveredId"], c2[4].as_str());

    // When the peer acknowledges, moves an entry to another consumer and reads on
    cmd(&mut peer, &["XACK", s, "workflow", &c1[3], &c2[1]]).await;
    cmd(
        &mut peer,
        &["XCLAIM", s, "workflow", "node-a-1", "0", &c2[0]],
    )
    .await;
    add_events(&mut peer, s, 40, 5).await;
    xreadgroup(&mut peer, s, "workflow", "node-a-2", 10).await;
    xreadgroup(&mut peer, s, "projector", "node-a-1", 100).await;
    cmd(&mut peer, &["XACK", s, "projector", &c1[0]]).await;

    // Then the standby follows: the acks left its pending list too
    wait_groups_equal(&peer, &local, s, DEADLINE).await;
    let g = groups(&mut local, s).await;
    let workflow = g.iter().find(|g| g.name == "workflow").unwrap();
    assert!(!workflow
        .pending
        .iter()
        .any(|(id, _, _)| id == &c1[3] || id == &c2[1]));

    // And a group destroyed on the peer disappears from the standby
    cmd(&mut peer, &["XGROUP", "DESTROY", s, "projector"]).await;
    wait_groups_equal(&peer, &local, s, DEADLINE).await;
}

#[tokio::test]
async fn stays_idle_while_the_roles_do_not_allow_copying() {
    // Given a peer with events, and a local region that is active itself
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    add_events(&mut peer, "tandem:events", 0, 20).await;
    set_role(&mut local, "active", 1).await;

    // When the replicator runs
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then it reports idle and copies nothing
    let http = rep.http();
    let idle = |reason_part: &'static str| {
        let http = http.clone();
        async move {
            wait_until(
                DEADLINE,
                "replicator idle",
                || {
                    let http = http.clone();
                    async move { http.get("/health/ready").await }
                },
                |r| {
                    r.status == 200
                        && r.json["state"] == "idle"
                        && r.json["reason"]
                            .as_str()
                            .is_some_and(|s| s.contains(reason_part))
                },
            )
            .await
        }
    };
    idle("local region is active").await;
    // (ten more decisions of the gate, each of which would have let a copy start)
    rep.wait_gate_rounds(10).await;
    assert_eq!(
        entries(&mut local, "tandem:events").await.len(),
        0,
        "copied while local is active"
    );

    // When the local region is standby but the peer is standby too (the peer first: for
    // a moment in between, a standby local and an active peer would rightly copy)
    set_role(&mut peer, "standby", 1).await;
    set_role(&mut local, "standby", 1).await;
    idle("peer region is not active").await;
    rep.wait_gate_rounds(10).await;
    assert_eq!(
        entries(&mut local, "tandem:events").await.len(),
        0,
        "copied from a standby peer"
    );

    // When the peer becomes active, copying starts: the gate was the only thing in the way
    set_role(&mut peer, "active", 1).await;
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;

    // And the roles themselves were never copied
    let r: Vec<String> = redis::cmd("HMGET")
        .arg("tandem:role")
        .arg("role")
        .arg("epoch")
        .query_async(&mut local)
        .await
        .unwrap();
    assert_eq!(r, vec!["standby".to_string(), "1".to_string()]);
}

#[tokio::test]
async fn copies_the_epoch_history() {
    // Given a peer that records where its epochs began
    let pair = Pair::start().await;
    let (mut peer, local) = (pair.peer_conn().await, pair.local_conn().await);
    let record =
        r#"{"region":"a","startOffsets":{"tandem:events":"0-0"},"at":"2026-11-21T00:00:00.000Z"}"#;
    cmd(&mut peer, &["HSET", "tandem:epochs", "1", record]).await;

    // When the replicator runs
    let _rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then the standby holds the same history
    eventually(DEADLINE, "tandem:epochs copied", || {
        let mut l = local.clone();
        async move {
            let v: Option<String> = redis::cmd("HGET")
                .arg("tandem:epochs")
                .arg("1")
                .query_async(&mut l)
                .await
                .unwrap();
            if v.as_deref() == Some(record) {
                Ok(())
            } else {
                Err(v)
            }
        }
    })
    .await;
}

#[tokio::test]
async fn metrics_expose_the_contract_names() {
    let pair = Pair::start().await;
    let mut peer = pair.peer_conn().await;
    add_events(&mut peer, "tandem:events", 0, 5).await;
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    let text = wait_until(
        DEADLINE,
        "events copied in metrics",
        || rep.metrics(),
        |t| t.contains("tandem_replicator_events_copied_total{stream=\"tandem:events\"} 5"),
    )
    .await;
    for name in [
        "tandem_replicator_events_copied_total",
        "tandem_replicator_lag_events",
        "tandem_replicator_lag_seconds",
        "tandem_replicator_group_syncs_total",
        "tandem_replicator_quarantined_events_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics:\n{text}"
        );
    }
    let live = rep.http().get("/health/live").await;
    assert_eq!(live.status, 200);
}

#[tokio::test]
async fn bad_configuration_exits_with_usage_naming_the_key() {
    let binary = system_tests::process::workspace_binary("replicator");
    let out = std::process::Command::new(binary)
        .env_clear()
        .env("REPLICATOR_LOCAL_REDIS_URL", "redis://127.0.0.1:1")
        .env("REPLICATOR_PEER_REGION", "a")
        .env("REPLICATOR_PEER_REDIS_URL", "redis://127.0.0.1:2")
        .output()
        .expect("run replicator");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REPLICATOR_LOCAL_REGION"), "{stderr}");
}

#[tokio::test]
async fn a_local_promotion_in_progress_stops_copying() {
    // Given a standby whose promotion to epoch 2 has recorded its intent
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    add_events(&mut peer, "tandem:events", 0, 10).await;
    record_intent(&mut local, 2).await;

    // When the replicator runs
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then it holds off: the new epoch's start offsets must not move under the node
    let http = rep.http();
    wait_until(
        DEADLINE,
        "idle during the promotion",
        || http.get("/health/ready"),
        |r| {
            r.json["state"] == "idle"
                && r.json["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("promotion"))
        },
    )
    .await;
    rep.wait_gate_rounds(5).await;
    assert_eq!(entries(&mut local, "tandem:events").await.len(), 0);

    // And when the peer turns out to be at that epoch already (the promotion lost), it copies
    set_role(&mut peer, "active", 2).await;
    set_role(&mut local, "standby", 2).await;
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;
}

#[tokio::test]
async fn a_group_position_at_an_entry_deleted_on_the_peer_is_still_copied() {
    // Given a peer group that delivered an entry which was deleted afterwards
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:dlq";
    let ids = add_events(&mut peer, s, 0, 5).await;
    cmd(&mut peer, &["XGROUP", "CREATE", s, "ops", "0"]).await;
    xreadgroup(&mut peer, s, "ops", "op-1", 10).await;
    cmd(&mut peer, &["XACK", s, "ops", &ids[4]]).await;
    cmd(&mut peer, &["XDEL", s, &ids[4]]).await;

    // When the replicator runs
    let _rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then the group is copied although its last-delivered entry never reaches the standby
    wait_groups_equal(&peer, &local, s, DEADLINE).await;
    assert_eq!(groups(&mut local, s).await[0].last_delivered, ids[4]);
    assert_eq!(groups(&mut local, s).await[0].pending.len(), 4);
}

#[tokio::test]
async fn a_batch_copied_after_a_local_promotion_began_is_refused_in_redis() {
    // Given a standby copying from its active peer, whose replicator reads the roles
    // only every 60 s: its gate says "copying" long after a promotion begins
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    add_events(&mut peer, "tandem:events", 0, 10).await;
    let rep = Replicator::start(
        &pair.local.url(),
        &pair.peer.url(),
        &[("REPLICATOR_POLL_INTERVAL_MS", "60000")],
    )
    .await;
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;

    // When a promotion of the local region records its intent and the peer writes more
    record_intent(&mut local, 2).await;
    add_events(&mut peer, "tandem:events", 10, 5).await;

    // Then the local Redis refuses the copy (the script checks the intent where it
    // appends), and not one of the new entries lands past the promotion's start
    let refused = "tandem_replicator_redis_errors_total{side=\"local\",task=\"copy\"}";
    eventually(DEADLINE, "the local Redis refused a copy", || async {
        match rep.metric(refused).await {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(entries(&mut local, "tandem:events").await.len(), 10);

    // And once the promotion is known to have lost (the peer is at its epoch), the copy
    // goes on
    set_role(&mut peer, "active", 2).await;
    set_role(&mut local, "standby", 2).await;
    wait_streams_equal(&peer, &local, "tandem:events", DEADLINE).await;
}

/// What a promotion of the local region (region b) to `epoch` records first.
async fn record_intent(local: &mut MultiplexedConnection, epoch: u64) {
    let epoch = epoch.to_string();
    cmd(
        local,
        &[
            "HSET",
            "tandem:promotion-intent",
            "epoch",
            &epoch,
            "region",
            "b",
        ],
    )
    .await;
}
