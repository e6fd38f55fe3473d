//! Redis access for one region: loading state, the atomic commit, the projector's
//! apply step, and reads of the event log.
//!
//! Every write of the workflow goes through [`Store::commit`]: one Lua script that
//! checks the region is active at the writer's epoch, checks that every key the
//! decision was based on is unchanged (compare-and-set on the whole value), then
//! appends the events, writes the state they imply, indexes them and acknowledges
//! the consumed entry. The stream is the outbox, so there is no dual write; a
//! concurrent writer's commit makes ours fail with [`CommitOutcome::Conflict`], and
//! the caller decides again on fresh state.

use eventlog::connection::Reconnecting;
use eventlog::{keys, Envelope, RoleRecord};
use internal_tls::PemFile;
use orders_model::DomainEvent;
use orders_model::{ApplyError, State};
use redis::{FromRedisValue, Script, Value};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or did not answer in time: retry later, answer 503.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error: a bug or corrupted data, not worth retrying soon.
    #[error("redis error: {0}")]
    Redis(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // A server still loading its AOF after a restart is away, not broken.
        if eventlog::unavailable::is_unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Redis(e.to_string())
        }
    }
}

#[derive(Clone)]
pub struct Store {
    /// Replaced after a call times out: a half-open connection is never reused. Its
    /// deadline is the upper bound on any one call, so a request fails fast when Redis
    /// is gone.
    conn: Arc<Reconnecting>,
    cache: Arc<StateCache>,
}

/// Last known values of derived-state keys, to save the read before a decision.
///
/// A cached value may be stale (another node or the projector wrote since), which is
/// safe for every decision that commits: the commit compares against Redis and a
/// conflict evicts the key. A decision to do nothing, or to refuse, is only trusted
/// on fresh reads (see `workflow`). Bounded: when full it is simply emptied.
#[derive(Default)]
struct StateCache {
    values: Mutex<HashMap<String, String>>,
}

const CACHE_CAPACITY: usize = 100_000;

impl StateCache {
    fn get(&self, key: &str) -> Option<String> {
        self.values.lock().expect("cache lock").get(key).cloned()
    }

    fn put<'a>(&self, entries: impl IntoIterator<Item = (&'a String, &'a String)>) {
        let mut values = self.values.lock().expect("cache lock");
        for (k, v) in entries {
            if values.len() >= CACHE_CAPACITY {
                values.clear();
            }
            values.insert(k.clone(), v.clone());
        }
    }

    fn evict<'a>(&self, keys: impl IntoIterator<Item = &'a String>) {
        let mut values = self.values.lock().expect("cache lock");
        for k in keys {
            values.remove(k);
        }
    }
}

impl Store {
    /// Connects lazily: the node starts (and reports not ready) while Redis is down,
    /// and the manager reconnects by itself when it returns. A call that gets no answer
    /// in time has the connection dialled anew for the next ones (see
    /// [`Reconnecting`]): a timeout may mean a half-open link the manager would keep.
    /// A `rediss://` URL trusts only `ca` when given (NODE_REDIS_CA).
    pub fn connect(
        url: &str,
        ca: Option<PemFile<'_>>,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        let client = internal_tls::redis_client(url, ca).map_err(StoreError::Redis)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.min(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = Reconnecting::new_lazy("node", client, config, Some(timeout))?;
        Ok(Store {
            conn: Arc::new(conn),
            cache: Arc::default(),
        })
    }

