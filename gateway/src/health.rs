//! Active health checks: one prober per region polls `GET /health/ready` every
//! interval, with a timeout and HAProxy-style rise/fall thresholds. After each
//! successful probe the failover controller renews the active region's lease.

use crate::routing::Verdict;
use crate::Shared;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::time::MissedTickBehavior;

/// Probes region `index` until the task is aborted.
pub async fn probe_loop(shared: Arc<Shared>, index: usize) {
    let cfg = &shared.config;
    let region = shared.routing.region(index).clone();
    let mut tick = tokio::time::interval(cfg.health_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        tick.tick().await;
        let t0 = Instant::now();
        let result = shared.node_api.ready(&region.url, cfg.health_timeout).await;
        region
            .last_probe_ms
            .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let ok = match result {
            Ok(report) => {
                *region.reported.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((report.role.clone(), report.epoch));
                shared.controller.after_probe(index, &report).await
            }
            Err(e) => {
                // Once per streak at warn, with the cause (a refused certificate reads
                // "invalid peer certificate: UnknownIssuer"); the repeats at debug.
                if failures == 0 {
                    tracing::warn!(region = %region.id, url = %region.url, error = %e, "probe failed");
                } else {
                    tracing::debug!(region = %region.id, error = %e, "probe failed");
                }
                false
            }
        };
        if ok {
            failures = 0;
            let n = region.probe_successes.fetch_add(1, Ordering::AcqRel) + 1;
            // A region that answers its very first probe starts healthy (as HAProxy
            // starts servers up); later it must pass `rise` probes in a row.
            if n >= cfg.health_rise || first {
                shared.routing.set_healthy(index, true, Verdict::Probe);
            }
        } else {
            region.probe_successes.store(0, Ordering::Release);
            failures += 1;
            if failures >= cfg.health_fall || first {
                shared.routing.set_healthy(index, false, Verdict::Probe);
            }
        }
        first = false;
    }
}
