//! The real `regional-node` binary, started on a free port against a test's Redis.

use std::process::ExitStatus;
use std::time::Duration;

use crate::http::HttpClient;
use crate::ports::free_port;
use crate::process::{workspace_binary, Process};
use crate::workdir::WorkDir;

/// How long a node may take to answer `GET /health/live` after spawn.
const LIVE_DEADLINE: Duration = Duration::from_secs(20);

/// The admin token tests use unless they choose another.
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token";

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub region: String,
    pub redis_url: String,
    /// `NODE_ROLE`: only seeds the role when Redis holds none yet.
    pub role: String,
    /// `NODE_ADMIN_TOKEN`; `None` leaves it unset (admin then only from loopback).
    pub admin_token: Option<String>,
    /// Further variables, e.g. `NODE_RECLAIM_IDLE_MS`; they win over the ones above.
    pub env: Vec<(String, String)>,
}

impl NodeOptions {
    /// An active node of region `a` with [`TEST_ADMIN_TOKEN`].
    pub fn new(redis_url: impl Into<String>) -> NodeOptions {
        NodeOptions {
            region: "a".into(),
            redis_url: redis_url.into(),
            role: "active".into(),
            admin_token: Some(TEST_ADMIN_TOKEN.into()),
            env: Vec::new(),
        }
    }

    pub fn region(mut self, region: &str) -> Self {
        self.region = region.into();
        self
    }

    pub fn role(mut self, role: &str) -> Self {
        self.role = role.into();
        self
    }

    pub fn admin_token(mut self, token: Option<&str>) -> Self {
        self.admin_token = token.map(String::from);
        self
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.into(), value.to_string()));
        self
    }
}

/// A running regional node; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Node {
    options: NodeOptions,
    port: u16,
    process: Process,
    // Declared after `process` so the log outlives the process's drop report.
    _workdir: WorkDir,
}

impl Node {
    /// Spawns `regional-node` and waits until `GET /health/live` answers.
    pub async fn start(options: NodeOptions) -> Node {
        let binary = workspace_binary("regional-node");
        let mut last = String::new();
        for attempt in 0..3 {
            let workdir = WorkDir::new(&format!("node-{}", options.region));
            let port = free_port();
            let mut env: Vec<(String, String)> = vec![
                ("NODE_REGION".into(), options.region.clone()),
                ("NODE_LISTEN".into(), format!("127.0.0.1:{port}")),
                ("NODE_REDIS_URL".into(), options.redis_url.clone()),
                ("NODE_ROLE".into(), options.role.clone()),
            ];
            // Plain text in the log files.
            env.push(("NO_COLOR".into(), "1".into()));
            if std::env::var_os("RUST_LOG").is_none() {
                env.push(("RUST_LOG".into(), "info".into()));
            }
            if let Some(token) = &options.admin_token {
                env.push(("NODE_ADMIN_TOKEN".into(), token.clone()));
            }
            env.extend(options.env.iter().cloned());
            let name = format!("regional-node-{}-{port}-{attempt}", options.region);
            let process = Process::spawn(&name, &binary, &[], &env, &workdir);
            let mut node = Node {
                options: options.clone(),
                port,
                process,
                _workdir: workdir,
            };
            match node.wait_live().await {
                Ok(()) => return node,
                Err(why) => {
                    last = why;
                    node.process.kill();
                }
            }
        }
        panic!("regional-node did not come up after 3 attempts:\n{last}");
    }

    async fn wait_live(&mut self) -> Result<(), String> {
        let url = self.url();
        self.process
            .wait_http_ok(&url, "/health/live", LIVE_DEADLINE)
            .await
    }

    /// Waits until `GET /health/ready` answers 200 (Redis reachable, role loaded).
    pub async fn wait_ready(&self) {
        let http = self.http();
        crate::poll::eventually(Duration::from_secs(20), "node /health/ready = 200", || {
            let http = http.clone();
            async move {
                match http
                    .try_request(reqwest::Method::GET, "/health/ready", None, &[])
                    .await
                {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(format!("{} {}", r.status, r.text)),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client for this node that sends the admin token (when the node has one).
    pub fn http(&self) -> HttpClient {
        let http = HttpClient::new(self.url());
        match &self.options.admin_token {
            Some(t) => http.with_token(t.clone()),
            None => http,
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// SIGKILL, as in a crash: no shutdown hooks, in-flight work abandoned.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait up to `deadline` for the exit status.
    pub async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        self.process.terminate(deadline).await
    }
}
