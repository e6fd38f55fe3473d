//! The harness itself: private Redis servers come up, keep data across a restart when
//! persistent, and the polling helper reports what it last saw.

use std::time::Duration;

use redis::AsyncCommands;
use system_tests::{eventually, redis_state, RedisServer};

#[tokio::test]
async fn redis_server_runs_on_a_private_port_and_dies_on_drop() {
    // Given a private Redis
    let redis = RedisServer::start().await;
    assert_ne!(redis.port(), 6379);
    let mut conn = redis.client().await;
    let _: () = conn.set("k", "v").await.unwrap();
    let v: String = conn.get("k").await.unwrap();
    assert_eq!(v, "v");
    let url = redis.url();

    // When it is dropped
    drop(redis);

    // Then nothing answers on its port any more
    let client = redis::Client::open(url).unwrap();
    eventually(Duration::from_secs(5), "redis gone", || async {
        match client.get_multiplexed_async_connection().await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting connections"),
        }
    })
    .await;
}

#[tokio::test]
async fn persistent_redis_keeps_data_across_kill_and_restart() {
    // Given a persistent Redis with a stream entry
    let mut redis = RedisServer::start_persistent().await;
    let port = redis.port();
    let mut conn = redis.client().await;
    let _: String = conn
        .xadd("tandem:events", "*", &[("type", "X"), ("event", "{}")])
        .await
        .unwrap();

    // When it is SIGKILLed and restarted
    redis.kill();
    assert!(!redis.is_running());
    redis.restart().await;

    // Then it is back on the same port with the entry
    assert_eq!(redis.port(), port);
    let mut conn = redis.client().await;
    let len: u64 = conn.xlen("tandem:events").await.unwrap();
    assert_eq!(len, 1);
    let snap = redis_state::snapshot(&mut conn).await;
    assert_eq!(snap.events_len, 1);
}

#[tokio::test]
#[should_panic(expected = "last observed")]
async fn eventually_panics_with_the_last_observation() {
    eventually(Duration::from_millis(100), "never", || async {
        Err::<(), _>(42)
    })
    .await;
}

#[test]
#[should_panic(expected = "cargo build --workspace --bins")]
fn a_missing_binary_names_the_build_command() {
    system_tests::process::workspace_binary("no-such-binary-in-this-workspace");
}
