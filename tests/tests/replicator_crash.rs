//! A replicator SIGKILLed in the middle of a large copy resumes with no gap and no
//! duplicate: the local stream's last id is the resume point.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use system_tests::eventually;
use system_tests::replicator::{add_events, entries, wait_groups_equal, xlen, Pair, Replicator};

const EVENTS: u64 = 100_000;

/// Delivers the next `count` entries of tandem:events to `consumer` of the workflow
/// group, which leaves them pending until acknowledged.
async fn deliver_to(conn: &mut MultiplexedConnection, consumer: &str, count: usize) {
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workflow")
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg("tandem:events")
        .arg(">")
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn sigkill_during_copy_resumes_without_gap_or_duplicate() {
    // Given an active peer holding 100,000 events and consumer groups mid-way
    let pair = Pair::start().await;
    let (mut peer, mut local) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:events";
    add_events(&mut peer, s, 0, EVENTS).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(s)
        .arg("workflow")
        .arg("0")
        .query_async(&mut peer)
        .await
        .unwrap();
    for _ in 0..12 {
        // In chunks: one reply of 60,000 entries would exceed the client's response timeout.
        deliver_to(&mut peer, "node-a-1", 5_000).await;
    }
    deliver_to(&mut peer, "node-a-2", 50).await;
    // Acknowledge all but a scattering of the first consumer's entries.
    let pending: Vec<String> = entries(&mut peer, s)
        .await
        .into_iter()
        .take(60_000)
        .map(|(id, _)| id)
        .collect();
    for chunk in pending.chunks(1000) {
        let mut c = redis::cmd("XACK");
        c.arg(s).arg("workflow");
        for id in chunk.iter().filter(|id| !id.ends_with('7')) {
            c.arg(id);
        }
        let _: i64 = c.query_async(&mut peer).await.unwrap();
    }

    // When the replicator is SIGKILLed while it copies (small batches keep it mid-copy)
    let mut rep = Replicator::start(
        &pair.local.url(),
        &pair.peer.url(),
        &[("REPLICATOR_BATCH_SIZE", "200")],
    )
    .await;
    let start = Instant::now();
    let at_kill = loop {
        let n = xlen(&mut local, s).await;
        if n >= 10_000 {
            rep.kill();
            break xlen(&mut local, s).await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "copy did not start; log:\n{}",
            rep.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        at_kill < EVENTS,
        "the copy finished before the kill ({at_kill} entries); the test proves nothing"
    );

    // And restarted
    rep.restart().await;

    // Then the standby's stream equals the peer's, ids and fields, with no duplicate
    eventually(
        Duration::from_secs(120),
        "all events copied after the restart",
        || {
            let mut l = local.clone();
            async move {
                let n = xlen(&mut l, s).await;
                if n >= EVENTS {
                    Ok(())
                } else {
                    Err(n)
                }
            }
        },
    )
    .await;
    let (theirs, ours) = (entries(&mut peer, s).await, entries(&mut local, s).await);
    assert_eq!(ours.len(), theirs.len());
    assert!(theirs == ours, "entries differ after resume");

    // And the consumer groups are equal
    wait_groups_equal(&peer, &local, s, Duration::from_secs(30)).await;
    assert!(rep.is_running());
}
