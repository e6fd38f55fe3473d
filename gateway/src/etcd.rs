//! A small etcd v3 client: the calls failover control needs (read a key, a transaction,
//! grant, renew and revoke a lease), spoken to etcd's JSON gateway over HTTP.
//!
//! Why the JSON gateway and not the `etcd-client` crate: every etcd v3 member serves it
//! on its client port (`/v3/...`: etcd 3.4, Debian bookworm's, serves `/v3/` and the
//! older `/v3beta/`), it needs nothing at build time (the gRPC crates need `protoc`),
//! and `reqwest`, already in the workspace, speaks it. Keys and values travel base64
//! encoded and 64-bit integers as JSON strings; both are handled here and nowhere else.
//!
//! Every call has a timeout per endpoint. A call goes to the endpoint that answered
//! last; when that one fails (no connection, no answer in time, or "no leader") the
//! next one is tried, each at most once per call, so any member of the cluster may be
//! down. A write whose every attempt failed may still have been applied
//! ([`EtcdError::Unavailable`]): callers that must know read the key back.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// gRPC status codes etcd answers with that mean "this member cannot serve now": the
/// next endpoint may (no leader, leader changed, request timed out).
const UNAVAILABLE: i64 = 14;
const DEADLINE_EXCEEDED: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered within its timeout. For a write, the outcome is unknown.
    #[error("no etcd endpoint answered: {0}")]
    Unavailable(String),
    /// etcd answered with an error (gRPC status code and message).
    #[error("etcd refused the request (code {code}): {message}")]
    Refused { code: i64, message: String },
    #[error("unexpected answer from etcd: {0}")]
    Decode(String),
}

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (unique per creation: a key deleted
    /// and created again gets a new one).
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's create revision equals this; 0 means "the key does not exist".
    Created { key: String, revision: i64 },
    /// The key's last modification was at this revision.
    Modified { key: String, revision: i64 },
}

/// An operation inside a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Attach the key to this lease (deleted when it expires); 0 for none.
        lease: i64,
    },
    Get {
        key: String,
    },
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnOutcome {
    /// Every compare held and the success branch ran.
    pub succeeded: bool,
    /// The store's revision after the transaction (the revision of its writes).
    pub revision: i64,
    /// For each `Get` of the branch that ran, in order: the key, if it exists.
    pub gets: Vec<Option<KeyValue>>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub id: i64,
    /// TTL etcd granted (it raises a TTL below its minimum, 1.5 election timeouts).
    pub ttl: Duration,
    /// When the successful request was sent: the lease runs at least until this + TTL.
    pub sent_at: Instant,
}

/// A keep-alive's answer.
#[derive(Debug, Clone, Copy)]
pub struct Renewal {
    /// Remaining TTL after the renewal; `None` when the lease no longer exists.
    pub ttl: Option<Duration>,
    /// When the successful request was sent.
    pub sent_at: Instant,
}

/// A client for the endpoints of one etcd cluster.
pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last.
    current: AtomicUsize,
    timeout: Duration,
}

