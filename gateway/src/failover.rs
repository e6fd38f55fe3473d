//! Failover control: the gateway is the witness that decides which region is active.
//!
//! Who may act is the [`Authority`]: this gateway alone, its epochs in a local file; or,
//! with several gateways, the one holding control in etcd ([`crate::election`]). The
//! others follow: they route to the region that reports itself active at the highest
//! epoch, and never renew, promote or demote.
//!
//! Invariants:
//! - An epoch is recorded (on disk, or in etcd by compare-and-swap) before any region is
//!   promoted to it, and no epoch at or below a recorded one is ever used again, also
//!   after a restart.
//! - The active region holds a lease that the gateway renews after every successful
//!   probe. A standby is promoted only once the old lease must have lapsed (the latest
//!   bound of any renewal sent, plus a margin), because a lapsed lease is what makes the
//!   old active fence itself: so two regions never act at once.
//! - A region that reports itself active while another is active is demoted at the
//!   current epoch as soon as it answers again.

use crate::config::Config;
use crate::election::Election;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::node_api::{NodeApi, NodeError, RoleReport};
use crate::routing::{Routing, Verdict};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Timeout for promote, demote and role queries (they may touch both Redis servers).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
const STATE_FILE: &str = "epoch.json";

#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    epoch: u64,
    active: Option<String>,
}

/// The highest epoch this gateway has used, persisted so a restart never reuses one.
pub struct EpochStore {
    dir: Option<PathBuf>,
    high: Mutex<u64>,
}

impl EpochStore {
    /// Reads `epoch.json` from `dir`, creating the directory if needed.
    pub fn open(dir: Option<&Path>) -> std::io::Result<EpochStore> {
        let mut high = 0;
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
            match std::fs::read(dir.join(STATE_FILE)) {
                Ok(bytes) => {
                    let p: Persisted = serde_json::from_slice(&bytes).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: {e}", dir.join(STATE_FILE).display()),
                        )
                    })?;
                    high = p.epoch;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(EpochStore {
            dir: dir.map(Path::to_path_buf),
            high: Mutex::new(high),
        })
    }

    pub fn high(&self) -> u64 {
        *self.high.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `epoch` (if higher than what is stored): temp file, fsync, rename, fsync
    /// of the directory, so a crash leaves either the old or the new file.
    pub fn record(&self, epoch: u64, active: &str) -> std::io::Result<()> {
        let mut high = self.high.lock().unwrap_or_else(|e| e.into_inner());
        if epoch <= *high {
            return Ok(());
        }
        if let Some(dir) = &self.dir {
            use std::io::Write;
            let tmp = dir.join(format!("{STATE_FILE}.tmp"));
            let body = serde_json::to_vec(&Persisted {
                epoch,
                active: Some(active.to_string()),
            })
            .map_err(std::io::Error::other)?;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, dir.join(STATE_FILE))?;
            std::fs::File::open(dir)?.sync_all()?;
        }
        *high = epoch;
        Ok(())
    }
}

/// Where epochs are recorded and who may act on the regions.
pub enum Authority {
    /// This gateway alone; its highest epoch in `GATEWAY_STATE_DIR`.
    Local(EpochStore),
    /// Whichever gateway holds control in etcd; epochs allocated there.
    Etcd(Arc<Election>),
}

/// The lease the gateway grants the active region.
struct Lease {
    region: Option<usize>,
    epoch: u64,
    /// The latest instant at which a lease the node acknowledged may still run: the
    /// node starts its lease before it answers, so answer time + ttl bounds it.
    until: Instant,
    /// Renewals sent and not answered yet, and the latest bound among them (send time
    /// + timeout + ttl: the node may act on a renewal until our timeout).
    in_flight: u32,
    pending_until: Option<Instant>,
    /// Set when a failover begins: no renewal is sent after it.
    stopped: bool,
    /// The node has acknowledged a lease at this epoch. A node fences itself only
    /// once it has been given a lease: until then, nothing but a demotion stops it.
    leased: bool,
    /// With etcd: the epoch record says so too, for the next controller.
    recorded: bool,
}

impl Lease {
    /// The latest instant at which any lease this gateway sent may still run.
    fn bound(&self) -> Instant {
        self.pending_until.map_or(self.until, |p| p.max(self.until))
    }
}