    /// Runs one command under the store's timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.bounded(|mut conn| async move { cmd.query_async::<T>(&mut conn).await })
            .await
    }

    pub async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.bounded(|mut conn| async move { pipe.query_async::<T>(&mut conn).await })
            .await
    }

    /// Runs a Lua script (EVALSHA, loading it on first use) under the store's timeout.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.bounded(|mut conn| async move { inv.invoke_async::<T>(&mut conn).await })
            .await
    }

    /// A call that does not answer within the timeout counts as Redis being away (a
    /// timeout is an I/O error: [`StoreError::Unavailable`]), and has the connection
    /// replaced.
    async fn bounded<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        Ok(self.conn.run(call).await?)
    }

    async fn mget(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.query(redis::cmd("MGET").arg(keys)).await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// A JSON value of derived state, parsed; one that does not parse is corrupt.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(raw) = self.get(key).await? else {
            return Ok(None);
        };
        let parsed = serde_json::from_str(&raw).map_err(|source| ApplyError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        Ok(Some(parsed))
    }

    pub async fn role(&self) -> Result<Option<RoleRecord>, StoreError> {
        let values: Vec<Option<String>> = self
            .query(
                redis::cmd("HMGET")
                    .arg(keys::ROLE)
                    .arg(&RoleRecord::FIELDS[..]),
            )
            .await?;
        RoleRecord::from_hmget(&values).map_err(StoreError::Redis)
    }

    /// The id of the last entry of a stream ("0-0" when empty).
    pub async fn last_id(&self, stream: &str) -> Result<String, StoreError> {
        let entries: Vec<(String, Value)> = self
            .query(
                redis::cmd("XREVRANGE")
                    .arg(stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(entries
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_else(|| "0-0".into()))
    }

    /// Appends events and the state they imply in one atomic step (see the module doc).
    pub async fn commit(
        &self,
        tx: &Tx,
        events: &[(Envelope, DomainEvent)],
        epoch: u64,
        ack: Option<(&str, &str)>,
    ) -> Result<CommitOutcome, StoreError> {
        let mut inv = COMMIT.prepare_invoke();
        inv.key(keys::ROLE)
            .key(keys::EVENTS)
            .key(keys::EVENT_INDEX)
            .key(keys::PROJECTION_CURSOR);
        // Every key read is compared; a key only written (never read) is just set.
        let mut guarded: Vec<(&String, Option<&Option<String>>)> =
            tx.reads.iter().map(|(k, v)| (k, Some(v))).collect();
        guarded.extend(
            tx.writes
                .keys()
                .filter(|k| !tx.reads.contains_key(*k))
                .map(|k| (k, None)),
        );
        let (group, ack_id) = ack.unwrap_or(("", ""));
        inv.arg(epoch.to_string())
            .arg(guarded.len())
            .arg(events.len())
            .arg(tx.incrs.len())
            .arg(group)
            .arg(ack_id);
        for (key, expected) in &guarded {
            inv.key(key.as_str());
            match expected {
                None => inv.arg("n").arg(""),
                Some(None) => inv.arg("a").arg(""),
                Some(Some(v)) => inv.arg("v").arg(v.as_str()),
            };
            match tx.writes.get(key.as_str()) {
                Some(new) => inv.arg("1").arg(new.as_str()),
                None => inv.arg("0").arg(""),
            };
        }
        for (env, _) in events {
            inv.key(keys::aggregate(&env.aggregate_id));
            let [(_, ty), (_, json)] = env.to_fields();
            inv.arg(env.event_id.as_str()).arg(ty).arg(json);
        }
        for (key, field, delta) in &tx.incrs {
            inv.key(key.as_str());
            inv.arg(field.as_str()).arg(*delta);
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        let outcome = CommitOutcome::parse(reply)?;
        match &outcome {
            CommitOutcome::Committed => self.cache.put(tx.writes.iter()),
            CommitOutcome::Conflict(key) => self.cache.evict([key]),
            _ => {}
        }
        Ok(outcome)
    }

    /// Moves `entry_id`, consumed by `group`, to the dead-letter stream with `fields`,
    /// and acknowledges it, if the region is still writable at `epoch`.
    pub async fn park(
        &self,
        epoch: u64,
        group: &str,
        entry_id: &str,
        fields: &[(&str, &str)],
    ) -> Result<CommitOutcome, StoreError> {
        let mut inv = PARK.prepare_invoke();
        inv.key(keys::ROLE).key(keys::DLQ).key(keys::EVENTS);
        inv.arg(epoch.to_string()).arg(group).arg(entry_id);
        for (f, v) in fields {
            inv.arg(*f).arg(*v);
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        CommitOutcome::parse(reply)
    }

    /// The projector's step: writes the state a batch of replicated entries implies
    /// (`(entry id, event id, aggregate id)` each, in stream order) and moves the cursor
    /// to the last one, if the cursor still stands where the caller read it (so two
    /// projectors never both apply an entry).
    pub async fn apply_batch(
        &self,
        tx: &Tx,
        entries: &[(&str, &str, &str)],
        expected_cursor: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut inv = APPLY.prepare_invoke();
        inv.key(keys::PROJECTION_CURSOR).key(keys::EVENT_INDEX);
        inv.arg(expected_cursor.unwrap_or(""))
            .arg(entries.len())
            .arg(tx.writes.len())
            .arg(tx.incrs.len());
        for (entry_id, event_id, aggregate_id) in entries {
            inv.key(keys::aggregate(aggregate_id));
            inv.arg(*entry_id).arg(*event_id);
        }
        for (key, value) in &tx.writes {
            inv.key(key.as_str());
            inv.arg(value.as_str());
        }
        for (key, field, delta) in &tx.incrs {
            inv.key(key.as_str());
            inv.arg(field.as_str()).arg(*delta);
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        Ok(
            matches!(reply.first(), Some(Value::SimpleString(s)) if s == "ok")
                || matches!(reply.first(), Some(Value::BulkString(b)) if b == b"ok"),
        )
    }

    /// Reads entries `[start, end]` of a stream (ids or `-`/`+`/`(id`).
    pub async fn xrange(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let reply: Value = self
            .query(
                redis::cmd("XRANGE")
                    .arg(stream)
                    .arg(start)
                    .arg(end)
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        Ok(Entry::from_range(reply))
    }
}

/// What a commit did.
#[derive(Debug, PartialEq)]
pub enum CommitOutcome {
    /// Appended.
    Committed,
    /// A key changed since it was read: decide again on fresh state.
    Conflict(String),
    /// The region is not active at the writer's epoch: never write.
    NotActive { role: String, epoch: String },
    /// Derived state is being rebuilt: wait and try again.
    Paused,
    /// The region's write window (lease, or the peer's word) had ended by Redis' clock
    /// when the commit arrived: never write.
    Fenced,
}

impl CommitOutcome {
    fn parse(reply: Vec<Value>) -> Result<CommitOutcome, StoreError> {
        let strings: Vec<String> = reply
            .into_iter()
            .map(|v| String::from_redis_value(v).map_err(|e| StoreError::Redis(e.to_string())))
            .collect::<Result<_, _>>()?;
        let mut it = strings.into_iter();
        match it.next().as_deref() {
            Some("ok") => Ok(CommitOutcome::Committed),
            Some("conflict") => Ok(CommitOutcome::Conflict(it.next().unwrap_or_default())),
            Some("not_active") => Ok(CommitOutcome::NotActive {
                role: it.next().unwrap_or_default(),
                epoch: it.next().unwrap_or_default(),
            }),
            Some("paused") => Ok(CommitOutcome::Paused),
            Some("fenced") => Ok(CommitOutcome::Fenced),
            other => Err(StoreError::Redis(format!(
                "commit script answered {other:?}"
            ))),
        }
    }
}

/// Stream entries, parsed where the replicator parses them too.
pub use eventlog::entry::Entry;

/// A unit of work: the values read (compared at commit) and the values to write.
#[derive(Debug, Default)]
pub struct Tx {
    reads: BTreeMap<String, Option<String>>,
    /// Values read for information only (the availability pre-check): not compared at
    /// commit, so a place-order does not conflict with every reservation of its SKUs.
    peeks: BTreeMap<String, Option<String>>,
    /// Keys whose value came from the cache.
    cached: Vec<String>,
    /// Bypass the cache.
    fresh: bool,
    writes: BTreeMap<String, String>,
    incrs: Vec<(String, String, i64)>,
}

impl Tx {
    pub fn new() -> Tx {
        Tx::default()
    }

    /// Loads the keys not read yet, in one round trip.
    pub async fn load<I, S>(&mut self, store: &Store, keys: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut missing = Vec::new();
        for key in keys.into_iter().map(Into::into) {
            if self.reads.contains_key(&key) {
                continue;
            }
            match store.cache.get(&key).filter(|_| !self.fresh) {
                Some(v) => {
                    self.cached.push(key.clone());
                    self.reads.insert(key, Some(v));
                }
                None => missing.push(key),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let values = store.mget(&missing).await?;
        store.cache.put(
            missing
                .iter()
                .zip(&values)
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v))),
        );
        self.reads.extend(missing.into_iter().zip(values));
        Ok(())
    }

    /// A transaction that reads only from Redis, never from the cache.
    pub fn fresh() -> Tx {
        Tx {
            fresh: true,
            ..Tx::default()
        }
    }

    /// True when some value was taken from the cache (and may be stale).
    pub fn used_cache(&self) -> bool {
        !self.cached.is_empty()
    }

    /// Forgets the cached values this transaction used.
    pub fn evict_cached(&self, store: &Store) {
        store.cache.evict(&self.cached);
    }

    /// Loads keys that the commit must not compare (see `peeks`).
    pub async fn peek<I, S>(&mut self, store: &Store, keys: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        // Always read from Redis: the availability check answers the client at once,
        // so it must not rest on a value another node may have outdated.
        let missing: Vec<String> = keys
            .into_iter()
            .map(Into::into)
            .filter(|k| !self.reads.contains_key(k) && !self.peeks.contains_key(k))
            .collect();
        if !missing.is_empty() {
            let values = store.mget(&missing).await?;
            self.peeks.extend(missing.into_iter().zip(values));
        }
        Ok(())
    }

    /// Records `key` as absent without reading it: for keys named by an id this node
    /// just generated (a UUID), which nobody can have written. The commit still checks.
    pub fn assume_absent(&mut self, key: String) {
        self.reads.entry(key).or_insert(None);
    }
}

impl State for Tx {
    fn get(&self, key: &str) -> Result<Option<&str>, ApplyError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(Some(v));
        }
        match self.reads.get(key).or_else(|| self.peeks.get(key)) {
            Some(v) => Ok(v.as_deref()),
            None => Err(ApplyError::NotLoaded(key.to_string())),
        }
    }
    fn put(&mut self, key: &str, value: String) {
        self.writes.insert(key.to_string(), value);
    }
    fn incr(&mut self, key: &str, field: &str, delta: i64) {
        self.incrs.push((key.to_string(), field.to_string(), delta));
    }
}

/// The check every script that appends to a replicated stream starts with. KEYS[1]:
/// role; ARGV[1]: the writer's epoch. The region must be active at that epoch, inside
/// its write window by Redis' clock once a lease is enforced (see
/// `eventlog::roles::fields::WRITE_UNTIL`), and not paused by a rebuild. Defines
/// `now_ms()`.
const WRITE_GUARD: &str = r#"
local role = redis.call('HMGET', KEYS[1], 'role', 'epoch', 'paused', 'fencing', 'write_until')
if role[1] ~= 'active' or role[2] ~= ARGV[1] then
  return {'not_active', tostring(role[1]), tostring(role[2])}
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if role[4] and not (role[5] and tonumber(role[5]) > now_ms()) then
  return {'fenced', tostring(role[5])}
end
if role[3] then
  local until_ms = tonumber(role[3])
  if until_ms and until_ms > now_ms() then
    return {'paused'}
  end
end
"#;

/// KEYS: role, events, event index, cursor, then one per guarded key, one aggregate
/// index per event, one per counter. ARGV: epoch, #guarded, #events, #counters,
/// ack group, ack id, then (mode, expected, write?, value) per guarded key,
/// (eventId, type, json) per event, (field, delta) per counter.
static COMMIT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{WRITE_GUARD}{COMMIT_BODY}")));

const COMMIT_BODY: &str = r#"
local ng, ne, nc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 7
for i = 1, ng do
  local cur = redis.call('GET', KEYS[4 + i])
  if ARGV[a] == 'a' then
    if cur then return {'conflict', KEYS[4 + i]} end
  elseif ARGV[a] == 'v' and cur ~= ARGV[a + 1] then
    return {'conflict', KEYS[4 + i]}
  end
  a = a + 4
end
a = 7
for i = 1, ng do
  if ARGV[a + 2] == '1' then redis.call('SET', KEYS[4 + i], ARGV[a + 3]) end
  a = a + 4
end
local out = {'ok'}
for j = 1, ne do
  local id = redis.call('XADD', KEYS[2], '*', 'type', ARGV[a + 1], 'event', ARGV[a + 2])
  redis.call('HSET', KEYS[3], ARGV[a], id)
  redis.call('RPUSH', KEYS[4 + ng + j], id)
  out[#out + 1] = id
  a = a + 3
end
for k = 1, nc do
  redis.call('HINCRBY', KEYS[4 + ng + ne + k], ARGV[a], ARGV[a + 1])
  a = a + 2
end
if ne > 0 then redis.call('SET', KEYS[4], out[#out]) end
if ARGV[5] ~= '' then redis.call('XACK', KEYS[2], ARGV[5], ARGV[6]) end
return out
"#;

/// KEYS: role, dead letters, events. ARGV: epoch, group, entry id, then the dead-letter
/// entry's fields and values. Moves a consumed entry to the dead letters and
/// acknowledges it, under the same guard as a commit: a region that is no longer
/// active (or fenced) must not add to a replicated stream.
static PARK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{WRITE_GUARD}{}",
        r#"
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[3])
return {'ok'}
"#
    ))
});

/// KEYS: cursor, event index, then one aggregate index per entry, one per write, one
/// per counter. ARGV: expected cursor ('' = none), #entries, #writes, #counters, then
/// (entry id, event id) per entry, the values, then (field, delta) per counter.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '' and cur) or (ARGV[1] ~= '' and cur ~= ARGV[1]) then return {'moved'} end
local n, nw, nc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local a = 5
for i = 1, n do
  redis.call('HSET', KEYS[2], ARGV[a + 1], ARGV[a])
  redis.call('RPUSH', KEYS[2 + i], ARGV[a])
  a = a + 2
end
local last = ARGV[a - 2]
for i = 1, nw do
  redis.call('SET', KEYS[2 + n + i], ARGV[a])
  a = a + 1
end
for k = 1, nc do
  redis.call('HINCRBY', KEYS[2 + n + nw + k], ARGV[a], ARGV[a + 1])
  a = a + 2
end
redis.call('SET', KEYS[1], last)
return {'ok'}
"#,
    )
});
