//! Client connections: how many are let in, from whom, how long one may sit idle, and
//! how one ends after an answer the client was not reading yet.
//!
//! - A cap on open connections across all workers and one per client address. At the
//!   cap, the longest-idle connection of a small sample (no request in flight) is closed
//!   to make room, so a flood of idle or slow connections cannot lock real clients out:
//!   a newcomer sends its request at once and is never the idlest.
//! - A connection that has not completed a request head within the header read timeout
//!   (slowloris; also before HTTP/1 or HTTP/2 is even recognised, and on HTTP/1.1 the
//!   wait for the next request) or has had no request in flight and sent nothing for
//!   the idle timeout is closed. This is one watcher per connection, not hyper's header
//!   read timer: hyper arms that timer for every request head, which cost about 1,400
//!   instructions per request (callgrind).
//! - Lingering close, as nginx does it: after an answer given without reading the whole
//!   request body (413, 401, ...), the gateway shuts down its sending side and reads and
//!   discards what the client still sends, for a bounded time and size, before closing.
//!   Closing at once would make the kernel answer the client's next bytes with a reset,
//!   which destroys the answer before the client reads it.

use crate::config::ConnectionLimits;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

const SHARDS: usize = 16;
/// How many connections are looked at to find the idlest one to close at the cap.
const EVICTION_SAMPLE: usize = 64;
/// While lingering, a pause this long in the client's sending ends it.
const LINGER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Milliseconds on one monotonic clock shared by all workers.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

const NOT_SERVED: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// What one connection's task and its requests share.
#[derive(Default)]
pub struct ConnState {
    in_flight: AtomicU32,
    /// When the last request ended, or an answer's body still being written to a slow
    /// reader last moved on, or the connection opened; in [`now_ms`].
    idle_since: AtomicU64,
    /// Which protocol the requests came in ([`NOT_SERVED`], [`HTTP1`], [`HTTP2`]): it
    /// chooses the limit on idleness.
    served: AtomicU8,
    /// An answer went out while the request body was still unread: linger on close.
    linger: AtomicBool,
    /// Chosen to make room at the cap (closed as soon as it is idle).
    evicting: AtomicBool,
    wake: Notify,
}

impl ConnState {
    /// Marks a request in flight until the guard drops (also when the client vanishes
    /// and the request's future is dropped).
    pub fn begin(self: &Arc<Self>, http2: bool) -> InFlight {
        let protocol = if http2 { HTTP2 } else { HTTP1 };
        let was = self.served.load(Ordering::Relaxed);
        if was != protocol {
            self.served.store(protocol, Ordering::Relaxed);
            if was == NOT_SERVED {
                // The watcher sleeps toward the header read timeout, and the idle limit
                // that applies from now on may be shorter: it must look again.
                self.wake.notify_one();
            }
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// No request has begun on this connection yet (none at all, or a head still
    /// coming in): closing it cuts no answer short.
    pub fn never_served(&self) -> bool {
        self.served.load(Ordering::Relaxed) == NOT_SERVED
    }

    /// The answer left before the request body was read: read on after closing.
    pub fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Relaxed);
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Completes when the connection should be closed: idle past its timeout, or idle
    /// and chosen to make room.
    pub async fn idle_expired(&self, limits: &ConnectionLimits) -> CloseReason {
        loop {
            let limit = match self.served.load(Ordering::Relaxed) {
                NOT_SERVED => limits.header_read_timeout,
                // The next request's head must be in within the header read timeout of
                // the last answer (what hyper's own timer enforced before).
                HTTP1 => limits.idle_timeout.min(limits.header_read_timeout),
                // HTTP/2 is multiplexed: only a wholly idle connection ends.
                _ => limits.idle_timeout,
            };
            let now = now_ms();
            let since = self.idle_since.load(Ordering::Acquire);
            let idle_for = Duration::from_millis(now.saturating_sub(since));
            if self.is_idle() {
                if self.evicting.load(Ordering::Acquire) {
                    return CloseReason::Evicted;
                }
                if idle_for >= limit {
                    return if self.never_served() {
                        CloseReason::HeaderTimeout
                    } else {
                        CloseReason::Idle
                    };
                }
            }
            let wait = if self.is_idle() {
                limit - idle_for
            } else {
                limit
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Why the gateway closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No whole first request head within the header read timeout.
    HeaderTimeout,
    Idle,
    Evicted,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Evicted => "evicted",
        }
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Ordering::Release);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Idle now: an evicted connection closes at once.
            if self.0.evicting.load(Ordering::Acquire) {
                self.0.wake.notify_one();
            }
        }
    }
}

