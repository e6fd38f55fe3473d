//! Bad input and abuse at the node itself (reached directly, as the gateway and any
//! client on its network do): an oversized body still gets its 413 while the client is
//! sending; slow request heads, idle connections and trickled bodies are cut off
//! after their timeouts while other clients are served, and a kept-alive connection
//! outlives the header timeout; a flood of connections past
//! the cap waits instead of being served at once, and real clients get through.

use std::time::{Duration, Instant};

use system_tests::api::metric_sum;
use system_tests::raw_http::{self, read_response, send_big};
use system_tests::redis_state;
use system_tests::{RedisOptions, Region};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIG: usize = 32 * 1024 * 1024;
const SETTLE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_its_413_while_the_client_is_still_sending() {
    // Given a node with its 1 MiB body limit
    let region = Region::start().await;
    let port = region.node.port();
    let mut redis = region.redis.client().await;
    let before = redis_state::snapshot(&mut redis).await;

    // When a client declares a 32 MiB body and keeps sending it
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: node\r\ncontent-type: application/json\r\ncontent-length: {BIG}\r\n\r\n"
    );
    let (answer, sent) = send_big(port, head, BIG, false).await;
    // Then it reads the 413, and could send its whole body without a reset
    let (head, body) = answer.expect("a readable answer");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(body.contains("payload_too_large"), "{body}");
    assert_eq!(sent, BIG, "the body was cut off");

    // When the body comes chunked, without a declared length (only counting tells)
    let head = "PUT /api/v1/products/BIG-1 HTTP/1.1\r\nhost: node\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let (answer, _) = send_big(port, head, BIG, true).await;
    let (head, body) = answer.expect("a readable answer");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(body.contains("payload_too_large"), "{body}");

    // And the same through reqwest, the way an application sends it, on a client that
    // then goes on with its next request
    let client = reqwest::Client::new();
    raw_http::assert_oversized_order_refused(&client, &region.node.url(), BIG).await;
    let r = client
        .get(format!("{}/health/live", region.node.url()))
        .send()
        .await
        .expect("the next request on the same client");
    assert_eq!(r.status(), 200);

    // And nothing was written
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "oversized bodies");
    // And the operator sees the lingering closes
    let metrics = region.api.metrics().await;
    let lingered = metric_sum(
        &metrics,
        "tandem_node_http_connections_closed_total",
        &[("reason", "lingered")],
    );
    assert!(lingered.unwrap_or(0.0) >= 2.0, "{lingered:?}");
}

/// Whether the node closed `stream`: EOF, a reset, or an answer (hyper may say 408
/// before closing), within `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut probe = [0u8; 512];
    match tokio::time::timeout(wait, stream.read(&mut probe)).await {
        Ok(Ok(_)) | Ok(Err(_)) => true,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_after_the_timeouts_while_others_are_served() {
    // Given a node with a 1 s header timeout, a 1 s body timeout and a 3 s idle timeout
    let region = Region::start_with(RedisOptions::default(), |o| {
        o.env("NODE_HTTP_HEADER_TIMEOUT_MS", 1_000)
            .env("NODE_HTTP_BODY_TIMEOUT_MS", 1_000)
            .env("NODE_HTTP_IDLE_TIMEOUT_MS", 3_000)
    })
    .await;
    let port = region.node.port();
    region.api.put_product("SLOW-1", 100, 5).await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, SETTLE).await;
    let before = redis_state::snapshot(&mut redis).await;

    // When a client sends its request head one byte every 100 ms (slowloris)
    let mut slow = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let started = Instant::now();
    let head = b"GET /api/v1/products/SLOW-1 HTTP/1.1\r\nhost: node\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_after = None;
    for (i, b) in head.iter().enumerate() {
        if slow.write_all(&[*b]).await.is_err()
            || closed_within(&mut slow, Duration::from_millis(100)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
        // And meanwhile other clients are served as usual
        if i % 5 == 0 {
            let r = region.node.http().get("/api/v1/products/SLOW-1").await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    }
    // Then the node closes it after about a second, though bytes kept coming
    let closed_after = closed_after.expect("a slowloris connection was kept open");
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}"
    );

    // When a client connects and sends nothing at all
    let mut silent = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let started = Instant::now();
    // Then it is closed after the header timeout too
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // When a client is answered and then keeps its connection open, sending nothing
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(b"GET /health/live HTTP/1.1\r\nhost: node\r\n\r\n")
        .await
        .expect("send");
    let (head, _) = read_response(&mut rd).await.expect("answered");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = Instant::now();
    // Then the connection stays open past the header timeout (a pooled connection the
    // client may reuse), and is closed after the idle timeout
    let mut probe = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(6), rd.read(&mut probe)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    let idle = started.elapsed();
    assert!(
        idle >= Duration::from_millis(2_800) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    drop(wr);

    // When an order's body trickles in a byte every 200 ms
    // Then it gets 408 request_timeout at the body timeout, and nothing is written
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    raw_http::assert_trickled_order_times_out(stream, "node", "").await;
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "a trickled order");
    // And the operator sees why connections were closed
    let metrics = region.api.metrics().await;
    let closed = |reason: &str| {
        metric_sum(
            &metrics,
            "tandem_node_http_connections_closed_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert!(closed("header_timeout") >= 2.0, "{metrics}");
    assert!(closed("idle_timeout") >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_and_real_clients_still_get_through() {
    // Given a node that serves at most 8 connections, with a 2 s header timeout
    let region = Region::start_with(RedisOptions::default(), |o| {
        o.env("NODE_HTTP_MAX_CONNECTIONS", 8)
            .env("NODE_HTTP_HEADER_TIMEOUT_MS", 2_000)
    })
    .await;
    let port = region.node.port();

    // When 8 idle connections take every slot
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    // And a real client sends a request on a ninth
    let started = Instant::now();
    let mut real = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the kernel's backlog takes it");
    real.write_all(b"GET /health/live HTTP/1.1\r\nhost: node\r\n\r\n")
        .await
        .expect("send");
    let (mut rd, _wr) = real.into_split();
    // Then it is not served while the slots are taken
    let early = tokio::time::timeout(Duration::from_millis(1_000), read_response(&mut rd)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    // And it is served once the idle ones time out
    let (head, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut rd))
        .await
        .expect("served after the idle connections were closed")
        .expect("a readable answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_500) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // And the idle ones were closed by the node
    for mut conn in idle {
        assert!(closed_within(&mut conn, Duration::from_secs(1)).await);
    }
}
