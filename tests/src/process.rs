//! Child processes of a test: the real binaries of the workspace and redis-server.
//!
//! Every process writes stdout and stderr to one log file in its own [`WorkDir`]; when a
//! test panics while a process is alive, the tail of that log is printed, which is
//! usually the fastest way to see why a node misbehaved. Dropping a process kills it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::workdir::{tail, WorkDir};

/// Lines of a process log shown when a test fails.
const TAIL_LINES: usize = 80;

/// Where the workspace's binaries are: `$TANDEM_BIN_DIR` if set, else
/// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            workspace_root().join(dir)
        };
        return dir.join("debug");
    }
    workspace_root().join("target").join("debug")
}

/// The Cargo workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the build command when it is missing, since
/// `cargo test` alone does not build other packages' binaries.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}.\n\
             Build the workspace binaries first: `cargo build --workspace --bins` \
             (or set TANDEM_BIN_DIR to the directory holding them).",
            path.display()
        );
    }
    path
}

/// A running child process with its log file.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Spawns `program` with `args` and `env` (added to the inherited environment), its
    /// output appended to `<dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        dir: &WorkDir,
    ) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        let err = file.try_clone().expect("clone log file handle");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Process {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// `Some(status)` when the process has exited (reaping it), `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status),
            Ok(None) => None,
            Err(e) => panic!("try_wait on {}: {e}", self.name),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// SIGKILL and reap: the process gets no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name for kill(1), e.g. "TERM") without waiting.
    pub fn signal(&self, signal: &str) {
        let Some(pid) = self.pid() else { return };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Sends `signal` like [`signal`](Self::signal) but reports failure instead of
    /// panicking: `false` when the process is gone (a fault campaign may find a process
    /// that exited by itself).
    pub fn try_signal(&self, signal: &str) -> bool {
        let Some(pid) = self.pid() else { return false };
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until `GET {base}{path}` answers 200, the process exits, or `deadline`
    /// passes; the error says which, with the tail of the log.
    pub async fn wait_http_ok(
        &mut self,
        base: &str,
        path: &str,
        deadline: Duration,
    ) -> Result<(), String> {
        self.wait_http_ok_with(&crate::HttpClient::new(base.to_string()), path, deadline)
            .await
    }

    /// [`wait_http_ok`](Self::wait_http_ok) with a client of the caller's (HTTPS).
    pub async fn wait_http_ok_with(
        &mut self,
        http: &crate::HttpClient,
        path: &str,
        deadline: Duration,
    ) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited with {status} before {path} answered; log:\n{}",
                    self.name,
                    self.log_tail(60)
                ));
            }
            if let Ok(r) = http
                .try_request(reqwest::Method::GET, path, None, &[])
                .await
            {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if start.elapsed() > deadline {
                return Err(format!(
                    "{} gave no 200 on {path} within {deadline:?}; log:\n{}",
                    self.name,
                    self.log_tail(60)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then waits up to `deadline` for the exit and returns its status. Panics
    /// (after SIGKILL) when the process does not stop in time.
    pub async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        self.signal("TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return status;
            }
            if start.elapsed() > deadline {
                let tail = self.log_tail(TAIL_LINES);
                self.kill();
                panic!(
                    "{} did not exit within {deadline:?} after SIGTERM; log tail:\n{tail}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- [harness] last lines of {} ({}) -----\n{}\n----- end of {} -----",
                self.name,
                self.log.display(),
                self.log_tail(TAIL_LINES),
                self.name
            );
        }
        self.kill();
    }
}
