//! One region's order workflow on Redis Streams.
//!
//! # Layout
//! - [`app`]: builds the node from its config and runs it until stopped.
//! - [`config`]: typed configuration (`NODE_*`).
//! - [`connections`]: the listener, plain or HTTPS (optionally requiring client
//!   certificates): connection cap, header and idle timeouts, lingering close.
//! - [`api`]: the HTTP API of API.md.
//! - [`durability`]: `replicated` durability: waiting for the standby, and the fallback.
//! - [`orders`], [`inventory`], [`payments`], [`shipments`]: the modules of the
//!   workflow: their commands and consumer-group handlers. What they decide with (the
//!   events, orders, products, the state machine and the pure `apply`) is the
//!   `orders-model` crate's.
//! - [`workflow`]: decide -> apply -> commit, a consumer group's turn on an event, and
//!   the errors and retry policy.
//! - [`webhooks`]: webhook subscriptions and the signed, at-least-once deliveries of
//!   the integration events.
//! - [`sagas`]: saga timeouts: orders not paid in time are cancelled and compensated.
//! - [`store`]: Redis access; its `scripts`: the commit, park and apply scripts and
//!   the typed requests they take, laid out in one place for Rust and Lua.
//! - [`bus`]: consumer groups, retries, dead letters, reclaiming.
//! - [`dead_letters`]: the dead-letter list for operators: pages, filters, bulk replay.
//! - [`projector`]: standby projection and rebuild from the event stream.
//! - [`roles`], [`promotion`]: role, epoch, lease fencing and promotion.
//! - [`jobs`]: admin jobs (promotion, rebuild) that outlive the request that started them.
//! - [`metrics`]: Prometheus metrics (logs and spans: the `telemetry` crate).
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod bus;
pub mod config;
pub mod connections;
pub mod dead_letters;
pub mod durability;
pub mod inventory;
pub mod jobs;
pub mod metrics;
pub mod orders;
pub mod payments;
pub mod projector;
pub mod promotion;
pub mod roles;
pub mod sagas;
pub mod shipments;
pub mod store;
pub mod webhooks;
pub mod workflow;
