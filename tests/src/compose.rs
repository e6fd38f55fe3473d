//! The Compose stack users run (`docker-compose.yml`), under test: images built by
//! `deploy/build-images.sh` from the workspace's binaries, a private compose project with
//! its own tokens and loopback ports, the real Docker faults (kill, pause, network
//! disconnect), and everything the project created removed on drop.
//!
//! When these tests run: they need a Docker engine. Where none answers they are skipped
//! with a message, unless Docker is required: when `CI` is set (to anything but `false`
//! or `0`) or `TANDEM_REQUIRE_DOCKER=1` (which `.ci/run` sets), a missing engine fails
//! the test. A missing compose tool always fails it (`scripts/test.sh` installs Debian's
//! `docker-compose` where an engine exists).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tokio::process::Command;

use crate::http::HttpClient;
use crate::poll::eventually;
use crate::ports::free_port;
use crate::process::{bin_dir, workspace_root};
use crate::workdir::WorkDir;

/// Every compose project a test starts is named `tandem-test-<pid>-<n>`.
pub const PROJECT_PREFIX: &str = "tandem-test-";
/// The `chaos` tool's Docker backend names its projects `tandem-chaos-<pid>-<n>`.
pub const CHAOS_PROJECT_PREFIX: &str = "tandem-chaos-";
/// Prefixes of the projects this harness starts, and removes once their process is gone.
const OWN_PREFIXES: [&str; 2] = [PROJECT_PREFIX, CHAOS_PROJECT_PREFIX];
/// Tag of the images the tests build (`deploy/build-images.sh --tag`), so a developer's
/// `:local` images (release binaries) are left alone. `TANDEM_TEST_IMAGE_TAG` overrides it
/// ([`image_tag`]): two worktrees sharing one engine then test their own binaries.
pub const IMAGE_TAG: &str = "test";

/// [`IMAGE_TAG`], or `$TANDEM_TEST_IMAGE_TAG` when set and not empty.
pub fn image_tag() -> String {
    std::env::var("TANDEM_TEST_IMAGE_TAG")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| IMAGE_TAG.to_string())
}
/// The long-running services of the stack (Grafana is an optional profile).
pub const SERVICES: &[&str] = &[
    "redis-a",
    "redis-b",
    "node-a",
    "node-b",
    "replicator-a",
    "replicator-b",
    "gateway",
    "prometheus",
];
/// The long-running services with `docker-compose.gateways.yml` over the stack: two
/// gateways and etcd instead of the one gateway.
pub const GATEWAYS_SERVICES: &[&str] = &[
    "redis-a",
    "redis-b",
    "node-a",
    "node-b",
    "replicator-a",
    "replicator-b",
    "etcd",
    "gw-1",
    "gw-2",
    "prometheus",
];
/// The override file that runs two gateways sharing failover control through etcd.
pub const GATEWAYS_FILE: &str = "docker-compose.gateways.yml";
/// Service and port of each region's node inside the compose networks.
const NODE_PORTS: &[(&str, u16)] = &[("a", 8081), ("b", 8082)];
/// The network joining the regions, the gateway and Prometheus (docker-compose.yml).
pub const WAN: &str = "wan";
const START_DEADLINE: Duration = Duration::from_secs(120);

/// Whether a test that needs Docker must fail, rather than skip, without an engine.
pub fn docker_required() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .map(|v| !v.is_empty() && v != "false" && v != "0")
            .unwrap_or(false)
    };
    set("CI") || set("TANDEM_REQUIRE_DOCKER")
}

