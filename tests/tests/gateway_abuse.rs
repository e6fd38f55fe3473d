//! Bad input and abuse at the gateway: an oversized body still gets its 413 while the
//! client is sending, slow headers and trickled bodies time out, floods of idle and
//! slow connections do not lock real clients out, and the rate limit follows the
//! authenticated client; an answer still moving to a slow reader is not idleness.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use system_tests::eventually;
use system_tests::gateway::{metric, Gateway, GatewayOptions, TwoRegions};
use system_tests::raw_http::{self, send_big};
use system_tests::redis_state;
use system_tests::tokens::{claims, write_jwks, SigningKey, AUDIENCE, ISSUER};
use system_tests::workdir::WorkDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SETTLE: Duration = Duration::from_secs(15);
const BIG: usize = 32 * 1024 * 1024;

/// A TCP connection to the gateway from a chosen loopback address (127.0.0.0/8 is all
/// this machine), so tests can play different clients.
async fn connect_from(from: &str, gw: &Gateway) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse::<SocketAddr>().expect("addr"))?;
    socket
        .connect(format!("127.0.0.1:{}", gw.port()).parse().expect("addr"))
        .await
}

/// Sends `head` a byte every 100 ms until the gateway closes the connection (or answers
/// before closing it); how long that took from the first byte. Panics if it never does.
async fn trickle_until_closed(mut stream: TcpStream, head: &[u8]) -> Duration {
    let started = Instant::now();
    for b in head.iter() {
        if stream.write_all(&[*b]).await.is_err() {
            return started.elapsed();
        }
        let mut probe = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe));
        // Closed, or an answer (hyper may send 408 before closing): either way it ends
        if read.await.is_ok() {
            return started.elapsed();
        }
    }
    panic!("a slowloris connection was kept open for the whole head");
}

