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
//!
//! The scripts and their typed requests ([`CommitRequest`], [`ParkRequest`],
//! [`ApplyRequest`]) are in [`scripts`], where one layout per script gives both the
//! Rust encoding and the Lua names of every argument.

pub mod scripts;

use eventlog::connection::Reconnecting;
use eventlog::{keys, Envelope, RoleRecord};
use internal_tls::PemFile;
use orders_model::DomainEvent;
use orders_model::{ApplyError, State};
use redis::{FromRedisValue, Value};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use scripts::{
    Ack, AppliedEntry, ApplyRequest, CommitRequest, Counter, Encoded, Expect, Guarded, NewEvent,
    ParkRequest, Write,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis cannot be reached or did not answer in time: retry later, answer 503.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// Redis answered with an error: a bug or corrupted data, not worth retrying soon.
    #[error("redis error: {0}")]
    Redis(String),
    /// A script refused its arguments as malformed (its reply began with
    /// [`scripts::BAD_REQUEST`]): the Rust and Lua sides disagree, a bug; nothing was
    /// written.
    #[error("script refused a malformed request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        if e.code() == Some(scripts::BAD_REQUEST) {
            StoreError::BadRequest(e.detail().unwrap_or_default().to_string())
        } else if eventlog::unavailable::is_unavailable(&e) {
            // A server still loading its AOF after a restart is away, not broken.
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
        let outcome = self
            .commit_request(&tx.commit_request(events, epoch, ack))
            .await?;
        match &outcome {
            CommitOutcome::Committed => self.cache.put(tx.writes.iter()),
            CommitOutcome::Conflict(key) => self.cache.evict([key]),
            _ => {}
        }
        Ok(outcome)
    }

    /// Sends one commit (see [`CommitRequest`]); [`Store::commit`] builds it from a
    /// transaction.
    pub async fn commit_request(
        &self,
        req: &CommitRequest<'_>,
    ) -> Result<CommitOutcome, StoreError> {
        CommitOutcome::parse(self.eval(&req.encode()).await?)
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
        let req = ParkRequest {
            epoch,
            group,
            entry_id,
            fields,
        };
        CommitOutcome::parse(self.eval(&req.encode()).await?)
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
        let req = ApplyRequest {
            expected_cursor,
            entries: entries
                .iter()
                .map(|&(entry_id, event_id, aggregate_id)| AppliedEntry {
                    entry_id,
                    event_id,
                    aggregate_id,
                })
                .collect(),
            writes: tx
                .writes
                .iter()
                .map(|(key, value)| Write { key, value })
                .collect(),
            counters: tx.counters(),
        };
        self.apply_request(&req).await
    }

    /// Sends one projector step (see [`ApplyRequest`]): false when the cursor had moved.
    pub async fn apply_request(&self, req: &ApplyRequest<'_>) -> Result<bool, StoreError> {
        let reply = self.eval(&req.encode()).await?;
        Ok(
            matches!(reply.first(), Some(Value::SimpleString(s)) if s == "ok")
                || matches!(reply.first(), Some(Value::BulkString(b)) if b == b"ok"),
        )
    }

    /// Runs a script on arguments already encoded for it. A request the script refuses
    /// as malformed is [`StoreError::BadRequest`].
    pub async fn eval(&self, encoded: &Encoded<'_>) -> Result<Vec<Value>, StoreError> {
        let mut inv = encoded.script().prepare_invoke();
        for key in &encoded.keys {
            inv.key(key.as_ref());
        }
        for arg in &encoded.args {
            inv.arg(arg.as_ref());
        }
        self.invoke(&inv).await
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

impl Tx {
    /// The commit of this transaction: every key read is compared, a key only written
    /// (never read) is just set.
    pub fn commit_request<'a>(
        &'a self,
        events: &'a [(Envelope, DomainEvent)],
        epoch: u64,
        ack: Option<(&'a str, &'a str)>,
    ) -> CommitRequest<'a> {
        let expect = |v: &'a Option<String>| match v {
            Some(v) => Expect::Value(v),
            None => Expect::Absent,
        };
        let mut guarded: Vec<Guarded<'a>> = self
            .reads
            .iter()
            .map(|(key, read)| Guarded {
                key,
                expect: expect(read),
                write: self.writes.get(key).map(String::as_str),
            })
            .collect();
        guarded.extend(
            self.writes
                .iter()
                .filter(|(k, _)| !self.reads.contains_key(*k))
                .map(|(key, value)| Guarded {
                    key,
                    expect: Expect::Nothing,
                    write: Some(value),
                }),
        );
        CommitRequest {
            epoch,
            guarded,
            events: events
                .iter()
                .map(|(env, _)| {
                    let [(_, event_type), (_, json)] = env.to_fields();
                    NewEvent {
                        event_id: &env.event_id,
                        aggregate_id: &env.aggregate_id,
                        event_type: event_type.into(),
                        json: json.into(),
                    }
                })
                .collect(),
            counters: self.counters(),
            ack: ack.map(|(group, entry_id)| Ack { group, entry_id }),
        }
    }

    fn counters(&self) -> Vec<Counter<'_>> {
        self.incrs
            .iter()
            .map(|(key, field, delta)| Counter {
                key,
                field,
                delta: *delta,
            })
            .collect()
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