/// `Ok` when a Docker engine answers, else why not.
pub fn docker_engine() -> Result<(), String> {
    match std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Err(format!("no docker client: {e}")),
        Ok(out) if !out.status.success() => Err(format!(
            "the Docker engine does not answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

/// True when the test may go on; false (after printing why) when it must be skipped.
/// Panics when Docker is missing but required (see the module's doc).
pub fn docker_or_skip(test: &str) -> bool {
    match docker_engine() {
        Ok(()) => true,
        Err(why) if docker_required() => {
            panic!("{test}: Docker is required here (CI or TANDEM_REQUIRE_DOCKER) but {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}. It runs wherever a Docker engine is available.");
            false
        }
    }
}

/// A compose tool: Compose v2 (`docker compose`) or Debian's docker-compose 1.29.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeTool {
    argv: Vec<String>,
}

impl ComposeTool {
    /// Every compose tool on this machine, v2 first.
    pub fn installed() -> Vec<ComposeTool> {
        let candidates: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
        candidates
            .iter()
            .filter(|argv| {
                std::process::Command::new(argv[0])
                    .args(&argv[1..])
                    .arg("version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .map(|argv| ComposeTool {
                argv: argv.iter().map(|s| s.to_string()).collect(),
            })
            .collect()
    }

    /// The tool the stack tests use: `$TANDEM_COMPOSE` (e.g. `docker-compose`) when set,
    /// else the first installed one. Panics when there is none.
    pub fn preferred() -> ComposeTool {
        if let Ok(cmd) = std::env::var("TANDEM_COMPOSE") {
            return ComposeTool {
                argv: cmd.split_whitespace().map(String::from).collect(),
            };
        }
        ComposeTool::installed()
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "a Docker engine is here but no compose tool: install Compose v2 or \
                 Debian's docker-compose (scripts/test.sh does)"
                )
            })
    }

    /// The tool for the other half of the stack tests: the last one installed (Debian's
    /// docker-compose 1.29 where Compose v2 is installed too), so a run of every test
    /// brings the stack up and breaks it under both tools. `$TANDEM_COMPOSE` wins, as for
    /// [`ComposeTool::preferred`].
    pub fn alternate() -> ComposeTool {
        if std::env::var_os("TANDEM_COMPOSE").is_some() {
            return ComposeTool::preferred();
        }
        ComposeTool::installed()
            .pop()
            .unwrap_or_else(ComposeTool::preferred)
    }

    pub fn name(&self) -> String {
        self.argv.join(" ")
    }

    /// An async command for this tool; arguments go after the tool's own words.
    pub fn command(&self) -> Command {
        Command::from(self.std_command())
    }

    /// The same as a blocking `std::process::Command`.
    pub fn std_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).stdin(Stdio::null());
        cmd
    }
}

/// Builds the stack's images from the binaries under test, once per test process
/// (`deploy/build-images.sh --bin-dir <bin_dir> --tag test`; docker caches the rest).
pub fn build_images() {
    if let Err(e) = try_build_images(&image_tag()) {
        panic!("{e}");
    }
}

/// `deploy/build-images.sh --bin-dir <bin_dir> --tag <tag>`, once per tag and process.
pub fn try_build_images(tag: &str) -> Result<(), String> {
    static BUILT: OnceLock<Mutex<BTreeMap<String, Result<(), String>>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    built
        .entry(tag.to_string())
        .or_insert_with(|| {
            let started = Instant::now();
            let out = std::process::Command::new("bash")
                .arg(workspace_root().join("deploy/build-images.sh"))
                .arg("--bin-dir")
                .arg(bin_dir())
                .args(["--tag", tag])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run deploy/build-images.sh: {e}"))?;
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() {
                return Err(format!("deploy/build-images.sh failed:\n{log}"));
            }
            eprintln!(
                "[compose] images built in {:.1}s:\n{log}",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        })
        .clone()
}

/// How [`Stack::up_options`] brings a stack up.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Compose files over docker-compose.yml (before the test overlay).
    pub files: Vec<&'static str>,
    /// The services to wait for (healthy).
    pub services: &'static [&'static str],
    /// `TANDEM_IMAGE_TAG` of the images to run.
    pub image_tag: String,
    /// Build the images first ([`try_build_images`]), or take them as they are.
    pub build: bool,
    /// The project is named `<prefix><pid>-<n>`.
    pub project_prefix: &'static str,
    /// Settings over the test's defaults (e.g. `NODE_DURABILITY`).
    pub settings: Vec<(String, String)>,
    /// The compose tool that runs the project.
    pub tool: ComposeTool,
}

