//! The fault-injection interface: what the campaign asks of whatever runs the system.
//!
//! The process backend ([`super::process`]) runs everything as local processes behind
//! the tool's own link proxies; the Docker backend ([`super::docker`]) runs the compose
//! stack and breaks containers (`docker kill`, `docker pause`, `docker network
//! disconnect`, `docker restart`); [`Attached`] is a system someone else runs. All three
//! share the schedule, the clients, the checker and the report.

use std::future::Future;
use std::path::PathBuf;

use super::schedule::{Capabilities, FaultKind};

/// Where the system under test answers. The campaign's own reads (settle, snapshots)
/// go straight to the nodes and Redis servers, never through a link a fault may cut.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub gateway: String,
    /// Bearer token for `POST /gateway/failover`.
    pub gateway_admin_token: Option<String>,
    /// Node URLs of regions `a` and `b`.
    pub nodes: [String; 2],
    /// Bearer token for the nodes' `/admin/*`.
    pub node_admin_token: Option<String>,
    /// Redis URLs of regions `a` and `b`.
    pub redis: [String; 2],
}

/// Injects faults into a running system and heals them.
pub trait Backend {
    /// For the report: `process`, `docker`, `attach`.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Where the system answers now. The campaign reads it again after
    /// [`heal_all`](Self::heal_all): a restarted container may have been given another
    /// published port (the gateway's stays fixed, since the clients hold it).
    fn endpoints(&self) -> &Endpoints;

    /// Starts a fault. Planned switchovers are the campaign's own (gateway admin API),
    /// never asked of a backend.
    fn inject(&mut self, fault: FaultKind) -> impl Future<Output = Result<(), String>>;

    /// Ends a fault that [`inject`](Self::inject) started (restarts what it killed,
    /// resumes what it paused, heals what it cut).
    fn heal(&mut self, fault: FaultKind) -> impl Future<Output = Result<(), String>>;

    /// Makes sure everything runs and every link forwards, whatever happened; returns
    /// what it found amiss (e.g. a process that exited by itself).
    fn heal_all(&mut self) -> impl Future<Output = Vec<String>>;

    /// Processes that exited although no fault killed them (each reported once).
    fn unexpected_exits(&mut self) -> impl Future<Output = Vec<String>>;

    /// Keeps the logs and data on disk; returns what is where.
    fn keep_logs(&mut self) -> impl Future<Output = Vec<(String, PathBuf)>>;
}

/// A system started by someone else: the tool has neither its processes nor proxies on
/// its links, so only a planned switchover (the gateway's admin API) can be injected.
pub struct Attached {
    pub endpoints: Endpoints,
}

impl Backend for Attached {
    fn name(&self) -> &'static str {
        "attach"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::attached(self.endpoints.gateway_admin_token.is_some())
    }

    fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    async fn inject(&mut self, fault: FaultKind) -> Result<(), String> {
        Err(format!(
            "{fault}: an attached system's processes and links are not the tool's to break"
        ))
    }

    async fn heal(&mut self, _fault: FaultKind) -> Result<(), String> {
        Ok(())
    }

    async fn heal_all(&mut self) -> Vec<String> {
        Vec::new()
    }

    async fn unexpected_exits(&mut self) -> Vec<String> {
        Vec::new()
    }

    async fn keep_logs(&mut self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }
}
