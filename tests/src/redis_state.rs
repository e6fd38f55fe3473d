//! What is in a region's Redis, read for assertions: "nothing was written" checks and
//! "rebuilt state equals live state" comparisons.

use std::collections::{BTreeMap, BTreeSet};

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Value as RedisValue};

/// The event stream, the dead-letter stream, and the prefix of every webhook's
/// consumer group, as the node and the replicator name them.
pub use eventlog::keys::{DLQ, EVENTS, WEBHOOK_GROUP_PREFIX};

/// Derived-state key patterns that a rebuild must reproduce exactly. The projection
/// cursor is left out on purpose: it is bookkeeping, not state a client can see. Listed
/// here, not taken from `eventlog::keys::DERIVED_PATTERNS`, so that a pattern dropped
/// from the node's list is still checked.
pub const DERIVED_PATTERNS: &[&str] = &[
    "tandem:order:*",
    "tandem:product:*",
    "tandem:shipment:*",
    "tandem:idem:*",
    "tandem:agg:*",
    "tandem:eventidx",
    "tandem:stats:orders",
    "tandem:webhooks",
];

/// A stream entry: `(id, [(field, value)])`.
pub type StreamEntry = (String, Vec<(String, Vec<u8>)>);
/// A stream's entries, oldest first.
pub type StreamEntries = Vec<StreamEntry>;

/// One key's value, compared type-aware (hash fields and set members sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dumped {
    String(Vec<u8>),
    Hash(BTreeMap<String, Vec<u8>>),
    List(Vec<Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    ZSet(Vec<(Vec<u8>, String)>),
    /// Entry ids and their fields.
    Stream(StreamEntries),
    Other(String),
}

/// Every key matching `patterns` (glob, as for SCAN MATCH) with its value.
pub async fn dump(conn: &mut MultiplexedConnection, patterns: &[&str]) -> BTreeMap<String, Dumped> {
    let mut keys = BTreeSet::new();
    for pattern in patterns {
        keys.extend(scan_keys(conn, pattern).await);
    }
    let mut out = BTreeMap::new();
    for key in keys {
        if let Some(v) = dump_key(conn, &key).await {
            out.insert(key, v);
        }
    }
    out
}

/// Every key of the database with its value.
pub async fn dump_all(conn: &mut MultiplexedConnection) -> BTreeMap<String, Dumped> {
    dump(conn, &["*"]).await
}

