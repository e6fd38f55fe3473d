//! Admin jobs (a promotion, a rebuild) that run to completion whatever happens to the
//! request that started them.
//!
//! Run inside an HTTP handler, such a job is cancelled when the client goes away: a
//! rebuild stopped halfway leaves the region paused, a promotion stopped between its
//! steps leaves an intent behind that holds the replicator and fences the peer. So the
//! job runs as its own task; a request starts it (or joins the one running for the same
//! key), waits a bounded time for its outcome, and may leave without harm.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The job running (or last run), by key, and where its outcome appears.
type Slot<K, T> = Arc<Mutex<Option<(K, watch::Receiver<Option<T>>)>>>;

/// At most one job at a time; `K` names what it does (e.g. the epoch of a promotion).
pub struct Jobs<K, T> {
    running: Slot<K, T>,
}

impl<K, T> Default for Jobs<K, T> {
    fn default() -> Self {
        Jobs {
            running: Arc::new(Mutex::new(None)),
        }
    }
}

/// How a wait for a job ended.
#[derive(Debug, PartialEq)]
pub enum Waited<T> {
    Done(T),
    /// Still running after the wait: ask again later (the job goes on).
    Running,
}

impl<K, T> Jobs<K, T>
where
    K: PartialEq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Starts `job` under `key`, or joins the job already running under the same key.
    /// A job running under another key is returned as `Err(key)`: one at a time.
    pub fn start<F>(&self, key: K, job: F) -> Result<Handle<T>, K>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, rx)) = running.as_ref() {
            if rx.borrow().is_none() {
                return if *k == key {
                    Ok(Handle { rx: rx.clone() })
                } else {
                    Err(k.clone())
                };
            }
        }
        let (tx, rx) = watch::channel(None);
        *running = Some((key, rx.clone()));
        let slot = self.running.clone();
        tokio::spawn(async move {
            let outcome = job.await;
            // Publish and free the slot together, so a caller never sees the job
            // finished and yet cannot start the next one.
            let _guard = slot.lock().unwrap_or_else(|e| e.into_inner());
            let _ = tx.send(Some(outcome));
        });
        Ok(Handle { rx })
    }

    /// The key of the job running now, if any.
    pub fn running(&self) -> Option<K> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .as_ref()
            .filter(|(_, rx)| rx.borrow().is_none())
            .map(|(k, _)| k.clone())
    }
}

/// A started or joined job.
pub struct Handle<T> {
    rx: watch::Receiver<Option<T>>,
}

impl<T: Clone> Handle<T> {
    /// Waits up to `limit` for the outcome.
    pub async fn wait(mut self, limit: Duration) -> Waited<T> {
        match tokio::time::timeout(limit, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => Waited::Done(v.clone().expect("waited for Some")),
            // The task ended without an outcome: it panicked.
            Ok(Err(_)) => Waited::Running,
            Err(_) => Waited::Running,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_outlives_the_caller_and_joins_by_key() {
        let jobs: Jobs<u64, u64> = Jobs::default();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let first = jobs
            .start(7, async move {
                let _ = go_rx.await;
                42
            })
            .unwrap();
        // The caller gives up waiting; the job goes on.
        assert_eq!(first.wait(Duration::from_millis(10)).await, Waited::Running);
        // Another key is refused while it runs; the same key joins it.
        assert_eq!(jobs.start(8, async { 0 }).err(), Some(7));
        let joined = jobs.start(7, async { 0 }).unwrap();
        assert_eq!(jobs.running(), Some(7));
        go_tx.send(()).unwrap();
        assert_eq!(joined.wait(Duration::from_secs(5)).await, Waited::Done(42));
        // Once finished, the next job may start.
        let next = jobs.start(8, async { 1 }).unwrap();
        assert_eq!(next.wait(Duration::from_secs(5)).await, Waited::Done(1));
        assert_eq!(jobs.running(), None);
    }
}
