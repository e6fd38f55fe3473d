//! A private `redis-server` per test, on a free loopback port (never 6379).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::ports::free_port;
use crate::process::Process;
use crate::workdir::WorkDir;

/// How long a starting Redis may take to answer PING.
const START_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `appendonly yes` with `appendfsync always`, so data survives `kill()` and
    /// `restart()`. Off by default: nothing is persisted and tests run faster.
    pub appendonly: bool,
    /// Data directory; a fresh temp dir when `None`.
    pub dir: Option<PathBuf>,
    /// Serve TLS only (`--port 0 --tls-port`): every URL is `rediss://`.
    pub tls: Option<RedisTls>,
    /// `--aclfile`: users and their rights (e.g. deploy/redis/users.acl).
    pub acl_file: Option<PathBuf>,
    /// The user and password the harness itself logs in with (with an ACL file whose
    /// `default` user is off).
    pub login: Option<(String, String)>,
}

/// PEM files for a Redis that speaks TLS. Clients are not asked for certificates
/// (`--tls-auth-clients no`): who they are is their ACL user.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// The CA clients must trust (given to the binaries as NODE_REDIS_CA etc.).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running `redis-server`, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    options: RedisOptions,
    process: Option<Process>,
    /// Holds logs and, unless `options.dir` is set, the data files.
    workdir: WorkDir,
    restarts: u32,
}

impl RedisServer {
    /// An ephemeral Redis: `--save "" --appendonly no`.
    pub async fn start() -> RedisServer {
        Self::start_with(RedisOptions::default()).await
    }

    /// A Redis whose data survives `kill()`/`restart()` on the same port.
    pub async fn start_persistent() -> RedisServer {
        Self::start_with(RedisOptions {
            appendonly: true,
            ..RedisOptions::default()
        })
        .await
    }

    pub async fn start_with(options: RedisOptions) -> RedisServer {
        let mut last_log = String::new();
        // A port can be taken between free_port() and Redis's bind: retry on a new one.
        for _ in 0..5 {
            let port = free_port();
            let workdir = WorkDir::new("redis");
            let mut server = RedisServer {
                port,
                options: options.clone(),
                process: None,
                workdir,
                restarts: 0,
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(log) => {
                    last_log = log;
                    server.kill();
                }
            }
        }
        panic!("redis-server did not start after 5 attempts; last log:\n{last_log}");
    }

    /// Where its data files (the AOF among them) live.
    pub fn data_dir(&self) -> PathBuf {
        self.options
            .dir
            .clone()
            .unwrap_or_else(|| self.workdir.path().to_path_buf())
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = match &self.options.tls {
            None => vec!["--port".into(), self.port.to_string()],
            Some(tls) => vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                self.port.to_string(),
                "--tls-cert-file".into(),
                tls.cert.display().to_string(),
                "--tls-key-file".into(),
                tls.key.display().to_string(),
                "--tls-ca-cert-file".into(),
                tls.ca.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        if let Some(acl) = &self.options.acl_file {
            args.extend(["--aclfile".into(), acl.display().to_string()]);
        }
        args.extend([
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--dir".into(),
            self.data_dir().display().to_string(),
            "--daemonize".into(),
            "no".into(),
        ]);
        if self.options.appendonly {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        args
    }

    /// Spawns redis-server and waits for PING; `Err(log tail)` when it exits early or
    /// never answers.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let program = redis_server_binary();
        std::fs::create_dir_all(self.data_dir()).expect("create redis data dir");
        let name = format!("redis-{}-{}", self.port, self.restarts);
        let process = Process::spawn(&name, &program, &self.args(), &[], &self.workdir);
        self.process = Some(process);
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.as_mut().and_then(|p| p.exited()) {
                let log = self
                    .process
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                return Err(format!("redis-server exited with {status}:\n{log}"));
            }
            if self.ping().await {
                return Ok(());
            }
            if start.elapsed() > START_DEADLINE {
                let log = self
                    .process
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default();
                self.process.take();
                return Err(format!("no PONG within {START_DEADLINE:?}:\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ping(&self) -> bool {
        let Ok(client) = self.redis_client(&self.url()) else {
            return false;
        };
        let connect = client.get_multiplexed_async_connection();
        let Ok(Ok(mut conn)) = tokio::time::timeout(Duration::from_millis(500), connect).await
        else {
            return false;
        };
        let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        matches!(pong.as_deref(), Ok("PONG"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` with TLS), logged in as the harness'
    /// own user when there is one.
    pub fn url(&self) -> String {
        match &self.options.login {
            Some((user, password)) => self.url_as(user, password),
            None => format!("{}://127.0.0.1:{}", self.scheme(), self.port),
        }
    }

    /// The URL logged in as `user` (an ACL user, e.g. the node's).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!(
            "{}://{user}:{password}@127.0.0.1:{}",
            self.scheme(),
            self.port
        )
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// A client for `url` (one of this server's), trusting the test CA with TLS.
    pub fn redis_client(&self, url: &str) -> Result<redis::Client, String> {
        let ca = self
            .options
            .tls
            .as_ref()
            .map(|t| internal_tls::PemFile::new("test CA", &t.ca));
        internal_tls::redis_client(url, ca)
    }

    /// A connection logged in as `user`, for tests of what that user may do.
    pub async fn client_as(&self, user: &str, password: &str) -> MultiplexedConnection {
        let url = self.url_as(user, password);
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        self.redis_client(&url)
            .expect("valid redis url")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
    }

    /// A fresh async connection for assertions.
    /// A connection for assertions. Patient: redis-rs answers a reply slower than
    /// 500 ms with a timeout by default, which a loaded 2-core CI machine can exceed.
    pub async fn client(&self) -> MultiplexedConnection {
        let client = self.redis_client(&self.url()).expect("valid redis url");
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// SIGKILL: the server vanishes as in a crash. With `appendonly` (fsync always) every
    /// acknowledged write is still on disk for `restart()`.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGSTOP: the server hangs (connections are accepted, nothing is answered).
    pub fn pause(&self) {
        if let Some(p) = &self.process {
            p.signal("STOP");
        }
    }

    /// Sends `signal` (e.g. "STOP", "CONT"); `false` when the server is not running.
    pub fn try_signal(&self, signal: &str) -> bool {
        self.process.as_ref().is_some_and(|p| p.try_signal(signal))
    }

    /// The log files' directory (and, unless `options.dir` is set, the data's).
    pub fn workdir(&self) -> &std::path::Path {
        self.workdir.path()
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        if let Some(p) = &self.process {
            p.signal("CONT");
        }
    }

    /// SIGTERM and wait for a clean exit (Redis flushes its AOF on the way out).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let status = p.terminate(Duration::from_secs(10)).await;
            assert!(status.success(), "redis-server exited with {status}");
        }
    }

    /// Starts Redis again on the same port and data dir (after `kill()` or `stop()`; a
    /// running server is killed first). Waits until PING answers.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            self.restarts += 1;
            match self.spawn_and_wait().await {
                Ok(()) => return,
                // The old socket can linger for a moment after SIGKILL.
                Err(log) if Instant::now() < deadline => {
                    let _ = log;
                    self.process.take();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(log) => panic!("redis-server did not restart on port {}:\n{log}", self.port),
            }
        }
    }
}

/// `redis-server` from `$REDIS_SERVER` or `PATH` (scripts/test.sh installs it).
pub fn redis_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "redis-server not found (PATH or $REDIS_SERVER). Install it: \
         `apt-get install -y redis-server`, or run scripts/test.sh which does."
    );
}
