//! A Redis connection that is dialled anew when it stops answering.
//!
//! redis-rs's [`ConnectionManager`] reconnects when the connection reports an error
//! (closed, reset, refused), but not when a command merely gets no answer within the
//! response timeout. A half-open connection (the peer's host restarted, a middlebox lost
//! its state, a partition outlasted the kernel's retransmissions) gives exactly that:
//! every command times out, and after the link heals the old socket is still either
//! silent or out of step (a pipelined connection matches replies to requests in order,
//! and the requests and replies lost meanwhile never come). The manager keeps it until
//! the kernel gives up on it, minutes later.
//!
//! [`Reconnecting`] holds the manager behind an [`ArcSwap`] and swaps in a freshly
//! made one (dialled lazily, by the next command) after a command on the current one
//! timed out: at most once per [`MIN_INTERVAL`], and only if the timed-out command ran
//! on the manager still in place, so late timeouts of commands sent before a swap do
//! not throw away the new connection. Commands already in flight on the old manager
//! finish or time out there; it is closed once the last of them lets go of it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, RedisResult};

/// Shortest time between two replacements of one connection.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

struct Slot {
    generation: u64,
    conn: ConnectionManager,
}

/// A lazily dialled [`ConnectionManager`] that is replaced after a response timeout.
pub struct Reconnecting {
    /// Names the connection in logs (e.g. "peer", "store").
    label: String,
    client: Client,
    config: ConnectionManagerConfig,
    /// Bound on one whole call (dial included), over the manager's own timeouts.
    deadline: Option<Duration>,
    current: ArcSwap<Slot>,
    /// When the current manager was put in place by a replacement.
    replaced_at: Mutex<Option<Instant>>,
    replacements: AtomicU64,
}

impl Reconnecting {
    /// Nothing is dialled until the first command. Must be called within a Tokio
    /// runtime. `deadline`, if any, bounds each [`Reconnecting::run`] as a whole; a call
    /// that exceeds it counts as a response timeout.
    pub fn new_lazy(
        label: impl Into<String>,
        client: Client,
        config: ConnectionManagerConfig,
        deadline: Option<Duration>,
    ) -> RedisResult<Reconnecting> {
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Reconnecting {
            label: label.into(),
            client,
            config,
            deadline,
            current: ArcSwap::from_pointee(Slot {
                generation: 0,
                conn,
            }),
            replaced_at: Mutex::new(None),
            replacements: AtomicU64::new(0),
        })
    }

    /// Runs `call` on the current connection. A timeout (the manager's response
    /// timeout, or `deadline`) replaces the connection for the next calls and is
    /// returned as an I/O error of kind `TimedOut`; other results pass through as they
    /// are.
    pub async fn run<T, F, Fut>(&self, call: F) -> RedisResult<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let slot = self.current.load_full();
        let pending = call(slot.conn.clone());
        let result = match self.deadline {
            Some(d) => match tokio::time::timeout(d, pending).await {
                Ok(r) => r,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {d:?}"),
                ))),
            },
            None => pending.await,
        };
        if let Err(e) = &result {
            if e.is_timeout() {
                self.replace(slot.generation, &e.to_string());
            }
        }
        result
    }

    /// How many times the connection was replaced since start.
    pub fn replacements(&self) -> u64 {
        self.replacements.load(Ordering::Relaxed)
    }

    /// Swaps in a new lazily dialled manager if `generation` is still the current one
    /// and the last swap is at least [`MIN_INTERVAL`] old.
    fn replace(&self, generation: u64, reason: &str) {
        let mut replaced_at = self.replaced_at.lock().expect("replace lock");
        let current = self.current.load();
        if current.generation != generation {
            return; // a command sent before the last swap: that one is gone already
        }
        if replaced_at.is_some_and(|t| t.elapsed() < MIN_INTERVAL) {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(conn) => {
                self.current.store(Arc::new(Slot {
                    generation: generation + 1,
                    conn,
                }));
                *replaced_at = Some(Instant::now());
                self.replacements.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    connection = %self.label,
                    addr = %self.client.get_connection_info().addr(),
                    reason,
                    "redis connection replaced after a response timeout; the next command dials anew"
                );
            }
            Err(e) => tracing::warn!(
                connection = %self.label,
                error = %e,
                "could not replace a redis connection after a response timeout"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_client() -> Client {
        // Port 9 (discard) on loopback: nothing listens; nothing is dialled here anyway.
        Client::open("redis://127.0.0.1:9").unwrap()
    }

    fn reconnecting(deadline: Option<Duration>) -> Reconnecting {
        Reconnecting::new_lazy(
            "test",
            unreachable_client(),
            ConnectionManagerConfig::new().set_number_of_retries(0),
            deadline,
        )
        .unwrap()
    }

    fn timed_out() -> RedisError {
        RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "t"))
    }

    #[tokio::test]
    async fn a_timeout_replaces_the_connection_at_most_once_per_interval() {
        let r = reconnecting(None);
        let e = r.run(|_| async { Err::<(), _>(timed_out()) }).await;
        assert!(e.unwrap_err().is_timeout());
        assert_eq!(r.replacements(), 1);
        // A second timeout right after: within the interval, kept.
        let _ = r.run(|_| async { Err::<(), _>(timed_out()) }).await;
        assert_eq!(r.replacements(), 1);
    }

    #[tokio::test]
    async fn other_errors_and_successes_keep_the_connection() {
        let r = reconnecting(None);
        let refused = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let _ = r.run(|_| async { Err::<(), _>(refused) }).await;
        assert_eq!(r.run(|_| async { Ok(7) }).await.unwrap(), 7);
        assert_eq!(r.replacements(), 0);
    }

    #[tokio::test]
    async fn a_late_timeout_from_before_a_swap_keeps_the_new_connection() {
        let r = reconnecting(None);
        let old = r.current.load().generation;
        r.replace(old, "first");
        assert_eq!(r.replacements(), 1);
        *r.replaced_at.lock().unwrap() = Some(Instant::now() - MIN_INTERVAL * 2);
        r.replace(old, "late");
        assert_eq!(r.replacements(), 1);
    }

    #[tokio::test]
    async fn the_deadline_turns_a_hung_call_into_a_timeout() {
        let r = reconnecting(Some(Duration::from_millis(20)));
        let e = r
            .run(|_| std::future::pending::<RedisResult<()>>())
            .await
            .unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert_eq!(r.replacements(), 1);
    }
}
