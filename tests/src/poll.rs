//! Waiting by polling with a deadline (never sleep-then-assert).

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

/// Interval between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(30);

/// Calls `check` every [`POLL_INTERVAL`] until it returns `Ok(value)` and returns that
/// value. `Err(observed)` means "not yet"; when `deadline` passes, panics with `what`
/// and the last observed value.
///
/// ```ignore
/// let order = eventually(Duration::from_secs(10), "order shipped", || async {
///     let o = api.order(&id).await;
///     if o["status"] == "SHIPPED" { Ok(o) } else { Err(o["status"].clone()) }
/// }).await;
/// ```
pub async fn eventually<T, E, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(value) => return value,
            Err(observed) => {
                if start.elapsed() >= deadline {
                    panic!(
                        "timed out after {deadline:?} waiting for: {what}\nlast observed: {observed:#?}"
                    );
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`eventually`] for a predicate over an observed value: polls `observe` until
/// `done(&value)` holds, returns the value.
pub async fn wait_until<T, F, Fut, P>(deadline: Duration, what: &str, mut observe: F, done: P) -> T
where
    T: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
    P: Fn(&T) -> bool,
{
    eventually(deadline, what, || {
        let fut = observe();
        let done = &done;
        async move {
            let v = fut.await;
            if done(&v) {
                Ok(v)
            } else {
                Err(v)
            }
        }
    })
    .await
}
