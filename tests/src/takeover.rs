//! Two whole regions wired for a takeover (issue 3): a Redis per region, node `a`
//! seeded active and node `b` seeded standby (each with the other's Redis as its peer),
//! and a replicator in each region pulling from the other. Only the active region's log
//! flows, so at first the replicator in `b` copies and the one in `a` idles.
//!
//! The fixture only starts and stops processes and reads state; every assertion about
//! what a client or an operator sees is in the tests (`tests/tests/takeover_*.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::Value;

use crate::api::Api;
use crate::node::{Node, NodeOptions};
use crate::poll::eventually;
use crate::redis_server::RedisServer;
use crate::redis_state::{self, Dumped, DERIVED_PATTERNS, DLQ, EVENTS};
use crate::replicator::{conn, Replicator};

/// Bound for replication or a projection to catch up on a loaded machine.
pub const CATCH_UP: Duration = Duration::from_secs(20);

/// Both regions and their processes. Every process is killed on drop.
#[derive(Debug)]
pub struct Takeover {
    pub redis_a: RedisServer,
    pub redis_b: RedisServer,
    /// The node of region `a` (seeded active at epoch 1).
    pub node_a: Node,
    /// The node of region `b` (seeded standby at epoch 0).
    pub node_b: Node,
    /// The replicator in `a`: copies `b` into `a` while `b` is active.
    pub rep_a: Replicator,
    /// The replicator in `b`: copies `a` into `b` while `a` is active.
    pub rep_b: Replicator,
}

/// Environment both nodes get. Quick retries keep the flows short. The idle reclaim is
/// pushed beyond every test's deadline on purpose: entries the dead active held must be
/// finished because the promotion took them over, not because a reclaim found them
/// idle later, so a takeover that forgot them fails the test.
fn common(options: NodeOptions) -> NodeOptions {
    options
        .env("NODE_RETRY_BASE_MS", 50)
        .env("NODE_RECLAIM_IDLE_MS", 120_000)
}

impl Takeover {
    /// Starts both regions with default node settings.
    pub async fn start() -> Takeover {
        Self::start_with(|o| o).await
    }

    /// Starts both regions; `configure_a` adjusts node `a`'s options (e.g. durability).
    pub async fn start_with(configure_a: impl FnOnce(NodeOptions) -> NodeOptions) -> Takeover {
        Self::start_with_both(configure_a, |o| o).await
    }

    /// Starts both regions, adjusting each node's options.
    pub async fn start_with_both(
        configure_a: impl FnOnce(NodeOptions) -> NodeOptions,
        configure_b: impl FnOnce(NodeOptions) -> NodeOptions,
    ) -> Takeover {
        let redis_a = RedisServer::start().await;
        let redis_b = RedisServer::start().await;
        let node_a = Node::start(configure_a(common(
            NodeOptions::new(redis_a.url())
                .region("a")
                .role("active")
                .env("NODE_PEER_REDIS_URL", redis_b.url()),
        )))
        .await;
        node_a.wait_ready().await;
        let node_b = Node::start(configure_b(common(
            NodeOptions::new(redis_b.url())
                .region("b")
                .role("standby")
                .env("NODE_PEER_REDIS_URL", redis_a.url()),
        )))
        .await;
        let rep_b = Replicator::start(&redis_b.url(), &redis_a.url(), &[]).await;
        let rep_a = Replicator::start(
            &redis_a.url(),
            &redis_b.url(),
            &[
                ("REPLICATOR_LOCAL_REGION", "a"),
                ("REPLICATOR_PEER_REGION", "b"),
            ],
        )
        .await;
        let t = Takeover {
            redis_a,
            redis_b,
            node_a,
            node_b,
            rep_a,
            rep_b,
        };
        // Node b has read its role (standby at epoch 0) before any test talks to it.
        let api_b = t.api_b();
        eventually(CATCH_UP, "node b reports standby", || async {
            let r = api_b.role().await;
            if r.status == 200 && r.json["role"] == "standby" {
                Ok(())
            } else {
                Err(r.text)
            }
        })
        .await;
        t
    }

    pub fn api_a(&self) -> Api {
        Api::new(self.node_a.http())
    }

    pub fn api_b(&self) -> Api {
        Api::new(self.node_b.http())
    }