impl EtcdClient {
    /// `endpoints`: base URLs (`http://host:2379`); `timeout`: per endpoint attempt.
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Result<EtcdClient, EtcdError> {
        assert!(!endpoints.is_empty(), "at least one etcd endpoint");
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| EtcdError::Unavailable(format!("HTTP client: {e}")))?;
        Ok(EtcdClient {
            http,
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            current: AtomicUsize::new(0),
            timeout,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The key, if it exists (a linearizable read: a member cut off from the majority
    /// cannot answer it).
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let (answer, _) = self
            .call("/v3/kv/range", json!({ "key": B64.encode(key) }))
            .await?;
        first_kv(&answer)
    }

    /// Runs a transaction: if every compare holds, `success`, else `failure`.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        let body = json!({
            "compare": compare.iter().map(compare_json).collect::<Vec<_>>(),
            "success": success.iter().map(op_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(op_json).collect::<Vec<_>>(),
        });
        let (answer, _) = self.call("/v3/kv/txn", body).await?;
        let succeeded = answer["succeeded"].as_bool().unwrap_or(false);
        let mut gets = Vec::new();
        for r in answer["responses"].as_array().into_iter().flatten() {
            if let Some(range) = r.get("response_range") {
                gets.push(first_kv(range)?);
            }
        }
        Ok(TxnOutcome {
            succeeded,
            revision: int(&answer["header"]["revision"]),
            gets,
        })
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, EtcdError> {
        let secs = ttl.as_secs().max(1);
        let (answer, sent_at) = self
            .call("/v3/lease/grant", json!({ "TTL": secs.to_string() }))
            .await?;
        let id = int(&answer["ID"]);
        if id == 0 {
            return Err(EtcdError::Decode(format!(
                "lease grant without an ID: {answer}"
            )));
        }
        Ok(Lease {
            id,
            ttl: Duration::from_secs(int(&answer["TTL"]).max(0) as u64),
            sent_at,
        })
    }

    /// Renews lease `id` once.
    pub async fn keep_alive(&self, id: i64) -> Result<Renewal, EtcdError> {
        let (answer, sent_at) = self
            .call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))
            .await?;
        // A streaming call: the answer is wrapped in "result" (or "error").
        let result = &answer["result"];
        if result.is_null() {
            return Err(refusal(&answer["error"]).unwrap_or_else(|| {
                EtcdError::Decode(format!("keep-alive answer without a result: {answer}"))
            }));
        }
        let ttl = int(&result["TTL"]);
        Ok(Renewal {
            ttl: (ttl > 0).then(|| Duration::from_secs(ttl as u64)),
            sent_at,
        })
    }

    /// Revokes lease `id`, deleting its keys at once. An unknown lease is not an error.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self
            .call("/v3/lease/revoke", json!({ "ID": id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { code: 5, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// POSTs `body` to `path`, trying each endpoint at most once, starting with the one
    /// that answered last. Returns the answer and when the answered attempt was sent.
    async fn call(&self, path: &str, body: Value) -> Result<(Value, Instant), EtcdError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = &self.endpoints[index];
            let sent_at = Instant::now();
            match self.attempt(endpoint, path, &body).await {
                Ok(answer) => {
                    if index != start {
                        self.current.store(index, Ordering::Relaxed);
                    }
                    return Ok((answer, sent_at));
                }
                Err(Attempt::Refused(e)) => return Err(e),
                Err(Attempt::TryNext(why)) => failures.push(format!("{endpoint}: {why}")),
            }
        }
        self.current.store((start + 1) % n, Ordering::Relaxed);
        Err(EtcdError::Unavailable(failures.join("; ")))
    }

    async fn attempt(&self, endpoint: &str, path: &str, body: &Value) -> Result<Value, Attempt> {
        let exchange = async {
            let resp = self
                .http
                .post(format!("{endpoint}{path}"))
                .json(body)
                .send()
                .await
                .map_err(|e| Attempt::TryNext(crate::node_api::error_chain(&e)))?;
            let status = resp.status();
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Attempt::TryNext(crate::node_api::error_chain(&e)))?;
            let answer: Value = serde_json::from_slice(&bytes).map_err(|e| {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                if status.is_success() {
                    Attempt::Refused(EtcdError::Decode(format!("{e}: {text}")))
                } else {
                    Attempt::TryNext(format!("HTTP {status}: {text}"))
                }
            })?;
            if status.is_success() {
                return Ok(answer);
            }
            match refusal(&answer) {
                Some(EtcdError::Refused { code, message })
                    if code == UNAVAILABLE || code == DEADLINE_EXCEEDED =>
                {
                    Err(Attempt::TryNext(message))
                }
                Some(e) => Err(Attempt::Refused(e)),
                None => Err(Attempt::TryNext(format!("HTTP {status}: {answer}"))),
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Attempt::TryNext(format!("no answer within {:?}", self.timeout)))?
    }
}

enum Attempt {
    /// This endpoint cannot serve now; another may.
    TryNext(String),
    /// The cluster's answer: asking another member would not change it.
    Refused(EtcdError),
}

/// The error of a JSON gateway answer: `{"error","message","code"}`, or in a stream
/// `{"grpc_code","message"}`.
fn refusal(error: &Value) -> Option<EtcdError> {
    let code = error
        .get("code")
        .or_else(|| error.get("grpc_code"))
        .map(int)?;
    let message = error["message"]
        .as_str()
        .or_else(|| error["error"].as_str())
        .unwrap_or("")
        .to_string();
    Some(EtcdError::Refused { code, message })
}

/// etcd's JSON carries 64-bit integers as strings and leaves out zero values.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes(v: &Value) -> Result<Vec<u8>, EtcdError> {
    match v.as_str() {
        None => Ok(Vec::new()),
        Some(s) => B64
            .decode(s)
            .map_err(|e| EtcdError::Decode(format!("base64 {s:?}: {e}"))),
    }
}

