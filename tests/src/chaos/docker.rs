//! The Docker backend: the compose stack users run (`docker-compose.yml`, the images of
//! `deploy/build-images.sh`), broken with Docker's own faults while the campaign's
//! clients place orders through the gateway's published port.
//!
//! | fault                     | Docker                                                    |
//! |---------------------------|-----------------------------------------------------------|
//! | kill (process or region)  | `docker kill` (SIGKILL); `docker start` at the heal       |
//! | pause (process or region) | `docker pause` (cgroup freezer); `docker unpause`         |
//! | cut a<->b                 | both Redis servers off the `wan` network; back at the heal|
//! | partition of a region     | its three containers off `wan`; back at the heal          |
//! | restart Redis, replicator | `docker kill` and `docker start` at once                  |
//! | restart gateway           | `docker restart` (SIGTERM, SIGKILL after 10 s, start)     |
//!
//! The report names the faults as for processes ("SIGKILL node a" is `docker kill`,
//! which sends SIGKILL; "SIGSTOP node a" is `docker pause`, which freezes the cgroup).
//!
//! A node reaches the gateway and the other region's Redis over the same network
//! (`wan`), so the gateway's link to one region cannot be cut alone: that kind is never
//! planned here ([`Capabilities::DOCKER`]). Off the network, packets go nowhere (no
//! reset) and the name no longer resolves; a container put back is found under its
//! service name again (its address may have changed), as after a real partition heals.
//!
//! Redis keeps the image's `appendfsync everysec` (the process backend runs `always`):
//! a killed container's Redis has written everything it acknowledged into the host
//! kernel's page cache, which outlives the container, so a loss the checker finds is
//! still never Redis's fsync window. Only a host crash could lose that last second, and
//! the campaign never crashes the host.
//!
//! The stack is a private compose project (`tandem-chaos-<pid>-<n>`, with the overlays
//! `tests/compose/chaos.yml`, the nodes' campaign settings, and `tests/compose/observe.yml`,
//! which publishes each Redis on a loopback port for the campaign's own reads) with
//! tokens of its own; it is brought down, volumes and all, when the backend is dropped
//! (`TANDEM_KEEP_STACK=1` keeps it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::backend::{Backend, Endpoints};
use super::schedule::{Capabilities, FaultKind, Link, Region, Target};
use super::Durability;
use crate::compose::{
    try_docker, ComposeTool, Stack, StackOptions, CHAOS_PROJECT_PREFIX, SERVICES, WAN,
};

/// How the Docker backend brings the stack up.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// The nodes' `NODE_DURABILITY`.
    pub durability: Durability,
    /// `TANDEM_IMAGE_TAG` of the images to run (`local` is what
    /// `deploy/build-images.sh` builds by default).
    pub image_tag: String,
    /// Run `deploy/build-images.sh --bin-dir <bin dir> --tag <image_tag>` first.
    pub build_images: bool,
}

/// Long enough for a container to start and its Redis to load its AOF on a loaded host.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// `docker restart`'s grace before SIGKILL: the gateway stops on SIGTERM well within it.
const RESTART_GRACE_S: &str = "10";

/// The compose services a fault target stands for. A region's Redis comes first: it is
/// started first at a heal, since a node or replicator without it only retries.
fn services(target: Target) -> Vec<&'static str> {
    match target {
        Target::Node(r) => vec![node(r)],
        Target::Redis(r) => vec![redis(r)],
        Target::Replicator(r) => vec![replicator(r)],
        Target::Gateway => vec!["gateway"],
        Target::Region(r) => region(r).to_vec(),
    }
}

fn node(r: Region) -> &'static str {
    match r {
        Region::A => "node-a",
        Region::B => "node-b",
    }
}

fn redis(r: Region) -> &'static str {
    match r {
        Region::A => "redis-a",
        Region::B => "redis-b",
    }
}

fn replicator(r: Region) -> &'static str {
    match r {
        Region::A => "replicator-a",
        Region::B => "replicator-b",
    }
}

fn region(r: Region) -> [&'static str; 3] {
    [redis(r), node(r), replicator(r)]
}

fn is_redis(service: &str) -> bool {
    service.starts_with("redis-")
}

/// The services a link or partition fault takes off `wan`.
fn off_wan_services(fault: FaultKind) -> Vec<&'static str> {
    match fault {
        FaultKind::Cut(Link::Regions) => vec![redis(Region::A), redis(Region::B)],
        FaultKind::Partition(r) => region(r).to_vec(),
        _ => Vec::new(),
    }
}

