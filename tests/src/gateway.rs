//! The real `gateway` binary in front of two real regions, for the gateway's tests.
//!
//! - [`Gateway`]: the gateway process on a free port, with its own state directory.
//! - [`RegionNode`]: a `regional-node` process whose pid the test can signal (SIGSTOP
//!   for a hang) and which restarts on the same port.
//! - [`TwoRegions`]: two Redis servers, a node in each (both standby: the gateway
//!   decides who is active), optionally a replicator in each region.
//! - [`Blackhole`]: a TCP proxy that can stop forwarding without closing anything, as
//!   a network partition looks to the gateway.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::api::Api;
use crate::http::HttpClient;
use crate::node::TEST_ADMIN_TOKEN;
use crate::poll::eventually;
use crate::ports::free_port;
use crate::process::{workspace_binary, Process};
use crate::redis_server::RedisServer;
use crate::replicator::Replicator;
use crate::workdir::WorkDir;

/// The gateway's own admin token in tests.
pub const GATEWAY_TOKEN: &str = "test-gateway-token";
const START_DEADLINE: Duration = Duration::from_secs(20);

/// How to start a gateway.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// `(id, base url)` of each region.
    pub regions: Vec<(String, String)>,
    pub primary: String,
    /// `None`: a fresh directory inside the gateway's work dir.
    pub state_dir: Option<PathBuf>,
    /// `(cert, key)` PEM files: the listener speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Further `GATEWAY_*` variables; they win over the ones above.
    pub env: Vec<(String, String)>,
}

impl GatewayOptions {
    pub fn new(regions: &[(&str, String)]) -> GatewayOptions {
        GatewayOptions {
            regions: regions
                .iter()
                .map(|(id, url)| (id.to_string(), url.clone()))
                .collect(),
            primary: regions[0].0.to_string(),
            state_dir: None,
            tls: None,
            env: Vec::new(),
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }

    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_path_buf());
        self
    }

    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Regions given as `https://` are trusted only when `ca` signed their
    /// certificates; `client` (cert, key) is presented to nodes that require one.
    pub fn node_tls(self, ca: &Path, client: Option<(&Path, &Path)>) -> Self {
        let s = self.env("GATEWAY_NODE_CA", ca.display());
        match client {
            Some((cert, key)) => s
                .env("GATEWAY_NODE_CLIENT_CERT", cert.display())
                .env("GATEWAY_NODE_CLIENT_KEY", key.display()),
            None => s,
        }
    }

    /// One of several gateways sharing failover control through etcd.
    pub fn etcd(self, id: &str, endpoints: &str) -> Self {
        self.env("GATEWAY_ID", id)
            .env("GATEWAY_ETCD_ENDPOINTS", endpoints)
    }
}

/// A running gateway; killed on drop.
#[derive(Debug)]
pub struct Gateway {
    pub options: GatewayOptions,
    port: u16,
    process: Process,
    workdir: WorkDir,
}

