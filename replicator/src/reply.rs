//! Parsing Redis replies of the general-purpose client (role records, XINFO, XRANGE
//! for lag and rejoin). Entry fields stay the byte strings Redis sent: a quarantined
//! or compared entry must be exactly what was written. The copier's hot path does
//! not use this module; see [`crate::wire`].

use eventlog::envelope::StreamId;
use redis::Value;

/// One stream entry: its id and its flat `field, value, field, value ...` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: StreamId,
    pub fields: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected reply shape: {0}")]
pub struct ShapeError(pub &'static str);

pub fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

pub fn string(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        other => bytes(other).map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => string(other)?.parse().ok(),
    }
}

pub fn stream_id(v: &Value) -> Option<StreamId> {
    StreamId::parse(&string(v)?)
}

pub fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

fn into_array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// The key/value pairs of an XINFO-style reply: a flat array in RESP2, a map in RESP3.
pub fn pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((string(k)?, v)))
            .collect(),
        Value::Array(a) => a
            .chunks_exact(2)
            .filter_map(|kv| Some((string(&kv[0])?, &kv[1])))
            .collect(),
        _ => Vec::new(),
    }
}

pub fn field<'a>(pairs: &'a [(String, &'a Value)], name: &str) -> Option<&'a Value> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
}

/// Takes the byte string out of a value without copying it.
fn take_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// Parses `[[id, [f, v, ...]], ...]` as returned by XRANGE and inside XREAD.
pub fn entries(v: Value) -> Result<Vec<Entry>, ShapeError> {
    if v == Value::Nil {
        return Ok(Vec::new());
    }
    let items = into_array(v).ok_or(ShapeError("entries are not an array"))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let mut pair = into_array(item)
            .ok_or(ShapeError("entry is not an array"))?
            .into_iter();
        let id = pair
            .next()
            .as_ref()
            .and_then(stream_id)
            .ok_or(ShapeError("entry id"))?;
        let fields = match pair.next() {
            Some(Value::Nil) | None => Vec::new(),
            Some(f) => into_array(f)
                .ok_or(ShapeError("entry fields are not an array"))?
                .into_iter()
                .map(|f| take_bytes(f).ok_or(ShapeError("entry field is not a string")))
                .collect::<Result<_, _>>()?,
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_xrange_entries() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("5-1"),
            Value::Array(vec![bulk("type"), bulk("T"), bulk("event"), bulk("{}")]),
        ])]);
        let e = entries(v).unwrap();
        assert_eq!(e[0].id, StreamId { ms: 5, seq: 1 });
        assert_eq!(e[0].fields[3], b"{}".to_vec());
        assert!(entries(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn parses_info_pairs() {
        let v = Value::Array(vec![
            bulk("name"),
            bulk("g"),
            bulk("pending"),
            Value::Int(3),
        ]);
        let p = pairs(&v);
        assert_eq!(field(&p, "pending").and_then(int), Some(3));
        assert_eq!(field(&p, "name").and_then(string).as_deref(), Some("g"));
    }
}