pub struct DockerBackend {
    stack: Stack,
    endpoints: Endpoints,
    /// Container id of each service (a container keeps its id across kill and start).
    ids: BTreeMap<&'static str, String>,
    /// The project's `wan` network.
    wan: String,
    /// Killed by a fault and not started again.
    down: BTreeSet<&'static str>,
    /// Paused by a fault and not resumed.
    paused: BTreeSet<&'static str>,
    /// Off `wan`, with how many faults hold each off (a cut of a<->b and a region's
    /// partition may overlap on a Redis: it goes back when both are healed).
    off_wan: BTreeMap<&'static str, usize>,
    /// Each container's RestartCount when last looked at: Docker's restart policy
    /// (`unless-stopped`) brings back a container that exited by itself, which
    /// must not pass unnoticed.
    restart_counts: BTreeMap<&'static str, u64>,
    /// Found stopped or restarted without a fault, already reported.
    reported: BTreeSet<&'static str>,
    /// Every Docker command a fault or heal ran, with when (from the start).
    actions: Vec<String>,
    started: Instant,
}

impl DockerBackend {
    /// Brings the stack up (building the images first when asked) and waits until the
    /// gateway routes writes to region a. A stack that does not start is an `Err`,
    /// torn down already.
    pub async fn start(options: DockerOptions) -> Result<DockerBackend, String> {
        crate::compose::docker_engine()?;
        let stack_options = StackOptions {
            files: vec!["tests/compose/chaos.yml"],
            services: SERVICES,
            image_tag: options.image_tag.clone(),
            build: options.build_images,
            project_prefix: CHAOS_PROJECT_PREFIX,
            settings: vec![(
                "NODE_DURABILITY".to_string(),
                options.durability.as_str().to_string(),
            )],
            // The other compose tool than compose_stack.rs's, where two are installed.
            tool: ComposeTool::alternate(),
        };
        // The compose harness panics when the stack does not come up (it is a test's
        // fixture); here that is the campaign's "could not run".
        let up = Instant::now();
        let (stack, wan) = tokio::spawn(async move {
            let stack = Stack::up_options(stack_options).await;
            let wan = stack.network(WAN).await;
            (stack, wan)
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the compose stack did not start".into()),
            Err(e) => format!("the compose stack did not start: {e}"),
        })?;
        eprintln!(
            "[docker] stack {} up and healthy in {:.1}s ({}, images :{})",
            stack.project,
            up.elapsed().as_secs_f64(),
            stack.tool.name(),
            options.image_tag
        );
        let mut ids = BTreeMap::new();
        for s in SERVICES {
            ids.insert(*s, stack.try_container(s).await?);
        }
        let endpoints = Endpoints {
            gateway: format!("http://127.0.0.1:{}", stack.gateway_port),
            gateway_admin_token: Some(stack.admin_token.clone()),
            nodes: [String::new(), String::new()],
            node_admin_token: Some(stack.node_token.clone()),
            redis: [String::new(), String::new()],
        };
        let mut backend = DockerBackend {
            stack,
            endpoints,
            ids,
            wan,
            down: BTreeSet::new(),
            paused: BTreeSet::new(),
            off_wan: BTreeMap::new(),
            restart_counts: BTreeMap::new(),
            reported: BTreeSet::new(),
            actions: Vec::new(),
            started: Instant::now(),
        };
        backend.refresh_endpoints().await?;
        backend.restart_counts = backend
            .inspect()
            .await?
            .into_iter()
            .map(|(s, st)| (s, st.restarts))
            .collect();
        backend.wait_active_a().await?;
        Ok(backend)
    }

    /// The compose project under test.
    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// Every Docker command the faults and heals ran, in order (`12.34s docker kill
    /// node-a`).
    pub fn actions(&self) -> &[String] {
        &self.actions
    }

    fn id(&self, service: &str) -> String {
        self.ids
            .get(service)
            .cloned()
            .unwrap_or_else(|| service.to_string())
    }