/// Result of a planned switchover.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Switchover {
    pub active: String,
    pub epoch: u64,
    pub previous: String,
    pub lost_events: u64,
}

pub struct Controller {
    config: Arc<Config>,
    routing: Arc<Routing>,
    api: NodeApi,
    authority: Authority,
    metrics: Arc<Metrics>,
    lease: Mutex<Lease>,
    /// One failover or switchover at a time.
    transition: tokio::sync::Mutex<()>,
    /// Bootstrap finished: an active region is known.
    ready: AtomicBool,
    /// With etcd: this gateway holds control (from taking stock of the regions on).
    controlling: AtomicBool,
    /// Shutting down: control is being handed over.
    stopping: AtomicBool,
    started: Instant,
}

impl Controller {
    pub fn new(
        config: Arc<Config>,
        routing: Arc<Routing>,
        api: NodeApi,
        authority: Authority,
        metrics: Arc<Metrics>,
    ) -> Controller {
        if matches!(authority, Authority::Local(_)) {
            metrics.controller.set(1);
        }
        Controller {
            config,
            routing,
            api,
            authority,
            metrics,
            lease: Mutex::new(Lease {
                region: None,
                epoch: 0,
                until: Instant::now(),
                in_flight: 0,
                pending_until: None,
                stopped: true,
                leased: false,
                recorded: false,
            }),
            transition: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            controlling: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// An active region is known: the gateway can route writes.
    pub fn is_ready(&self) -> bool {
        match self.authority {
            Authority::Local(_) => self.ready.load(Ordering::Acquire),
            Authority::Etcd(_) => self.routing.active().is_some(),
        }
    }

    /// The id of the gateway in control of failover, if known.
    pub fn controller_id(&self) -> Option<String> {
        match &self.authority {
            Authority::Local(_) => Some(self.config.id.clone()),
            Authority::Etcd(e) if self.acting() => Some(e.id().to_string()),
            Authority::Etcd(e) => e.holder().filter(|id| id != e.id()),
        }
    }

    /// This gateway controls failover now (`tandem_gateway_controller`).
    pub fn is_controller(&self) -> bool {
        self.acting()
    }

    /// This gateway may act on the regions now (renew, promote, demote).
    fn acting(&self) -> bool {
        match &self.authority {
            Authority::Local(_) => true,
            Authority::Etcd(e) => {
                self.controlling.load(Ordering::Acquire)
                    && !self.stopping.load(Ordering::Acquire)
                    && e.may_act()
            }
        }
    }

    fn not_controller(&self) -> GatewayError {
        let holder = self.controller_id();
        GatewayError::Conflict {
            code: "not_controller",
            message: format!(
                "gateway {} does not control failover{}",
                self.config.id,
                holder.map_or(String::new(), |h| format!("; gateway {h} does"))
            ),
        }
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs bootstrap, then watches the active region and fails over when it fails.
    /// With etcd, does so only while this gateway holds control.
    pub async fn run(self: Arc<Self>) {
        if let Authority::Etcd(election) = &self.authority {
            let election = election.clone();
            return self.run_shared(election).await;
        }
        self.bootstrap().await;
        let mut changes = self.routing.subscribe();
        loop {
            changes.borrow_and_update();
            self.check().await;
            let _ = tokio::time::timeout(self.config.health_interval, changes.changed()).await;
        }
    }

    /// Several gateways: follow (route by what the regions report) until this one holds
    /// control, then take stock and act until control ends.
    async fn run_shared(self: Arc<Self>, election: Arc<Election>) {
        let mut control = election.subscribe();
        let mut changes = self.routing.subscribe();
        loop {
            if control.wait_for(|c| *c).await.is_err() {
                return;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            // Acting from here on: taking stock may renew a lease or promote.
            self.controlling.store(true, Ordering::Release);
            self.metrics.controller.set(1);
            if !self.take_control(&election).await {
                self.controlling.store(false, Ordering::Release);
                self.metrics.controller.set(0);
                tokio::time::sleep(self.config.health_interval).await;
                continue;
            }
            while *control.borrow_and_update() && !self.stopping.load(Ordering::Acquire) {
                changes.borrow_and_update();
                self.check().await;
                tokio::select! {
                    _ = tokio::time::timeout(self.config.health_interval, changes.changed()) => {}
                    _ = control.changed() => {}
                }
            }
            self.controlling.store(false, Ordering::Release);
            self.lease().stopped = true;
            self.metrics.controller.set(0);
            tracing::warn!("no longer in control of failover; following the regions' reports");
        }
    }

    /// On gaining control: learn the allocated epoch and the regions' roles, and carry on
    /// from there. A region active at (or above) the last allocated epoch keeps its role
    /// and gets its lease renewed at once; every lease the previous controller granted
    /// ended when its control did, so none has to be waited out.
    async fn take_control(&self, election: &Election) -> bool {
        let _t = self.transition.lock().await;
        let record = match election.record().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the epoch record; not taking control yet");
                return false;
            }
        };
        let regions = self.routing.regions().to_vec();
        let reports = self.role_reports().await;
        let seen = reports.iter().flatten().map(|r| r.epoch).max().unwrap_or(0);
        let allocated = record.as_ref().map_or(0, |r| r.epoch);
        let best_active = reports
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().filter(|r| r.is_active()).map(|r| (i, r)))
            .max_by_key(|(_, r)| r.epoch);
        let recorded_leased = |i: usize, epoch: u64| {
            record
                .as_ref()
                .is_some_and(|r| r.leased && r.epoch == epoch && r.region == regions[i].id)
        };
        if let Some((i, rep)) = best_active.filter(|(_, r)| r.epoch >= allocated) {
            // It just answered. Requests may have ejected it while this gateway only
            // followed (it refuses writes for a moment when its lease has lapsed and
            // its peer's word is stale, as while nobody could renew): a failover needs
            // this controller's own probes to find it failing.
            if !self.routing.region(i).is_healthy() {
                self.routing.set_healthy(i, true, Verdict::Probe);
            }
            self.take_office(i, rep.epoch, rep).await;
            if recorded_leased(i, rep.epoch) {
                let mut lease = self.lease();
                lease.leased = true;
                lease.recorded = true;
            }
            self.ready.store(true, Ordering::Release);
            tracing::info!(region = %regions[i].id, epoch = rep.epoch, "took control; the active region keeps its role");
            return true;
        }
        if let Some(rec) = &record {
            if let Some(r) = regions.iter().position(|r| r.id == rec.region) {
                if reports[r].is_none() {
                    // The region of the last allocated epoch does not answer: it may be
                    // active there. Hold it as the active region; the failover path then
                    // decides as for any active region that fails its checks.
                    {
                        let mut lease = self.lease();
                        lease.region = Some(r);
                        lease.epoch = rec.epoch;
                        lease.leased = rec.leased;
                        lease.recorded = rec.leased;
                        lease.stopped = false;
                        // Nothing the previous controller granted can still run: every
                        // lease it renewed and every window its promotions opened ended
                        // by the end of its control (`renewal_ttl`, `promotion_bound`),
                        // which came before this gateway could take the key.
                        lease.until = lease.until.max(Instant::now());
                    }
                    self.routing.set_active(r, rec.epoch);
                    self.ready.store(true, Ordering::Release);
                    tracing::warn!(region = %rec.region, epoch = rec.epoch,
                        "took control; the region of the last epoch does not answer");
                    return true;
                }
                if let Some((i, rep)) = best_active {
                    // It answers and is not active at that epoch: that promotion never
                    // happened; the region that is active keeps its role.
                    self.take_office(i, rep.epoch, rep).await;
                    self.ready.store(true, Ordering::Release);
                    tracing::info!(region = %regions[i].id, epoch = rep.epoch, allocated,
                        "took control; an allocated epoch was never used");
                    return true;
                }
            }
        }
        // No region is active: the system's first start, or every region lost its role.
        let Some(primary) = regions.iter().position(|r| r.id == self.config.primary) else {
            return false;
        };
        if reports[primary].is_none() {
            tracing::info!(region = %self.config.primary, "waiting for the primary region to answer");
            return false;
        }
        match self.promote(primary, seen.max(allocated)).await {
            Ok((epoch, report)) => {
                self.take_office(primary, epoch, &report).await;
                self.ready.store(true, Ordering::Release);
                tracing::info!(region = %regions[primary].id, epoch, "took control; made the primary region active");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not make the primary region active");
                false
            }
        }
    }

    /// Each region's `GET /admin/role`, `None` where it did not answer.
    async fn role_reports(&self) -> Vec<Option<RoleReport>> {
        let mut reports = Vec::with_capacity(self.routing.regions().len());
        for r in self.routing.regions() {
            match self.api.role(&r.url, self.config.health_timeout * 5).await {
                Ok(rep) => reports.push(Some(rep)),
                Err(e) => {
                    tracing::debug!(region = %r.id, error = %e, "role query failed");
                    reports.push(None);
                }
            }
        }
        reports
    }

    /// Shutting down: stop acting, let the node leases this gateway granted run out,
    /// then give control up so another gateway takes over at once.
    pub async fn resign(&self) {
        let Authority::Etcd(election) = &self.authority else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        if self.controlling.swap(false, Ordering::AcqRel) {
            let bound = {
                let mut lease = self.lease();
                lease.stopped = true;
                lease.bound()
            };
            self.metrics.controller.set(0);
            tracing::info!(
                wait_ms = bound.saturating_duration_since(Instant::now()).as_millis() as u64,
                "handing control over once the active region's lease has run out"
            );
            tokio::time::sleep_until((bound + self.config.lease_margin).into()).await;
        }
        election.resign().await;
    }

    /// One look at the active region: fail over if it is unhealthy and a standby is not.
    async fn check(&self) {
        let Some(active) = self.routing.active() else {
            return;
        };
        if self.routing.region(active).is_healthy() {
            let mut lease = self.lease();
            if lease.stopped && lease.region == Some(active) && !self.routing.is_switching() {
                // A failover was abandoned (no standby could be promoted) and the active
                // region answers again: keep it.
                tracing::info!(region = %self.routing.region(active).id, "resuming lease renewals");
                lease.stopped = false;
            }
            return;
        }
        if let Some(to) = self.candidate(active) {
            self.fail_over(active, to, "unhealthy").await;
        }
    }

    /// A healthy, undrained region other than `except`.
    fn candidate(&self, except: usize) -> Option<usize> {
        self.routing
            .regions()
            .iter()
            .find(|r| r.index != except && r.is_healthy() && !r.is_drained())
            .map(|r| r.index)
    }

    /// Records the next epoch, above everything recorded and everything seen, for
    /// `region`; nobody will use it again.
    async fn allocate(&self, seen: u64, region: &str) -> Result<u64, NodeError> {
        match &self.authority {
            Authority::Local(store) => {
                let epoch = store.high().max(self.routing.epoch()).max(seen) + 1;
                store.record(epoch, region).map_err(|e| {
                    tracing::error!(error = %e, "cannot persist the epoch");
                    NodeError::Transport(format!("persist epoch: {e}"))
                })?;
                Ok(epoch)
            }
            Authority::Etcd(election) => {
                if !self.acting() {
                    return Err(NodeError::Transport("not in control of failover".into()));
                }
                election
                    .allocate(self.routing.epoch().max(seen), region)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot allocate an epoch in etcd");
                        NodeError::Transport(format!("allocate an epoch in etcd: {e}"))
                    })
            }
        }
    }

    async fn fail_over(&self, from: usize, mut to: usize, reason: &'static str) {
        let _t = self.transition.lock().await;
        if self.routing.active() != Some(from)
            || self.routing.region(from).is_healthy()
            || !self.acting()
        {
            return;
        }
        let from_id = self.routing.region(from).id.clone();
        self.routing.set_switching(true);
        let (lapse, leased) = {
            let mut lease = self.lease();
            lease.stopped = true;
            (lease.bound() + self.config.lease_margin, lease.leased)
        };
        if !leased && !self.demote_unleased(from).await {
            self.routing.set_switching(false);
            return;
        }
        tracing::warn!(
            from = %from_id,
            to = %self.routing.region(to).id,
            wait_ms = lapse.saturating_duration_since(Instant::now()).as_millis() as u64,
            "active region failed its checks; promoting the standby once the lease has lapsed"
        );
        tokio::time::sleep_until(lapse.into()).await;
        if !self.acting() {
            tracing::warn!("lost control of failover while waiting; not promoting");
            self.routing.set_switching(false);
            return;
        }
        if !self.routing.region(to).is_healthy() {
            match self.candidate(from) {
                Some(c) => to = c,
                None => {
                    tracing::error!("no healthy standby to promote; will try again");
                    self.routing.set_switching(false);
                    return;
                }
            }
        }
        let asked = Instant::now();
        match self.promote(to, 0).await {
            Ok((epoch, report)) => {
                tracing::info!(
                    region = %self.routing.region(to).id,
                    epoch,
                    took_ms = asked.elapsed().as_millis() as u64,
                    "standby promoted"
                );
                self.take_office(to, epoch, &report).await;
                let to_id = &self.routing.region(to).id;
                self.metrics
                    .failovers
                    .with_label_values(&[from_id.as_str(), to_id.as_str(), reason])
                    .inc();
                tracing::warn!(from = %from_id, to = %to_id, epoch, reason, "failover done");
            }
            Err(e) => {
                tracing::error!(to = %self.routing.region(to).id, error = %e, "promotion failed; will try again");
            }
        }
        self.routing.set_switching(false);
    }

    /// An active region that never acknowledged a lease will not fence itself when we
    /// stop renewing, so waiting is no protection: it must be demoted explicitly
    /// before anyone else is promoted. Returns true when it was.
    async fn demote_unleased(&self, from: usize) -> bool {
        let region = self.routing.region(from).clone();
        let Ok(epoch) = self.allocate(0, &region.id).await else {
            tracing::error!("no epoch to demote at; not failing over");
            return false;
        };
        match self
            .api
            .demote(&region.url, epoch, self.config.health_timeout * 5)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(region = %region.id, error = %e,
                    "the active region never acknowledged a lease and cannot be demoted; \
                     not promoting another region while it may still act");
                false
            }
        }
    }

    /// Records a new epoch and promotes `to` at it; on `stale_epoch` learns the
    /// region's epoch and tries once more above it.
    async fn promote(&self, to: usize, seen: u64) -> Result<(u64, RoleReport), NodeError> {
        let region = self.routing.region(to).clone();
        let mut above = seen;
        for attempt in 0..3 {
            let epoch = self.allocate(above, &region.id).await?;
            match self
                .api
                .promote(
                    &region.url,
                    epoch,
                    self.promotion_bound(),
                    CONTROL_TIMEOUT,
                    || self.acting(),
                )
                .await
            {
                Ok(report) => return Ok((epoch, report)),
                Err(e) if e.code().as_deref() == Some("stale_epoch") && attempt < 2 => {
                    let theirs = self
                        .api
                        .role(&region.url, CONTROL_TIMEOUT)
                        .await
                        .map(|r| r.epoch)
                        .unwrap_or(epoch);
                    above = theirs.max(epoch);
                }
                Err(e) => return Err(e),
            }
        }
        Err(NodeError::Transport("promotion kept failing".into()))
    }

    /// Makes `index` the active region at `epoch`: takes over its lease (a node may
    /// report a lease already running, e.g. a grace period after promotion), routes
    /// writes to it, and grants a first lease at once so the node starts fencing itself.
    /// (Writes need not wait for that lease: it protects the *next* failover.)
    async fn take_office(&self, index: usize, epoch: u64, report: &RoleReport) {
        {
            let mut lease = self.lease();
            lease.region = Some(index);
            lease.epoch = epoch;
            lease.stopped = false;
            lease.leased = report.lease_remaining_ms.is_some();
            let remaining = Duration::from_millis(report.lease_remaining_ms.unwrap_or(0));
            lease.until = lease.until.max(Instant::now() + remaining);
        }
        self.routing.set_active(index, epoch);
        self.routing.set_switching(false);
        self.renew(index).await;
    }

    /// Called by a region's prober after each successful probe. Renews the active
    /// region's lease; demotes a region that claims to be active but is not. Returns
    /// false when the region refused its lease (it is not active at our epoch).
    pub async fn after_probe(&self, index: usize, report: &RoleReport) -> bool {
        match self.authority {
            Authority::Etcd(_) if !self.controlling.load(Ordering::Acquire) => {
                self.follow(index, report);
                return true;
            }
            Authority::Local(_) if !self.is_ready() => return true,
            _ => {}
        }
        if self.routing.active() == Some(index) {
            return self.renew(index).await;
        }
        if report.is_active() && !self.routing.is_switching() && self.acting() {
            let epoch = self.routing.epoch();
            let region = self.routing.region(index);
            if report.epoch > epoch {
                if let Authority::Etcd(_) = self.authority {
                    // Only controllers allocate epochs: this is a promotion a previous
                    // controller finished after this one took stock. It is the active
                    // region now; the other one is demoted when it answers next.
                    if let Ok(_t) = self.transition.try_lock() {
                        tracing::warn!(region = %region.id, epoch = report.epoch,
                            "a region is active at a higher epoch than ours; following it");
                        self.take_office(index, report.epoch, report).await;
                    }
                    return true;
                }
                tracing::error!(region = %region.id, their_epoch = report.epoch, our_epoch = epoch,
                    "a region is active at a higher epoch than ours; not touching it");
                return true;
            }
            tracing::warn!(region = %region.id, epoch, "demoting a stale active region");
            if let Err(e) = self.api.demote(&region.url, epoch, CONTROL_TIMEOUT).await {
                tracing::warn!(region = %region.id, error = %e, "demote failed");
            }
        }
        true
    }

    /// A gateway that does not control failover routes writes to the region that
    /// reports itself active at the highest epoch.
    fn follow(&self, index: usize, report: &RoleReport) {
        let known = self.routing.active();
        if report.is_active() {
            if known.is_none() || report.epoch > self.routing.epoch() {
                tracing::info!(region = %self.routing.region(index).id, epoch = report.epoch,
                    "following the active region");
                self.routing.set_active(index, report.epoch);
            }
            if self.routing.is_switching() && self.routing.active() == Some(index) {
                self.routing.set_switching(false);
            }
        } else if known == Some(index) && !self.routing.is_switching() {
            // The region writes went to stepped down (a switchover or failover is under
            // way): hold writes until a region reports itself active, rather than send
            // them where they are refused.
            tracing::info!(region = %self.routing.region(index).id, role = %report.role,
                "the active region stepped down; holding writes for its successor");
            self.routing.set_switching(true);
        }
    }

    fn lease_timeout(&self) -> Duration {
        self.config.lease_timeout()
    }

    /// The lease to grant now, `None` when this gateway may not renew. With etcd it is
    /// clipped to end (at the latest arrival of the renewal, plus the margin) before
    /// this gateway's control may end: no lease outlives the control that granted it.
    fn renewal_ttl(&self) -> Option<Duration> {
        let Authority::Etcd(election) = &self.authority else {
            return Some(self.config.lease);
        };
        if !self.acting() {
            return None;
        }
        let until = election.held_until()?;
        let latest_arrival = Instant::now() + self.lease_timeout() + self.config.lease_margin;
        let left = until.checked_duration_since(latest_arrival)?;
        let ttl = self.config.lease.min(left);
        (ttl.as_millis() >= 1).then_some(ttl)
    }

    /// With etcd, the bound (wall clock) of the write window a promotion opens by itself
    /// until its first lease: the end of this gateway's control, less the margin. So
    /// that window nests in the control too, like every renewal, and the next
    /// controller has nothing of this one's to wait out. A single gateway sends none
    /// (the node's own grace applies; `bootstrap` waits out what a previous life of it
    /// may have granted).
    fn promotion_bound(&self) -> Option<std::time::SystemTime> {
        let Authority::Etcd(election) = &self.authority else {
            return None;
        };
        let left = election
            .held_until()
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .and_then(|left| left.checked_sub(self.config.lease_margin))
            .unwrap_or_default();
        Some(std::time::SystemTime::now() + left)
    }

    /// Sends one lease renewal to the active region, unless renewals are stopped.
    async fn renew(&self, index: usize) -> bool {
        let Some(ttl) = self.renewal_ttl() else {
            return true;
        };
        let timeout = self.lease_timeout();
        // The wall-clock twin of `bound`, taken first so it is never the later one: the
        // node's write window ends by it (see `NodeApi::lease`).
        let not_after = std::time::SystemTime::now() + timeout + ttl;
        let epoch = {
            let mut lease = self.lease();
            if lease.stopped || lease.region != Some(index) {
                return true;
            }
            let bound = Instant::now() + timeout + ttl;
            lease.in_flight += 1;
            lease.pending_until = Some(lease.pending_until.map_or(bound, |p| p.max(bound)));
            lease.epoch
        };
        let region = self.routing.region(index);
        let result = self
            .api
            .lease(&region.url, epoch, ttl, not_after, timeout)
            .await;
        {
            let mut lease = self.lease();
            lease.in_flight -= 1;
            match &result {
                Ok(report) => {
                    let remaining = Duration::from_millis(report.lease_remaining_ms.unwrap_or(0));
                    lease.until = lease.until.max(Instant::now() + ttl.max(remaining));
                    lease.leased = true;
                }
                // Never reached the node: it extends nothing.
                Err(e) if e.extended_nothing() => {}
                // The node may still act on it: keep the pessimistic bound for good.
                Err(_) => {
                    let pending = lease.bound();
                    lease.until = pending;
                }
            }
            if lease.in_flight == 0 {
                lease.pending_until = None;
            }
        }
        if let (Authority::Etcd(election), Ok(_)) = (&self.authority, &result) {
            // Tell the next controller that this region fences itself now (once per
            // epoch: until the record says so).
            let recorded = self.lease().recorded;
            if !recorded && election.mark_leased(epoch).await {
                let mut lease = self.lease();
                if lease.epoch == epoch {
                    lease.recorded = true;
                }
            }
        }
        match result {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(region = %region.id, epoch, error = %e, "lease renewal failed");
                false
            }
        }
    }

    /// At start: adopt the highest active region, or make the primary active.
    async fn bootstrap(&self) {
        loop {
            match self.try_bootstrap().await {
                Ok(true) => {
                    self.ready.store(true, Ordering::Release);
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "bootstrap step failed; retrying"),
            }
            tokio::time::sleep(self.config.health_interval).await;
        }
    }

    async fn try_bootstrap(&self) -> Result<bool, NodeError> {
        let Authority::Local(store) = &self.authority else {
            return Ok(false);
        };
        let regions = self.routing.regions().to_vec();
        let reports = self.role_reports().await;
        let persisted = store.high();
        let seen = reports.iter().flatten().map(|r| r.epoch).max().unwrap_or(0);
        let best_active = reports
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().filter(|r| r.is_active()).map(|r| (i, r)))
            .max_by_key(|(_, r)| r.epoch);
        if let Some((i, rep)) = best_active {
            if rep.epoch >= persisted && rep.epoch > 0 {
                store
                    .record(rep.epoch, &regions[i].id)
                    .map_err(|e| NodeError::Transport(format!("persist epoch: {e}")))?;
                // A previous life of this gateway may have granted a lease we no
                // longer know about: count it as running for a full lease from now.
                self.lease().until = Instant::now() + self.config.lease + self.lease_timeout();
                self.take_office(i, rep.epoch, rep).await;
                tracing::info!(region = %regions[i].id, epoch = rep.epoch, "adopted the active region");
                return Ok(true);
            }
            tracing::warn!(region = %regions[i].id, epoch = rep.epoch, persisted,
                "a region is active below the epoch this gateway persisted; promoting anew");
        }
        let Some(primary) = regions.iter().position(|r| r.id == self.config.primary) else {
            return Ok(false);
        };
        if reports[primary].is_none() {
            tracing::info!(region = %self.config.primary, "waiting for the primary region to answer");
            return Ok(false);
        }
        if persisted > 0 {
            // This gateway ran before and may have granted a lease it no longer knows
            // about: let it lapse before anyone else is made active.
            let lapse =
                self.started + self.config.lease + self.lease_timeout() + self.config.lease_margin;
            tokio::time::sleep_until(lapse.into()).await;
        }
        let (epoch, report) = self.promote(primary, seen).await?;
        self.take_office(primary, epoch, &report).await;
        tracing::info!(region = %regions[primary].id, epoch, "made the primary region active");
        Ok(true)
    }

    /// Planned switchover: stop writes, demote the active one, wait until the target
    /// holds every event, promote it. Nothing acknowledged is lost.
    pub async fn switchover(&self, to_id: &str) -> Result<Switchover, GatewayError> {
        if !self.acting() {
            return Err(self.not_controller());
        }
        let _t = self.transition.lock().await;
        if !self.acting() {
            return Err(self.not_controller());
        }
        let conflict = |code, message: String| GatewayError::Conflict { code, message };
        let to = self
            .routing
            .find(to_id)
            .ok_or_else(|| conflict("unknown_region", format!("no region {to_id:?}")))?
            .clone();
        let from = self
            .routing
            .active()
            .ok_or_else(|| conflict("no_active_region", "no region is active yet".into()))?;
        let from = self.routing.region(from).clone();
        if from.index == to.index {
            return Err(conflict(
                "already_active",
                format!("region {to_id} is already active"),
            ));
        }
        if !to.is_healthy() {
            return Err(conflict(
                "region_unhealthy",
                format!("region {to_id} fails its checks"),
            ));
        }
        self.routing.set_switching(true);
        self.lease().stopped = true;
        let result = self.switch(&from, &to).await;
        match &result {
            Ok((s, report)) => {
                self.take_office(to.index, s.epoch, report).await;
                self.metrics
                    .failovers
                    .with_label_values(&[from.id.as_str(), to.id.as_str(), "planned"])
                    .inc();
                tracing::info!(from = %from.id, to = %to.id, epoch = s.epoch, "switchover done");
            }
            Err(e) => {
                tracing::error!(from = %from.id, to = %to.id, error = %e, "switchover failed")
            }
        }
        self.routing.set_switching(false);
        result.map(|(s, _)| s)
    }

    async fn switch(
        &self,
        from: &crate::routing::Region,
        to: &crate::routing::Region,
    ) -> Result<(Switchover, RoleReport), GatewayError> {
        let failed = |code, e: NodeError| GatewayError::ControlFailed {
            code,
            message: e.to_string(),
        };
        let epoch = self
            .allocate(0, &to.id)
            .await
            .map_err(|e| failed("persist_failed", e))?;
        if let Err(e) = self.api.demote(&from.url, epoch, CONTROL_TIMEOUT).await {
            // `from` is still active at its epoch: keep renewing its lease.
            self.lease().stopped = false;
            return Err(failed("demote_failed", e));
        }
        let source = self
            .api
            .role(&from.url, CONTROL_TIMEOUT)
            .await
            .map_err(|e| failed("role_query_failed", e))?;
        let deadline = Instant::now() + self.config.switchover_timeout;
        loop {
            let target = self.api.role(&to.url, CONTROL_TIMEOUT).await;
            if let Ok(t) = &target {
                if t.last_event_id == source.last_event_id {
                    break;
                }
            }
            if Instant::now() >= deadline {
                // Give the old active its role back rather than lose events.
                tracing::warn!(region = %to.id, "replication did not catch up; restoring the old active");
                if let Ok((back, report)) = self.promote(from.index, epoch).await {
                    self.take_office(from.index, back, &report).await;
                } else {
                    self.lease().stopped = false;
                }
                return Err(GatewayError::Conflict {
                    code: "replication_lag",
                    message: format!(
                        "region {} did not reach the last event {:?} of region {} within {:?}",
                        to.id, source.last_event_id, from.id, self.config.switchover_timeout
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = match self
            .api
            .promote(
                &to.url,
                epoch,
                self.promotion_bound(),
                CONTROL_TIMEOUT,
                || self.acting(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let Ok((back, report)) = self.promote(from.index, epoch).await {
                    self.take_office(from.index, back, &report).await;
                }
                return Err(failed("promote_failed", e));
            }
        };
        Ok((
            Switchover {
                active: to.id.clone(),
                epoch,
                previous: from.id.clone(),
                lost_events: 0,
            },
            report,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_survives_reopen_and_never_goes_down() {
        let dir = std::env::temp_dir().join(format!("gw-epoch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = EpochStore::open(Some(&dir)).unwrap();
        assert_eq!(s.high(), 0);
        s.record(3, "a").unwrap();
        s.record(2, "b").unwrap();
        drop(s);
        let s = EpochStore::open(Some(&dir)).unwrap();
        assert_eq!(s.high(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