fn first_kv(range: &Value) -> Result<Option<KeyValue>, EtcdError> {
    let Some(kv) = range["kvs"].as_array().and_then(|kvs| kvs.first()) else {
        return Ok(None);
    };
    Ok(Some(KeyValue {
        key: bytes(&kv["key"])?,
        value: bytes(&kv["value"])?,
        create_revision: int(&kv["create_revision"]),
        mod_revision: int(&kv["mod_revision"]),
        lease: int(&kv["lease"]),
    }))
}

fn compare_json(c: &Compare) -> Value {
    match c {
        Compare::Created { key, revision } => json!({
            "key": B64.encode(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": revision.to_string(),
        }),
        Compare::Modified { key, revision } => json!({
            "key": B64.encode(key), "target": "MOD", "result": "EQUAL",
            "mod_revision": revision.to_string(),
        }),
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value, lease } => {
            let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
            if *lease != 0 {
                put["lease"] = json!(lease.to_string());
            }
            json!({ "request_put": put })
        }
        Op::Get { key } => json!({ "request_range": { "key": B64.encode(key) } }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_etcd_json_with_string_integers_and_missing_zeros() {
        let range = json!({
            "header": {"revision": "7"},
            "kvs": [{"key": "Zm9v", "value": "YmFy", "create_revision": "3",
                     "mod_revision": "7", "version": "2", "lease": "42"}],
            "count": "1"
        });
        let kv = first_kv(&range).unwrap().unwrap();
        assert_eq!(kv.key, b"foo");
        assert_eq!(kv.value, b"bar");
        assert_eq!((kv.create_revision, kv.mod_revision), (3, 7));
        assert_eq!(kv.lease, 42);
        assert_eq!(first_kv(&json!({"header": {}})).unwrap(), None);
        assert_eq!(int(&json!("9007199254740993")), 9_007_199_254_740_993);
        assert_eq!(int(&Value::Null), 0);
    }

    #[test]
    fn errors_of_plain_and_streaming_answers() {
        let plain = json!({"error": "etcdserver: requested lease not found",
                           "message": "etcdserver: requested lease not found", "code": 5});
        assert!(matches!(
            refusal(&plain),
            Some(EtcdError::Refused { code: 5, .. })
        ));
        let stream = json!({"grpc_code": 14, "http_code": 503, "message": "no leader"});
        assert!(matches!(
            refusal(&stream),
            Some(EtcdError::Refused { code: 14, .. })
        ));
        assert!(refusal(&json!({"header": {}})).is_none());
    }

    #[test]
    fn transactions_are_spelled_as_the_gateway_wants() {
        let c = compare_json(&Compare::Created {
            key: "k".into(),
            revision: 0,
        });
        assert_eq!(c["target"], "CREATE");
        assert_eq!(c["create_revision"], "0");
        assert_eq!(c["key"], "aw==");
        let put = op_json(&Op::Put {
            key: "k".into(),
            value: b"v".to_vec(),
            lease: 42,
        });
        assert_eq!(put["request_put"]["lease"], "42");
        let bare = op_json(&Op::Put {
            key: "k".into(),
            value: b"v".to_vec(),
            lease: 0,
        });
        assert!(bare["request_put"].get("lease").is_none());
    }
}