impl Gateway {
    /// Spawns the gateway and waits until it answers `GET /gateway/regions`.
    pub async fn start(options: GatewayOptions) -> Gateway {
        let mut workdir = WorkDir::new("gateway");
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let process = spawn_gateway(&options, port, attempt, &workdir);
            let mut gw = Gateway {
                options: options.clone(),
                port,
                process,
                workdir,
            };
            match gw.wait_listening().await {
                Ok(()) => return gw,
                Err(why) => {
                    last = why;
                    gw.process.kill();
                    workdir = gw.workdir;
                }
            }
        }
        panic!("gateway did not come up after 3 attempts:\n{last}");
    }

    /// Stops (SIGTERM) and starts it again on the same port with the same state dir;
    /// after [`kill`](Self::kill), just starts it again.
    pub async fn restart(&mut self) {
        if self.process.is_running() {
            self.process.terminate(Duration::from_secs(10)).await;
        }
        for attempt in 10..30 {
            self.process = spawn_gateway(&self.options, self.port, attempt, &self.workdir);
            if self.wait_listening().await.is_ok() {
                return;
            }
            self.process.kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("gateway did not restart:\n{}", self.process.log_tail(60));
    }

    async fn wait_listening(&mut self) -> Result<(), String> {
        // Over TLS, readiness is checked with a client that accepts the test's
        // self-signed certificate; the tests themselves verify it properly.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client");
        let url = format!("{}/gateway/regions", self.url());
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.exited() {
                return Err(format!(
                    "gateway exited with {status}; log:\n{}",
                    self.process.log_tail(60)
                ));
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if start.elapsed() > START_DEADLINE {
                return Err(format!(
                    "gateway not answering within {START_DEADLINE:?}; log:\n{}",
                    self.process.log_tail(60)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A plain client (no token). Over TLS use your own reqwest client.
    pub fn http(&self) -> HttpClient {
        HttpClient::new(format!("http://127.0.0.1:{}", self.port))
    }

    /// A client that sends the gateway's admin token.
    pub fn admin(&self) -> HttpClient {
        self.http().with_token(GATEWAY_TOKEN)
    }

    /// The node API (orders, products) through the gateway.
    pub fn api(&self) -> Api {
        Api::new(self.http())
    }

    pub async fn regions(&self) -> Value {
        self.http().get("/gateway/regions").await.json
    }

    /// The gateway in control of failover, as this one reports it.
    pub async fn controller(&self) -> Option<String> {
        self.regions().await["controller"]
            .as_str()
            .map(str::to_string)
    }

    /// Waits until this gateway reports `id` in control of failover.
    pub async fn wait_controller(&self, id: &str, deadline: Duration) {
        let http = self.http();
        eventually(deadline, &format!("{id} in control"), || {
            let http = http.clone();
            async move {
                let view = http.get("/gateway/regions").await.json;
                if view["controller"] == id {
                    Ok(())
                } else {
                    Err(view)
                }
            }
        })
        .await
    }

    /// Waits until the gateway reports `region` active at an epoch of at least
    /// `min_epoch` and can route writes there; returns the epoch.
    pub async fn wait_active(&self, region: &str, min_epoch: u64, deadline: Duration) -> u64 {
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("reqwest client");
        let url = format!("{}/gateway/health", self.url());
        eventually(deadline, &format!("gateway: {region} active"), || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let resp = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| Value::String(e.to_string()))?;
                let ok = resp.status() == 200;
                let json: Value = resp.json().await.unwrap_or(Value::Null);
                if ok
                    && json["active"] == region
                    && json["writes"] == true
                    && json["epoch"].as_u64().unwrap_or(0) >= min_epoch
                {
                    Ok(json["epoch"].as_u64().unwrap_or(0))
                } else {
                    Err(json)
                }
            }
        })
        .await
    }

    /// Waits until the gateway reports every region in `ids` healthy.
    pub async fn wait_healthy(&self, ids: &[&str], deadline: Duration) {
        let http = self.http();
        eventually(deadline, &format!("gateway: {ids:?} healthy"), || {
            let http = http.clone();
            async move {
                let view = http.get("/gateway/regions").await.json;
                let healthy = view["regions"]
                    .as_array()
                    .map(|rs| {
                        ids.iter()
                            .all(|id| rs.iter().any(|r| r["id"] == *id && r["healthy"] == true))
                    })
                    .unwrap_or(false);
                if healthy {
                    Ok(())
                } else {
                    Err(view)
                }
            }
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        self.http().get("/metrics").await.text
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.options
            .state_dir
            .clone()
            .unwrap_or_else(|| self.workdir.path().join("state"))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.exited()
    }

    /// SIGKILL: no chance to hand control over, as in a crash.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Sends `signal` (e.g. "STOP", "CONT"); `false` when the process is gone.
    pub fn try_signal(&self, signal: &str) -> bool {
        self.process.try_signal(signal)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub async fn terminate(&mut self, deadline: Duration) -> std::process::ExitStatus {
        self.process.terminate(deadline).await
    }
}

fn spawn_gateway(options: &GatewayOptions, port: u16, attempt: u32, workdir: &WorkDir) -> Process {
    let regions = options
        .regions
        .iter()
        .map(|(id, url)| format!("{id}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    let state = options
        .state_dir
        .clone()
        .unwrap_or_else(|| workdir.path().join("state"));
    let mut env: Vec<(String, String)> = vec![
        ("GATEWAY_LISTEN".into(), format!("127.0.0.1:{port}")),
        ("GATEWAY_REGIONS".into(), regions),
        ("GATEWAY_PRIMARY".into(), options.primary.clone()),
        ("GATEWAY_STATE_DIR".into(), state.display().to_string()),
        ("GATEWAY_ADMIN_TOKEN".into(), GATEWAY_TOKEN.into()),
        ("GATEWAY_NODE_TOKEN".into(), TEST_ADMIN_TOKEN.into()),
    ];
    if let Some((cert, key)) = &options.tls {
        env.push(("GATEWAY_TLS_CERT".into(), cert.display().to_string()));
        env.push(("GATEWAY_TLS_KEY".into(), key.display().to_string()));
    }
    if std::env::var_os("RUST_LOG").is_none() {
        env.push(("RUST_LOG".into(), "info,gateway=debug".into()));
    }
    for (k, v) in &options.env {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    Process::spawn(
        &format!("gateway-{port}-{attempt}"),
        &workspace_binary("gateway"),
        &[],
        &env,
        workdir,
    )
}

/// Runs the gateway binary with `env` only (no defaults) until it exits; returns the
/// exit code and its output, for configuration errors.
pub fn run_gateway_expecting_exit(env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(workspace_binary("gateway"));
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run gateway");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A `regional-node` process whose pid is at hand and whose port survives a restart.
#[derive(Debug)]
pub struct RegionNode {
    pub region: String,
    port: u16,
    /// Set: the node serves HTTPS (and may require client certificates).
    https: Option<NodeHttps>,
    env: Vec<(String, String)>,
    process: Process,
    restarts: u32,
    workdir: WorkDir,
}

impl RegionNode {
    /// A standby node of `region` on `redis_url`, with the peer's Redis for fencing.
    pub async fn start(region: &str, redis_url: &str, peer_redis_url: Option<&str>) -> RegionNode {
        Self::start_with_env(region, redis_url, peer_redis_url, &[]).await
    }

    /// Like [`start`](Self::start), with further variables (they win).
    pub async fn start_with_env(
        region: &str,
        redis_url: &str,
        peer_redis_url: Option<&str>,
        extra: &[(String, String)],
    ) -> RegionNode {
        Self::start_with(region, redis_url, peer_redis_url, extra, None).await
    }

    /// Like [`start_with_env`](Self::start_with_env), serving HTTPS when `https` is set.
    pub async fn start_with(
        region: &str,
        redis_url: &str,
        peer_redis_url: Option<&str>,
        extra: &[(String, String)],
        https: Option<NodeHttps>,
    ) -> RegionNode {
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("NODE_REGION".into(), region.into()),
            ("NODE_LISTEN".into(), format!("127.0.0.1:{port}")),
            ("NODE_REDIS_URL".into(), redis_url.into()),
            ("NODE_ROLE".into(), "standby".into()),
            ("NODE_ADMIN_TOKEN".into(), TEST_ADMIN_TOKEN.into()),
            ("NODE_REDIS_TIMEOUT_MS".into(), "300".into()),
        ];
        if let Some(peer) = peer_redis_url {
            env.push(("NODE_PEER_REDIS_URL".into(), peer.into()));
        }
        if let Some(h) = &https {
            env.push(("NODE_TLS_CERT".into(), h.cert.display().to_string()));
            env.push(("NODE_TLS_KEY".into(), h.key.display().to_string()));
            if let Some(ca) = &h.client_ca {
                env.push(("NODE_TLS_CLIENT_CA".into(), ca.display().to_string()));
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            env.push(("RUST_LOG".into(), "info".into()));
        }
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let workdir = WorkDir::new(&format!("gwnode-{region}"));
        let process = spawn_node(&env, region, port, 0, &workdir);
        let mut node = RegionNode {
            region: region.into(),
            port,
            https,
            env,
            process,
            restarts: 0,
            workdir,
        };
        node.wait_live().await.unwrap_or_else(|why| panic!("{why}"));
        node
    }

    /// Starts it again on the same port (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) {
        self.process.kill();
        for _ in 0..30 {
            self.restarts += 1;
            self.process = spawn_node(
                &self.env,
                &self.region,
                self.port,
                self.restarts,
                &self.workdir,
            );
            if self.wait_live().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "node {} did not restart:\n{}",
            self.region,
            self.process.log_tail(60)
        );
    }

    async fn wait_live(&mut self) -> Result<(), String> {
        let http = self.http();
        self.process
            .wait_http_ok_with(&http, "/health/live", START_DEADLINE)
            .await
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` (the name the test
    /// certificates carry) when the node serves HTTPS.
    pub fn url(&self) -> String {
        match self.https {
            None => format!("http://127.0.0.1:{}", self.port),
            Some(_) => format!("https://localhost:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client with the node's admin token (over HTTPS: trusting the test CA and
    /// presenting the harness' client certificate).
    pub fn http(&self) -> HttpClient {
        let http = match &self.https {
            None => HttpClient::new(self.url()),
            Some(h) => HttpClient::new_tls(self.url(), &h.harness),
        };
        http.with_token(TEST_ADMIN_TOKEN)
    }

    pub fn api(&self) -> Api {
        Api::new(self.http())
    }

    pub async fn role(&self) -> Value {
        self.http().get("/admin/role").await.json
    }

    /// Waits until this node serves product `sku` (e.g. replicated from the active).
    pub async fn wait_product(&self, sku: &str, deadline: Duration) {
        let http = self.http();
        let path = format!("/api/v1/products/{sku}");
        eventually(
            deadline,
            &format!("product {sku} in {}", self.region),
            || {
                let (http, path) = (http.clone(), path.clone());
                async move {
                    let r = http.get(&path).await;
                    if r.status == 200 {
                        Ok(())
                    } else {
                        Err(r.status)
                    }
                }
            },
        )
        .await
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: the process hangs with its sockets open.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    /// Sends `signal`; `false` when the process is gone.
    pub fn try_signal(&self, signal: &str) -> bool {
        self.process.try_signal(signal)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Every promote, demote and lease call this node received (in every life of the
    /// process), oldest first. Needs the node started with [`CONTROL_CALL_LOGS`].
    pub fn control_calls(&self) -> Vec<ControlCall> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.workdir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        let mut calls = Vec::new();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            calls.extend(text.lines().filter_map(ControlCall::parse));
        }
        calls.sort_by_key(|c| c.at_us);
        calls
    }
}

/// Node variables that make it log every control call as a JSON line.
pub const CONTROL_CALL_LOGS: [(&str, &str); 2] = [
    ("LOG_FORMAT", "json"),
    ("RUST_LOG", "info,regional_node::api::admin=debug"),
];

/// One promote, demote or lease call as a node logged it.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlCall {
    /// When the node logged it (after acting on it), microseconds since the Unix epoch.
    pub at_us: i64,
    /// The calling gateway's `GATEWAY_ID`.
    pub caller: String,
    /// `promote`, `demote` or `lease`.
    pub action: String,
    pub epoch: u64,
    pub ttl_ms: Option<u64>,
    /// The node granted it.
    pub ok: bool,
}

impl ControlCall {
    fn parse(line: &str) -> Option<ControlCall> {
        let v: Value = serde_json::from_str(line).ok()?;
        // The node's JSON lines carry the event's fields at the top level.
        let f = v.get("fields").unwrap_or(&v);
        if f["message"] != "control call" {
            return None;
        }
        Some(ControlCall {
            at_us: rfc3339_micros(v["timestamp"].as_str()?)?,
            caller: f["caller"].as_str()?.to_string(),
            action: f["action"].as_str()?.to_string(),
            epoch: f["epoch"].as_u64()?,
            ttl_ms: f["ttl_ms"].as_u64(),
            ok: f["outcome"] == "ok",
        })
    }
}

/// `2026-01-02T03:04:05.123456Z` as microseconds since the Unix epoch (UTC only).
pub fn rfc3339_micros(s: &str) -> Option<i64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().chain("000000".chars()).take(6).collect();
    let micros: i64 = digits.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}

fn spawn_node(env: &[(String, String)], region: &str, port: u16, n: u32, dir: &WorkDir) -> Process {
    Process::spawn(
        &format!("regional-node-{region}-{port}-{n}"),
        &workspace_binary("regional-node"),
        &[],
        env,
        dir,
    )
}

/// A node that serves HTTPS: its certificate and, for mutual TLS, the CA its clients'
/// certificates must come from.
#[derive(Debug, Clone)]
pub struct NodeHttps {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// NODE_TLS_CLIENT_CA: set, clients without a certificate it signed are refused.
    pub client_ca: Option<PathBuf>,
    /// How the harness itself reaches the node.
    pub harness: crate::http::ClientTls,
}

/// How the processes of [`TwoRegions`] reach Redis and one another; the default is
/// plain text and Redis' default user.
#[derive(Debug, Clone, Default)]
pub struct Links {
    /// The ACL users (user, password) the nodes and the replicators log in as.
    pub node_login: Option<(String, String)>,
    pub replicator_login: Option<(String, String)>,
    /// The CA for `rediss://` (NODE_REDIS_CA, REPLICATOR_REDIS_CA).
    pub redis_ca: Option<PathBuf>,
    /// The nodes serve HTTPS.
    pub https: Option<NodeHttps>,
}

impl Links {
    fn redis_url(redis: &RedisServer, login: &Option<(String, String)>) -> String {
        match login {
            Some((user, password)) => redis.url_as(user, password),
            None => redis.url(),
        }
    }
}

/// One region: its Redis and its node.
#[derive(Debug)]
pub struct RegionUnderTest {
    pub redis: RedisServer,
    pub node: RegionNode,
}

/// Two regions `a` and `b`, both standby at first, each node with the other's Redis as
/// its fencing peer; with `replicate`, a replicator in each region pulls from the other.
#[derive(Debug)]
pub struct TwoRegions {
    pub a: RegionUnderTest,
    pub b: RegionUnderTest,
    pub replicators: Vec<Replicator>,
}

impl TwoRegions {
    pub async fn start(replicate: bool) -> TwoRegions {
        Self::start_with(replicate, |_| Vec::new()).await
    }

    /// Like [`start`](Self::start), with further variables for each region's node.
    pub async fn start_with(
        replicate: bool,
        node_env: impl Fn(&str) -> Vec<(String, String)>,
    ) -> TwoRegions {
        let redis_a = RedisServer::start().await;
        let redis_b = RedisServer::start().await;
        Self::start_on(redis_a, redis_b, replicate, node_env).await
    }

    /// Like [`start_with`](Self::start_with), on Redis servers the caller started (e.g.
    /// with an AOF to inspect).
    pub async fn start_on(
        redis_a: RedisServer,
        redis_b: RedisServer,
        replicate: bool,
        node_env: impl Fn(&str) -> Vec<(String, String)>,
    ) -> TwoRegions {
        Self::start_linked(redis_a, redis_b, replicate, node_env, &Links::default()).await
    }

    /// Like [`start_on`](Self::start_on), with TLS and ACL users as `links` says.
    pub async fn start_linked(
        redis_a: RedisServer,
        redis_b: RedisServer,
        replicate: bool,
        node_env: impl Fn(&str) -> Vec<(String, String)>,
        links: &Links,
    ) -> TwoRegions {
        let node_url = |r: &RedisServer| Links::redis_url(r, &links.node_login);
        let env = |region: &str| {
            let mut env = node_env(region);
            if let Some(ca) = &links.redis_ca {
                env.insert(0, ("NODE_REDIS_CA".into(), ca.display().to_string()));
            }
            env
        };
        // Each region's node is given the peer's Redis too, for fencing.
        let node = |region: &str, own: &RedisServer, peer: &RedisServer| {
            let (own, peer) = (node_url(own), node_url(peer));
            let (env, https) = (env(region), links.https.clone());
            let region = region.to_string();
            async move { RegionNode::start_with(&region, &own, Some(&peer), &env, https).await }
        };
        let node_a = node("a", &redis_a, &redis_b).await;
        let node_b = node("b", &redis_b, &redis_a).await;
        let mut replicators = Vec::new();
        if replicate {
            let url = |r: &RedisServer| Links::redis_url(r, &links.replicator_login);
            let ca = links
                .redis_ca
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let mut extra = vec![];
            if links.redis_ca.is_some() {
                extra.push(("REPLICATOR_REDIS_CA", ca.as_str()));
            }
            // In region b, pulling from a; in region a, pulling from b.
            replicators.push(Replicator::start(&url(&redis_b), &url(&redis_a), &extra).await);
            extra.extend([
                ("REPLICATOR_LOCAL_REGION", "a"),
                ("REPLICATOR_PEER_REGION", "b"),
            ]);
            replicators.push(Replicator::start(&url(&redis_a), &url(&redis_b), &extra).await);
        }
        TwoRegions {
            a: RegionUnderTest {
                redis: redis_a,
                node: node_a,
            },
            b: RegionUnderTest {
                redis: redis_b,
                node: node_b,
            },
            replicators,
        }
    }

    /// `[("a", url), ("b", url)]` for [`GatewayOptions::new`].
    pub fn regions(&self) -> Vec<(&'static str, String)> {
        vec![("a", self.a.node.url()), ("b", self.b.node.url())]
    }
}

/// A TCP proxy on a free port to `target`. While [`cut`](Self::cut) is on, it stops
/// moving bytes in both directions and accepts new connections without forwarding,
/// so the peer sees timeouts, never a refusal or a reset — as a partition looks.
pub struct Blackhole {
    port: u16,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(target_port: u16) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::spawn(pump(cr, uw, flag.clone()));
                    pump(ur, cw, flag).await;
                });
            }
        });
        Blackhole { port, cut, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While cut, hold the bytes: read nothing, so the sender's writes stall.
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = match tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1, made
/// with openssl(1) in `dir`; returns `(ca_cert, server_cert, server_key)` paths. (A
/// lone self-signed certificate is refused by webpki as a CA used as end entity.)
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = dir.join("ca.key");
    let ca = dir.join("ca.pem");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write extfile");
    let run = |args: &[&str]| {
        crate::tokens::openssl(dir, args);
    };
    let p = |p: &PathBuf| p.display().to_string();
    crate::tokens::ec_p256_key(dir, &p(&ca_key));
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &p(&ca_key),
        "-days",
        "2",
        "-subj",
        "/CN=tandem test CA",
        "-out",
        &p(&ca),
    ]);
    crate::tokens::ec_p256_key(dir, &p(&key));
    run(&[
        "req",
        "-new",
        "-key",
        &p(&key),
        "-subj",
        "/CN=localhost",
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]);
    (ca, cert, key)
}

/// Sum of the samples of `metric` whose labels include all of `labels`. Unlike a
/// split at the first `}`, this reads label values that contain braces, as route
/// templates such as `/orders/{orderId}` do.
pub fn metric(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (label_part, value) = if rest.starts_with('{') {
            let Some(end) = rest.rfind('}') else { continue };
            (&rest[1..end], rest[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue;
        };
        if labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::rfc3339_micros;

    #[test]
    fn log_timestamps_parse_to_unix_micros() {
        assert_eq!(rfc3339_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_micros("2000-03-01T00:00:01.5Z"),
            Some(951_868_801_500_000)
        );
        assert_eq!(
            rfc3339_micros("2026-11-30T04:12:01.123456Z"),
            Some(1_796_011_921_123_456)
        );
        assert_eq!(rfc3339_micros("not a time"), None);
    }
}
