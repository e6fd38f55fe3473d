//! Half-open Redis connections: a link that stops answering without closing (bytes
//! dropped in both directions, sockets kept open), then heals. Each command meanwhile
//! hits its response timeout; after the heal the old connection carries bytes again but
//! is out of step (the requests and replies of the drop are gone), so a client that
//! keeps it waits until the kernel gives up on it, minutes later. The node and the
//! replicator must dial anew and answer within seconds of the heal.

use std::time::{Duration, Instant};

use system_tests::chaos::proxy::LinkProxy;
use system_tests::replicator::{add_events, wait_copied, wait_len, Pair, Replicator};
use system_tests::{eventually, order_body, Api, Node, NodeOptions, RedisServer};

/// How soon after the heal service must be back: a few response timeouts (1 s each
/// here), far below the kernel's retransmission limit.
const AFTER_HEAL: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_node_answers_again_within_seconds_after_its_redis_link_drops_bytes_and_heals() {
    // Given an active node whose Redis link goes through a proxy, taking orders
    let redis = RedisServer::start().await;
    let proxy = LinkProxy::start("node-redis", redis.port()).await.unwrap();
    let node =
        Node::start(NodeOptions::new(proxy.redis_url()).env("NODE_REDIS_TIMEOUT_MS", 1000)).await;
    node.wait_ready().await;
    let api = Api::new(node.http());
    api.put_product("WIDGET-001", 1000, 1000).await;
    api.place_ok(&order_body("c-1", &[("WIDGET-001", 1)], "tok_ok"))
        .await;

    // When the link drops every byte (the sockets stay open) long enough for the
    // node's commands to time out
    proxy.drop_all();
    let http = node.http();
    http.wait_readiness(
        503,
        DEADLINE,
        "node not ready while its Redis link drops bytes",
    )
    .await;
    let r = api
        .place_order(&order_body("c-2", &[("WIDGET-001", 1)], "tok_ok"))
        .await;
    assert_eq!(r.status, 503, "an order during the drop: {}", r.text);

    // And the link heals
    proxy.heal();
    let healed = Instant::now();

    // Then the node is ready again and takes orders within seconds
    http.wait_readiness(200, AFTER_HEAL, "node ready again soon after the heal")
        .await;
    let ready_after = healed.elapsed();
    let id = eventually(
        AFTER_HEAL.saturating_sub(healed.elapsed()),
        "an order acknowledged soon after the heal",
        || {
            let api = api.clone();
            async move {
                let r = api
                    .place_order(&order_body("c-3", &[("WIDGET-001", 1)], "tok_ok"))
                    .await;
                if r.status == 201 {
                    Ok(r.order_id())
                } else {
                    Err((r.status, r.text))
                }
            }
        },
    )
    .await;
    eprintln!(
        "node: ready {ready_after:?} after the heal, order {id} acknowledged {:?} after it",
        healed.elapsed()
    );
}

#[tokio::test]
async fn the_replicator_copies_again_within_seconds_after_its_peer_link_drops_bytes_and_heals() {
    // Given a replicator copying from a peer whose link goes through a proxy
    let pair = Pair::start().await;
    let (mut peer, local) = (pair.peer_conn().await, pair.local_conn().await);
    let proxy = LinkProxy::start("peer-redis", pair.peer.port())
        .await
        .unwrap();
    let s = "tandem:events";
    add_events(&mut peer, s, 0, 20).await;
    let rep = Replicator::start(&pair.local.url(), &proxy.redis_url(), &[]).await;
    wait_len(&local, s, 20, DEADLINE, "first events copied").await;

    // When the peer link drops every byte (sockets open) until the replicator's reads
    // time out and it reports the peer unreachable
    proxy.drop_all();
    let http = rep.http();
    http.wait_readiness(
        503,
        DEADLINE,
        "replicator not ready while the peer link drops bytes",
    )
    .await;
    add_events(&mut peer, s, 20, 10).await;

    // And the link heals
    proxy.heal();
    let healed = Instant::now();

    // Then what the peer wrote meanwhile is copied within seconds
    let what = "events written during the drop copied soon after the heal";
    wait_copied(&peer, &local, s, 30, AFTER_HEAL, what).await;
    let copied_after = healed.elapsed();
    http.wait_readiness(200, AFTER_HEAL, "replicator ready again")
        .await;
    eprintln!(
        "replicator: copy resumed {copied_after:?} after the heal, ready {:?} after it",
        healed.elapsed()
    );
}
