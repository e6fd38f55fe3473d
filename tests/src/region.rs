//! One region as most node tests need it: a private Redis and one active node on it.

use crate::api::Api;
use crate::node::{Node, NodeOptions};
use crate::redis_server::{RedisOptions, RedisServer};

#[derive(Debug)]
pub struct Region {
    pub node: Node,
    pub redis: RedisServer,
    pub api: Api,
}

impl Region {
    /// Ephemeral Redis, an active node of region `a`, ready to serve.
    pub async fn start() -> Region {
        Self::start_with(RedisOptions::default(), |o| o).await
    }

    /// Redis with `redis_options`; the node's options adjusted by `configure`.
    pub async fn start_with(
        redis_options: RedisOptions,
        configure: impl FnOnce(NodeOptions) -> NodeOptions,
    ) -> Region {
        let redis = RedisServer::start_with(redis_options).await;
        let node = Node::start(configure(NodeOptions::new(redis.url()))).await;
        // A standby may report not-ready; tests of standbys wait for what they need.
        if node.options().role == "active" {
            node.wait_ready().await;
        }
        let api = Api::new(node.http());
        Region { node, redis, api }
    }
}