/// Key names matching `pattern`, via SCAN (never KEYS on a busy server).
pub async fn scan_keys(conn: &mut MultiplexedConnection, pattern: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// One key's value, or `None` when it vanished in between.
pub async fn dump_key(conn: &mut MultiplexedConnection, key: &str) -> Option<Dumped> {
    let kind: String = redis::cmd("TYPE")
        .arg(key)
        .query_async(conn)
        .await
        .expect("TYPE");
    let v = match kind.as_str() {
        "none" => return None,
        "string" => Dumped::String(conn.get(key).await.expect("GET")),
        "hash" => {
            let map: BTreeMap<String, Vec<u8>> = conn.hgetall(key).await.expect("HGETALL");
            Dumped::Hash(map)
        }
        "list" => Dumped::List(conn.lrange(key, 0, -1).await.expect("LRANGE")),
        "set" => Dumped::Set(conn.smembers(key).await.expect("SMEMBERS")),
        "zset" => {
            let items: Vec<(Vec<u8>, String)> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(conn)
                .await
                .expect("ZRANGE");
            Dumped::ZSet(items)
        }
        "stream" => Dumped::Stream(stream_entries(conn, key).await),
        other => Dumped::Other(other.to_string()),
    };
    Some(v)
}

/// All entries of a stream: `(id, [(field, value)])`, oldest first.
pub async fn stream_entries(conn: &mut MultiplexedConnection, key: &str) -> StreamEntries {
    try_stream_entries(conn, key)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// All entries of a stream, `(id, [(field, value)])`, oldest first; read in pages so
/// that a stream of 100,000 entries stays within a client's response timeout.
pub async fn try_stream_entries(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> Result<Vec<StreamEntry>, String> {
    const PAGE: usize = 2000;
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let raw: RedisValue = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(conn)
            .await
            .map_err(|e| format!("XRANGE {stream}: {e}"))?;
        let RedisValue::Array(items) = raw else {
            return Ok(out);
        };
        let n = items.len();
        for item in items {
            let RedisValue::Array(mut parts) = item else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields_v = parts.pop().expect("two parts");
            let id: String = redis::from_redis_value(parts.pop().expect("two parts"))
                .map_err(|e| format!("{stream} entry id: {e}"))?;
            let flat: Vec<Vec<u8>> = redis::from_redis_value(fields_v)
                .map_err(|e| format!("{stream} entry {id}: {e}"))?;
            let fields = flat
                .chunks(2)
                .filter(|c| c.len() == 2)
                .map(|c| (String::from_utf8_lossy(&c[0]).into_owned(), c[1].clone()))
                .collect();
            out.push((id, fields));
        }
        match out.last() {
            Some((id, _)) if n == PAGE => start = format!("({id}"),
            _ => return Ok(out),
        }
    }
}

/// The parsed `event` envelopes of `tandem:events`, oldest first, with entry ids.
pub async fn events(conn: &mut MultiplexedConnection) -> Vec<(String, serde_json::Value)> {
    stream_entries(conn, EVENTS)
        .await
        .into_iter()
        .filter_map(|(id, fields)| {
            let event = fields.iter().find(|(f, _)| f == "event")?;
            Some((id, serde_json::from_slice(&event.1).ok()?))
        })
        .collect()
}

/// A cheap fingerprint of a database for "nothing was written" assertions: the set of
/// key names, the event stream's length and every derived key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub dbsize: u64,
    pub keys: BTreeSet<String>,
    pub events_len: u64,
    pub derived: BTreeMap<String, Dumped>,
}

pub async fn snapshot(conn: &mut MultiplexedConnection) -> Snapshot {
    let dbsize: u64 = redis::cmd("DBSIZE")
        .query_async(conn)
        .await
        .expect("DBSIZE");
    let keys = scan_keys(conn, "*").await;
    let events_len: u64 = conn.xlen(EVENTS).await.expect("XLEN");
    let derived = dump(conn, DERIVED_PATTERNS).await;
    Snapshot {
        dbsize,
        keys,
        events_len,
        derived,
    }
}

/// Panics with the differences when `after` differs from `before`.
pub fn assert_unchanged(before: &Snapshot, after: &Snapshot, context: &str) {
    if before == after {
        return;
    }
    let added: Vec<_> = after.keys.difference(&before.keys).collect();
    let removed: Vec<_> = before.keys.difference(&after.keys).collect();
    let changed: Vec<_> = after
        .derived
        .iter()
        .filter(|(k, v)| before.derived.get(*k).is_some_and(|b| b != *v))
        .map(|(k, _)| k)
        .collect();
    panic!(
        "{context}: Redis changed.\n events: {} -> {}\n dbsize: {} -> {}\n added keys: {added:?}\n removed keys: {removed:?}\n changed derived keys: {changed:?}",
        before.events_len, after.events_len, before.dbsize, after.dbsize
    );
}

/// Lists the first differing keys of two dumps (for readable failure messages).
pub fn diff_dumps(
    a: &BTreeMap<String, Dumped>,
    b: &BTreeMap<String, Dumped>,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        if out.len() >= limit {
            break;
        }
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => out.push(format!("{k}: {} != {}", show(x), show(y))),
            (Some(_), None) => out.push(format!("{k}: only in the first")),
            (None, Some(_)) => out.push(format!("{k}: only in the second")),
            (None, None) => {}
        }
    }
    out
}

