//! The real `replicator` binary, and a two-region fixture for it: a peer Redis (the
//! region copied from, active) and a local Redis (the standby copied into), each with
//! its role record written directly, so replication is tested without the node.

use std::collections::BTreeMap;
use std::process::ExitStatus;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::http::{HttpClient, Response};
use crate::poll::{eventually, wait_until};
use crate::ports::free_port;
use crate::process::{workspace_binary, Process};
use crate::redis_server::RedisServer;
use crate::workdir::WorkDir;

const LIVE_DEADLINE: Duration = Duration::from_secs(20);

/// A running replicator; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Replicator {
    env: Vec<(String, String)>,
    port: u16,
    process: Process,
    restarts: u32,
    workdir: WorkDir,
}

impl Replicator {
    /// Starts `replicator` copying from `peer_url` (region `a`) into `local_url` (region
    /// `b`). `extra` env vars win over the defaults.
    pub async fn start(local_url: &str, peer_url: &str, extra: &[(&str, &str)]) -> Replicator {
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("REPLICATOR_LOCAL_REGION".into(), "b".into()),
            ("REPLICATOR_LOCAL_REDIS_URL".into(), local_url.into()),
            ("REPLICATOR_PEER_REGION".into(), "a".into()),
            ("REPLICATOR_PEER_REDIS_URL".into(), peer_url.into()),
            ("REPLICATOR_LISTEN".into(), format!("127.0.0.1:{port}")),
            // Quick reconnects keep the outage tests short.
            ("REPLICATOR_CONNECT_TIMEOUT_MS".into(), "300".into()),
            ("REPLICATOR_RESPONSE_TIMEOUT_MS".into(), "1000".into()),
            ("REPLICATOR_MAX_BACKOFF_MS".into(), "300".into()),
        ];
        if std::env::var_os("RUST_LOG").is_none() {
            env.push(("RUST_LOG".into(), "info".into()));
        }
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        let workdir = WorkDir::new("replicator");
        let process = spawn(&env, port, 0, &workdir);
        let mut r = Replicator {
            env,
            port,
            process,
            restarts: 0,
            workdir,
        };
        r.wait_live().await;
        r
    }

    /// Starts it again with the same configuration and port (after `kill`).
    pub async fn restart(&mut self) {
        self.process.kill();
        let mut last = String::new();
        for _ in 0..20 {
            self.restarts += 1;
            self.process = spawn(&self.env, self.port, self.restarts, &self.workdir);
            match self.try_wait_live().await {
                Ok(()) => return,
                // The listener port can linger for a moment after SIGKILL.
                Err(why) => last = why,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("replicator did not restart:\n{last}");
    }

    async fn wait_live(&mut self) {
        if let Err(why) = self.try_wait_live().await {
            panic!("{why}");
        }
    }

    async fn try_wait_live(&mut self) -> Result<(), String> {
        let base = format!("http://127.0.0.1:{}", self.port);
        self.process
            .wait_http_ok(&base, "/health/live", LIVE_DEADLINE)
            .await
    }

    pub fn http(&self) -> HttpClient {
        HttpClient::new(format!("http://127.0.0.1:{}", self.port))
    }

    pub async fn ready(&self) -> Response {
        self.http().get("/health/ready").await
    }

    pub async fn metrics(&self) -> String {
        self.http().get("/metrics").await.text
    }

    /// The value of one sample, e.g. `tandem_replicator_events_copied_total{stream="tandem:events"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until the role gate has taken `rounds` more decisions than now (its
    /// counter in `/metrics`): what a test that asserts "nothing was copied" waits for,
    /// instead of a bare sleep.
    pub async fn wait_gate_rounds(&self, rounds: u64) {
        const SAMPLE: &str = "tandem_replicator_gate_checks_total";
        let start = self.metric(SAMPLE).await.unwrap_or(0.0);
        let target = start + rounds as f64;
        wait_until(
            Duration::from_secs(30),
            &format!("{rounds} rounds of the role gate"),
            || self.metric(SAMPLE),
            |n| n.is_some_and(|n| n >= target),
        )
        .await;
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Sends `signal` (e.g. "STOP", "CONT"); `false` when the process is gone.
    pub fn try_signal(&self, signal: &str) -> bool {
        self.process.try_signal(signal)
    }

    pub fn workdir(&self) -> &std::path::Path {
        self.workdir.path()
    }

    /// SIGKILL: no shutdown, a batch may be half written.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        self.process.terminate(deadline).await
    }
}

fn spawn(env: &[(String, String)], port: u16, n: u32, workdir: &WorkDir) -> Process {
    let binary = workspace_binary("replicator");
    Process::spawn(
        &format!("replicator-{port}-{n}"),
        &binary,
        &[],
        env,
        workdir,
    )
}

/// Two regions' Redis servers: `peer` (region a, active) and `local` (region b, standby).
pub struct Pair {
    pub peer: RedisServer,
    pub local: RedisServer,
}

impl Pair {
    /// Ephemeral servers with roles a=active@1, b=standby@1.
    pub async fn start() -> Pair {
        Pair::with_roles(RedisServer::start().await, RedisServer::start().await).await
    }

    /// The peer keeps its data across kill/restart.
    pub async fn start_persistent_peer() -> Pair {
        Pair::with_roles(
            RedisServer::start_persistent().await,
            RedisServer::start().await,
        )
        .await
    }

    /// The local Redis keeps its data across kill/restart.
    pub async fn start_persistent_local() -> Pair {
        Pair::with_roles(
            RedisServer::start().await,
            RedisServer::start_persistent().await,
        )
        .await
    }

    /// Writes the role records a=active@1, b=standby@1 into the two servers.
    async fn with_roles(peer: RedisServer, local: RedisServer) -> Pair {
        let pair = Pair { peer, local };
        set_role(&mut pair.peer.client().await, "active", 1).await;
        set_role(&mut pair.local.client().await, "standby", 1).await;
        pair
    }
}

impl Pair {
    /// A connection to the peer that tolerates a loaded machine (see [`conn`]).
    pub async fn peer_conn(&self) -> MultiplexedConnection {
        conn(&self.peer.url()).await
    }

    pub async fn local_conn(&self) -> MultiplexedConnection {
        conn(&self.local.url()).await
    }
}

/// A connection with a generous response timeout: the tests move 100,000 entries while
/// other builds may share the machine, and a slow reply is not a failure.
pub async fn conn(url: &str) -> MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    redis::Client::open(url)
        .expect("valid redis url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

pub async fn set_role(conn: &mut MultiplexedConnection, role: &str, epoch: u64) {
    let _: () = redis::cmd("HSET")
        .arg("tandem:role")
        .arg("role")
        .arg(role)
        .arg("epoch")
        .arg(epoch)
        .query_async(conn)
        .await
        .expect("HSET tandem:role");
}

/// `(role, epoch)` of a region.
pub async fn role(conn: &mut MultiplexedConnection) -> (String, u64) {
    let (r, e): (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg("tandem:role")
        .arg("role")
        .arg("epoch")
        .query_async(conn)
        .await
        .expect("HMGET tandem:role");
    (r.unwrap_or_default(), e.unwrap_or_default())
}

/// A ~400-byte event like the node writes: `type` and a JSON envelope in `event`.
pub fn envelope(event_type: &str, n: u64) -> String {
    serde_json::json!({
        "eventId": format!("00000000-0000-4000-8000-{n:012}"),
        "eventType": event_type,
        "aggregateId": format!("ord-{n}"),
        "aggregateType": "order",
        "sequence": 1,
        "occurredAt": "2026-11-21T12:00:00.000Z",
        "version": 1,
        "correlationId": format!("req-{n}"),
        "causationId": format!("req-{n}"),
        "region": "a",
        "epoch": 1,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "payload": {"orderId": format!("ord-{n}"), "customerId": "c-1",
                    "items": [{"sku": "WIDGET-001", "quantity": 2, "unitPrice": 1000}],
                    "amount": 2000, "currency": "USD"}
    })
    .to_string()
}

/// XADD `count` events to `stream` with auto ids, pipelined in chunks; returns the ids.
pub async fn add_events(
    conn: &mut MultiplexedConnection,
    stream: &str,
    first: u64,
    count: u64,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count as usize);
    let mut n = first;
    while n < first + count {
        let end = (n + 1000).min(first + count);
        let mut pipe = redis::pipe();
        for i in n..end {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("type")
                .arg("OrderPlaced")
                .arg("event")
                .arg(envelope("OrderPlaced", i));
        }
        let chunk: Vec<String> = pipe.query_async(conn).await.expect("pipelined XADD");
        ids.extend(chunk);
        n = end;
    }
    ids
}

/// One consumer group as a standby must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    pub name: String,
    pub last_delivered: String,
    pub entries_read: Option<i64>,
    /// `(id, consumer, deliveries)` of every pending entry.
    pub pending: Vec<(String, String, i64)>,
}

fn s(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// Every group of `stream`, with its pending entries; empty when the stream is missing.
pub async fn groups(conn: &mut MultiplexedConnection, stream: &str) -> Vec<GroupState> {
    let v: Value = match redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
    {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for g in items {
        let Value::Array(kv) = g else { continue };
        let m: BTreeMap<String, Value> = kv.chunks(2).map(|c| (s(&c[0]), c[1].clone())).collect();
        let name = s(&m["name"]);
        let entries_read = match &m["entries-read"] {
            Value::Int(i) => Some(*i),
            _ => None,
        };
        let raw: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(&name)
            .arg("-")
            .arg("+")
            .arg(1_000_000)
            .query_async(conn)
            .await
            .expect("XPENDING");
        let mut pending = Vec::new();
        if let Value::Array(rows) = raw {
            for r in rows {
                if let Value::Array(f) = r {
                    let n = match &f[3] {
                        Value::Int(i) => *i,
                        _ => 0,
                    };
                    pending.push((s(&f[0]), s(&f[1]), n));
                }
            }
        }
        out.push(GroupState {
            name,
            last_delivered: s(&m["last-delivered-id"]),
            entries_read,
            pending,
        });
    }
    out
}

/// Entries of a stream, `(id, [(field, value)])`, read in pages so that a stream of
/// 100,000 entries does not exceed the client's response timeout.
pub async fn entries(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> Vec<crate::redis_state::StreamEntry> {
    crate::redis_state::stream_entries(conn, stream).await
}

pub async fn xlen(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}

/// Waits until `local` holds exactly `count` entries of `stream`.
pub async fn wait_len(
    local: &MultiplexedConnection,
    stream: &str,
    count: u64,
    deadline: Duration,
    what: &str,
) {
    eventually(deadline, what, || {
        let mut l = local.clone();
        async move {
            match xlen(&mut l, stream).await {
                n if n == count => Ok(()),
                n => Err(n),
            }
        }
    })
    .await
}

/// Waits until both sides hold the same `count` entries of `stream` (ids and fields).
pub async fn wait_copied(
    peer: &MultiplexedConnection,
    local: &MultiplexedConnection,
    stream: &str,
    count: usize,
    deadline: Duration,
    what: &str,
) {
    eventually(deadline, what, || {
        let (mut p, mut l) = (peer.clone(), local.clone());
        async move {
            let (theirs, ours) = (entries(&mut p, stream).await, entries(&mut l, stream).await);
            if theirs.len() == count && theirs == ours {
                Ok(())
            } else {
                Err((theirs.len(), ours.len()))
            }
        }
    })
    .await
}

/// Waits until both sides hold the same, non-empty list of entries of `stream`: same ids
/// and fields, in the same order.
pub async fn wait_streams_equal(
    peer: &MultiplexedConnection,
    local: &MultiplexedConnection,
    stream: &str,
    deadline: Duration,
) {
    eventually(
        deadline,
        &format!("{stream} copied with identical ids and fields"),
        || {
            let (mut p, mut l) = (peer.clone(), local.clone());
            async move {
                let (theirs, ours) = (entries(&mut p, stream).await, entries(&mut l, stream).await);
                if !theirs.is_empty() && theirs == ours {
                    Ok(())
                } else {
                    Err((theirs.len(), ours.len()))
                }
            }
        },
    )
    .await
}

/// Waits until both sides hold the same consumer groups on `stream`: positions,
/// entries-read and pending entries.
pub async fn wait_groups_equal(
    peer: &MultiplexedConnection,
    local: &MultiplexedConnection,
    stream: &str,
    deadline: Duration,
) {
    eventually(deadline, &format!("groups of {stream} equal"), || {
        let (mut p, mut l) = (peer.clone(), local.clone());
        async move {
            let (theirs, ours) = (groups(&mut p, stream).await, groups(&mut l, stream).await);
            if theirs == ours {
                Ok(())
            } else {
                Err((theirs, ours))
            }
        }
    })
    .await
}
