//! Both regions' final state, read straight from their Redis after the settle: the
//! role record, the epoch history, the event, dead-letter and quarantine streams, and
//! every key of derived state. The checker judges these (and the history) and nothing
//! else.

use std::collections::BTreeMap;
use std::time::Duration;

use eventlog::envelope::StreamId;
use eventlog::{keys, Envelope};
use redis::aio::MultiplexedConnection;

use crate::redis_state::{self, Dumped, StreamEntry};

/// One entry of `tandem:events`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// The stream entry id: Redis's clock (ms) when the entry was first appended, kept
    /// verbatim by the replicator, so it is the commit time in either region.
    pub id: String,
    /// The `type` field.
    pub event_type: String,
    /// The `event` field as stored (compared byte for byte between the regions).
    pub raw: String,
    /// The parsed envelope; `None` when the entry cannot be read.
    pub env: Option<Envelope>,
}

impl StoredEvent {
    pub fn new(id: &str, event_type: &str, raw: &str) -> StoredEvent {
        StoredEvent {
            id: id.to_string(),
            event_type: event_type.to_string(),
            raw: raw.to_string(),
            env: serde_json::from_str(raw).ok(),
        }
    }

    /// The commit time in Unix ms (from the entry id).
    pub fn ms(&self) -> u64 {
        StreamId::parse(&self.id).map(|s| s.ms).unwrap_or(0)
    }
}

/// One entry of `tandem:quarantine`: an event the rejoin moved out of a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    pub id: String,
    /// The stream it came from and its id there (its commit time).
    pub stream: String,
    pub original_id: String,
    pub env: Option<Envelope>,
}

impl Quarantined {
    pub fn original_ms(&self) -> u64 {
        StreamId::parse(&self.original_id)
            .map(|s| s.ms)
            .unwrap_or(0)
    }
}

/// One region as the settle left it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSnapshot {
    pub region: String,
    /// `role` and `epoch` of `tandem:role`.
    pub role: Option<String>,
    pub epoch: u64,
    /// `tandem:epochs`: epoch -> its record (JSON text).
    pub epochs: BTreeMap<u64, String>,
    pub events: Vec<StoredEvent>,
    /// `tandem:dlq` entries: id and fields.
    pub dlq: Vec<StreamEntry>,
    pub quarantine: Vec<Quarantined>,
    /// Every key of derived state (eventlog's `DERIVED_PATTERNS`).
    pub derived: BTreeMap<String, Dumped>,
}

impl RegionSnapshot {
    /// An empty region (for tests).
    pub fn empty(region: &str) -> RegionSnapshot {
        RegionSnapshot {
            region: region.to_string(),
            role: None,
            epoch: 0,
            epochs: BTreeMap::new(),
            events: Vec::new(),
            dlq: Vec::new(),
            quarantine: Vec::new(),
            derived: BTreeMap::new(),
        }
    }

    pub fn is_active(&self) -> bool {
        self.role.as_deref() == Some("active")
    }

    /// Reads the region's Redis at `url`.
    pub async fn read(region: &str, url: &str) -> Result<RegionSnapshot, String> {
        let mut conn = connect(url).await?;
        let (role, epoch): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(keys::ROLE)
            .arg("role")
            .arg("epoch")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("{url}: HMGET role: {e}"))?;
        let epochs: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::EPOCHS)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("{url}: HGETALL epochs: {e}"))?;
        let events = redis_state::try_stream_entries(&mut conn, keys::EVENTS)
            .await?
            .into_iter()
            .map(|(id, fields)| {
                StoredEvent::new(&id, &field(&fields, "type"), &field(&fields, "event"))
            })
            .collect();
        let dlq = redis_state::try_stream_entries(&mut conn, keys::DLQ).await?;
        let quarantine = redis_state::try_stream_entries(&mut conn, keys::QUARANTINE)
            .await?
            .into_iter()
            .map(|(id, fields)| Quarantined {
                id,
                stream: field(&fields, "stream"),
                original_id: field(&fields, "originalId"),
                env: serde_json::from_str(&field(&fields, "event")).ok(),
            })
            .collect();
        let derived = redis_state::dump(&mut conn, keys::DERIVED_PATTERNS).await;
        Ok(RegionSnapshot {
            region: region.to_string(),
            role,
            epoch: epoch.unwrap_or(0),
            epochs: epochs
                .into_iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
                .collect(),
            events,
            dlq,
            quarantine,
            derived,
        })
    }
}

fn field(fields: &[(String, Vec<u8>)], name: &str) -> String {
    fields
        .iter()
        .find(|(f, _)| f == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// A connection that tolerates a loaded machine (large streams take a while to read).
pub async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    redis::Client::open(url)
        .map_err(|e| format!("{url}: {e}"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))
}
