//! Who controls failover when several gateways run (`GATEWAY_ETCD_ENDPOINTS`), and the
//! epoch counter every controller allocates from; both live in etcd.
//!
//! - Election: a gateway creates `<prefix>/controller` (value: its id) attached to an
//!   etcd lease, in a transaction that succeeds only while the key does not exist, and
//!   keeps the lease alive every quarter TTL. The others read the key every 100 ms and
//!   try again once it is gone: its holder died, was cut off from etcd, or resigned.
//! - A holder's *term* is the key's create revision, unique to one acquisition.
//! - Control runs until `held_until`: the send time of the last successful keep-alive
//!   (or of the grant) plus the TTL. etcd started or renewed the lease after that request
//!   left, and deletes the key only once the lease expired, so no other gateway can hold
//!   the key before `held_until` (up to the difference of the two clocks' rates, which
//!   the lease margin covers). The controller acts (renews, promotes, demotes) only
//!   before `held_until`, and clips the node leases it grants to end by then too: a new
//!   controller inherits no running lease it does not know of.
//! - Epochs: `<prefix>/epoch` holds [`EpochRecord`]. The next epoch is allocated by a
//!   transaction that compares the record's mod revision *and* the controller key's
//!   create revision with the caller's term: two gateways never take the same epoch, a
//!   deposed controller takes none, and etcd keeps the counter across any restart.

use crate::config::EtcdConfig;
use crate::etcd::{Compare, EtcdClient, EtcdError, KeyValue, Op};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often a gateway that does not hold control looks whether the key is free.
const CAMPAIGN_POLL: Duration = Duration::from_millis(100);

/// The allocation record of the highest epoch any controller has taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    /// The region this epoch was allocated for (promoted, or demoted at it).
    pub region: String,
    /// The region acknowledged a lease at this epoch, so it fences itself once its
    /// lease lapses; until then only a demotion stops it.
    #[serde(default)]
    pub leased: bool,
    /// The gateway that allocated it.
    #[serde(default)]
    pub controller: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("this gateway does not control failover")]
    NotController,
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("the epoch record in etcd is not valid: {0}")]
    BadRecord(String),
    #[error("the epoch record kept changing; try again")]
    Contended,
}

/// One acquisition of the controller key.
#[derive(Debug, Clone, Copy)]
struct Term {
    /// The controller key's create revision.
    revision: i64,
    lease: i64,
    /// Control surely runs until then (see the module's doc).
    until: Instant,
}

#[derive(Default)]
struct State {
    term: Option<Term>,
    /// The holder as last read from etcd, and when.
    holder: Option<(String, Instant)>,
    /// etcd unreachable since then (logged once per outage).
    failing_since: Option<Instant>,
}

pub struct Election {
    etcd: Arc<EtcdClient>,
    id: String,
    ttl: Duration,
    margin: Duration,
    controller_key: String,
    epoch_key: String,
    state: Mutex<State>,
    in_control: watch::Sender<bool>,
    resigned: AtomicBool,
    warned_ttl: AtomicBool,
}