/// Reads one answer with a `content-length` body off a kept-alive connection.
async fn read_one_answer(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = raw_http::content_length(&text[..end]).expect("a content-length answer");
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no whole answer: {other:?} after {text:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_its_413_while_the_client_is_still_sending() {
    // Given a gateway with the default 1 MiB body limit
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(GatewayOptions::new(&regions.regions())).await;
    gw.wait_active("a", 1, SETTLE).await;
    let mut redis = regions.a.redis.client().await;
    let before = redis_state::snapshot(&mut redis).await;

    // When a client declares a 32 MiB body and keeps sending it
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {BIG}\r\n\r\n"
    );
    let (answer, sent) = send_big(gw.port(), head, BIG, false).await;
    // Then it reads the 413, and could send its whole body without a reset
    let (head, body) = answer.expect("a readable answer");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(body.contains("payload_too_large"), "{body}");
    assert_eq!(sent, BIG, "the body was cut off");

    // When the body comes chunked, without a declared length (only counting tells)
    let head = "POST /orders HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
    let (answer, _) = send_big(gw.port(), head, BIG, true).await;
    let (head, body) = answer.expect("a readable answer");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(body.contains("payload_too_large"), "{body}");

    // And the same through reqwest (hyper's client), the way an application sends it
    raw_http::assert_oversized_order_refused(&reqwest::Client::new(), &gw.url(), BIG).await;

    // And nothing was written
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "oversized bodies");
    let metrics = gw.metrics().await;
    assert!(
        metric(&metrics, "tandem_gateway_lingering_closes_total", &[]).unwrap_or(0.0) >= 2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_trickled_bodies_time_out() {
    // Given a gateway with a 1 s header read timeout and a 1.5 s request deadline
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_HEADER_READ_TIMEOUT_MS", 1_000)
            .env("GATEWAY_REQUEST_TIMEOUT_MS", 1_500),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    let api = gw.api();
    api.put_product("SLOW-1", 100, 5).await;
    let mut redis = regions.a.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, SETTLE).await;
    let before = redis_state::snapshot(&mut redis).await;

    // When a client sends its request head one byte every 100 ms (slowloris)
    let head = b"GET /api/v1/products/SLOW-1 HTTP/1.1\r\nhost: gw\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let slow = connect_from("127.0.0.1", &gw).await.expect("connect");
    let closed_after = trickle_until_closed(slow, head).await;
    // Then the gateway closes it after about a second, though bytes kept coming
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}"
    );

    // When a client on a kept-alive connection is answered, then trickles its next head
    let mut kept = connect_from("127.0.0.1", &gw).await.expect("connect");
    kept.write_all(b"GET /api/v1/products/SLOW-1 HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("send");
    let answer = read_one_answer(&mut kept).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Then that head gets the same header read timeout from the answer on
    let closed_after = trickle_until_closed(kept, head).await;
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(4),
        "kept-alive connection closed after {closed_after:?}"
    );

    // And the operator sees those closes for what they were
    let metrics = gw.metrics().await;
    let header_timeouts = metric(
        &metrics,
        "tandem_gateway_connections_closed_total",
        &[("reason", "header_timeout")],
    );
    assert!(header_timeouts >= Some(1.0), "{metrics}");

    // When a client connects and sends nothing at all (not even enough to tell HTTP/1 from HTTP/2)
    let mut silent = connect_from("127.0.0.1", &gw).await.expect("connect");
    let started = Instant::now();
    let mut probe = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut probe)).await;
    // Then it is closed after the header read timeout too
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // When an order's body trickles in a byte every 200 ms
    // Then it gets 408 request_timeout at the request deadline, and nothing is written
    let stream = connect_from("127.0.0.1", &gw).await.expect("connect");
    raw_http::assert_trickled_order_times_out(stream, "gw", "idempotency-key: slow-1\r\n").await;
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "a trickled order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_idle_and_slow_connections_do_not_lock_real_clients_out() {
    // Given a gateway that takes at most 100 connections, 60 per client address
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_MAX_CONNECTIONS", 100)
            .env("GATEWAY_MAX_CONNECTIONS_PER_CLIENT", 60)
            .env("GATEWAY_HEADER_READ_TIMEOUT_MS", 3_000),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;

    // When one address opens 80 idle connections and two others 40 slow ones each
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(connect_from("127.0.0.2", &gw).await.expect("connect"));
    }
    let mut slow = Vec::new();
    for from in ["127.0.0.3", "127.0.0.4"] {
        for _ in 0..40 {
            let mut s = connect_from(from, &gw).await.expect("connect");
            let _ = s.write_all(b"GET / HTTP/1.1\r\nx-slow: ").await;
            slow.push(s);
        }
    }
    let trickle_until = Instant::now() + Duration::from_secs(2);
    let flood_alive = tokio::spawn(async move {
        // The slow ones keep sending a byte now and then
        while Instant::now() < trickle_until {
            for s in slow.iter_mut() {
                let _ = s.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slow
    });

    // Then real clients, each on a new connection, are served promptly
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    for i in 0..20 {
        let started = Instant::now();
        let r = client
            .get(format!("{}/api/v1/products/NONE", gw.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("real request {i} failed: {e}"));
        assert_eq!(r.status(), 404, "request {i}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    let slow = flood_alive.await.expect("flood");

    // And the gateway refused the idle address's excess and made room by closing the idlest
    let metrics = gw.metrics().await;
    let refused = metric(
        &metrics,
        "tandem_gateway_connections_refused_total",
        &[("reason", "per_client")],
    )
    .unwrap_or(0.0);
    assert!(refused >= 20.0, "{metrics}");
    let evicted = metric(
        &metrics,
        "tandem_gateway_connections_closed_total",
        &[("reason", "evicted")],
    )
    .unwrap_or(0.0);
    assert!(evicted >= 1.0, "{metrics}");

    // And every flood connection is closed by the gateway within the header timeout
    let mut all: Vec<TcpStream> = idle.into_iter().chain(slow).collect();
    let started = Instant::now();
    for (idx, s) in all.iter_mut().enumerate() {
        let mut probe = [0u8; 256];
        let local = s.local_addr().expect("local address");
        let left = Duration::from_secs(8).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            // An answer (408/400) before the close is fine; the close must follow
            Ok(Ok(_)) => {
                let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut probe)).await;
                assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
            }
            Err(_) => {
                // What the operator would see: which closes the gateway counted.
                let metrics = gw.metrics().await;
                let counts: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.contains("connections") && !l.starts_with('#'))
                    .collect();
                panic!(
                    "flood connection {idx} (from {local}) is still open after {:?}: {counts:#?}",
                    started.elapsed()
                )
            }
        }
    }
    eventually(SETTLE, "open connections back to almost none", || {
        let http = gw.http();
        async move {
            let m = http.get("/metrics").await.text;
            let open = metric(&m, "tandem_gateway_connections_open", &[]).unwrap_or(-1.0);
            // this scrape's own connection, and perhaps a pooled one
            if (0.0..=3.0).contains(&open) {
                Ok(())
            } else {
                Err(serde_json::json!(open))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_follows_the_token_subject_when_auth_is_on() {
    // Given a gateway with auth and a limit of 3 requests, then 1 a second, per client
    let dir = WorkDir::new("abuse-keys");
    let key = SigningKey::ec(dir.path(), "ec-1");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&key]);
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_AUTH_JWKS", jwks.display())
            .env("GATEWAY_AUTH_ISSUER", ISSUER)
            .env("GATEWAY_AUTH_AUDIENCE", AUDIENCE)
            .env("GATEWAY_RATE_LIMIT_PER_SEC", 1)
            .env("GATEWAY_RATE_LIMIT_BURST", 3),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    let alice = gw.http().with_token(key.sign(&claims("alice", "")));
    let bob = gw.http().with_token(key.sign(&claims("bob", "")));

    // When alice spends her burst from this address, she is limited
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(alice.get("/api/v1/products/NONE").await);
    }
    let limited = statuses
        .iter()
        .find(|r| r.status == 429)
        .unwrap_or_else(|| {
            panic!(
                "{:?}",
                statuses.iter().map(|r| r.status).collect::<Vec<_>>()
            )
        });
    assert_eq!(limited.error_code(), "rate_limited");
    assert!(limited.header("retry-after").is_some());

    // But bob, from the same address, is not: the bucket is per subject
    for _ in 0..3 {
        assert_eq!(bob.get("/api/v1/products/NONE").await.status, 404);
    }

    // And requests without a valid token are limited by their address
    let anonymous: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(gw.http().get("/api/v1/products/NONE").await.status);
        }
        v
    };
    assert_eq!(&anonymous[..3], &[401, 401, 401], "{anonymous:?}");
    assert!(anonymous[3..].contains(&429), "{anonymous:?}");
}

