//! The chaos campaign (issue 7, DESIGN.md section 8): careful clients record a
//! history, a seeded nemesis breaks processes and links, everything heals, and a checker
//! judges the history and both regions' final state. The `chaos` binary is a thin
//! front end to [`campaign::run`].
//!
//! # Layout
//! - [`schedule`]: the seeded fault plan (pure: a seed is a reproducible plan).
//! - [`backend`]: the fault-injection interface, and an attached system (switchovers only).
//! - [`process`]: the process backend: every process local, every cuttable link proxied.
//! - [`docker`]: the Docker backend: the compose stack, broken with `docker kill`,
//!   `docker pause`, `docker network disconnect` and `docker restart`.
//! - [`proxy`]: the blackholing TCP proxies on those links.
//! - [`clients`]: careful clients: idempotent retries until a definitive answer.
//! - [`history`]: what the clients sent and saw.
//! - [`snapshot`]: both regions' final streams, roles and derived state.
//! - [`checker`]: history + snapshots -> violations of the seven invariants (pure).
//! - [`campaign`]: one run: catalogue, clients, faults, heal, settle, check.
//! - [`report`]: the table and its last line `N faults, M violations`.

pub mod backend;
pub mod campaign;
pub mod checker;
pub mod clients;
pub mod docker;
pub mod history;
pub mod process;
pub mod proxy;
pub mod report;
pub mod schedule;
pub mod snapshot;

/// The nodes' `NODE_DURABILITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Acknowledge after the local write.
    Async,
    /// Acknowledge after the standby holds the order (or say `Tandem-Durability: local`).
    Replicated,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Async => "async",
            Durability::Replicated => "replicated",
        }
    }
}
