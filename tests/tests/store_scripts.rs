//! The node's store scripts against a real Redis, through their typed requests: what a
//! commit writes is what a client reads back; a request that does not fit its script's
//! layout is refused with TANDEM_BAD_REQUEST before anything is written; the epoch,
//! fencing, pause and compare-and-set guards refuse and write nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use eventlog::keys;
use eventlog::roles::fields;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use regional_node::store::scripts::{self, BAD_REQUEST};
use regional_node::store::{
    Ack, AppliedEntry, ApplyRequest, CommitOutcome, CommitRequest, Counter, Expect, Guarded,
    NewEvent, ParkRequest, Store, StoreError, Write,
};
use system_tests::redis_server::RedisServer;
use system_tests::redis_state::{dump_all, stream_entries, Dumped};

const EPOCH: u64 = 3;
const ORDER: &str = "tandem:order:o-1";
const IDEM: &str = "tandem:idem:k-1";
const PRODUCT: &str = "tandem:product:p-1";
const STATS: &str = "tandem:stats:orders";

async fn setup() -> (RedisServer, Store, MultiplexedConnection) {
    let redis = RedisServer::start().await;
    let store = Store::connect(&redis.url(), None, Duration::from_secs(10)).expect("store");
    let mut conn = redis.client().await;
    set_role(&mut conn, &[(fields::ROLE, "active"), (fields::EPOCH, "3")]).await;
    let _: () = conn.set(ORDER, "old").await.unwrap();
    (redis, store, conn)
}

async fn set_role(conn: &mut MultiplexedConnection, values: &[(&str, &str)]) {
    let _: () = conn.hset_multiple(keys::ROLE, values).await.unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const JSON_1: &str = r#"{"eventId":"e-1","eventType":"OrderPlaced","aggregateId":"o-1"}"#;
const JSON_2: &str = r#"{"eventId":"e-2","eventType":"StockReserved","aggregateId":"o-1"}"#;

/// A decision that read the order ("old") and an absent idempotency key, writes both
/// and a product it did not read, appends two events and counts one order.
fn request(epoch: u64, ack: Option<Ack<'_>>) -> CommitRequest<'_> {
    CommitRequest {
        epoch,
        guarded: vec![
            Guarded {
                key: ORDER,
                expect: Expect::Value("old"),
                write: Some("new"),
            },
            Guarded {
                key: IDEM,
                expect: Expect::Absent,
                write: Some("o-1"),
            },
            Guarded {
                key: PRODUCT,
                expect: Expect::Nothing,
                write: Some("p"),
            },
        ],
        events: vec![
            NewEvent {
                event_id: "e-1",
                aggregate_id: "o-1",
                event_type: "OrderPlaced".into(),
                json: JSON_1.into(),
            },
            NewEvent {
                event_id: "e-2",
                aggregate_id: "o-1",
                event_type: "StockReserved".into(),
                json: JSON_2.into(),
            },
        ],
        counters: vec![Counter {
            key: STATS,
            field: "placed",
            delta: 1,
        }],
        ack,
    }
}

#[tokio::test]
async fn a_typed_commit_writes_what_a_client_reads_back() {
    // Given an active region at epoch 3 and an entry pending in group g.
    let (_redis, store, mut conn) = setup().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys::EVENTS)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let consumed: String = conn
        .xadd(keys::EVENTS, "*", &[("type", "Earlier")])
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("STREAMS")
        .arg(keys::EVENTS)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    // When a typed commit acknowledges it.
    let ack = Ack {
        group: "g",
        entry_id: &consumed,
    };
    let outcome = store.commit_request(&request(EPOCH, Some(ack))).await;

    // Then everything it carried is there.
    assert_eq!(outcome.unwrap(), CommitOutcome::Committed);
    let values: Vec<Option<String>> = conn.mget(&[ORDER, IDEM, PRODUCT]).await.unwrap();
    assert_eq!(
        values,
        [Some("new".into()), Some("o-1".into()), Some("p".into())]
    );
    let entries = stream_entries(&mut conn, keys::EVENTS).await;
    assert_eq!(entries.len(), 3, "{entries:?}");
    let appended: Vec<(String, Vec<(String, Vec<u8>)>)> = entries[1..].to_vec();
    assert_eq!(
        appended[0].1,
        [
            ("type".to_string(), b"OrderPlaced".to_vec()),
            ("event".to_string(), JSON_1.as_bytes().to_vec())
        ]
    );
    assert_eq!(
        appended[1].1,
        [
            ("type".to_string(), b"StockReserved".to_vec()),
            ("event".to_string(), JSON_2.as_bytes().to_vec())
        ]
    );
    let ids: Vec<String> = appended.iter().map(|(id, _)| id.clone()).collect();
    let index: BTreeMap<String, String> = conn.hgetall(keys::EVENT_INDEX).await.unwrap();
    assert_eq!(
        index,
        BTreeMap::from([
            ("e-1".into(), ids[0].clone()),
            ("e-2".into(), ids[1].clone())
        ])
    );
    let aggregate: Vec<String> = conn.lrange(keys::aggregate("o-1"), 0, -1).await.unwrap();
    assert_eq!(aggregate, ids);
    let placed: i64 = conn.hget(STATS, "placed").await.unwrap();
    assert_eq!(placed, 1);
    let cursor: String = conn.get(keys::PROJECTION_CURSOR).await.unwrap();
    assert_eq!(cursor, ids[1]);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(keys::EVENTS)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("XPENDING answered {pending:?}")
    };
    assert_eq!(
        summary[0],
        redis::Value::Int(0),
        "the consumed entry is acked"
    );
}