/// The caps, shared by all workers.
pub struct Connections {
    limits: ConnectionLimits,
    open: AtomicUsize,
    per_client: Vec<Mutex<HashMap<IpAddr, u32>>>,
    metrics: Arc<Metrics>,
}

/// One worker's connections, the candidates it may close to make room.
#[derive(Default)]
pub struct Registry {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    list: Vec<Option<Arc<ConnState>>>,
    free: Vec<usize>,
    cursor: usize,
}

/// A connection let in; dropping it gives its place back.
pub struct Admission {
    connections: Arc<Connections>,
    registry: Arc<Registry>,
    slot: usize,
    ip: IpAddr,
    pub state: Arc<ConnState>,
}

impl Connections {
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Connections {
        Connections {
            limits,
            open: AtomicUsize::new(0),
            per_client: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
        }
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        let last = match ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(v6) => v6.octets()[15],
        };
        &self.per_client[usize::from(last) % SHARDS]
    }

    /// Lets a new connection from `ip` in, making room at the cap if an idle one can
    /// go; `None` when it must be closed at once.
    pub fn admit(self: &Arc<Self>, registry: &Arc<Registry>, ip: IpAddr) -> Option<Admission> {
        if self.limits.max_per_client > 0 {
            let mut counts = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(ip).or_insert(0);
            if *n as usize >= self.limits.max_per_client {
                drop(counts);
                self.refused("per_client");
                return None;
            }
            *n += 1;
        }
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_connections && !registry.evict_idlest() {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.release_client(ip);
            self.refused("limit");
            return None;
        }
        if before >= self.limits.max_connections {
            self.metrics
                .connections_closed
                .with_label_values(&[CloseReason::Evicted.label()])
                .inc();
        }
        self.metrics.connections_open.inc();
        let state = Arc::new(ConnState::default());
        state.idle_since.store(now_ms(), Ordering::Release);
        let slot = registry.insert(state.clone());
        Some(Admission {
            connections: self.clone(),
            registry: registry.clone(),
            slot,
            ip,
            state,
        })
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc();
    }

    fn release_client(&self, ip: IpAddr) {
        if self.limits.max_per_client == 0 {
            return;
        }
        let mut counts = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.remove(self.slot);
        self.connections.open.fetch_sub(1, Ordering::AcqRel);
        self.connections.metrics.connections_open.dec();
        self.connections.release_client(self.ip);
    }
}

impl Registry {
    fn insert(&self, state: Arc<ConnState>) -> usize {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match s.free.pop() {
            Some(i) => {
                s.list[i] = Some(state);
                i
            }
            None => {
                s.list.push(Some(state));
                s.list.len() - 1
            }
        }
    }

    fn remove(&self, slot: usize) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.list[slot] = None;
        s.free.push(slot);
    }

    /// Picks the connection idle the longest among a sample and tells it to close;
    /// false when none in the sample is idle.
    fn evict_idlest(&self) -> bool {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let len = s.list.len();
        if len == 0 {
            return false;
        }
        let mut best: Option<(u64, usize)> = None;
        let mut looked = 0;
        let mut i = s.cursor % len;
        for _ in 0..len {
            if let Some(c) = &s.list[i] {
                if c.is_idle() && !c.evicting.load(Ordering::Acquire) {
                    let since = c.idle_since.load(Ordering::Acquire);
                    if best.is_none_or(|(b, _)| since < b) {
                        best = Some((since, i));
                    }
                }
                looked += 1;
                if looked >= EVICTION_SAMPLE {
                    break;
                }
            }
            i = (i + 1) % len;
        }
        s.cursor = i;
        let Some((_, victim)) = best else {
            return false;
        };
        let c = s.list[victim].as_ref().expect("sampled slot is occupied");
        c.evicting.store(true, Ordering::Release);
        c.wake.notify_one();
        true
    }
}