impl StackOptions {
    /// What the compose tests run: `docker-compose.yml` and `files`, images built from
    /// the binaries under test with [`image_tag`].
    pub fn test(files: &[&'static str], services: &'static [&'static str]) -> StackOptions {
        StackOptions {
            files: files.to_vec(),
            services,
            image_tag: image_tag(),
            build: true,
            project_prefix: PROJECT_PREFIX,
            settings: Vec::new(),
            tool: ComposeTool::preferred(),
        }
    }
}

/// One running compose project of `docker-compose.yml` plus the test overlay
/// `tests/compose/observe.yml` (which publishes nodes, Redis servers and replicators on
/// random loopback ports for the test's own reads). Brought down, volumes and all, on
/// drop, unless `TANDEM_KEEP_STACK=1`.
pub struct Stack {
    pub project: String,
    pub tool: ComposeTool,
    settings: Vec<(String, String)>,
    /// Compose files over docker-compose.yml (before the test overlay).
    files: Vec<&'static str>,
    services: &'static [&'static str],
    /// The published port of the single `gateway`, or of `gw-1` with two gateways.
    pub gateway_port: u16,
    /// The published port of `gw-2` (two gateways only).
    pub gateway2_port: u16,
    pub prometheus_port: u16,
    pub admin_token: String,
    pub node_token: String,
    workdir: WorkDir,
}

impl Stack {
    /// Builds the images, starts the stack and waits until every service is healthy.
    pub async fn up() -> Stack {
        Stack::up_with(&[], SERVICES).await
    }

    /// The stack with two gateways (`gw-1`, `gw-2`) sharing failover control through
    /// etcd ([`GATEWAYS_FILE`]).
    pub async fn up_gateways() -> Stack {
        Stack::up_options(StackOptions {
            tool: ComposeTool::alternate(),
            ..StackOptions::test(&[GATEWAYS_FILE], GATEWAYS_SERVICES)
        })
        .await
    }

