//! The process backend: the whole topology as local processes on free ports, started
//! with the harness (two `redis-server` with AOF, a node and a replicator per region,
//! the gateway), with every link a fault may cut going through a [`LinkProxy`]:
//!
//! - gateway -> node a, gateway -> node b;
//! - region a's processes -> Redis b (node a's fencing peer, replicator a's source);
//! - region b's processes -> Redis a.
//!
//! Redis runs with `appendonly yes` and `appendfsync always` (the harness's persistent
//! Redis): whatever Redis acknowledged is on disk before the reply, so a SIGKILL or a
//! restart from the AOF can lose nothing it acknowledged, and any loss the checker
//! finds is the node's or the replicator's, never Redis's fsync window. (`everysec`
//! would also survive a process kill, since the write(2) precedes the reply, but not an
//! OS crash; `always` makes the argument independent of that detail. The cost is
//! throughput, which the campaign does not measure.)

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::backend::{Backend, Endpoints};
use super::proxy::LinkProxy;
use super::schedule::{Capabilities, FaultKind, Link, Region, Target};
use super::Durability;
use crate::gateway::{Gateway, GatewayOptions, RegionNode, GATEWAY_TOKEN};
use crate::node::TEST_ADMIN_TOKEN;
use crate::redis_server::{RedisOptions, RedisServer};
use crate::replicator::Replicator;
use crate::workdir::WorkDir;

/// A process the backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Component {
    Node(Region),
    Redis(Region),
    Replicator(Region),
    Gateway,
}

impl Component {
    fn name(self) -> String {
        match self {
            Component::Node(r) => format!("node {}", r.id()),
            Component::Redis(r) => format!("redis {}", r.id()),
            Component::Replicator(r) => format!("replicator {}", r.id()),
            Component::Gateway => "gateway".into(),
        }
    }

    fn of(target: Target) -> Vec<Component> {
        match target {
            Target::Node(r) => vec![Component::Node(r)],
            Target::Redis(r) => vec![Component::Redis(r)],
            Target::Replicator(r) => vec![Component::Replicator(r)],
            Target::Gateway => vec![Component::Gateway],
            Target::Region(r) => vec![
                Component::Node(r),
                Component::Replicator(r),
                Component::Redis(r),
            ],
        }
    }
}

struct RegionProcs {
    redis: RedisServer,
    node: RegionNode,
    replicator: Replicator,
    /// This region's node and replicator -> the other region's Redis.
    to_peer_redis: LinkProxy,
    /// The gateway -> this region's node.
    from_gateway: LinkProxy,
}

pub struct ProcessBackend {
    regions: [RegionProcs; 2],
    gateway: Gateway,
    endpoints: Endpoints,
    /// Killed by a fault and not restarted yet.
    down: BTreeSet<Component>,
    /// Found dead without a fault, already reported.
    reported: BTreeSet<Component>,
    /// Redis data and every process's logs live under here.
    _data: WorkDir,
}

fn idx(r: Region) -> usize {
    match r {
        Region::A => 0,
        Region::B => 1,
    }
}

