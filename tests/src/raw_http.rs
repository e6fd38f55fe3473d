//! Raw HTTP/1.1 over TCP, for what an HTTP client library hides: a body sent while the
//! answer is already coming back, trickled bytes, connections that never finish a head.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `Content-Length` of a response head, if it has one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    })
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) or what arrived
/// before the connection ended; `Err` when the connection broke before a full head.
pub async fn read_response(
    stream: &mut tokio::net::tcp::OwnedReadHalf,
) -> Result<(String, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = content_length(&head).unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                return Ok((head, body));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(format!("EOF after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("{e} after {} bytes", buf.len())),
        }
    }
}

/// Sends `head` then `total` body bytes as fast as the connection takes them, while
/// reading the answer; returns the answer and how many body bytes went out.
pub async fn send_big(
    port: u16,
    head: String,
    total: usize,
    chunked: bool,
) -> (Result<(String, String), String>, usize) {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        if wr.write_all(head.as_bytes()).await.is_err() {
            return sent;
        }
        let block = vec![b'x'; 64 * 1024];
        while sent < total {
            let r = if chunked {
                let mut framed = format!("{:x}\r\n", block.len()).into_bytes();
                framed.extend_from_slice(&block);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            } else {
                wr.write_all(&block).await
            };
            if r.is_err() {
                return sent;
            }
            sent += block.len();
        }
        if chunked {
            let _ = wr.write_all(b"0\r\n\r\n").await;
        }
        sent
    });
    let answer = tokio::time::timeout(Duration::from_secs(30), read_response(&mut rd))
        .await
        .unwrap_or_else(|_| Err("no answer in 30 s".into()));
    let sent = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("writer ends")
        .expect("writer");
    (answer, sent)
}

/// Sends `head` (its Content-Length is `body`'s) then trickles `body` a byte every
/// 200 ms, and returns the answer (which must come within 10 s) and how long it took
/// from the first body byte.
pub async fn trickle_body(
    stream: TcpStream,
    head: String,
    body: Vec<u8>,
) -> (String, String, std::time::Duration) {
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(head.as_bytes()).await.expect("head");
    let trickle = tokio::spawn(async move {
        for b in body {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = std::time::Instant::now();
    let (head, body) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut rd))
        .await
        .expect("an answer within 10 s")
        .expect("a readable answer");
    trickle.abort();
    (head, body, started.elapsed())
}

/// Trickles an order of one SLOW-1 to `POST /orders` over `stream` (`extra_headers`,
/// each ending in CRLF, go after the content type) and asserts what a slow body gets:
/// 408 request_timeout within 4 s of its first byte, long before the body is done.
pub async fn assert_trickled_order_times_out(stream: TcpStream, host: &str, extra_headers: &str) {
    let order = crate::api::order_body("c-1", &[("SLOW-1", 1)], "tok_ok");
    let body = serde_json::to_vec(&order).expect("json");
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n{extra_headers}content-length: {}\r\n\r\n",
        body.len()
    );
    let (head, body, took) = trickle_body(stream, head, body).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(body.contains("request_timeout"), "{body}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// POSTs `len` bytes to `{base}/orders` with `client`, the way an application's HTTP
/// library sends a body, and asserts that the 413 reaches it (the server read enough
/// of the body for the client to see the answer rather than a reset).
pub async fn assert_oversized_order_refused(client: &reqwest::Client, base: &str, len: usize) {
    let r = client
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .body(vec![b' '; len])
        .send()
        .await
        .expect("the 413 reaches reqwest");
    assert_eq!(r.status(), 413);
}
