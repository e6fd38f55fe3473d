//! The region table and the routing decision: writes to the active region, reads to
//! the active one or any healthy one, never to a drained or unhealthy region.
//!
//! The hot path reads only atomics. Every change (health, drain, active region) bumps a
//! generation in a `watch` channel, so a request that found no region can wait for the
//! next change within its deadline instead of failing at once.

use crate::config::{Config, ReadPolicy};
use crate::metrics::Metrics;
use hyper::http::uri::Authority;
use hyper::http::HeaderValue;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

const NO_REGION: usize = usize::MAX;

/// One region as the gateway sees it.
pub struct Region {
    pub index: usize,
    pub id: String,
    /// `id` as the `X-Region` header value, made once rather than for every answer.
    pub id_header: HeaderValue,
    /// Base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// `host:port` of `url`, for building upstream URIs without parsing.
    pub authority: Authority,
    /// `authority` as a `Host` value, for a request that came without one (HTTP/2).
    pub host_header: HeaderValue,
    /// Passing its checks and not ejected by outlier detection.
    healthy: AtomicBool,
    /// Drained by an operator: no new requests.
    drained: AtomicBool,
    /// Consecutive successful probes; reset when the region is ejected, so it must
    /// pass `rise` probes again before it gets traffic.
    pub probe_successes: AtomicU32,
    /// Consecutive failed requests seen by the proxy (passive outlier detection).
    passive_failures: AtomicU32,
    /// Latency of the last probe, in milliseconds.
    pub last_probe_ms: AtomicU64,
    /// Role and epoch as the region last reported them.
    pub reported: Mutex<Option<(String, u64)>>,
}

impl Region {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }
    fn usable(&self) -> bool {
        self.is_healthy() && !self.is_drained()
    }
}

/// Why a region was marked unhealthy.
#[derive(Debug, Clone, Copy)]
pub enum Verdict {
    Probe,
    Outlier,
}