impl Election {
    /// `id`: this gateway's `GATEWAY_ID`; `margin`: kept between the end of control as
    /// this gateway counts it and its last action (`GATEWAY_LEASE_MARGIN_MS`).
    pub fn new(id: &str, margin: Duration, etcd: &EtcdConfig) -> Result<Election, EtcdError> {
        Ok(Election {
            etcd: Arc::new(EtcdClient::new(etcd.endpoints.clone(), etcd.timeout)?),
            id: id.to_string(),
            ttl: etcd.lease_ttl,
            margin,
            controller_key: format!("{}/controller", etcd.prefix),
            epoch_key: format!("{}/epoch", etcd.prefix),
            state: Mutex::new(State::default()),
            in_control: watch::channel(false).0,
            resigned: AtomicBool::new(false),
            warned_ttl: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Until when this gateway surely controls failover, while it holds a term.
    pub fn held_until(&self) -> Option<Instant> {
        if self.resigned.load(Ordering::Acquire) {
            return None;
        }
        self.state().term.map(|t| t.until)
    }

    /// True while this gateway may act: it holds the key, with the margin to spare.
    pub fn may_act(&self) -> bool {
        self.held_until()
            .is_some_and(|until| Instant::now() + self.margin < until)
    }

    /// Sees every change of [`may_act`](Self::may_act) (within a keep-alive period).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.in_control.subscribe()
    }

    /// The controlling gateway's id: this one while it may act, else the holder last
    /// read from etcd if that was recent (`None`: unknown, or nobody holds control).
    pub fn holder(&self) -> Option<String> {
        if self.may_act() {
            return Some(self.id.clone());
        }
        let state = self.state();
        state
            .holder
            .as_ref()
            .filter(|(id, at)| at.elapsed() < 2 * self.ttl && *id != self.id)
            .map(|(id, _)| id.clone())
    }

    fn publish(&self) {
        let now = self.may_act();
        self.in_control.send_if_modified(|c| {
            let changed = *c != now;
            *c = now;
            changed
        });
    }

    /// Campaigns for control, and keeps it while held, until [`resign`](Self::resign).
    pub async fn run(self: Arc<Self>) {
        let keep_every = self.ttl / 4;
        while !self.resigned.load(Ordering::Acquire) {
            let term = self.state().term;
            let pause = match term {
                None => {
                    self.campaign().await;
                    CAMPAIGN_POLL
                }
                Some(t) => {
                    // A keep-alive may hang on an unreachable member for a while: say
                    // when control ends even if it is still waiting.
                    let keep = self.keep(t);
                    tokio::pin!(keep);
                    let end = t.until.checked_sub(self.margin).unwrap_or(t.until);
                    if Instant::now() < end {
                        tokio::select! {
                            _ = &mut keep => {}
                            _ = tokio::time::sleep_until(end.into()) => {
                                self.publish();
                                keep.await;
                            }
                        }
                    } else {
                        keep.await;
                    }
                    // Wake up in time to report the end of control when renewals fail.
                    let left = t
                        .until
                        .saturating_duration_since(Instant::now() + self.margin);
                    keep_every.min(left).max(Duration::from_millis(5))
                }
            };
            self.publish();
            tokio::time::sleep(pause).await;
            self.publish();
        }
    }

    /// Reads the controller key; creates it when it is free.
    async fn campaign(&self) {
        match self.etcd.get(&self.controller_key).await {
            Ok(Some(kv)) => {
                self.note_success();
                let holder = String::from_utf8_lossy(&kv.value).into_owned();
                self.state().holder = Some((holder, Instant::now()));
            }
            Ok(None) => {
                self.note_success();
                self.acquire().await
            }
            Err(e) => self.note_failure(&e),
        }
    }

    async fn acquire(&self) {
        let lease = match self.etcd.grant(self.ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot grant a controller lease");
                return;
            }
        };
        if lease.ttl > self.ttl && !self.warned_ttl.swap(true, Ordering::Relaxed) {
            tracing::warn!(asked = ?self.ttl, granted = ?lease.ttl,
                "etcd raised the controller lease's TTL to its minimum (1.5 election timeouts): \
                 a controller that dies is replaced that much later");
        }
        let key = &self.controller_key;
        let put = Op::Put {
            key: key.clone(),
            value: self.id.clone().into_bytes(),
            lease: lease.id,
        };
        let created = Compare::Created {
            key: key.clone(),
            revision: 0,
        };
        let get = Op::Get { key: key.clone() };
        let won = match self.etcd.txn(&[created], &[put], &[get]).await {
            Ok(o) if o.succeeded => Some(o.revision),
            Ok(o) => {
                if let Some(Some(kv)) = o.gets.first() {
                    let holder = String::from_utf8_lossy(&kv.value).into_owned();
                    self.state().holder = Some((holder, Instant::now()));
                }
                None
            }
            // The write may have been applied: the key tells.
            Err(_) => match self.etcd.get(key).await {
                Ok(Some(kv)) if kv.lease == lease.id => Some(kv.create_revision),
                _ => None,
            },
        };
        match won {
            Some(revision) => {
                let mut state = self.state();
                state.term = Some(Term {
                    revision,
                    lease: lease.id,
                    until: lease.sent_at + self.ttl,
                });
                state.holder = Some((self.id.clone(), Instant::now()));
                state.failing_since = None;
                drop(state);
                tracing::info!(term = revision, ttl = ?self.ttl, "this gateway now controls failover");
            }
            None => self.revoke_later(lease.id),
        }
    }

    /// One keep-alive, and a look at the key (an operator may have deleted it).
    async fn keep(&self, term: Term) {
        let renewal = self.etcd.keep_alive(term.lease).await;
        let lost = match renewal {
            Ok(r) if r.ttl.is_some() => match self.etcd.get(&self.controller_key).await {
                Ok(Some(kv)) if kv.create_revision == term.revision => {
                    self.note_success();
                    let mut state = self.state();
                    if let Some(t) = state.term.as_mut().filter(|t| t.revision == term.revision) {
                        t.until = t.until.max(r.sent_at + self.ttl);
                    }
                    state.holder = Some((self.id.clone(), Instant::now()));
                    None
                }
                Ok(other) => Some(format!(
                    "the controller key is gone or was recreated ({:?})",
                    other.map(|kv| holder_of(&kv))
                )),
                Err(e) => {
                    self.note_failure(&e);
                    None
                }
            },
            Ok(_) => Some("the controller lease expired".to_string()),
            Err(e) => {
                self.note_failure(&e);
                None
            }
        };
        if let Some(why) = lost {
            let mut state = self.state();
            if state.term.is_some_and(|t| t.revision == term.revision) {
                state.term = None;
                drop(state);
                tracing::warn!(
                    term = term.revision,
                    why,
                    "this gateway lost control of failover"
                );
                self.revoke_later(term.lease);
            }
        }
    }

    fn note_failure(&self, e: &EtcdError) {
        let mut state = self.state();
        if state.failing_since.is_some() {
            return;
        }
        state.failing_since = Some(Instant::now());
        match state.term {
            Some(t) => {
                let left = t.until.saturating_duration_since(Instant::now());
                drop(state);
                tracing::warn!(error = %e, control_left = ?left,
                    "etcd unreachable: cannot renew the controller lease; \
                     failover actions stop when control runs out");
            }
            None => {
                drop(state);
                tracing::warn!(error = %e,
                    "etcd unreachable: this gateway cannot take control of failover \
                     (it keeps routing to the active region)");
            }
        }
    }

    fn note_success(&self) {
        if let Some(since) = self.state().failing_since.take() {
            tracing::info!(after = ?since.elapsed(), "etcd reachable again");
        }
    }

    fn revoke_later(&self, lease: i64) {
        // Best effort: an unrevoked lease expires by itself.
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            let _ = etcd.revoke(lease).await;
        });
    }

    /// Gives control up at once (SIGTERM): no more actions, and the key is deleted so
    /// another gateway takes over within its poll. Call it once the node leases this
    /// gateway granted have run out.
    pub async fn resign(&self) {
        self.resigned.store(true, Ordering::Release);
        self.publish();
        let term = self.state().term.take();
        if let Some(t) = term {
            match self.etcd.revoke(t.lease).await {
                Ok(()) => tracing::info!(term = t.revision, "resigned control of failover"),
                Err(e) => tracing::warn!(error = %e,
                    "could not revoke the controller lease; another gateway takes over when it expires"),
            }
        }
    }

    /// The highest epoch allocated so far.
    pub async fn record(&self) -> Result<Option<EpochRecord>, ControlError> {
        let kv = self.etcd.get(&self.epoch_key).await?;
        kv.map(|kv| parse_record(&kv)).transpose()
    }

    fn term_to_act(&self) -> Result<Term, ControlError> {
        if !self.may_act() {
            return Err(ControlError::NotController);
        }
        self.state().term.ok_or(ControlError::NotController)
    }

    /// Allocates the next epoch, above the stored one and above `above`, for `region`.
    /// The record is written before the epoch is used, so it is never handed out twice.
    pub async fn allocate(&self, above: u64, region: &str) -> Result<u64, ControlError> {
        let term = self.term_to_act()?;
        for _ in 0..5 {
            let current = self.etcd.get(&self.epoch_key).await?;
            let (stored, guard) = match &current {
                Some(kv) => (
                    parse_record(kv)?.epoch,
                    Compare::Modified {
                        key: self.epoch_key.clone(),
                        revision: kv.mod_revision,
                    },
                ),
                None => (
                    0,
                    Compare::Created {
                        key: self.epoch_key.clone(),
                        revision: 0,
                    },
                ),
            };
            let record = EpochRecord {
                epoch: stored.max(above) + 1,
                region: region.to_string(),
                leased: false,
                controller: self.id.clone(),
            };
            match self.write_record(term, guard, &record).await? {
                Written::Yes => return Ok(record.epoch),
                Written::NotController => return Err(ControlError::NotController),
                Written::Changed => continue,
            }
        }
        Err(ControlError::Contended)
    }

    /// Notes in the record that the region at `epoch` acknowledged a lease (a
    /// controller that finds it unset demotes the region before promoting another).
    /// True once the record says so, or is about another epoch.
    pub async fn mark_leased(&self, epoch: u64) -> bool {
        let result = async {
            let term = self.term_to_act()?;
            let Some(kv) = self.etcd.get(&self.epoch_key).await? else {
                return Ok(true);
            };
            let mut record = parse_record(&kv)?;
            if record.epoch != epoch || record.leased {
                return Ok(true);
            }
            record.leased = true;
            let guard = Compare::Modified {
                key: self.epoch_key.clone(),
                revision: kv.mod_revision,
            };
            Ok(matches!(
                self.write_record(term, guard, &record).await?,
                Written::Yes
            ))
        }
        .await;
        result.unwrap_or_else(|e: ControlError| {
            tracing::debug!(epoch, error = %e, "could not note the lease in the epoch record");
            false
        })
    }

    async fn write_record(
        &self,
        term: Term,
        guard: Compare,
        record: &EpochRecord,
    ) -> Result<Written, ControlError> {
        let value = serde_json::to_vec(record).expect("serialize epoch record");
        let ours = Compare::Created {
            key: self.controller_key.clone(),
            revision: term.revision,
        };
        let put = Op::Put {
            key: self.epoch_key.clone(),
            value,
            lease: 0,
        };
        let check = Op::Get {
            key: self.controller_key.clone(),
        };
        match self.etcd.txn(&[guard, ours], &[put], &[check]).await {
            Ok(o) if o.succeeded => Ok(Written::Yes),
            Ok(o) => {
                let holder = o.gets.first().cloned().flatten();
                if holder.is_some_and(|kv| kv.create_revision == term.revision) {
                    Ok(Written::Changed)
                } else {
                    Ok(Written::NotController)
                }
            }
            // Applied or not? The record tells: nobody else writes this exact one.
            Err(EtcdError::Unavailable(why)) => match self.etcd.get(&self.epoch_key).await? {
                Some(kv) if parse_record(&kv).ok().as_ref() == Some(record) => Ok(Written::Yes),
                _ => Err(EtcdError::Unavailable(why).into()),
            },
            Err(e) => Err(e.into()),
        }
    }
}

enum Written {
    Yes,
    /// The record changed since it was read.
    Changed,
    NotController,
}

fn parse_record(kv: &KeyValue) -> Result<EpochRecord, ControlError> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        ControlError::BadRecord(format!("{e}: {}", String::from_utf8_lossy(&kv.value)))
    })
}

fn holder_of(kv: &KeyValue) -> String {
    format!(
        "{} since revision {}",
        String::from_utf8_lossy(&kv.value),
        kv.create_revision
    )
}