/// A client's TCP stream that, if the gateway answered without reading the request
/// body, hands itself back when the HTTP layer drops it, so the connection task can
/// linger instead of closing.
pub struct ClientStream {
    inner: Option<TcpStream>,
    state: Arc<ConnState>,
    give_back: Option<oneshot::Sender<TcpStream>>,
    /// The last write found the client's receive window full.
    blocked: bool,
}

impl ClientStream {
    /// The stream, and where it comes back when lingering is wanted.
    pub fn new(
        stream: TcpStream,
        state: Arc<ConnState>,
    ) -> (ClientStream, oneshot::Receiver<TcpStream>) {
        let (tx, rx) = oneshot::channel();
        (
            ClientStream {
                inner: Some(stream),
                state,
                give_back: Some(tx),
                blocked: false,
            },
            rx,
        )
    }

    fn io(&mut self) -> &mut TcpStream {
        self.inner.as_mut().expect("stream present until drop")
    }

    /// A write that had to wait for the client to read went through: with no request in
    /// flight, that is an answer's body still moving to a slow reader, which is not
    /// idleness. Only then is the clock read: a write that goes straight through (every
    /// small answer) costs a branch.
    fn sent(&mut self, written: &Poll<std::io::Result<usize>>) {
        match written {
            Poll::Pending => self.blocked = true,
            Poll::Ready(Ok(n)) if *n > 0 && self.blocked => {
                self.blocked = false;
                if self.state.is_idle() {
                    self.state.idle_since.store(now_ms(), Ordering::Release);
                }
            }
            Poll::Ready(_) => {}
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.state.linger.load(Ordering::Relaxed) {
            if let (Some(stream), Some(tx)) = (self.inner.take(), self.give_back.take()) {
                let _ = tx.send(stream);
            }
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(self.io()).poll_write(cx, buf);
        self.sent(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(self.io()).poll_write_vectored(cx, bufs);
        self.sent(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.io()).poll_shutdown(cx)
    }
}

/// Sends FIN after the answer, then reads and discards until the client stops sending
/// (EOF or a pause), the time is up or the byte budget is spent; then the socket closes.
pub async fn linger(mut stream: TcpStream, limits: &ConnectionLimits, metrics: &Metrics) {
    metrics.lingering_closes.inc();
    let _ = stream.shutdown().await;
    let until = Instant::now() + limits.linger;
    let mut left = limits.linger_bytes;
    let mut buf = vec![0u8; 16 * 1024];
    while left > 0 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let wait = (until - now).min(LINGER_READ_TIMEOUT);
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => left = left.saturating_sub(n as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            max_per_client: per_client,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            linger: Duration::from_secs(1),
            linger_bytes: 1024,
        }
    }

    #[test]
    fn per_client_cap_and_room_made_by_closing_the_idlest() {
        let metrics = Arc::new(Metrics::new(&[]));
        let conns = Arc::new(Connections::new(limits(2, 1), metrics));
        let reg = Arc::new(Registry::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let c: IpAddr = "127.0.0.4".parse().unwrap();
        let first = conns.admit(&reg, a).expect("first");
        assert!(conns.admit(&reg, a).is_none(), "one per client");
        let second = conns.admit(&reg, b).expect("second");
        // Busy connections are never closed to make room.
        let _busy_1 = first.state.begin(false);
        let busy_2 = second.state.begin(false);
        assert!(conns.admit(&reg, c).is_none(), "nothing idle to close");
        drop(busy_2);
        let third = conns.admit(&reg, c).expect("room made");
        assert!(second.state.evicting.load(Ordering::Acquire));
        assert!(!first.state.evicting.load(Ordering::Acquire));
        drop((first, second, third));
        assert_eq!(conns.open.load(Ordering::Acquire), 0);
        assert!(conns.admit(&reg, a).is_some(), "places are given back");
    }

    #[tokio::test]
    async fn an_idle_limit_shorter_than_the_header_timeout_applies_after_the_first_request() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(200),
            ..limits(10, 10)
        };
        let state = Arc::new(ConnState::default());
        let started = Instant::now();
        let watcher = tokio::spawn({
            let state = state.clone();
            async move { state.idle_expired(&limits).await }
        });
        // The watcher is asleep toward the header read timeout when the request comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(state.begin(false));
        let reason = tokio::time::timeout(Duration::from_secs(3), watcher)
            .await
            .expect("closed within the idle limit, not the header read timeout")
            .expect("watcher");
        assert_eq!(reason, CloseReason::Idle);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