/// Runs `encoded` and expects a refusal naming `script` that left Redis untouched.
async fn assert_refused(
    store: &Store,
    conn: &mut MultiplexedConnection,
    encoded: scripts::Encoded<'_>,
    script: &str,
    why: &str,
) {
    let before: BTreeMap<String, Dumped> = dump_all(conn).await;
    match store.eval(&encoded).await {
        Err(StoreError::BadRequest(msg)) => {
            assert!(msg.starts_with(script), "{why}: {msg}");
        }
        other => panic!("{why}: expected a bad request, got {other:?}"),
    }
    let after = dump_all(conn).await;
    assert_eq!(before, after, "{why}: nothing may be written");
}

#[tokio::test]
async fn a_malformed_request_is_refused_and_writes_nothing() {
    // Given an active region where the well-formed request would commit.
    let (_redis, store, mut conn) = setup().await;
    let good = request(EPOCH, None).encode();

    // When a count says more events than the request carries.
    let mut more = good.clone();
    more.args[2] = "3".into();
    assert_refused(&store, &mut conn, more, "commit", "n_events too high").await;

    // When an argument is missing at the end.
    let mut short = good.clone();
    short.args.pop();
    assert_refused(&store, &mut conn, short, "commit", "one ARGV short").await;

    // When a key is missing.
    let mut no_key = good.clone();
    no_key.keys.pop();
    assert_refused(&store, &mut conn, no_key, "commit", "one KEY short").await;

    // When a count is not a number.
    let mut nan = good.clone();
    nan.args[1] = "three".into();
    assert_refused(&store, &mut conn, nan, "commit", "n_guarded not a count").await;

    // When a guarded key has a mode the script does not know (the last one, so the
    // first two guards pass).
    let mut mode = good.clone();
    let third_mode = 6 + 2 * 4; // ARGV[15], 0-based: six header arguments, stride 4
    assert_eq!(mode.args[third_mode], "n");
    mode.args[third_mode] = "x".into();
    assert_refused(&store, &mut conn, mode, "commit", "unknown mode").await;

    // When a park's field count is off.
    let dead = [("group", "g"), ("reason", "r")];
    let mut park = ParkRequest {
        epoch: EPOCH,
        group: "g",
        entry_id: "1-0",
        fields: &dead,
    }
    .encode();
    park.args[3] = "1".into();
    assert_refused(&store, &mut conn, park, "park", "n_fields too low").await;

    // When an apply carries no entries, or its entry count is off.
    let empty = ApplyRequest::default().encode();
    assert_refused(&store, &mut conn, empty, "apply", "no entries").await;
    let mut apply = ApplyRequest {
        expected_cursor: None,
        entries: vec![AppliedEntry {
            entry_id: "1-0",
            event_id: "e-1",
            aggregate_id: "o-1",
        }],
        writes: vec![],
        counters: vec![],
    }
    .encode();
    apply.args[1] = "2".into();
    assert_refused(&store, &mut conn, apply, "apply", "n_entries too high").await;

    // Then the raw reply a client sees is an error with code TANDEM_BAD_REQUEST.
    let mut wrong = good.clone();
    wrong.args[3] = "5".into();
    let raw: redis::RedisResult<redis::Value> = redis::cmd("EVAL")
        .arg(scripts::COMMIT_SOURCE.as_str())
        .arg(wrong.keys.len())
        .arg(wrong.keys.iter().map(|k| k.as_ref()).collect::<Vec<&str>>())
        .arg(wrong.args.iter().map(|a| a.as_ref()).collect::<Vec<&str>>())
        .query_async(&mut conn)
        .await;
    let err = raw.expect_err("a malformed commit is an error reply");
    assert_eq!(err.code(), Some(BAD_REQUEST), "{err}");

    // And the well-formed request still commits.
    let outcome = store.eval(&good).await.map(|_| ());
    assert!(outcome.is_ok(), "{outcome:?}");
    let order: String = conn.get(ORDER).await.unwrap();
    assert_eq!(order, "new");
}

