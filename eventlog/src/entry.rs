//! Stream entries as Redis returns them (XRANGE, XREAD, XREADGROUP, XAUTOCLAIM), parsed
//! in one place for the node and the replicator.
//!
//! The field bytes are moved out of the reply, never copied: every consumer group of
//! the node reads every entry of the stream, so this is the node's hottest parse. Field
//! names are text (every Tandem stream writes ASCII names); a field whose name is not
//! UTF-8 is left out. The replicator's copier does not parse entries at all (it forwards
//! the reply's bytes); this is for everything else.

use crate::envelope::{DecodeError, Envelope};
use redis::Value;

/// One stream entry with its fields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// One `[id, [field, value, ...]]` pair; `None` for anything else. A deleted entry
    /// (still referenced by a pending list) has no fields.
    fn from_value(v: Value) -> Option<Entry> {
        let Value::Array(mut parts) = v else {
            return None;
        };
        if parts.len() != 2 {
            return None;
        }
        let raw_fields = parts.pop()?;
        let id = bulk_string(parts.pop()?)?;
        let mut fields = Vec::new();
        if let Value::Array(flat) = raw_fields {
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(v)) = (bulk_string(k), bulk_bytes(v)) {
                    fields.push((k, v));
                }
            }
        }
        Some(Entry { id, fields })
    }

    /// An XRANGE reply (or the entries part of XAUTOCLAIM).
    pub fn from_range(v: Value) -> Vec<Entry> {
        match v {
            Value::Array(items) => items.into_iter().filter_map(Entry::from_value).collect(),
            _ => Vec::new(),
        }
    }

    /// An XREAD / XREADGROUP reply: nil, or per stream `[key, entries]` (a map in RESP3).
    pub fn from_read(v: Value) -> Vec<Entry> {
        let per_stream: Vec<Value> = match v {
            Value::Array(streams) => streams
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                    _ => None,
                })
                .collect(),
            Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        per_stream.into_iter().flat_map(Entry::from_range).collect()
    }

    /// An XAUTOCLAIM reply: `[next, entries, deleted]`.
    pub fn from_autoclaim(v: Value) -> (String, Vec<Entry>) {
        let Value::Array(mut parts) = v else {
            return ("0-0".into(), Vec::new());
        };
        if parts.len() < 2 {
            return ("0-0".into(), Vec::new());
        }
        let entries = Entry::from_range(parts.swap_remove(1));
        let next = bulk_string(parts.swap_remove(0)).unwrap_or_else(|| "0-0".into());
        (next, entries)
    }

    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn field_str(&self, name: &str) -> Option<&str> {
        self.field(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn envelope(&self) -> Result<Envelope, DecodeError> {
        Envelope::from_fields(self.fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }
}

fn bulk_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn bulk_string(v: Value) -> Option<String> {
    bulk_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn parses_range_read_and_autoclaim_replies() {
        let range = Value::Array(vec![entry("5-1", &["type", "T", "event", "{}"])]);
        let e = Entry::from_range(range.clone());
        assert_eq!(e[0].id, "5-1");
        assert_eq!(e[0].field_str("type"), Some("T"));
        assert_eq!(e[0].field("event"), Some(&b"{}"[..]));
        assert!(Entry::from_range(Value::Nil).is_empty());

        let read = Value::Array(vec![Value::Array(vec![
            bulk("tandem:events"),
            range.clone(),
        ])]);
        assert_eq!(Entry::from_read(read), e);
        assert!(Entry::from_read(Value::Nil).is_empty());

        let claimed = Value::Array(vec![bulk("7-0"), range, Value::Array(vec![])]);
        assert_eq!(Entry::from_autoclaim(claimed), ("7-0".to_string(), e));
    }

    #[test]
    fn a_deleted_entry_has_no_fields() {
        let v = Value::Array(vec![Value::Array(vec![bulk("1-0"), Value::Nil])]);
        let e = Entry::from_range(v);
        assert_eq!(e.len(), 1);
        assert!(e[0].fields.is_empty());
    }
}