    /// A connection to region `a`'s Redis (generous response timeout).
    pub async fn conn_a(&self) -> MultiplexedConnection {
        conn(&self.redis_a.url()).await
    }

    pub async fn conn_b(&self) -> MultiplexedConnection {
        conn(&self.redis_b.url()).await
    }

    /// Starts node `a` again on the same Redis with the same options (after `kill`),
    /// as when region `a`'s compute comes back.
    pub async fn restart_node_a(&mut self) {
        self.node_a.kill();
        let options = self.node_a.options().clone();
        self.node_a = Node::start(options).await;
    }

    /// Waits until `b`'s copy of the event and dead-letter streams equals `a`'s
    /// (same ids, same fields) and `b`'s projection has applied all of it: `b`'s read
    /// models then reflect everything `a` wrote.
    pub async fn wait_b_caught_up(&self) {
        let (a, b) = (self.conn_a().await, self.conn_b().await);
        wait_streams_equal(&a, &b, "b holds a's streams and has projected them").await;
    }
}

/// Waits until `follower`'s event and dead-letter streams equal `leader`'s and the
/// follower's projection cursor stands on its last event.
pub async fn wait_streams_equal(
    leader: &MultiplexedConnection,
    follower: &MultiplexedConnection,
    what: &str,
) {
    eventually(CATCH_UP, what, || {
        let (mut l, mut f) = (leader.clone(), follower.clone());
        async move {
            let (le, fe) = (
                redis_state::stream_entries(&mut l, EVENTS).await,
                redis_state::stream_entries(&mut f, EVENTS).await,
            );
            let (ld, fd) = (
                redis_state::stream_entries(&mut l, DLQ).await,
                redis_state::stream_entries(&mut f, DLQ).await,
            );
            let cursor = projection_cursor(&mut f).await;
            let last = fe.last().map(|(id, _)| id.clone());
            if le == fe && ld == fd && cursor == last {
                Ok(())
            } else {
                Err(format!(
                    "events {} vs {}, dlq {} vs {}, follower cursor {cursor:?} vs last {last:?}",
                    le.len(),
                    fe.len(),
                    ld.len(),
                    fd.len()
                ))
            }
        }
    })
    .await
}

/// `tandem:projection:cursor`: the last event reflected in the derived state.
pub async fn projection_cursor(conn: &mut MultiplexedConnection) -> Option<String> {
    redis::cmd("GET")
        .arg("tandem:projection:cursor")
        .query_async(conn)
        .await
        .expect("GET projection cursor")
}

/// The derived state a client's reads come from (orders, products, shipments,
/// idempotency keys, indexes, counters).
pub async fn derived(conn: &mut MultiplexedConnection) -> BTreeMap<String, Dumped> {
    redis_state::dump(conn, DERIVED_PATTERNS).await
}

/// The event envelopes of every given region's stream, merged by `eventId` (the first
/// copy seen wins; copies of one event are identical).
pub async fn union_by_event_id(conns: &mut [MultiplexedConnection]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for c in conns.iter_mut() {
        for (_, e) in redis_state::events(c).await {
            let id = e["eventId"].as_str().unwrap_or_default().to_string();
            out.entry(id).or_insert(e);
        }
    }
    out
}

/// The `eventId`s of one region's event stream.
pub async fn event_ids(conn: &mut MultiplexedConnection) -> BTreeSet<String> {
    redis_state::events(conn)
        .await
        .into_iter()
        .map(|(_, e)| e["eventId"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `(role, epoch)` from `GET /admin/role`.
pub async fn role_of(api: &Api) -> (String, u64) {
    let r = api.role().await;
    assert_eq!(r.status, 200, "GET /admin/role: {}", r.text);
    (
        r.json["role"].as_str().unwrap_or_default().to_string(),
        r.json["epoch"].as_u64().unwrap_or_default(),
    )
}

/// Polls until the node reports `role` at `epoch`.
pub async fn wait_role(api: &Api, role: &str, epoch: u64) {
    eventually(
        CATCH_UP,
        &format!("node {role} at epoch {epoch}"),
        || async {
            let r = role_of(api).await;
            if r.0 == role && r.1 == epoch {
                Ok(())
            } else {
                Err(r)
            }
        },
    )
    .await
}
