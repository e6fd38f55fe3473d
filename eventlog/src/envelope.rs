//! The event envelope (DESIGN.md "Event envelope").
//!
//! A stream entry holds two fields: `type` (the event type, so a consumer can skip an
//! entry without parsing it) and `event` (the whole envelope as JSON). The replicator
//! copies entries field for field, so nothing else in the entry may carry meaning.

use serde::{Deserialize, Serialize};

/// Schema version of the envelope. Changes within a version are additive only.
pub const ENVELOPE_VERSION: u32 = 1;

/// Stream entry field holding the event type.
pub const FIELD_TYPE: &str = "type";
/// Stream entry field holding the JSON envelope.
pub const FIELD_EVENT: &str = "event";

/// The largest `event` field decoded. The node refuses request bodies over 1 MiB, so no
/// event it writes comes near this; anything larger in a stream was not written by a
/// node, and is refused before the JSON parser sees it.
pub const MAX_EVENT_BYTES: usize = 2 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub event_id: String,
    pub event_type: String,
    pub aggregate_id: String,
    pub aggregate_type: String,
    /// Position of this event in its aggregate's history, starting at 1. Consumers use
    /// it to tell a replayed event from a new one, also across a failover.
    pub sequence: u64,
    pub occurred_at: String,
    pub version: u32,
    pub correlation_id: String,
    pub causation_id: String,
    /// Region whose node wrote the event.
    pub region: String,
    /// Epoch in which it was written; events of an old epoch past the new epoch's start
    /// are the ones quarantined on rejoin.
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    pub payload: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("stream entry has no `{0}` field")]
    MissingField(&'static str),
    #[error("stream entry's event is not a valid envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("stream entry's event is {0} bytes, over the {max} byte limit", max = MAX_EVENT_BYTES)]
    TooLarge(usize),
}

impl Envelope {
    /// The `(field, value)` pairs written with XADD.
    pub fn to_fields(&self) -> [(&'static str, String); 2] {
        let json = serde_json::to_string(self).expect("an envelope always serialises");
        [(FIELD_TYPE, self.event_type.clone()), (FIELD_EVENT, json)]
    }

    /// Parses the `event` field of a stream entry, given as field/value pairs.
    pub fn from_fields<'a, I>(fields: I) -> Result<Self, DecodeError>
    where
        I: IntoIterator<Item = (&'a str, &'a [u8])>,
    {
        for (name, value) in fields {
            if name == FIELD_EVENT {
                if value.len() > MAX_EVENT_BYTES {
                    return Err(DecodeError::TooLarge(value.len()));
                }
                return Ok(serde_json::from_slice(value)?);
            }
        }
        Err(DecodeError::MissingField(FIELD_EVENT))
    }
}

/// Stream entry ids are `<ms>-<seq>`. They only grow within a stream, which is what lets
/// the replicator copy them verbatim and consumer positions need no translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_stream_fields() {
        let e = Envelope {
            event_id: "e-1".into(),
            event_type: "OrderPlaced".into(),
            aggregate_id: "o-1".into(),
            aggregate_type: "order".into(),
            sequence: 1,
            occurred_at: "2026-01-01T00:00:00.000Z".into(),
            version: ENVELOPE_VERSION,
            correlation_id: "r-1".into(),
            causation_id: "r-1".into(),
            region: "a".into(),
            epoch: 1,
            traceparent: None,
            payload: serde_json::json!({"orderId": "o-1"}),
        };
        let fields = e.to_fields();
        let back = Envelope::from_fields(fields.iter().map(|(k, v)| (*k, v.as_bytes()))).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn unknown_envelope_fields_are_ignored() {
        let json = br#"{"eventId":"e","eventType":"T","aggregateId":"a","aggregateType":"t","sequence":1,
            "occurredAt":"x","version":1,"correlationId":"c","causationId":"c","region":"a","epoch":1,
            "payload":{},"addedLater":true}"#;
        assert!(Envelope::from_fields([("event", &json[..])]).is_ok());
    }

    #[test]
    fn an_oversized_event_is_refused_before_parsing() {
        let mut big = br#"{"eventId":""#.to_vec();
        big.resize(MAX_EVENT_BYTES + 1, b'x');
        assert!(matches!(
            Envelope::from_fields([("event", &big[..])]),
            Err(DecodeError::TooLarge(n)) if n == MAX_EVENT_BYTES + 1
        ));
    }

    #[test]
    fn stream_ids_order_numerically() {
        let a = StreamId::parse("9-5").unwrap();
        let b = StreamId::parse("10-0").unwrap();
        assert!(a < b);
        assert_eq!(b.to_string(), "10-0");
        assert!(StreamId::parse("10").is_none());
    }
}
