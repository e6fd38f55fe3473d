//! The Redis key layout of one region. Both regions use the same names, so a copied
//! entry or consumer group means the same thing on either side.
//!
//! Streams (copied by the replicator, entry ids preserved):
//! - [`EVENTS`]: every domain event of the region, in commit order. It is the outbox and
//!   the source of truth; it is never trimmed.
//! - [`DLQ`]: entries a consumer group gave up on, with the reason.
//!
//! Copied as a hash (fields added or overwritten, never removed):
//! - [`EPOCHS`]: where each epoch began, so a standby knows it before it is promoted.
//!
//! Region-local, never copied:
//! - [`ROLE`]: who is active at which epoch.
//! - [`QUARANTINE`]: events of an old epoch that the new active never received.
//! - [`REPLICATION_CHECKPOINT`]: what the replicator has copied into this region.
//! - [`webhook_lease`]: which node of the region delivers a webhook's events.
//!
//! Derived state (rebuildable from [`EVENTS`], see [`DERIVED_PATTERNS`]): orders,
//! products, shipments, idempotency keys, event indexes, counters.

pub const PREFIX: &str = "tandem:";

pub const EVENTS: &str = "tandem:events";
pub const DLQ: &str = "tandem:dlq";
pub const QUARANTINE: &str = "tandem:quarantine";

/// Hash: `role`, `epoch`, `paused` (Unix ms until which commits wait: a rebuild runs and
/// keeps extending it), `fencing`.
pub const ROLE: &str = "tandem:role";
/// Hash: epoch number -> JSON `{"region","startOffsets":{stream: id},"at"}`.
pub const EPOCHS: &str = "tandem:epochs";
/// Hash: a promotion's intent, written before the new epoch begins (DESIGN.md 4). It
/// expires, so a promotion whose node died cannot hold the local replicator and fence the
/// peer for good; the promotion only takes effect while its intent still stands.
pub const PROMOTION_INTENT: &str = "tandem:promotion-intent";

/// Hash: replicated stream -> last copied entry id, plus `groups:<stream>` -> JSON.
pub const REPLICATION_CHECKPOINT: &str = "tandem:replication:checkpoint";

/// Hash: eventId -> stream entry id in [`EVENTS`].
pub const EVENT_INDEX: &str = "tandem:eventidx";
/// String: id of the last [`EVENTS`] entry reflected in the derived state.
pub const PROJECTION_CURSOR: &str = "tandem:projection:cursor";
/// String: id of the last [`QUARANTINE`] entry the derived state has been rebuilt
/// after. Not derived: it survives a rebuild.
pub const PROJECTION_QUARANTINE_SEEN: &str = "tandem:projection:quarantine-seen";
/// Hash: order status -> number of orders in it.
pub const ORDER_COUNTS: &str = "tandem:stats:orders";

pub fn order(order_id: &str) -> String {
    format!("tandem:order:{order_id}")
}

pub fn product(sku: &str) -> String {
    format!("tandem:product:{sku}")
}

/// String: shipment id -> order id.
pub fn shipment(shipment_id: &str) -> String {
    format!("tandem:shipment:{shipment_id}")
}

/// String: Idempotency-Key -> JSON of the first answer.
pub fn idempotency(key: &str) -> String {
    format!("tandem:idem:{key}")
}

/// List: the [`EVENTS`] entry ids of one aggregate, oldest first.
pub fn aggregate(aggregate_id: &str) -> String {
    format!("tandem:agg:{aggregate_id}")
}

/// String: the replay of one [`DLQ`] entry, by its entry id. The dead-letter stream is
/// append-only like every replicated stream (the replicator copies appends, never
/// deletions), so a replayed entry is marked by an event, not removed: both regions then
/// agree that it is done, also after a failover.
pub fn dlq_replayed(dlq_id: &str) -> String {
    format!("tandem:dlq:replayed:{dlq_id}")
}

/// String: JSON map webhook id -> subscription, derived from the `Webhook*` events. One
/// key: subscriptions are few and change rarely.
pub const WEBHOOKS: &str = "tandem:webhooks";

/// Stream: the integration events a webhook's deliveries gave up on (parked after the
/// bound of attempts). A `tandem:` stream, so the replicator copies it.
pub fn webhook_dlq(webhook_id: &str) -> String {
    format!("tandem:webhook-dlq:{webhook_id}")
}

/// The consumer group on [`EVENTS`] whose position is a webhook's delivery cursor. Its
/// position and pending entries are copied like any group's, so the region promoted
/// after a failover resumes deliveries where the old active one stopped.
pub fn webhook_group(webhook_id: &str) -> String {
    format!("{WEBHOOK_GROUP_PREFIX}{webhook_id}")
}

/// String: the node of this region that delivers a webhook's events (its consumer
/// name), with an expiry the holder keeps renewing. Region-local, never copied: one
/// deliverer per webhook per region keeps one webhook's events in order when several
/// nodes share the region.
pub fn webhook_lease(webhook_id: &str) -> String {
    format!("tandem:webhook-lease:{webhook_id}")
}

/// Every webhook's consumer group starts with this; they are not workflow groups.
pub const WEBHOOK_GROUP_PREFIX: &str = "webhook:";

/// Every key pattern of derived state: what a rebuild deletes and writes anew.
pub const DERIVED_PATTERNS: &[&str] = &[
    "tandem:order:*",
    "tandem:product:*",
    "tandem:shipment:*",
    "tandem:idem:*",
    "tandem:agg:*",
    "tandem:dlq:replayed:*",
    WEBHOOKS,
    EVENT_INDEX,
    PROJECTION_CURSOR,
    ORDER_COUNTS,
];
