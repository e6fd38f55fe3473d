//! Failback: a region that was active and missed a failover rejoins as standby. What it
//! wrote past the new epoch's start, and the new active never received, is moved to
//! `tandem:quarantine`; its streams then equal the new active's.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use system_tests::eventually;
use system_tests::redis_state::StreamEntry;
use system_tests::replicator::{
    add_events, entries, envelope, role, set_role, wait_streams_equal, xlen, Pair, Replicator,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Copies entries verbatim (same ids), as replication did before the failover.
async fn copy_entries(
    from: &mut MultiplexedConnection,
    to: &mut MultiplexedConnection,
    stream: &str,
    ids: &[String],
) {
    let all = entries(from, stream).await;
    for (id, fields) in all.into_iter().filter(|(id, _)| ids.contains(id)) {
        let mut c = redis::cmd("XADD");
        c.arg(stream).arg(&id);
        for (k, v) in fields {
            c.arg(k).arg(v);
        }
        let _: String = c.query_async(to).await.unwrap();
    }
}

/// The regions before the failover: b (local) active at epoch 1, a (peer) its
/// standby; with a connection to a and one to b.
async fn b_active_a_standby() -> (Pair, MultiplexedConnection, MultiplexedConnection) {
    let pair = Pair::start().await;
    let (mut a, mut b) = (pair.peer_conn().await, pair.local_conn().await);
    set_role(&mut b, "active", 1).await;
    set_role(&mut a, "standby", 1).await;
    (pair, a, b)
}

/// `count` events written in b and copied verbatim to a: the history both regions
/// share before the failover. Returns their ids.
async fn common_history(
    b: &mut MultiplexedConnection,
    a: &mut MultiplexedConnection,
    count: u64,
) -> Vec<String> {
    let common = add_events(b, "tandem:events", 0, count).await;
    copy_entries(b, a, "tandem:events", &common).await;
    common
}

/// Promotes the region behind `conn` (a, the peer) to `epoch`, with the epoch's record
/// naming `start` as where tandem:events stood, as a promotion writes it.
async fn promote_at(conn: &mut MultiplexedConnection, epoch: u64, start: &str) {
    set_role(conn, "active", epoch).await;
    let record = format!(
        r#"{{"region":"a","startOffsets":{{"tandem:events":"{start}"}},"at":"2026-11-30T00:00:00.000Z"}}"#
    );
    let _: i64 = redis::cmd("HSET")
        .arg("tandem:epochs")
        .arg(epoch.to_string())
        .arg(&record)
        .query_async(conn)
        .await
        .unwrap();
}

/// One field of a quarantined (or copied) entry, as text.
fn field(fields: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// The `originalId` of each quarantined entry, in the quarantine's order.
fn original_ids(quarantine: &[StreamEntry]) -> Vec<String> {
    quarantine
        .iter()
        .map(|(_, f)| field(f, "originalId").expect("originalId"))
        .collect()
}

/// Waits until region b's role record says `role` at `epoch`.
async fn wait_role(b: &MultiplexedConnection, role_now: &str, epoch: u64) {
    eventually(DEADLINE, &format!("b {role_now}@{epoch}"), || {
        let mut b = b.clone();
        async move {
            let r = role(&mut b).await;
            if r.0 == role_now && r.1 == epoch {
                Ok(())
            } else {
                Err(r)
            }
        }
    })
    .await;
}

/// Waits until b's tandem:events equals a's and b's `(role, epoch)` passes `role_ok`.
async fn wait_follows(
    a: &MultiplexedConnection,
    b: &MultiplexedConnection,
    role_ok: impl Fn((String, u64)) -> bool,
) {
    let s = "tandem:events";
    eventually(DEADLINE, "b follows a", || {
        let (mut a, mut b) = (a.clone(), b.clone());
        let role_ok = &role_ok;
        async move {
            let (x, y) = (entries(&mut a, s).await, entries(&mut b, s).await);
            if x == y && role_ok(role(&mut b).await) {
                Ok(())
            } else {
                Err((x.len(), y.len()))
            }
        }
    })
    .await;
}

/// A failover after a shared history of `count` events: b was active at epoch 1, and a
/// was promoted to epoch 2 starting at that history's end. b has not noticed yet.
async fn failed_over_after(count: u64) -> (Pair, MultiplexedConnection, MultiplexedConnection) {
    let (pair, mut a, mut b) = b_active_a_standby().await;
    let common = common_history(&mut b, &mut a, count).await;
    promote_at(&mut a, 2, common.last().expect("a common history")).await;
    (pair, a, b)
}

#[tokio::test]
async fn rejoin_quarantines_the_divergent_tail_and_follows_the_new_active() {
    // Given a common history that reached a before the failover, and a failover: a is
    // promoted to epoch 2, starting at the common history's end
    let (pair, mut a, mut b) = failed_over_after(20).await;
    let s = "tandem:events";
    // One of b's late writes reached a after the cut (same id and fields on both) ...
    let late = add_events(&mut b, s, 20, 1).await;
    copy_entries(&mut b, &mut a, s, &late).await;
    // ... then a writes in epoch 2 ...
    let newer = add_events(&mut a, s, 1000, 5).await;
    // ... and b, cut off, kept writing in epoch 1: ids above a's newer entries.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let divergent = add_events(&mut b, s, 2000, 7).await;

    // When b's replicator sees a active at the higher epoch
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then b becomes standby at epoch 2
    wait_role(&b, "standby", 2).await;

    // And b's stream equals a's: the new active's entries copied in, the divergent tail gone
    wait_streams_equal(&a, &b, s, DEADLINE).await;
    let ids: Vec<String> = entries(&mut b, s)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(newer.iter().all(|id| ids.contains(id)));
    assert!(late.iter().all(|id| ids.contains(id)));
    assert!(divergent.iter().all(|id| !ids.contains(id)));

    // And the quarantine holds exactly the divergent entries, with their origin
    let q = entries(&mut b, "tandem:quarantine").await;
    let original = original_ids(&q);
    assert_eq!(original, divergent);
    for (i, (_, fields)) in q.iter().enumerate() {
        let get = |k: &str| field(fields, k);
        assert_eq!(get("stream").as_deref(), Some(s));
        assert_eq!(get("epoch").as_deref(), Some("1"));
        assert_eq!(get("type").as_deref(), Some("OrderPlaced"));
        assert_eq!(
            get("event"),
            Some(envelope("OrderPlaced", 2000 + i as u64)),
            "fields kept as written"
        );
    }

    // And the quarantine is counted and never copied to a
    let n = rep
        .metric("tandem_replicator_quarantined_events_total")
        .await;
    assert_eq!(n, Some(7.0));
    assert!(entries(&mut a, "tandem:quarantine").await.is_empty());

    // And later writes on a keep flowing
    let more = add_events(&mut a, s, 3000, 3).await;
    eventually(DEADLINE, "new entries after rejoin copied", || {
        let mut b = b.clone();
        let last = more.last().unwrap().clone();
        async move {
            let e = entries(&mut b, s).await;
            if e.last().map(|(id, _)| id == &last).unwrap_or(false) {
                Ok(())
            } else {
                Err(e.len())
            }
        }
    })
    .await;
}

#[tokio::test]
async fn rejoin_without_an_epoch_record_keeps_the_common_history() {
    let pair = Pair::start().await;
    let (mut a, mut b) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:events";
    // Given b (standby at epoch 1) sharing a history with a, plus entries a never had
    set_role(&mut b, "standby", 1).await;
    common_history(&mut b, &mut a, 30).await;
    let newer = add_events(&mut a, s, 100, 4).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let divergent = add_events(&mut b, s, 200, 2).await;
    // And a active at epoch 2 with no record of where epoch 2 began
    set_role(&mut a, "active", 2).await;

    // When b's replicator runs
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then only the entries a lacks are quarantined, and b follows a
    wait_follows(&a, &b, |(role, epoch)| role == "standby" && epoch == 2).await;
    let q = entries(&mut b, "tandem:quarantine").await;
    let original = original_ids(&q);
    assert_eq!(original, divergent);
    assert!(newer.iter().all(|id| !entries_contains(&q, id)));
    assert_eq!(
        rep.metric("tandem_replicator_quarantined_events_total")
            .await,
        Some(2.0)
    );
    // The common history was never rewritten: nothing of it was copied again.
    let copied = rep
        .metric("tandem_replicator_events_copied_total{stream=\"tandem:events\"}")
        .await;
    assert_eq!(copied, Some(newer.len() as f64));
}

fn entries_contains(q: &[StreamEntry], id: &str) -> bool {
    q.iter().any(|(_, f)| {
        f.iter()
            .any(|(k, v)| k == "originalId" && v == id.as_bytes())
    })
}

#[tokio::test]
async fn an_entry_with_the_same_id_but_other_fields_is_quarantined() {
    let (pair, mut a, mut b) = failed_over_after(5).await;
    let s = "tandem:events";

    // Given both regions wrote an entry with the same id, but different events
    let theirs = add_events(&mut a, s, 100, 1).await;
    let clash = theirs[0].clone();
    let _: String = redis::cmd("XADD")
        .arg(s)
        .arg(&clash)
        .arg("type")
        .arg("OrderCancelled")
        .arg("event")
        .arg(envelope("OrderCancelled", 999))
        .query_async(&mut b)
        .await
        .unwrap();

    // When b rejoins
    let _rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;

    // Then b's own version is quarantined and a's version takes its place
    wait_follows(&a, &b, |(_, epoch)| epoch == 2).await;
    let q = entries(&mut b, "tandem:quarantine").await;
    assert_eq!(q.len(), 1);
    let get = |k: &str| field(&q[0].1, k);
    assert_eq!(get("originalId"), Some(clash));
    assert_eq!(get("type").as_deref(), Some("OrderCancelled"));
}

/// Chaos seed 6007 (async durability): region b handled a kept entry (a payment) and
/// acknowledged it in the same step that appended its outcome (the shipment), which a
/// never received. On rejoin that outcome is quarantined; if b's consumer group still
/// counted the payment as handled, and b were promoted before the next group sync, the
/// order would stay PAID forever. The rejoin sets the group back before that entry.
#[tokio::test]
async fn rejoin_delivers_again_an_entry_whose_outcome_was_quarantined() {
    let (pair, mut a, mut b) = b_active_a_standby().await;
    let s = "tandem:events";

    // Given a common history on both regions, indexed by event id on b as its node does
    let common = common_history(&mut b, &mut a, 20).await;
    for (n, id) in common.iter().enumerate() {
        let _: i64 = redis::cmd("HSET")
            .arg("tandem:eventidx")
            .arg(format!("00000000-0000-4000-8000-{n:012}"))
            .arg(id)
            .query_async(&mut b)
            .await
            .unwrap();
    }
    let start = common.last().unwrap().clone();
    // And the shipments group past all of it on both regions (both handled entry 10)
    for conn in [&mut a, &mut b] {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s)
            .arg("shipments")
            .arg(&start)
            .query_async(conn)
            .await
            .unwrap();
    }

    // And a failover: a is promoted to epoch 2, starting at the common history's end
    promote_at(&mut a, 2, &start).await;
    // And b's outcome of entry 10 (and of nothing older), written in epoch 1, never
    // reached a
    let mut outcome: serde_json::Value =
        serde_json::from_str(&envelope("ShipmentDispatched", 5000)).unwrap();
    outcome["causationId"] = "00000000-0000-4000-8000-000000000010".into();
    let _: String = redis::cmd("XADD")
        .arg(s)
        .arg("*")
        .arg("type")
        .arg("ShipmentDispatched")
        .arg("event")
        .arg(outcome.to_string())
        .query_async(&mut b)
        .await
        .unwrap();

    // When b's replicator rejoins it to a
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    wait_role(&b, "standby", 2).await;

    // Then the outcome is quarantined, and the rejoin reports b's shipments group set
    // back to just before entry 10, so that a promotion of b handles it again (later
    // group syncs take a's position once a's own outcome is copied)
    assert_eq!(xlen(&mut b, "tandem:quarantine").await, 1);
    let (ms, seq) = common[10].split_once('-').unwrap();
    let before = match seq.parse::<u64>().unwrap() {
        0 => format!("{}-{}", ms.parse::<u64>().unwrap() - 1, u64::MAX),
        n => format!("{ms}-{}", n - 1),
    };
    let line = eventually(
        DEADLINE,
        "the rejoin's report of the shipments group",
        || {
            let log = rep.log_tail(400);
            async move {
                log.lines()
                    .find(|l| l.contains("consumer group set back") && l.contains("shipments"))
                    .map(str::to_string)
                    .ok_or(log)
            }
        },
    )
    .await;
    assert!(
        line.contains(&before),
        "shipments group not set back to {before} (before entry 10, {}): {line}",
        common[10]
    );
}

/// compose_stack, pause fault: the gateway promoted region b (its peer hung) while b's
/// replicator was rejoining it to the peer's older epoch, decided from role records
/// read a moment before. The rejoin went on: it moved b's first writes as active to
/// the quarantine and set b back to standby at the peer's epoch. Every step of a
/// rejoin now refuses once the local role record is not the one it began at.
#[tokio::test]
async fn a_promotion_during_a_rejoin_stops_it() {
    // Given b active at epoch 1 with a long tail a never received, and a active at 2
    let (pair, _, mut b) = failed_over_after(10).await;
    let s = "tandem:events";
    const TAIL: u64 = 40_000;
    add_events(&mut b, s, 1000, TAIL).await;

    // When b's replicator begins to rejoin b to a's epoch 2, and b is promoted to epoch
    // 3 meanwhile (its promotion's intent first, then its role)
    let rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    eventually(DEADLINE, "the rejoin has begun moving b's tail", || {
        let mut b = b.clone();
        async move {
            match xlen(&mut b, "tandem:quarantine").await {
                0 => Err(0),
                n => Ok(n),
            }
        }
    })
    .await;
    let _: i64 = redis::cmd("HSET")
        .arg("tandem:promotion-intent")
        .arg("epoch")
        .arg(3)
        .query_async(&mut b)
        .await
        .unwrap();
    set_role(&mut b, "active", 3).await;

    // Then the rejoin stops, saying why, and b stays active at epoch 3 with the rest of
    // its tail in place
    eventually(DEADLINE, "the rejoin refused to go on", || {
        let log = rep.log_tail(200);
        async move {
            if log.contains("TANDEM_ROLE_CHANGED") {
                Ok(())
            } else {
                Err(log)
            }
        }
    })
    .await;
    assert_eq!(role(&mut b).await, ("active".to_string(), 3));
    let moved = xlen(&mut b, "tandem:quarantine").await;
    assert!(
        moved < TAIL,
        "the whole tail ({moved} entries) was quarantined after b's promotion"
    );
    assert_eq!(xlen(&mut b, s).await, 10 + TAIL - moved);
}