/// Commits `req` and expects `expected`, with Redis untouched.
async fn assert_guarded(
    store: &Store,
    conn: &mut MultiplexedConnection,
    req: &CommitRequest<'_>,
    expected: CommitOutcome,
) {
    let before = dump_all(conn).await;
    let outcome = store.commit_request(req).await.expect("an outcome");
    assert_eq!(outcome, expected);
    assert_eq!(
        before,
        dump_all(conn).await,
        "{expected:?}: nothing written"
    );
}

#[tokio::test]
async fn the_guards_refuse_a_commit_and_write_nothing() {
    let (_redis, store, mut conn) = setup().await;

    // An older epoch.
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH - 1, None),
        CommitOutcome::NotActive {
            role: "active".into(),
            epoch: "3".into(),
        },
    )
    .await;

    // A changed value, then a key that appeared since it was read as absent.
    let _: () = conn.set(ORDER, "changed").await.unwrap();
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH, None),
        CommitOutcome::Conflict(ORDER.into()),
    )
    .await;
    let _: () = conn.set(ORDER, "old").await.unwrap();
    let _: () = conn.set(IDEM, "other").await.unwrap();
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH, None),
        CommitOutcome::Conflict(IDEM.into()),
    )
    .await;
    let _: () = conn.del(IDEM).await.unwrap();

    // Paused by a rebuild.
    let later = (now_ms() + 600_000).to_string();
    set_role(&mut conn, &[(fields::PAUSED, later.as_str())]).await;
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH, None),
        CommitOutcome::Paused,
    )
    .await;
    let _: () = conn.hdel(keys::ROLE, fields::PAUSED).await.unwrap();

    // Fenced: a lease is enforced and its write window has ended.
    let earlier = (now_ms() - 1_000).to_string();
    set_role(
        &mut conn,
        &[
            (fields::FENCING, "1"),
            (fields::WRITE_UNTIL, earlier.as_str()),
        ],
    )
    .await;
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH, None),
        CommitOutcome::Fenced,
    )
    .await;

    // A park is guarded the same way.
    let dead = [("group", "g"), ("reason", "r")];
    let park = ParkRequest {
        epoch: EPOCH,
        group: "g",
        entry_id: "1-0",
        fields: &dead,
    };
    let before = dump_all(&mut conn).await;
    let outcome = store
        .park(park.epoch, park.group, park.entry_id, park.fields)
        .await;
    assert_eq!(outcome.unwrap(), CommitOutcome::Fenced);
    assert_eq!(
        before,
        dump_all(&mut conn).await,
        "a fenced park writes nothing"
    );

    // Demoted.
    set_role(&mut conn, &[(fields::ROLE, "standby")]).await;
    let _: () = conn.hdel(keys::ROLE, fields::FENCING).await.unwrap();
    assert_guarded(
        &store,
        &mut conn,
        &request(EPOCH, None),
        CommitOutcome::NotActive {
            role: "standby".into(),
            epoch: "3".into(),
        },
    )
    .await;

    // Active again, inside its write window: the same request commits.
    let window = (now_ms() + 600_000).to_string();
    set_role(
        &mut conn,
        &[
            (fields::ROLE, "active"),
            (fields::FENCING, "1"),
            (fields::WRITE_UNTIL, window.as_str()),
        ],
    )
    .await;
    let outcome = store.commit_request(&request(EPOCH, None)).await;
    assert_eq!(outcome.unwrap(), CommitOutcome::Committed);
    let idem: String = conn.get(IDEM).await.unwrap();
    assert_eq!(idem, "o-1");
}