    /// The stack with compose `files` over docker-compose.yml, running `services`.
    pub async fn up_with(files: &[&'static str], services: &'static [&'static str]) -> Stack {
        Stack::up_options(StackOptions::test(files, services)).await
    }

    /// The stack as `options` say. Panics when it does not start.
    pub async fn up_options(options: StackOptions) -> Stack {
        if options.build {
            if let Err(e) = try_build_images(&options.image_tag) {
                panic!("{e}");
            }
        }
        remove_abandoned_projects().await;
        let tool = options.tool.clone();
        eprintln!("[compose] project run by `{}`", tool.name());
        let services = options.services;
        let mut last = String::new();
        // Published ports are chosen free but are only bound by `up`: another process
        // may take one in between, so try again on fresh ports.
        for attempt in 0..3 {
            let stack = Stack::configure(tool.clone(), &options);
            let out = stack
                .compose(&["up", "-d", "--no-build"])
                .await
                .expect("run compose up");
            if out.status.success() {
                stack.wait_healthy(services, START_DEADLINE).await;
                return stack;
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("[compose] `up` failed (attempt {attempt}):\n{last}");
            // Drop brings down what was created.
        }
        panic!("the compose stack did not start:\n{last}");
    }

    fn configure(tool: ComposeTool, options: &StackOptions) -> Stack {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let project = format!("{}{}-{n}", options.project_prefix, std::process::id());
        let workdir = WorkDir::new("compose");
        let (admin_token, node_token) = (secret(), secret());
        let (gateway_port, gateway2_port, prometheus_port) =
            (free_port(), free_port(), free_port());
        // Passed as the compose tool's environment, which wins over any .env file, so
        // nothing from a developer's shell or .env leaks into the test's stack.
        let mut settings: Vec<(String, String)> = [
            ("COMPOSE_PROJECT_NAME", project.clone()),
            ("TANDEM_IMAGE_TAG", options.image_tag.clone()),
            ("TANDEM_ADMIN_TOKEN", admin_token.clone()),
            ("TANDEM_NODE_TOKEN", node_token.clone()),
            ("TANDEM_PII_KEYS", format!("t1:{}", pii_key())),
            ("GRAFANA_ADMIN_PASSWORD", secret()),
            ("TANDEM_GATEWAY_PORT", gateway_port.to_string()),
            ("TANDEM_GATEWAY2_PORT", gateway2_port.to_string()),
            ("TANDEM_PROMETHEUS_PORT", prometheus_port.to_string()),
            ("TANDEM_GRAFANA_PORT", free_port().to_string()),
            ("NODE_DURABILITY", "async".to_string()),
            // Looser than the defaults (100 ms probe timeout, 600 ms lease): CI and
            // developers' machines run other builds and tests beside the stack, and a
            // probe that misses 100 ms there is load, not a dead region. The faults the
            // tests inject are seconds long either way. 400 ms was not loose enough: with
            // eight containers on two cores, probes and lease renewals of a healthy
            // active region missed it twice in a row now and then (once in CI, right
            // after region a thawed from a pause), and the gateway failed over to the
            // region that had just come back. Not with etcd control (two gateways): a
            // lease the controller grants must end, at the latest arrival of the
            // renewal (its timeout later), before the controller's 1 s etcd lease can,
            // and a 1 s timeout leaves no lease at all to grant.
            ("GATEWAY_HEALTH_INTERVAL_MS", "200".to_string()),
            (
                "GATEWAY_HEALTH_TIMEOUT_MS",
                if options.files.contains(&GATEWAYS_FILE) {
                    "400"
                } else {
                    "1000"
                }
                .to_string(),
            ),
            ("GATEWAY_LEASE_MS", "1500".to_string()),
            ("RUST_LOG", "info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The caller's settings win over these defaults.
        for (k, v) in &options.settings {
            settings.retain(|(key, _)| key != k);
            settings.push((k.clone(), v.clone()));
        }
        Stack {
            project,
            tool,
            settings,
            files: options.files.clone(),
            services: options.services,
            gateway_port,
            gateway2_port,
            prometheus_port,
            admin_token,
            node_token,
            workdir,
        }
    }

    /// Runs the compose tool on this project with `args`.
    pub async fn compose(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let root = workspace_root();
        // An empty env file: the repository's .env (a developer's tokens) is not read.
        let env_file = self.workdir.path().join("empty.env");
        std::fs::write(&env_file, "")?;
        let mut cmd = self.tool.command();
        cmd.current_dir(&root)
            .arg("--env-file")
            .arg(&env_file)
            .args(["-p", &self.project])
            .arg("-f")
            .arg(root.join("docker-compose.yml"));
        for f in &self.files {
            cmd.arg("-f").arg(root.join(f));
        }
        cmd.arg("-f")
            .arg(root.join("tests/compose/observe.yml"))
            .args(args)
            .envs(self.settings.iter().map(|(k, v)| (k, v)));
        cmd.output().await
    }

    /// The container id of `service`.
    pub async fn container(&self, service: &str) -> String {
        self.try_container(service)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The container id of `service`, or why there is none.
    pub async fn try_container(&self, service: &str) -> Result<String, String> {
        let out = self.container_ids(service).await?;
        let id = out.lines().next().unwrap_or("").trim().to_string();
        if id.is_empty() {
            return Err(format!("no container for service {service}"));
        }
        Ok(id)
    }

    /// Whether `service` has a container in this project (running or not).
    pub async fn has_container(&self, service: &str) -> bool {
        let out = self
            .container_ids(service)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        !out.trim().is_empty()
    }

    /// `docker ps -aq` of `service`'s containers in this project, one id a line.
    async fn container_ids(&self, service: &str) -> Result<String, String> {
        try_docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
        .await
    }

    async fn containers(&self, services: &[&str]) -> Vec<String> {
        let mut ids = Vec::new();
        for s in services {
            ids.push(self.container(s).await);
        }
        ids
    }

    /// The Docker network `name` of this project (compose prefixes it).
    pub async fn network(&self, name: &str) -> String {
        let out = docker(&[
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.network={name}"),
        ])
        .await;
        let id = out.lines().next().unwrap_or("").trim().to_string();
        assert!(!id.is_empty(), "no network {name} in {}", self.project);
        id
    }

    /// `docker <verb>` on the containers of `services`, in one call so they are hit
    /// together.
    async fn each(&self, verb: &str, services: &[&str]) {
        let ids = self.containers(services).await;
        let mut args = vec![verb];
        args.extend(ids.iter().map(String::as_str));
        docker(&args).await;
    }

    /// `docker kill` (SIGKILL): the containers vanish as in a crash of their host.
    pub async fn kill(&self, services: &[&str]) {
        self.each("kill", services).await;
    }

    /// `docker start` after a kill; the restart policy does not restart killed
    /// containers, so a drill decides when a region comes back.
    pub async fn start(&self, services: &[&str]) {
        self.each("start", services).await;
    }

    /// `docker pause` (the cgroup freezer): the processes hang with every socket open.
    ///
    /// The freezer gives up ("unable to freeze") when a task does not stop in time, as a
    /// Redis busy writing its AOF on a loaded machine may not; runc thaws the cgroup
    /// again then, so the pause is simply tried once more, a few times.
    pub async fn pause(&self, services: &[&str]) {
        let ids = self.containers(services).await;
        let mut args = vec!["pause"];
        args.extend(ids.iter().map(String::as_str));
        let Err(first) = try_docker(&args).await else {
            return;
        };
        for id in &ids {
            let mut attempt = 1;
            loop {
                let paused = docker(&["inspect", "-f", "{{.State.Paused}}", id]).await;
                if paused.trim() == "true" {
                    break;
                }
                match try_docker(&["pause", id]).await {
                    Ok(_) => break,
                    Err(e) if attempt < 5 => {
                        eprintln!("[compose] docker pause {id}: {e}; trying again");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("docker pause {id} failed: {e} (first: {first})"),
                }
            }
        }
    }

    pub async fn unpause(&self, services: &[&str]) {
        self.each("unpause", services).await;
    }

    /// `docker network disconnect` of `services` from `network`: packets to and from
    /// them on that network go nowhere (a partition; no reset).
    pub async fn disconnect(&self, network: &str, services: &[&str]) {
        let net = self.network(network).await;
        for id in self.containers(services).await {
            docker(&["network", "disconnect", &net, &id]).await;
        }
    }

    /// Reconnects `services` to `network` under their service names (the names the
    /// other containers use for them).
    pub async fn connect(&self, network: &str, services: &[&str]) {
        let net = self.network(network).await;
        for s in services {
            let id = self.container(s).await;
            docker(&["network", "connect", "--alias", s, &net, &id]).await;
        }
    }

    /// The loopback port Docker published for `service`'s `port`.
    pub async fn published_port(&self, service: &str, port: u16) -> u16 {
        self.try_published_port(service, port)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The loopback port Docker published for `service`'s `port` now: a container
    /// started again is given a new one (the test overlay leaves the host port open).
    pub async fn try_published_port(&self, service: &str, port: u16) -> Result<u16, String> {
        let id = self.try_container(service).await?;
        let out = try_docker(&["port", &id, &format!("{port}/tcp")]).await?;
        out.lines()
            .filter_map(|l| l.trim().rsplit(':').next()?.parse().ok())
            .next()
            .ok_or_else(|| format!("{service}:{port} is not published: {out:?}"))
    }

    /// A client of the gateway's published port, as a user's client would reach it.
    pub fn gateway(&self) -> HttpClient {
        HttpClient::new(format!("http://127.0.0.1:{}", self.gateway_port))
    }

    /// Gateway `service` (`gw-1`, `gw-2`) of the two-gateway stack, at its published port.
    pub fn gateway_named(&self, service: &str) -> HttpClient {
        let port = match service {
            "gw-1" => self.gateway_port,
            "gw-2" => self.gateway2_port,
            other => panic!("no gateway service {other} (gw-1, gw-2)"),
        };
        HttpClient::new(format!("http://127.0.0.1:{port}"))
    }

    /// The gateway with its admin token.
    pub fn gateway_admin(&self) -> HttpClient {
        self.gateway().with_token(&self.admin_token)
    }

    /// Prometheus' HTTP API.
    pub fn prometheus(&self) -> HttpClient {
        HttpClient::new(format!("http://127.0.0.1:{}", self.prometheus_port))
    }

    /// Region `region`'s node, directly (published by the test overlay), with the node
    /// admin token.
    pub async fn node(&self, region: &str) -> HttpClient {
        let (_, port) = NODE_PORTS
            .iter()
            .find(|(r, _)| *r == region)
            .unwrap_or_else(|| panic!("no region {region}"));
        let host_port = self.published_port(&format!("node-{region}"), *port).await;
        HttpClient::new(format!("http://127.0.0.1:{host_port}")).with_token(&self.node_token)
    }

    /// A connection to region `region`'s Redis (published by the test overlay).
    pub async fn redis(&self, region: &str) -> MultiplexedConnection {
        let port = self.published_port(&format!("redis-{region}"), 6379).await;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("redis url");
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to redis-{region}: {e}"))
    }

    /// Waits until Docker reports every one of `services` healthy (their images'
    /// healthchecks).
    pub async fn wait_healthy(&self, services: &[&str], deadline: Duration) {
        let ids = self.containers(services).await;
        eventually(deadline, "every service healthy", || async {
            let mut args = vec!["inspect", "--format", "{{.Name}} {{.State.Health.Status}}"];
            args.extend(ids.iter().map(String::as_str));
            let out = docker(&args).await;
            let unhealthy: Vec<&str> = out.lines().filter(|l| !l.ends_with(" healthy")).collect();
            if unhealthy.is_empty() {
                Ok(())
            } else {
                Err(unhealthy.join(", "))
            }
        })
        .await;
    }

    /// The last `lines` log lines of `service`.
    pub async fn logs(&self, service: &str, lines: usize) -> String {
        let id = self.container(service).await;
        let out = Command::new("docker")
            .args(["logs", "--tail", &lines.to_string(), "--timestamps", &id])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("docker logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Writes every service's log into the work dir; returns each service's file.
    pub async fn write_logs(&self, lines: usize) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for s in self.services {
            let text = self.logs(s, lines).await;
            let path = self.workdir.path().join(format!("{s}.log"));
            if std::fs::write(&path, &text).is_ok() {
                out.push((s.to_string(), path));
            }
        }
        out
    }

    /// Writes every service's log into the work dir and prints where.
    async fn save_logs(&self) {
        for s in self.services {
            let text = self.logs(s, 2000).await;
            let path = self.workdir.path().join(format!("{s}.log"));
            let _ = std::fs::write(&path, &text);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "----- [compose] last lines of {s} (all in {}) -----\n{}",
                path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let keep = std::env::var("TANDEM_KEEP_STACK").is_ok_and(|v| v == "1");
        let failed = std::thread::panicking();
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime for teardown");
                rt.block_on(async {
                    if failed {
                        self.save_logs().await;
                    }
                    if keep {
                        eprintln!(
                            "[compose] TANDEM_KEEP_STACK=1: project {} left running",
                            self.project
                        );
                        return;
                    }
                    let down = self
                        .compose(&["down", "-v", "--remove-orphans", "-t", "2"])
                        .await;
                    if !down.is_ok_and(|o| o.status.success()) {
                        remove_project(&self.project).await;
                    }
                });
            });
        });
    }
}

/// Removes the containers, networks and volumes of compose projects named
/// `tandem-test-<pid>-<n>` whose test process is gone (a test killed mid-run).
async fn remove_abandoned_projects() {
    let out = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=com.docker.compose.project",
        "--format",
        "{{.Label \"com.docker.compose.project\"}}",
    ])
    .await;
    let projects: BTreeSet<(&str, &str)> = out
        .lines()
        .map(str::trim)
        .filter_map(|p| {
            let prefix = OWN_PREFIXES.iter().find(|pre| p.starts_with(**pre))?;
            Some((p, &p[prefix.len()..]))
        })
        .collect();
    for (project, rest) in projects {
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            eprintln!("[compose] removing abandoned project {project}");
            remove_project(project).await;
        }
    }
}

/// Everything Docker holds of `project`, by compose's labels.
async fn remove_project(project: &str) {
    let label = format!("label=com.docker.compose.project={project}");
    let ids = docker(&["ps", "-aq", "--filter", &label]).await;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(ids);
        docker(&args).await;
    }
    for kind in ["network", "volume"] {
        let ids = docker(&[kind, "ls", "-q", "--filter", &label]).await;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec![kind, "rm"];
            args.extend(ids);
            docker(&args).await;
        }
    }
}

/// Runs `docker args` and returns its stdout; panics (with stderr) when it fails.
pub async fn docker(args: &[&str]) -> String {
    try_docker(args)
        .await
        .unwrap_or_else(|e| panic!("docker {args:?} failed: {e}"))
}

/// Runs `docker args`: its stdout, or its stderr when it fails.
pub async fn try_docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run docker {args:?}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// 32 random bytes, hex: a token nobody else knows.
/// 32 random bytes in standard base64: a key for `NODE_PII_KEYS`.
fn pii_key() -> String {
    use base64::Engine as _;
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn secret() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the workspace keeps deploy files.
pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}
