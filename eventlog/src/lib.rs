//! What the regional node and the replicator must agree on, and nothing else.
//!
//! # Layout
//! - [`envelope`]: the canonical event envelope and how it is stored in a stream entry.
//! - `connection`: a Redis connection dialled anew after a response timeout (a
//!   half-open link); with the `redis` feature.
//! - `entry`: stream entries parsed from Redis replies (XRANGE, XREAD, XAUTOCLAIM); with
//!   the `redis` feature.
//! - [`keys`]: the Redis key layout of one region (streams, role, derived state).
//! - [`roles`]: regions, roles and epochs, and how they are stored.
//! - [`time`]: RFC 3339 timestamps for `occurredAt`.
//! - `unavailable`: which Redis errors mean "not now" (retry) rather than "wrong"; with
//!   the `redis` feature.
#![forbid(unsafe_code)]

#[cfg(feature = "redis")]
pub mod connection;
#[cfg(feature = "redis")]
pub mod entry;
pub mod envelope;
pub mod keys;
pub mod roles;
pub mod time;
#[cfg(feature = "redis")]
pub mod unavailable;

pub use envelope::{Envelope, ENVELOPE_VERSION};
pub use roles::{Epoch, RegionId, Role, RoleRecord};