    /// `docker <verb> <containers of services>` in one call, so they are hit together.
    async fn each(&mut self, verb: &[&str], services: &[&'static str]) -> Result<(), String> {
        let mut args: Vec<&str> = verb.to_vec();
        let ids: Vec<String> = services.iter().map(|s| self.id(s)).collect();
        args.extend(ids.iter().map(String::as_str));
        let command = format!("docker {} {}", verb.join(" "), services.join(" "));
        self.record(command.clone());
        try_docker(&args)
            .await
            .map(|_| ())
            .map_err(|e| format!("{command}: {e}"))
    }

    fn record(&mut self, action: String) {
        eprintln!("[docker] {action}");
        self.actions.push(format!(
            "{:.2}s {action}",
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// `docker pause` of `services` together; a container the freezer gave up on is
    /// paused again alone. runc reports "unable to freeze" when a task does not stop
    /// in time (a process busy in the kernel on a loaded host) and thaws the cgroup
    /// again, so trying once more is safe; the others stay paused meanwhile.
    async fn pause(&mut self, services: &[&'static str]) -> Result<(), String> {
        let Err(first) = self.each(&["pause"], services).await else {
            self.paused.extend(services);
            return Ok(());
        };
        let mut errors = Vec::new();
        for s in services {
            let id = self.id(s);
            let mut attempt = 1;
            loop {
                let paused = try_docker(&["inspect", "-f", "{{.State.Paused}}", &id]).await;
                if paused.as_deref().map(str::trim) == Ok("true") {
                    self.paused.insert(s);
                    break;
                }
                match try_docker(&["pause", &id]).await {
                    Ok(_) => {
                        self.record(format!("docker pause {s} (again)"));
                        self.paused.insert(s);
                        break;
                    }
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        eprintln!("[docker] docker pause {s}: {e}; trying again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        errors.push(format!("docker pause {s}: {e} (first: {first})"));
                        break;
                    }
                }
            }
        }
        join(errors)
    }

    /// `docker unpause` of those of `services` a fault paused.
    async fn unpause(&mut self, services: &[&'static str]) -> Result<(), String> {
        let paused: Vec<&'static str> = services
            .iter()
            .copied()
            .filter(|s| self.paused.remove(s))
            .collect();
        if paused.is_empty() {
            return Ok(());
        }
        self.each(&["unpause"], &paused).await
    }

    async fn kill(&mut self, services: &[&'static str]) -> Result<(), String> {
        let r = self.each(&["kill"], services).await;
        // Marked down even when the command failed: the final heal starts whatever is
        // not running, and a container found stopped is then not blamed on itself.
        self.down.extend(services);
        r
    }

    /// Starts `services` again, Redis servers first and answering before the rest.
    async fn start_again(&mut self, services: &[&'static str]) -> Result<(), String> {
        let (redis, rest): (Vec<&'static str>, Vec<&'static str>) =
            services.iter().partition(|s| is_redis(s));
        let mut errors = Vec::new();
        if !redis.is_empty() {
            if let Err(e) = self.each(&["start"], &redis).await {
                errors.push(e);
            }
            for s in &redis {
                if let Err(e) = self.wait_redis(s).await {
                    errors.push(e);
                }
            }
        }
        if !rest.is_empty() {
            if let Err(e) = self.each(&["start"], &rest).await {
                errors.push(e);
            }
        }
        for s in services {
            self.down.remove(s);
        }
        join(errors)
    }

    /// Waits until `service` (a Redis) answers PING on its published port, which Docker
    /// chose anew when the container started, and keeps that port in the endpoints.
    async fn wait_redis(&mut self, service: &'static str) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.stack.try_published_port(service, 6379).await {
                Ok(port) => {
                    let url = format!("redis://127.0.0.1:{port}");
                    match ping(&url).await {
                        Ok(()) => {
                            let i = if service == redis(Region::A) { 0 } else { 1 };
                            self.endpoints.redis[i] = url;
                            return Ok(());
                        }
                        Err(e) => last = e,
                    }
                }
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "{service} did not answer PING within {READY_DEADLINE:?}: {last}"
        ))
    }

    /// Takes `services` off `wan` (those no other fault holds off already).
    async fn disconnect(&mut self, services: &[&'static str]) -> Result<(), String> {
        let mut go = Vec::new();
        for s in services {
            let held = self.off_wan.entry(s).or_insert(0);
            *held += 1;
            if *held == 1 {
                go.push(*s);
            }
        }
        self.network("disconnect", &go).await
    }

    /// Puts `services` back on `wan` (those no other fault still holds off).
    async fn reconnect(&mut self, services: &[&'static str]) -> Result<(), String> {
        let mut go = Vec::new();
        for s in services {
            if let Some(held) = self.off_wan.get_mut(s) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    self.off_wan.remove(s);
                    go.push(*s);
                }
            }
        }
        self.network("connect", &go).await
    }

    /// `docker network disconnect|connect` of each service at once (one command per
    /// container, run together so a region is cut off in one moment). Back on the
    /// network a container is known by its service name again, the name the others
    /// use.
    async fn network(&mut self, verb: &str, services: &[&'static str]) -> Result<(), String> {
        if services.is_empty() {
            return Ok(());
        }
        self.record(format!(
            "docker network {verb} {WAN} {}",
            services.join(" ")
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for s in services {
            let (id, wan) = (self.id(s), self.wan.clone());
            let (verb, s) = (verb.to_string(), s.to_string());
            tasks.spawn(async move {
                let mut args = vec!["network", verb.as_str()];
                if verb == "connect" {
                    args.extend(["--alias", s.as_str()]);
                }
                args.extend([wan.as_str(), id.as_str()]);
                try_docker(&args)
                    .await
                    .map_err(|e| format!("docker network {verb} {WAN} {s}: {e}"))
            });
        }
        let mut errors = Vec::new();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        join(errors)
    }

    /// Each service's container state, as Docker reports it now.
    async fn inspect(&self) -> Result<BTreeMap<&'static str, ContainerState>, String> {
        let mut args = vec![
            "inspect",
            "--format",
            "{{.Id}}|{{.State.Status}}|{{.RestartCount}}|{{range $k, $v := .NetworkSettings.Networks}}{{$v.NetworkID}},{{end}}",
        ];
        args.extend(self.ids.values().map(String::as_str));
        let out = try_docker(&args)
            .await
            .map_err(|e| format!("docker inspect: {e}"))?;
        let mut states = BTreeMap::new();
        for line in out.lines() {
            let parts: Vec<&str> = line.trim().split('|').collect();
            if parts.len() != 4 {
                continue;
            }
            // `docker ps -q` gave short ids; inspect answers with whole ones.
            let Some((service, _)) = self.ids.iter().find(|(_, id)| parts[0].starts_with(*id))
            else {
                continue;
            };
            states.insert(
                *service,
                ContainerState {
                    status: parts[1].to_string(),
                    restarts: parts[2].parse().unwrap_or(0),
                    on_wan: parts[3]
                        .split(',')
                        .any(|n| !n.is_empty() && n.starts_with(&self.wan)),
                },
            );
        }
        Ok(states)
    }

    /// Re-reads the published ports of the nodes and Redis servers (a container
    /// started again has new ones) and waits until both Redis servers answer.
    async fn refresh_endpoints(&mut self) -> Result<(), String> {
        for r in Region::BOTH {
            self.wait_redis(redis(r)).await?;
            let port = match r {
                Region::A => 8081,
                Region::B => 8082,
            };
            let i = if r == Region::A { 0 } else { 1 };
            if let Ok(p) = self.stack.try_published_port(node(r), port).await {
                self.endpoints.nodes[i] = format!("http://127.0.0.1:{p}");
            }
        }
        Ok(())
    }

    /// Waits until the gateway routes writes to region a, as the process backend
    /// starts. A gateway whose probes timed out while the stack came up on a busy host
    /// may have failed over to b already: then a planned switchover brings region a
    /// back first, so a seed's faults hit the regions its plan names.
    async fn wait_active_a(&self) -> Result<(), String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + READY_DEADLINE;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http
                .get(format!("{}/gateway/health", self.endpoints.gateway))
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    if status == 200 && body["writes"] == true {
                        if body["active"] == "a" {
                            return Ok(());
                        }
                        eprintln!(
                            "[docker] the gateway failed over while the stack came up ({} \
                             active at epoch {}): switching back to a",
                            body["active"], body["epoch"]
                        );
                        let mut req = http
                            .post(format!("{}/gateway/failover", self.endpoints.gateway))
                            .json(&serde_json::json!({"to": "a"}));
                        if let Some(t) = &self.endpoints.gateway_admin_token {
                            req = req.bearer_auth(t);
                        }
                        last = match req.send().await {
                            Ok(r) => format!("switchover to a: {}", r.status()),
                            Err(e) => format!("switchover to a: {e}"),
                        };
                    } else {
                        last = format!("{status} {body}");
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "the gateway did not route writes to region a within {READY_DEADLINE:?}: {last}"
        ))
    }
}

/// One container as `docker inspect` shows it.
#[derive(Debug, Clone)]
struct ContainerState {
    /// `running`, `paused`, `exited`, `restarting`, ...
    status: String,
    restarts: u64,
    on_wan: bool,
}

async fn ping(url: &str) -> Result<(), String> {
    let mut conn = super::snapshot::connect(url).await?;
    let pong: String = tokio::time::timeout(
        Duration::from_secs(5),
        redis::cmd("PING").query_async(&mut conn),
    )
    .await
    .map_err(|_| format!("{url}: no answer to PING in 5 s"))?
    .map_err(|e| format!("{url}: {e}"))?;
    if pong == "PONG" {
        Ok(())
    } else {
        Err(format!("{url}: PING answered {pong}"))
    }
}

fn join(errors: Vec<String>) -> Result<(), String> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::DOCKER
    }

    fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    async fn inject(&mut self, fault: FaultKind) -> Result<(), String> {
        match fault {
            FaultKind::Kill(t) => self.kill(&services(t)).await,
            FaultKind::Pause(t) => self.pause(&services(t)).await,
            FaultKind::Cut(Link::Regions) | FaultKind::Partition(_) => {
                self.disconnect(&off_wan_services(fault)).await
            }
            FaultKind::RestartRedis(r) => {
                self.kill(&[redis(r)]).await?;
                self.start_again(&[redis(r)]).await
            }
            FaultKind::RestartReplicator(r) => {
                self.kill(&[replicator(r)]).await?;
                self.start_again(&[replicator(r)]).await
            }
            FaultKind::RestartGateway => {
                self.each(&["restart", "-t", RESTART_GRACE_S], &["gateway"])
                    .await
            }
            FaultKind::Cut(Link::Gateway(_)) => Err(format!(
                "{fault}: the gateway reaches a node over the network the node uses for \
                 the other region, so this link cannot be cut alone in the compose stack"
            )),
            FaultKind::Switchover => {
                Err("a switchover is the campaign's, not the backend's".into())
            }
        }
    }

    async fn heal(&mut self, fault: FaultKind) -> Result<(), String> {
        match fault {
            FaultKind::Kill(t) => self.start_again(&services(t)).await,
            FaultKind::Pause(t) => self.unpause(&services(t)).await,
            FaultKind::Cut(Link::Regions) | FaultKind::Partition(_) => {
                self.reconnect(&off_wan_services(fault)).await
            }
            FaultKind::Cut(Link::Gateway(_))
            | FaultKind::RestartRedis(_)
            | FaultKind::RestartReplicator(_)
            | FaultKind::RestartGateway
            | FaultKind::Switchover => Ok(()),
        }
    }

    /// Whatever the bookkeeping says, from what Docker reports: every container back
    /// on `wan`, unpaused and running (Redis servers first), then the published ports
    /// read again.
    async fn heal_all(&mut self) -> Vec<String> {
        let mut notes = self.unexpected_exits().await;
        let states = match self.inspect().await {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!("final heal: docker inspect failed: {e}"));
                return notes;
            }
        };
        let mut off = Vec::new();
        let mut paused = Vec::new();
        let mut stopped = Vec::new();
        for (service, st) in &states {
            if !st.on_wan {
                off.push(*service);
            }
            match st.status.as_str() {
                "running" => {}
                "paused" => paused.push(*service),
                "restarting" => {
                    notes.push(format!(
                        "{service} was restarting (Docker's restart policy) at the final heal"
                    ));
                }
                other => {
                    if !self.down.contains(service) && !self.reported.contains(service) {
                        notes.push(format!("{service} was {other} at the final heal"));
                    }
                    stopped.push(*service);
                }
            }
        }
        // Back on the network first: a Redis started while off it would be started
        // unreachable for the other region.
        self.off_wan.clear();
        if let Err(e) = self.network("connect", &off).await {
            notes.push(format!("final heal: {e}"));
        }
        if !paused.is_empty() {
            if let Err(e) = self.each(&["unpause"], &paused).await {
                notes.push(format!("final heal: {e}"));
            }
        }
        self.paused.clear();
        if let Err(e) = self.start_again(&stopped).await {
            notes.push(format!("final heal: {e}"));
        }
        self.down.clear();
        if let Err(e) = self.refresh_endpoints().await {
            notes.push(format!("final heal: {e}"));
        }
        notes
    }

    async fn unexpected_exits(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        let states = match self.inspect().await {
            Ok(s) => s,
            Err(e) => return vec![format!("docker inspect failed: {e}")],
        };
        for (service, st) in states {
            let before = self
                .restart_counts
                .insert(service, st.restarts)
                .unwrap_or(0);
            if st.restarts > before {
                notes.push(format!(
                    "{service} exited by itself and Docker's restart policy started it again \
                     ({} times)",
                    st.restarts - before
                ));
            }
            let stopped = !matches!(st.status.as_str(), "running" | "paused" | "restarting");
            if stopped && !self.down.contains(service) && self.reported.insert(service) {
                notes.push(format!(
                    "{service} exited although no fault killed it ({})",
                    st.status
                ));
            }
        }
        notes
    }

    async fn keep_logs(&mut self) -> Vec<(String, PathBuf)> {
        crate::workdir::keep_all();
        let mut kept = self.stack.write_logs(5000).await;
        let actions = self.stack.workdir().join("docker-actions.txt");
        if std::fs::write(&actions, self.actions.join("\n")).is_ok() {
            kept.push(("docker commands of the faults".into(), actions));
        }
        kept
    }
}
