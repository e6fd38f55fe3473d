//! A reconnecting connection to one Redis, with connect and response timeouts.
//!
//! The peer region may be refused, killed or hung at any time. A [`Link`] never gives
//! up: a failed command drops the connection, the next command dials again, and the
//! caller decides how long to back off. Timeouts turn a hung peer into an error instead
//! of a task stuck forever.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, Value};
use std::sync::Mutex;
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
    client: Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// The current connection, `None` after a failure until the next command dials.
    conn: Mutex<Option<MultiplexedConnection>>,
}

impl Link {
    pub fn new(
        side: Side,
        url: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Link, RedisError> {
        let client = Client::open(url)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Ok(Link {
            side,
            client,
            config,
            connect_timeout,
            conn: Mutex::new(None),
        })
    }

    pub fn side(&self) -> Side {
        self.side
    }

    async fn connection(&self) -> Result<MultiplexedConnection, LinkError> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(c.clone());
        }
        let dial = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config);
        let conn = match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.unreachable(e)),
            Err(_) => {
                return Err(self.unreachable(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))))
            }
        };
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn unreachable(&self, source: RedisError) -> LinkError {
        LinkError::Unreachable {
            side: self.side.as_str(),
            source,
        }
    }

    /// Sorts an error: connection problems also drop the connection so that the next
    /// command dials a fresh one (a timed-out multiplexed connection may be wedged).
    fn classify(&self, e: RedisError) -> LinkError {
        let connection_problem = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error();
        if connection_problem {
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
        let mut conn = self.connection().await?;
        match cmd.query_async::<Value>(&mut conn).await {
            Ok(Value::ServerError(e)) => Err(LinkError::Command {
                side: self.side.as_str(),
                source: e.into(),
            }),
            Ok(v) => Ok(v),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Runs a pipeline made with [`pipeline()`] and returns one reply per command; server
    /// errors are returned in place as [`Value::ServerError`] so the caller can judge each
    /// command.
    pub async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, LinkError> {
        let mut conn = self.connection().await?;
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) => Err(self.classify(e)),
        }
    }

    /// Runs a Lua script by its SHA, sending the body on a `NOSCRIPT` reply (a restarted
    /// Redis forgets loaded scripts).
    pub async fn script(
        &self,
        script: &Lua,
        keys: &[&str],
        args: &[Vec<u8>],
    ) -> Result<Value, LinkError> {
        let build = |name: &str, first: &str| {
            let mut c = redis::cmd(name);
            c.arg(first).arg(keys.len()).arg(keys);
            for a in args {
                c.arg(&a[..]);
            }
            c
        };
        match self.query(&build("EVALSHA", &script.hash)).await {
            Err(LinkError::Command { source, .. }) if source.code() == Some("NOSCRIPT") => {
                self.query(&build("EVAL", script.source)).await
            }
            other => other,
        }
    }
}

/// A pipeline whose failed commands are reported in place instead of failing it whole.
pub fn pipeline() -> Pipeline {
    let mut p = redis::pipe();
    p.ignore_errors();
    p
}

/// A Lua script and its SHA1, run with EVALSHA.
pub struct Lua {
    source: &'static str,
    hash: String,
}

impl Lua {
    pub fn new(source: &'static str) -> Lua {
        Lua {
            source,
            hash: redis::Script::new(source).get_hash().to_string(),
        }
    }
}

/// Exponential backoff for a failing loop: 50 ms doubling up to `max`.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);

    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::MIN,
            max,
        }
    }

    /// The delay to wait now; doubles the next one.
    pub fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }
}
