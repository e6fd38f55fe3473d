//! The order workflow's model (DESIGN.md section 2): the events, the orders and
//! products derived from them, the order's state machine and the one pure `apply`.
//!
//! The regional node decides with these types and derives all its state with them.
//! This crate reads no clock, draws no random numbers and talks to no Redis or HTTP,
//! so it builds and is tested alone (`cargo test -p orders-model`); its only
//! dependency in the workspace is `eventlog` (the envelope and the key layout).
//!
//! # Layout
//! - [`text`]: bounded, non-blank text a client sends (names, addresses, tokens).
//! - [`product`]: SKUs, prices, stock levels, products and the availability check.
//! - [`order`]: order ids, lines and quantities, the order and its statuses, and the
//!   place-order command.
//! - [`events`]: the domain events, their types, and how they sit in the envelope.
//! - [`flow`]: the order's state machine: what happens next, in one `match`.
//! - [`apply`]: `apply(state, event)`, which all derived state comes from.
//! - [`pii`]: personal data sealed at rest (AES-256-GCM) with a key ring passed in.
//! - [`integration`]: the seed's integration events (`order.status_updated`), derived
//!   from the domain events by one pure function.
//! - [`webhooks`]: webhook subscriptions: ids, URLs, and the subscriptions `apply`
//!   derives.
#![forbid(unsafe_code)]

pub mod apply;
pub mod events;
pub mod flow;
pub mod integration;
pub mod order;
pub mod pii;
pub mod product;
pub mod text;
pub mod webhooks;

pub use apply::{apply, ApplyError, MemState, State};
pub use events::{Cause, DomainEvent, EventType, Writer};
pub use flow::{Input, Module, Next, Step};
pub use order::{Order, OrderId, ShipmentId, Status};
pub use product::{Currency, Product, Quantity, Sku};
