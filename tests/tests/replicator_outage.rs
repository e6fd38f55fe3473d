//! Either Redis goes away (killed, hung) and comes back: the replicator keeps running,
//! reports not-ready meanwhile, and resumes copying; lag is reported while behind.

use std::time::Duration;

use system_tests::eventually;
use system_tests::replicator::{add_events, entries, wait_copied, wait_len, Pair, Replicator};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn peer_redis_killed_and_restarted_copying_resumes() {
    // Given a replicator copying from a peer whose Redis persists its data
    let mut pair = Pair::start_persistent_peer().await;
    let (mut peer, local) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:events";
    add_events(&mut peer, s, 0, 100).await;
    let mut rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    wait_len(&local, s, 100, DEADLINE, "first events copied").await;
    let http = rep.http();
    http.wait_readiness(200, DEADLINE, "ready").await;

    // When the peer's Redis is killed
    pair.peer.kill();

    // Then readiness turns 503 with a reason naming the peer, and the process keeps running
    let r = http
        .wait_readiness(503, DEADLINE, "not ready while the peer is down")
        .await;
    assert!(
        r.json["reason"].as_str().unwrap_or("").contains("peer"),
        "{}",
        r.text
    );
    assert_eq!(r.json["peer"]["redis"], "unreachable");
    assert!(rep.is_running());
    let up = rep
        .metric("tandem_replicator_redis_up{side=\"peer\"}")
        .await;
    assert_eq!(up, Some(0.0));

    // When it comes back with its data and takes new writes
    pair.peer.restart().await;
    let mut peer = pair.peer_conn().await;
    add_events(&mut peer, s, 100, 50).await;

    // Then the replicator is ready again and copies what was written meanwhile
    http.wait_readiness(200, DEADLINE, "ready again").await;
    let what = "events written after the restart copied";
    wait_copied(&peer, &local, s, 150, DEADLINE, what).await;
    assert!(
        rep.is_running(),
        "replicator exited; log:\n{}",
        rep.log_tail(40)
    );
}

/// The pid of a Redis server, from `INFO server`.
async fn redis_pid(conn: &mut redis::aio::MultiplexedConnection) -> u32 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("process_id in INFO server")
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn hung_peer_is_reported_and_copying_resumes_when_it_answers_again() {
    // Given a replicator copying from a peer
    let pair = Pair::start().await;
    let (mut peer, local) = (pair.peer_conn().await, pair.local_conn().await);
    let s = "tandem:events";
    add_events(&mut peer, s, 0, 10).await;
    let mut rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    let http = rep.http();
    http.wait_readiness(200, DEADLINE, "ready").await;
    let pid = redis_pid(&mut peer).await;

    // When the peer's Redis hangs (accepts connections, never answers)
    signal(pid, "STOP");
    let hung = http
        .wait_readiness(503, DEADLINE, "not ready while the peer hangs")
        .await;
    signal(pid, "CONT");
    assert_eq!(hung.json["peer"]["redis"], "unreachable", "{}", hung.text);
    assert!(rep.is_running());

    // Then, once it answers again, the replicator is ready and copies new writes
    add_events(&mut peer, s, 10, 10).await;
    http.wait_readiness(200, DEADLINE, "ready again").await;
    wait_len(
        &local,
        s,
        20,
        DEADLINE,
        "events written after the hang copied",
    )
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_replicator_cleanly() {
    let pair = Pair::start().await;
    let mut rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    let status = rep.terminate(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn local_redis_restarted_copying_resumes_without_duplicates() {
    // Given a replicator copying into a local Redis that persists its data
    let mut pair = Pair::start_persistent_local().await;
    let mut peer = pair.peer_conn().await;
    let s = "tandem:events";
    add_events(&mut peer, s, 0, 50).await;
    let mut rep = Replicator::start(&pair.local.url(), &pair.peer.url(), &[]).await;
    let http = rep.http();
    let local = pair.local_conn().await;
    wait_len(&local, s, 50, DEADLINE, "first events copied").await;

    // When the local Redis dies, the replicator reports it
    pair.local.kill();
    let r = http
        .wait_readiness(503, DEADLINE, "not ready while local is down")
        .await;
    assert_eq!(r.json["local"]["redis"], "unreachable", "{}", r.text);
    add_events(&mut peer, s, 50, 50).await;

    // Then after its restart everything written meanwhile is copied, once
    pair.local.restart().await;
    http.wait_readiness(200, DEADLINE, "ready again").await;
    eventually(DEADLINE, "all events copied", || async {
        let (mut p, mut l) = (pair.peer_conn().await, pair.local_conn().await);
        let (a, b) = (entries(&mut p, s).await, entries(&mut l, s).await);
        if a == b {
            Ok(())
        } else {
            Err((a.len(), b.len()))
        }
    })
    .await;
    assert!(
        rep.is_running(),
        "replicator exited; log:\n{}",
        rep.log_tail(40)
    );
}

#[tokio::test]
async fn lag_is_reported_while_behind_and_zero_when_caught_up() {
    // Given a peer far ahead and a replicator copying one entry per batch
    let pair = Pair::start().await;
    let mut peer = pair.peer_conn().await;
    add_events(&mut peer, "tandem:events", 0, 20_000).await;
    let rep = Replicator::start(
        &pair.local.url(),
        &pair.peer.url(),
        &[
            ("REPLICATOR_BATCH_SIZE", "1"),
            ("REPLICATOR_WRITE_DEPTH", "1"),
            ("REPLICATOR_LAG_INTERVAL_MS", "20"),
        ],
    )
    .await;

    // Then the lag is visible in entries and seconds while it copies
    let events = "tandem_replicator_lag_events{stream=\"tandem:events\"}";
    let seconds = "tandem_replicator_lag_seconds{stream=\"tandem:events\"}";
    eventually(DEADLINE, "lag reported", || async {
        let (e, s) = (rep.metric(events).await, rep.metric(seconds).await);
        if e.is_some_and(|e| e > 0.0) && s.is_some_and(|s| s > 0.0) {
            Ok(())
        } else {
            Err((e, s))
        }
    })
    .await;

    // And both drop to zero once it has caught up
    eventually(Duration::from_secs(120), "lag back to zero", || async {
        let (e, s) = (rep.metric(events).await, rep.metric(seconds).await);
        if e == Some(0.0) && s == Some(0.0) {
            Ok(())
        } else {
            Err((e, s))
        }
    })
    .await;
}
