//! A connection to one Redis, with connect and response timeouts, that says which side
//! of the replication it belongs to.
//!
//! The peer region may be refused, killed or hung at any time. The connection is
//! redis-rs's [`ConnectionManager`]: nothing is dialled before the first command (a peer
//! that is down at start is normal), a command that finds the connection broken fails
//! and the next one dials again, once, within the connect timeout; the caller decides
//! how long to back off ([`retry_policy`]). The response timeout turns a hung peer into
//! an error instead of a task stuck forever, and has the connection dialled anew
//! ([`Reconnecting`]): the manager itself only reconnects on a connection error, so a
//! half-open link (packets dropped, socket up) would keep every later command waiting
//! on a dead connection long after the link healed.

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use eventlog::connection::Reconnecting;
use redis::aio::ConnectionManagerConfig;
use redis::{Cmd, Pipeline, RedisError, Script, Value};
use std::time::Duration;

/// Which side of the replication a connection or an error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Peer,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Peer => "peer",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{side} redis unreachable: {source}")]
    Unreachable {
        side: &'static str,
        source: RedisError,
    },
    #[error("{side} redis: {source}")]
    Command {
        side: &'static str,
        source: RedisError,
    },
    #[error("{side} redis: {message}")]
    Server { side: &'static str, message: String },
    #[error("{side} redis: unexpected reply to {what}")]
    Reply {
        side: &'static str,
        what: &'static str,
    },
    #[error("{0}")]
    Other(String),
}

impl LinkError {
    /// Connection-level failures say nothing about the data; the caller backs off and
    /// retries the same work. Everything else is logged as a real problem.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, LinkError::Unreachable { .. })
    }
}

pub struct Link {
    side: Side,
    conn: Reconnecting,
}

impl Link {
    /// A link to `url`; nothing is dialled yet. Must be called within the runtime.
    pub fn new(
        side: Side,
        url: &str,
        ca: Option<internal_tls::PemFile<'_>>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Link, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            // One dial per attempt: the tasks back off themselves, with their own limits.
            .set_number_of_retries(0);
        let client = internal_tls::redis_client(url, ca).map_err(|e| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "Redis client", e))
        })?;
        Ok(Link {
            side,
            conn: Reconnecting::new_lazy(side.as_str(), client, config, None)?,
        })
    }

    pub fn side(&self) -> Side {
        self.side
    }

    fn unreachable(&self, source: RedisError) -> LinkError {
        LinkError::Unreachable {
            side: self.side.as_str(),
            source,
        }
    }

    /// Sorts an error: a connection problem says the side is unreachable, anything
    /// else is the command's.
    fn classify(&self, e: RedisError) -> LinkError {
        // A server loading its AOF after a restart counts as unreachable too.
        let connection_problem =
            eventlog::unavailable::is_unavailable(&e) || e.is_unrecoverable_error();
        if connection_problem {
            self.unreachable(e)
        } else {
            LinkError::Command {
                side: self.side.as_str(),
                source: e,
            }
        }
    }

    /// Runs one command. A server error reply is an `Err`.
    pub async fn query(&self, cmd: &Cmd) -> Result<Value, LinkError> {
        let reply = self
            .conn
            .run(|mut c| async move { cmd.query_async::<Value>(&mut c).await })
            .await;
        match reply {
            Ok(Value::ServerError(e)) => Err(self.classify(e.into())),
            Ok(v) => Ok(v),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Runs a pipeline made with [`pipeline()`] and returns one reply per command; server
    /// errors are returned in place as [`Value::ServerError`] so the caller can judge each
    /// command.
    pub async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, LinkError> {
        self.conn
            .run(|mut c| async move { pipe.query_async::<Vec<Value>>(&mut c).await })
            .await
            .map_err(|e| self.classify(e))
    }

    /// Runs a Lua script by its SHA, loading it first when Redis does not know it (a
    /// restarted Redis forgets loaded scripts).
    pub async fn script(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[Vec<u8>],
    ) -> Result<Value, LinkError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(&a[..]);
        }
        let invocation = &invocation;
        let reply = self
            .conn
            .run(|mut c| async move { invocation.invoke_async::<Value>(&mut c).await })
            .await;
        match reply {
            Ok(Value::ServerError(e)) => Err(self.classify(e.into())),
            Ok(v) => Ok(v),
            Err(e) => Err(self.classify(e)),
        }
    }
}

/// A pipeline whose failed commands are reported in place instead of failing it whole.
pub fn pipeline() -> Pipeline {
    let mut p = redis::pipe();
    p.ignore_errors();
    p
}

/// The backoff of a failing task loop: 50 ms doubling up to `max`, for as long as it
/// fails. Build a fresh one after a success.
pub fn retry_policy(max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(max)
        .without_max_times()
        .build()
}
