//! Real `etcd` processes (Debian's `etcd-server`) on free loopback ports: one member, or
//! a cluster of three, each member killable and restartable with its data.
//!
//! Members run with a 50 ms heartbeat and a 500 ms election timeout (what a LAN or
//! loopback cluster uses), so etcd accepts 1 s leases (its minimum TTL is 1.5 election
//! timeouts, rounded up to whole seconds). Their data lives in `/dev/shm` when there is
//! one: etcd preallocates 64 MB of log per member and fsyncs every write, which a busy
//! shared disk makes slow (and the logs stay in the work dir).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::process::Process;
use crate::workdir::WorkDir;

const START_DEADLINE: Duration = Duration::from_secs(20);

/// One member: its ports, data directory and process.
#[derive(Debug)]
pub struct EtcdMember {
    pub name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Process>,
    starts: u32,
}

impl EtcdMember {
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }
}

/// An etcd cluster of one or more members, killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    token: String,
    workdir: WorkDir,
    /// The members' data directories; removed on drop.
    data: PathBuf,
}

impl EtcdCluster {
    /// A single member.
    pub async fn start_one() -> EtcdCluster {
        Self::start(1).await
    }

    /// `n` members, waiting until every one answers `/health` as healthy.
    pub async fn start(n: usize) -> EtcdCluster {
        let mut last = String::new();
        // A port may be taken between free_port() and etcd's bind: retry with new ones.
        for attempt in 0..3 {
            let workdir = WorkDir::new("etcd");
            let members = (0..n)
                .map(|i| EtcdMember {
                    name: format!("m{i}"),
                    client_port: free_port(),
                    peer_port: free_port(),
                    process: None,
                    starts: 0,
                })
                .collect();
            let data = data_root(&workdir);
            let mut cluster = EtcdCluster {
                members,
                token: format!("tandem-test-{}-{attempt}", std::process::id()),
                workdir,
                data,
            };
            for i in 0..n {
                cluster.spawn(i);
            }
            match cluster.wait_healthy(START_DEADLINE).await {
                Ok(()) => return cluster,
                Err(why) => {
                    last = why;
                    cluster.kill_all();
                }
            }
        }
        panic!("etcd did not start after 3 attempts:\n{last}");
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.data.join(format!("{}.etcd", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let data_dir = self.data_dir(i);
        let m = &self.members[i];
        let args: Vec<String> = vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={}", m.client_url()),
            format!("--advertise-client-urls={}", m.client_url()),
            format!("--listen-peer-urls={}", m.peer_url()),
            format!("--initial-advertise-peer-urls={}", m.peer_url()),
            format!("--initial-cluster={}", initial.join(",")),
            format!("--initial-cluster-token={}", self.token),
            "--initial-cluster-state=new".into(),
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--logger=zap".into(),
            "--log-level=warn".into(),
        ];
        let name = format!("etcd-{}-{}-{}", m.name, m.client_port, m.starts);
        let process = Process::spawn(&name, &etcd_binary(), &args, &[], &self.workdir);
        let m = &mut self.members[i];
        m.process = Some(process);
        m.starts += 1;
    }

    /// Comma-separated client URLs, for `GATEWAY_ETCD_ENDPOINTS`.
    pub fn endpoints(&self) -> String {
        self.client_urls().join(",")
    }

    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url()).collect()
    }

    /// SIGKILL member `i` (its data stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its ports with its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Starts every member again and waits until the cluster is healthy.
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            self.restart(i);
        }
        if let Err(why) = self.wait_healthy(START_DEADLINE).await {
            panic!("etcd did not come back:\n{why}");
        }
    }

    /// Waits until every running member answers `GET /health` with `"health":"true"`
    /// (a member is healthy only while the cluster has a leader).
    pub async fn wait_healthy(&mut self, deadline: Duration) -> Result<(), String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("reqwest client");
        let start = Instant::now();
        loop {
            let mut all = true;
            for m in self.members.iter_mut() {
                let Some(p) = m.process.as_mut() else {
                    continue;
                };
                if let Some(status) = p.exited() {
                    return Err(format!(
                        "etcd {} exited with {status}:\n{}",
                        m.name,
                        p.log_tail(40)
                    ));
                }
                let healthy = match client
                    .get(format!("{}/health", m.client_url()))
                    .send()
                    .await
                {
                    Ok(r) => r.text().await.unwrap_or_default().contains("\"true\""),
                    Err(_) => false,
                };
                all &= healthy;
            }
            if all {
                return Ok(());
            }
            if start.elapsed() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .filter_map(|m| m.process.as_ref().map(|p| p.log_tail(20)))
                    .collect();
                return Err(format!(
                    "etcd not healthy within {deadline:?}:\n{}",
                    logs.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i]
            .process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A fresh directory for the members' data: in `/dev/shm` if present, else the work dir.
fn data_root(workdir: &WorkDir) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let root = match workdir.path().file_name() {
        Some(name) if shm.is_dir() => shm.join(name),
        _ => workdir.path().join("data"),
    };
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("create etcd data dir {}: {e}", root.display()));
    root
}

/// `etcd` from `$PATH` (Debian's `etcd-server`; `scripts/test.sh` installs it).
pub fn etcd_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("etcd not found on PATH: apt-get install etcd-server (scripts/test.sh does)")
    })
}
