//! Parsing Redis replies of the general-purpose client (role records, XINFO, SCAN,
//! XPENDING). Stream entries are parsed by `eventlog::entry`, as the node parses them.
//! The copier's hot path does not use this module; see [`crate::wire`].

use eventlog::envelope::StreamId;
use redis::Value;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
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