#[tokio::test]
async fn park_and_apply_through_their_typed_requests() {
    let (_redis, store, mut conn) = setup().await;

    // A park adds the dead letter with its fields, in order.
    let dead = [("group", "inventory"), ("entry", "1-0"), ("reason", "boom")];
    let outcome = store.park(EPOCH, "inventory", "1-0", &dead).await;
    assert_eq!(outcome.unwrap(), CommitOutcome::Committed);
    let letters = stream_entries(&mut conn, keys::DLQ).await;
    assert_eq!(letters.len(), 1);
    let fields: Vec<(String, String)> = letters[0]
        .1
        .iter()
        .map(|(f, v)| (f.clone(), String::from_utf8(v.clone()).unwrap()))
        .collect();
    let expected: Vec<(String, String)> = dead
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
    assert_eq!(fields, expected);

    // An apply from no cursor writes, indexes and moves the cursor.
    let req = ApplyRequest {
        expected_cursor: None,
        entries: vec![
            AppliedEntry {
                entry_id: "5-0",
                event_id: "e-5",
                aggregate_id: "o-1",
            },
            AppliedEntry {
                entry_id: "6-0",
                event_id: "e-6",
                aggregate_id: "o-2",
            },
        ],
        writes: vec![Write {
            key: ORDER,
            value: "applied",
        }],
        counters: vec![Counter {
            key: STATS,
            field: "placed",
            delta: 2,
        }],
    };
    assert!(store.apply_request(&req).await.unwrap());
    let cursor: String = conn.get(keys::PROJECTION_CURSOR).await.unwrap();
    assert_eq!(cursor, "6-0");
    let order: String = conn.get(ORDER).await.unwrap();
    assert_eq!(order, "applied");
    let e6: String = conn.hget(keys::EVENT_INDEX, "e-6").await.unwrap();
    assert_eq!(e6, "6-0");
    let o2: Vec<String> = conn.lrange(keys::aggregate("o-2"), 0, -1).await.unwrap();
    assert_eq!(o2, ["6-0"]);
    let placed: i64 = conn.hget(STATS, "placed").await.unwrap();
    assert_eq!(placed, 2);

    // The same step again finds the cursor moved and writes nothing.
    let before = dump_all(&mut conn).await;
    assert!(!store.apply_request(&req).await.unwrap());
    assert_eq!(before, dump_all(&mut conn).await);
}