/// Regions, the active one, the epoch, and the change signal.
pub struct Routing {
    regions: Vec<Arc<Region>>,
    active: AtomicUsize,
    epoch: AtomicU64,
    /// True while a failover or switchover is under way: writes wait for its end.
    switching: AtomicBool,
    read_policy: ReadPolicy,
    outlier_threshold: u32,
    round_robin: AtomicUsize,
    changes: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Routing {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Routing {
        let regions = config
            .regions
            .iter()
            .enumerate()
            .map(|(index, r)| {
                Arc::new(Region {
                    index,
                    id: r.id.clone(),
                    id_header: HeaderValue::from_str(&r.id)
                        .expect("region ids are [a-z0-9-] (config checks)"),
                    url: r.url.clone(),
                    authority: r.authority.clone(),
                    host_header: HeaderValue::from_str(r.authority.as_str())
                        .expect("an authority is a valid header value"),
                    healthy: AtomicBool::new(false),
                    drained: AtomicBool::new(false),
                    probe_successes: AtomicU32::new(0),
                    passive_failures: AtomicU32::new(0),
                    last_probe_ms: AtomicU64::new(0),
                    reported: Mutex::new(None),
                })
            })
            .collect();
        Routing {
            regions,
            active: AtomicUsize::new(NO_REGION),
            epoch: AtomicU64::new(0),
            switching: AtomicBool::new(false),
            read_policy: config.read_policy,
            outlier_threshold: config.outlier_consecutive_failures,
            round_robin: AtomicUsize::new(0),
            changes: watch::channel(0).0,
            metrics,
        }
    }

    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    pub fn region(&self, index: usize) -> &Arc<Region> {
        &self.regions[index]
    }

    pub fn find(&self, id: &str) -> Option<&Arc<Region>> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The active region's index, if one is known.
    pub fn active(&self) -> Option<usize> {
        match self.active.load(Ordering::Acquire) {
            NO_REGION => None,
            i => Some(i),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn is_switching(&self) -> bool {
        self.switching.load(Ordering::Acquire)
    }

    /// A receiver that sees every change of health, drain state or active region.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|g| *g += 1);
    }

    pub fn set_active(&self, index: usize, epoch: u64) {
        let previous = self.active.swap(index, Ordering::AcqRel);
        self.epoch.store(epoch, Ordering::Release);
        if previous != NO_REGION && previous != index {
            self.metrics
                .active_region
                .with_label_values(&[self.regions[previous].id.as_str()])
                .set(0);
        }
        self.metrics
            .active_region
            .with_label_values(&[self.regions[index].id.as_str()])
            .set(1);
        self.metrics.epoch.set(epoch as i64);
        self.changed();
    }

    pub fn set_switching(&self, on: bool) {
        self.switching.store(on, Ordering::Release);
        self.changed();
    }

    pub fn set_drained(&self, index: usize, drained: bool) {
        self.regions[index]
            .drained
            .store(drained, Ordering::Release);
        self.changed();
    }

    /// Sets a region's health; returns true when it changed.
    pub fn set_healthy(&self, index: usize, healthy: bool, why: Verdict) -> bool {
        let region = &self.regions[index];
        let was = region.healthy.swap(healthy, Ordering::AcqRel);
        if was == healthy {
            return false;
        }
        if healthy {
            region.passive_failures.store(0, Ordering::Release);
            tracing::info!(region = %region.id, "region healthy");
        } else {
            region.probe_successes.store(0, Ordering::Release);
            tracing::warn!(region = %region.id, reason = ?why, "region unhealthy");
        }
        self.metrics
            .region_healthy
            .with_label_values(&[region.id.as_str()])
            .set(i64::from(healthy));
        self.changed();
        true
    }

    /// Passive outlier detection: a failed request (connect error, timeout, 5xx).
    pub fn record_failure(&self, index: usize) {
        let n = self.regions[index]
            .passive_failures
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if n >= self.outlier_threshold {
            self.set_healthy(index, false, Verdict::Outlier);
        }
    }

    /// A request that got a non-5xx answer resets the outlier count.
    pub fn record_success(&self, index: usize) {
        let r = &self.regions[index];
        if r.passive_failures.load(Ordering::Relaxed) != 0 {
            r.passive_failures.store(0, Ordering::Release);
        }
    }

    /// The region for a write, or `None` while there is no usable active region (during
    /// a failover, say): the caller waits for a change.
    pub fn pick_write(&self) -> Option<usize> {
        if self.is_switching() {
            return None;
        }
        let a = self.active()?;
        self.regions[a].usable().then_some(a)
    }

    /// The region for a read. `avoid` holds regions that already failed this request;
    /// they are used again only when nothing else is usable.
    pub fn pick_read(&self, avoid: Tried) -> Option<usize> {
        let active = self.active().filter(|&a| self.regions[a].usable());
        if self.read_policy == ReadPolicy::Active {
            if let Some(a) = active.filter(|&a| !avoid.contains(a)) {
                return Some(a);
            }
        }
        let usable = self
            .regions
            .iter()
            .filter(|r| r.usable())
            .fold(Tried::default(), |set, r| set.with(r.index));
        let candidates = usable.without(avoid);
        let pool = if candidates.is_empty() {
            usable
        } else {
            candidates
        };
        if pool.is_empty() {
            return None;
        }
        let n = self.round_robin.fetch_add(1, Ordering::Relaxed);
        pool.nth(n % pool.len())
    }
}

/// A set of regions (by index) as bits: the regions a request has tried, or those
/// usable. The configuration allows at most [`Tried::MAX_REGIONS`] regions; a set of
/// bits costs no allocation on a request's way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    pub const MAX_REGIONS: usize = crate::config::MAX_REGIONS;

    pub fn contains(self, i: usize) -> bool {
        i < Self::MAX_REGIONS && self.0 & (1 << i) != 0
    }
    #[must_use]
    pub fn with(self, i: usize) -> Tried {
        debug_assert!(i < Self::MAX_REGIONS);
        Tried(self.0 | 1u64.checked_shl(i as u32).unwrap_or(0))
    }
    fn without(self, other: Tried) -> Tried {
        Tried(self.0 & !other.0)
    }
    fn is_empty(self) -> bool {
        self.0 == 0
    }
    fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    /// The `n`th member in index order.
    fn nth(self, n: usize) -> Option<usize> {
        (0..Self::MAX_REGIONS).filter(|&i| self.contains(i)).nth(n)
    }
}