/// Node settings for a campaign: quick handler retries, and entries of a killed node
/// reclaimed after 3 s instead of 10 s so the settle does not wait on them.
fn node_env(durability: Durability) -> Vec<(String, String)> {
    [
        ("NODE_DURABILITY", durability.as_str()),
        ("NODE_RETRY_BASE_MS", "50"),
        ("NODE_RECLAIM_IDLE_MS", "3000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl ProcessBackend {
    /// Starts both regions and the gateway; region a becomes active.
    pub async fn start(durability: Durability) -> Result<ProcessBackend, String> {
        let data = WorkDir::new("chaos");
        let redis_opts = |r: &str| RedisOptions {
            appendonly: true,
            dir: Some(data.path().join(format!("redis-{r}"))),
            ..RedisOptions::default()
        };
        let redis_a = RedisServer::start_with(redis_opts("a")).await;
        let redis_b = RedisServer::start_with(redis_opts("b")).await;
        let proxy = |name: &'static str, port: u16| async move {
            LinkProxy::start(name, port)
                .await
                .map_err(|e| format!("proxy {name}: {e}"))
        };
        let a_to_b = proxy("a->redis b", redis_b.port()).await?;
        let b_to_a = proxy("b->redis a", redis_a.port()).await?;
        let env = node_env(durability);
        let node_a =
            RegionNode::start_with_env("a", &redis_a.url(), Some(&a_to_b.redis_url()), &env).await;
        let node_b =
            RegionNode::start_with_env("b", &redis_b.url(), Some(&b_to_a.redis_url()), &env).await;
        let gw_a = proxy("gateway->a", node_a.port()).await?;
        let gw_b = proxy("gateway->b", node_b.port()).await?;
        let rep_a = Replicator::start(
            &redis_a.url(),
            &a_to_b.redis_url(),
            &[
                ("REPLICATOR_LOCAL_REGION", "a"),
                ("REPLICATOR_PEER_REGION", "b"),
            ],
        )
        .await;
        let rep_b = Replicator::start(
            &redis_b.url(),
            &b_to_a.redis_url(),
            &[
                ("REPLICATOR_LOCAL_REGION", "b"),
                ("REPLICATOR_PEER_REGION", "a"),
            ],
        )
        .await;
        let gateway = Gateway::start(
            GatewayOptions::new(&[("a", gw_a.http_url()), ("b", gw_b.http_url())])
                .state_dir(&data.path().join("gateway-state")),
        )
        .await;
        gateway.wait_active("a", 1, Duration::from_secs(60)).await;
        let endpoints = Endpoints {
            gateway: gateway.url(),
            gateway_admin_token: Some(GATEWAY_TOKEN.into()),
            nodes: [node_a.url(), node_b.url()],
            node_admin_token: Some(TEST_ADMIN_TOKEN.into()),
            redis: [redis_a.url(), redis_b.url()],
        };
        Ok(ProcessBackend {
            regions: [
                RegionProcs {
                    redis: redis_a,
                    node: node_a,
                    replicator: rep_a,
                    to_peer_redis: a_to_b,
                    from_gateway: gw_a,
                },
                RegionProcs {
                    redis: redis_b,
                    node: node_b,
                    replicator: rep_b,
                    to_peer_redis: b_to_a,
                    from_gateway: gw_b,
                },
            ],
            gateway,
            endpoints,
            down: BTreeSet::new(),
            reported: BTreeSet::new(),
            _data: data,
        })
    }

    fn signal(&self, c: Component, signal: &str) -> Result<(), String> {
        let ok = match c {
            Component::Node(r) => self.regions[idx(r)].node.try_signal(signal),
            Component::Redis(r) => self.regions[idx(r)].redis.try_signal(signal),
            Component::Replicator(r) => self.regions[idx(r)].replicator.try_signal(signal),
            Component::Gateway => self.gateway.try_signal(signal),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("SIG{signal} {}: the process is gone", c.name()))
        }
    }

    /// Signals every component in turn, even after one fails; the failures joined.
    fn signal_all(
        &self,
        components: impl IntoIterator<Item = Component>,
        signal: &str,
    ) -> Result<(), String> {
        let errors: Vec<String> = components
            .into_iter()
            .filter_map(|c| self.signal(c, signal).err())
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn kill(&mut self, c: Component) {
        match c {
            Component::Node(r) => self.regions[idx(r)].node.kill(),
            Component::Redis(r) => self.regions[idx(r)].redis.kill(),
            Component::Replicator(r) => self.regions[idx(r)].replicator.kill(),
            Component::Gateway => self.gateway.kill(),
        }
        self.down.insert(c);
    }

    /// Starts a component again (Redis from its AOF, on the same port: everything else
    /// keeps its address).
    async fn start_again(&mut self, c: Component) {
        match c {
            Component::Node(r) => self.regions[idx(r)].node.restart().await,
            Component::Redis(r) => self.regions[idx(r)].redis.restart().await,
            Component::Replicator(r) => self.regions[idx(r)].replicator.restart().await,
            Component::Gateway => self.gateway.restart().await,
        }
        self.down.remove(&c);
    }

    fn running(&mut self, c: Component) -> bool {
        match c {
            Component::Node(r) => self.regions[idx(r)].node.is_running(),
            Component::Redis(r) => self.regions[idx(r)].redis.is_running(),
            Component::Replicator(r) => self.regions[idx(r)].replicator.is_running(),
            Component::Gateway => self.gateway.is_running(),
        }
    }

    fn links(&self, link: Link) -> Vec<&LinkProxy> {
        match link {
            Link::Regions => self.regions.iter().map(|r| &r.to_peer_redis).collect(),
            Link::Gateway(r) => vec![&self.regions[idx(r)].from_gateway],
        }
    }

    fn all_components() -> Vec<Component> {
        let mut all = Vec::new();
        for r in Region::BOTH {
            all.extend([
                Component::Redis(r),
                Component::Node(r),
                Component::Replicator(r),
            ]);
        }
        all.push(Component::Gateway);
        all
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::PROCESS
    }

    fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    async fn inject(&mut self, fault: FaultKind) -> Result<(), String> {
        match fault {
            FaultKind::Kill(t) => {
                for c in Component::of(t) {
                    self.kill(c);
                }
                Ok(())
            }
            FaultKind::Pause(t) => self.signal_all(Component::of(t), "STOP"),
            FaultKind::Cut(link) => {
                for p in self.links(link) {
                    p.cut();
                }
                Ok(())
            }
            FaultKind::RestartRedis(r) => {
                self.kill(Component::Redis(r));
                self.start_again(Component::Redis(r)).await;
                Ok(())
            }
            FaultKind::RestartReplicator(r) => {
                self.kill(Component::Replicator(r));
                self.start_again(Component::Replicator(r)).await;
                Ok(())
            }
            FaultKind::Switchover => {
                Err("a switchover is the campaign's, not the backend's".into())
            }
            // Not in Capabilities::PROCESS, so never planned for this backend.
            FaultKind::Partition(_) | FaultKind::RestartGateway => {
                Err(format!("{fault}: not a fault of the process backend"))
            }
        }
    }

    async fn heal(&mut self, fault: FaultKind) -> Result<(), String> {
        match fault {
            FaultKind::Kill(t) => {
                // Redis first: a node or replicator starting without it only retries.
                for c in Component::of(t).into_iter().rev() {
                    self.start_again(c).await;
                }
                Ok(())
            }
            FaultKind::Pause(t) => self.signal_all(Component::of(t).into_iter().rev(), "CONT"),
            FaultKind::Cut(link) => {
                for p in self.links(link) {
                    p.heal();
                }
                Ok(())
            }
            FaultKind::RestartRedis(_)
            | FaultKind::RestartReplicator(_)
            | FaultKind::Switchover
            | FaultKind::Partition(_)
            | FaultKind::RestartGateway => Ok(()),
        }
    }

    async fn heal_all(&mut self) -> Vec<String> {
        for r in &self.regions {
            r.to_peer_redis.heal();
            r.from_gateway.heal();
        }
        let mut notes = self.unexpected_exits().await;
        for c in Self::all_components() {
            if self.running(c) {
                // A paused process takes SIGCONT; a running one ignores it.
                let _ = self.signal(c, "CONT");
            } else {
                if !self.down.contains(&c) && !self.reported.contains(&c) {
                    notes.push(format!("{} was not running at the final heal", c.name()));
                }
                self.start_again(c).await;
            }
        }
        notes
    }

    async fn unexpected_exits(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        for c in Self::all_components() {
            if !self.down.contains(&c) && !self.reported.contains(&c) && !self.running(c) {
                self.reported.insert(c);
                notes.push(format!("{} exited although no fault killed it", c.name()));
            }
        }
        notes
    }

    async fn keep_logs(&mut self) -> Vec<(String, PathBuf)> {
        crate::workdir::keep_all();
        let mut dirs = vec![("redis data".to_string(), self._data.path().to_path_buf())];
        dirs.extend(self.log_dirs());
        dirs
    }
}

impl ProcessBackend {
    /// The directories holding each process's log, for a report.
    pub fn log_dirs(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for (r, procs) in Region::BOTH.iter().zip(&self.regions) {
            out.push((
                format!("redis {}", r.id()),
                procs.redis.workdir().to_path_buf(),
            ));
            out.push((
                format!("node {}", r.id()),
                procs.node.workdir().to_path_buf(),
            ));
            out.push((
                format!("replicator {}", r.id()),
                procs.replicator.workdir().to_path_buf(),
            ));
        }
        out.push(("gateway".into(), self.gateway.workdir().to_path_buf()));
        out
    }
}
