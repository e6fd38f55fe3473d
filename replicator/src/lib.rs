//! The replicator: one process per region that pulls the peer region's event streams,
//! consumer-group positions and epoch history into the local region's Redis
//! (DESIGN.md section 3; the MirrorMaker 2 pattern of running next to the target).
//!
//! Entry ids are copied verbatim (`XADD key <id> ...`). Because ids only grow in a
//! stream, the local copy is always a prefix of the peer's stream, the local stream's
//! top id is the resume point (the target is its own checkpoint), a retried batch is
//! rejected by Redis as "already copied", and consumer-group positions need no offset
//! translation.
//!
//! # Layout
//! - [`config`]: the typed, layered configuration (TOML file, then `REPLICATOR_*` env vars).
//! - [`app`]: [`app::Application`] builds the listener and runs every task until shutdown.
//! - [`link`]: a reconnecting Redis connection (redis-rs's `ConnectionManager`) with
//!   connect and response timeouts, errors that name the side, and the tasks' backoff.
//! - [`reply`]: parsing Redis replies (stream entries, XINFO maps).
//! - [`wire`]: the copier's hot path: XREAD replies turned into pipelined XADDs on raw
//!   RESP2 connections, field bytes copied in one piece.
//! - [`gate`]: the decision from both role records: copy, rejoin or idle (pure).
//! - [`roles`]: the task that reads both role records and acts on the gate's decision.
//! - [`replication`]: stream discovery and the entry copier (read peer, write local).
//! - [`groups`]: consumer-group positions and pending entries, copied after their entries.
//! - [`epochs`]: the epoch history (`tandem:epochs`) copied from the peer.
//! - [`quarantine`]: the rejoin's decisions: which local entries stay, go, or move to
//!   the quarantine stream (pure).
//! - [`rejoin`]: rejoin of a region with a divergent tail: move it aside, then follow.
//! - [`lag`]: per-stream replication lag in entries and seconds.
//! - [`metrics`]: the Prometheus registry and every metric the replicator exports.
//! - [`http`]: `/metrics`, `/health/live`, `/health/ready`.
//! - [`status`]: what the tasks share: the gate, reachability, copied positions.
//!
//! `src/bin/replication-bench.rs` is the load generator and probe behind
//! `bench/replication.sh` (a benchmark, not a test).
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod epochs;
pub mod gate;
pub mod groups;
pub mod http;
pub mod lag;
pub mod link;
pub mod metrics;
pub mod quarantine;
pub mod rejoin;
pub mod replication;
pub mod reply;
pub mod roles;
pub mod status;
pub mod wire;

pub use app::Application;
pub use config::Config;