/// The per-worker connection gauges, as a `/metrics` answer gives them.
fn worker_connections(metrics_text: &str, workers: usize) -> Vec<f64> {
    (0..workers)
        .map(|w| {
            metric(
                metrics_text,
                "tandem_gateway_worker_connections",
                &[("worker", &w.to_string())],
            )
            .expect("a gauge for every worker")
        })
        .collect()
}

/// `GET /metrics` over `stream`, a kept-alive connection.
async fn metrics_over(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .expect("send");
    read_one_answer(stream).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_are_spread_evenly_over_the_workers() {
    // Given a gateway with two worker threads and no other client connected: the
    // kernel picks a worker's listener by a hash of each connection's addresses, which
    // alone leaves a few long connections lopsided
    let regions = TwoRegions::start(false).await;
    let gw =
        Gateway::start(GatewayOptions::new(&regions.regions()).env("GATEWAY_WORKERS", 2)).await;
    gw.wait_active("a", 1, SETTLE).await;
    let mut kept = vec![connect_from("127.0.0.1", &gw).await.expect("connect")];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = worker_connections(&metrics_over(&mut kept[0]).await, 2);
        if counts.iter().sum::<f64>() == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "other connections still counted: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // When clients open 31 more kept-alive connections, one after another
    for n in 2..=32 {
        let mut stream = connect_from("127.0.0.1", &gw).await.expect("connect");
        let counts = worker_connections(&metrics_over(&mut stream).await, 2);
        kept.push(stream);

        // Then after each, as the operator's gauges show, every connection is counted
        // once and neither worker serves more than one more than the other
        assert_eq!(counts.iter().sum::<f64>(), n as f64, "{counts:?}");
        assert!(
            (counts[0] - counts[1]).abs() <= 1.0,
            "connection {n}: workers serve {counts:?}"
        );
    }

    // And every connection is still served (a handed-over one included)
    for (i, stream) in kept.iter_mut().enumerate() {
        let answer = metrics_over(stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "connection {i}: {answer:.80}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_keeps_its_connection_while_a_long_answer_is_still_moving() {
    // Given a gateway that closes connections idle for 2 s, and pages of 1,000 events
    // (about half a megabyte each)
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions()).env("GATEWAY_IDLE_TIMEOUT_MS", IDLE_MS),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..10 {
        let api = gw.api();
        writers.spawn(async move {
            for i in 0..100 {
                api.put_product(&format!("SLOW-{w}-{i:03}"), 100, 1).await;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("product writer");
    }

    // When a client with a small window asks for eight pages at once (pipelined: more
    // than the kernel's buffers hold, so the gateway writes the whole time) and reads
    // slowly for two idle timeouts, then at full speed
    let mut stream = small_window_client(gw.port());
    let ask = "GET /api/events?limit=1000 HTTP/1.1\r\nhost: gateway\r\n\r\n".repeat(PAGES);
    stream.write_all(ask.as_bytes()).await.expect("send");
    let slow_for = Duration::from_millis(2 * IDLE_MS);
    let (answers, total, slow_part) = read_slowly(&mut stream, PAGES, slow_for).await;

    // Then every answer arrives whole
    for (i, head) in answers.iter().enumerate() {
        assert!(head.starts_with("HTTP/1.1 200"), "answer {i}: {head}");
    }
    assert!(
        total > 2 * slow_part,
        "only {total} bytes in all, {slow_part} of them read slowly: the gateway may have \
         finished writing before the slow part ended"
    );
    // And the connection was not closed as idle meanwhile: it serves the next request
    let answer = metrics_over(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.80}");
    assert_eq!(
        metric(
            &answer,
            "tandem_gateway_connections_closed_total",
            &[("reason", "idle")]
        )
        .unwrap_or(0.0),
        0.0,
        "a connection was closed as idle"
    );

    // And once really idle, it is closed after the idle timeout
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection stayed open: {closed:?}"
    );
}

/// Long enough that the gateway's writes to the reader below come well within it: the
/// kernel wakes a blocked writer when a third of its send buffer is free again, which
/// here is a few hundred milliseconds apart.
const IDLE_MS: u64 = 2000;
const PAGES: usize = 8;

/// A connection to the gateway with a 4 KiB receive buffer and 536-byte segments, which
/// keeps the gateway's send buffer small (on loopback, 64 KiB segments let the kernel
/// take a megabyte at once).
fn small_window_client(port: u16) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    socket.connect(&addr.into()).expect("connect");
    socket.set_nonblocking(true).expect("non-blocking");
    TcpStream::from_std(socket.into()).expect("tokio stream")
}

/// Reads `count` `content-length` answers, 8 KiB every 20 ms for `slow_for`, then as
/// fast as they come: their heads, the bytes read in all and those read slowly.
async fn read_slowly(
    stream: &mut TcpStream,
    count: usize,
    slow_for: Duration,
) -> (Vec<String>, usize, usize) {
    let mut got = Vec::new();
    let mut heads = Vec::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let (mut total, mut slow_part) = (0, 0);
    while heads.len() < count {
        // A head is short: only the start of what is buffered can hold it.
        let start = &got[..got.len().min(8192)];
        if let Some(end) = start.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let length = raw_http::content_length(&head)
                .unwrap_or_else(|| panic!("not a content-length answer: {head}"));
            if got.len() >= end + 4 + length {
                got.drain(..end + 4 + length);
                heads.push(head);
                continue;
            }
        }
        let slow = started.elapsed() < slow_for;
        let mut buf = vec![0u8; if slow { 8 * 1024 } else { 256 * 1024 }];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                total += n;
            }
            other => panic!(
                "cut off after {} answers and {total} bytes: {other:?}",
                heads.len()
            ),
        }
        if slow {
            slow_part = total;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (heads, total, slow_part)
}