fn show(d: &Dumped) -> String {
    let s = match d {
        Dumped::String(v) => String::from_utf8_lossy(v).into_owned(),
        Dumped::Hash(m) => format!(
            "{:?}",
            m.iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect::<BTreeMap<_, _>>()
        ),
        Dumped::List(l) => format!(
            "{:?}",
            l.iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    };
    if s.len() > 400 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(400).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// The consumer group whose position is the node's saga-timeout cursor.
pub const SAGA_CURSOR_GROUP: &str = "saga-timeouts";

/// Consumer groups of `tandem:events` and whether each has caught up.
#[derive(Debug, Clone)]
pub struct GroupsProgress {
    pub last_generated_id: String,
    /// `(group, last_delivered_id, pending)`
    pub groups: Vec<(String, String, usize)>,
}

impl GroupsProgress {
    /// Every group has been delivered the last entry and acknowledged everything.
    pub fn idle(&self) -> bool {
        !self.groups.is_empty()
            && self
                .groups
                .iter()
                .all(|(_, last, pending)| *last == self.last_generated_id && *pending == 0)
    }
}

pub async fn groups_progress(conn: &mut MultiplexedConnection) -> GroupsProgress {
    let exists: bool = conn.exists(EVENTS).await.expect("EXISTS");
    if !exists {
        return GroupsProgress {
            last_generated_id: String::new(),
            groups: Vec::new(),
        };
    }
    let stream: redis::streams::StreamInfoStreamReply =
        conn.xinfo_stream(EVENTS).await.expect("XINFO STREAM");
    let groups: redis::streams::StreamInfoGroupsReply =
        conn.xinfo_groups(EVENTS).await.expect("XINFO GROUPS");
    GroupsProgress {
        last_generated_id: stream.last_generated_id,
        groups: groups
            .groups
            .into_iter()
            // The saga timeout's cursor (regional-node `sagas::CURSOR_GROUP`) reads
            // nothing and trails the stream by the timeout on purpose: no work left.
            .filter(|g| g.name != SAGA_CURSOR_GROUP)
            // A webhook's delivery cursor waits on its receiver, not on the workflow
            // (a dead receiver holds it back for good): not workflow backlog.
            .filter(|g| !g.name.starts_with(WEBHOOK_GROUP_PREFIX))
            .map(|g| (g.name, g.last_delivered_id, g.pending))
            .collect(),
    }
}

/// Waits until every consumer group of `tandem:events` has read and acknowledged every
/// entry: the workflow has nothing left to do.
pub async fn wait_workflow_idle(conn: &mut MultiplexedConnection, deadline: std::time::Duration) {
    let conn = &*conn;
    crate::poll::eventually(deadline, "every consumer group caught up", || {
        let mut conn = conn.clone();
        async move {
            let p = groups_progress(&mut conn).await;
            if p.idle() {
                Ok(())
            } else {
                Err(p)
            }
        }
    })
    .await
}

/// The event types of `aggregate` as written in the raw stream (not through the API),
/// oldest first: duplicates appended by a handler show up here even if an index hides
/// them.
pub async fn stream_event_types(conn: &mut MultiplexedConnection, aggregate: &str) -> Vec<String> {
    events(conn)
        .await
        .into_iter()
        .filter(|(_, e)| e["aggregateId"] == aggregate)
        .map(|(_, e)| e["eventType"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits until `order` is confirmed in this region's stream while its payment step's
/// entry is still pending in the `payments` group: the charge is in flight (a retry
/// waiting), which is where the failover tests cut a region off.
pub async fn wait_payment_pending(
    conn: &MultiplexedConnection,
    order: &str,
    deadline: std::time::Duration,
    what: &str,
) {
    crate::poll::eventually(deadline, what, || {
        let mut conn = conn.clone();
        async move {
            let types = stream_event_types(&mut conn, order).await;
            let pending: RedisValue = redis::cmd("XPENDING")
                .arg(EVENTS)
                .arg("payments")
                .query_async(&mut conn)
                .await
                .unwrap_or(RedisValue::Nil);
            // XPENDING's summary form: [count, lowest id, highest id, consumers].
            let pending_count = match &pending {
                RedisValue::Array(v) => match v.first() {
                    Some(RedisValue::Int(n)) => *n,
                    _ => 0,
                },
                _ => 0,
            };
            if types.iter().any(|t| t == "OrderConfirmed") && pending_count > 0 {
                Ok(())
            } else {
                Err((types, pending))
            }
        }
    })
    .await
}
