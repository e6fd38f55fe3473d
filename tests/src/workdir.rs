//! Per-process scratch directories (logs, Redis data), removed when the test passes and
//! kept when it fails, so the logs can be read afterwards.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Set by [`keep_all`]: every work dir outlives its owner.
static KEEP: AtomicBool = AtomicBool::new(false);

/// Keeps every work dir dropped from now on (logs and data), as a failing test does: a
/// fault campaign that found a violation calls it before tearing its processes down.
pub fn keep_all() {
    KEEP.store(true, Ordering::SeqCst);
}

#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `$TMPDIR/tandem-systest-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> WorkDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "tandem-systest-{}-{n}-{nanos}-{label}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create work dir {}: {e}", path.display()));
        WorkDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if KEEP.load(Ordering::SeqCst) {
            return;
        }
        if std::thread::panicking() {
            eprintln!("[harness] keeping {} for inspection", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The last `lines` lines of a text file, for failure reports.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
