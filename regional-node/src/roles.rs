//! The region's role and epoch as this node sees them, and the transitions an
//! operator or the gateway asks for (DESIGN.md section 4).
//!
//! Redis holds the truth (`tandem:role`); the commit script checks it on every write.
//! This module keeps a cached copy that is refreshed every [`POLL`] so handlers know
//! when to run, and adds the lease: once the gateway has granted one, a node whose
//! lease lapsed fences itself unless the peer's Redis confirms that no higher epoch
//! exists or is about to begin.

use crate::store::{Store, StoreError};
use eventlog::{keys, roles::fields, Role};
use redis::Script;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoleState {
    /// False until Redis has been read once.
    pub known: bool,
    pub role: Role,
    pub epoch: u64,
    pub paused: bool,
    /// Lease lapsed and the peer could not vouch for us: no writes, no handlers.
    pub fenced: bool,
}

impl RoleState {
    pub fn writable(&self) -> bool {
        self.known && self.role == Role::Active && !self.fenced
    }

    pub fn describe(&self) -> String {
        match (self.known, self.fenced) {
            (false, _) => "unknown".into(),
            (true, true) => format!("{} (fenced)", self.role),
            (true, false) => self.role.to_string(),
        }
    }
}

/// The peer region's role record and promotion intent, as read from its Redis.
#[derive(Debug, Clone, Copy)]
pub struct PeerStatus {
    pub role: Option<Role>,
    pub epoch: u64,
    pub intent_epoch: u64,
}

#[derive(Debug)]
struct Lease {
    /// Set once the gateway grants a lease; from then on the lease is enforced.
    enforced: bool,
    until: Option<Instant>,
}

#[derive(Clone)]
pub struct Roles {
    store: Store,
    peer: Option<Store>,
    tx: Arc<watch::Sender<RoleState>>,
    lease: Arc<Mutex<Lease>>,
    /// The peer's status as last read by the watcher, and when. Request paths use it
    /// instead of asking a peer that may be dead or hung.
    peer_view: Arc<Mutex<Option<PeerReading>>>,
    /// When the peer last answered the watcher.
    peer_last_ok: Arc<Mutex<Option<Instant>>>,
}

/// When the peer was read, and what it said (`None`: unreachable).
type PeerReading = (Instant, Option<PeerStatus>);

/// A peer reading older than this vouches for nothing: after a pause (SIGSTOP, a long
/// GC-like stall) the node must look again before it writes on a lapsed lease.
const VOUCH_TTL: Duration = Duration::from_millis(100);

/// How long the peer may not answer before it counts as unreachable.
const PEER_DOWN_AFTER: Duration = Duration::from_millis(300);

/// The lease a node grants itself when it becomes active, until the gateway's first
/// renewal: the gateway renews right after the promotion answers.
pub(crate) const PROMOTION_GRACE: Duration = Duration::from_secs(2);

/// How long the watcher's finding "the peer cannot be read" stands for a lease renewal.
/// While the peer hangs (a cut link, a paused host) each read waits out the peer timeout
/// (200 ms), about as long as the gateway waits for a renewal: asking again on every
/// renewal would let the lease of a healthy active lapse. The watcher reads again every
/// POLL plus that timeout, so a finding this young is the latest there is.
const UNREACHABLE_TTL: Duration = Duration::from_millis(400);

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("epoch {requested} is stale: the region is at epoch {stored}")]
    StaleEpoch { requested: u64, stored: u64 },
    /// The renewal reached this node (or its Redis) after the deadline its gateway gave
    /// it: the gateway no longer counts on it, so it opens no write window.
    #[error(
        "the lease renewal arrived after its deadline ({late_ms} ms late by this region's clocks)"
    )]
    LeaseExpired { late_ms: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Roles {
    pub fn new(store: Store, peer: Option<Store>) -> Roles {
        let initial = RoleState {
            known: false,
            role: Role::Standby,
            epoch: 0,
            paused: false,
            fenced: false,
        };
        let (tx, _) = watch::channel(initial);
        Roles {
            store,
            peer,
            tx: Arc::new(tx),
            lease: Arc::new(Mutex::new(Lease {
                enforced: false,
                until: None,
            })),
            peer_view: Arc::new(Mutex::new(None)),
            peer_last_ok: Arc::new(Mutex::new(None)),
        }
    }

    pub fn current(&self) -> RoleState {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.tx.subscribe()
    }

    /// Stores `role` (active at epoch 1, standby at epoch 0) unless a role is stored. A
    /// region seeded active also records epoch 1's start (the empty streams), so a
    /// later rejoin knows exactly which events belong to which epoch.
    pub async fn seed(&self, role: Role, region: &str) -> Result<(), StoreError> {
        let epoch = if role == Role::Active { 1 } else { 0 };
        let record = serde_json::json!({
            "region": region,
            "startOffsets": { keys::EVENTS: "0-0", keys::DLQ: "0-0" },
            "at": eventlog::time::rfc3339_ms(eventlog::time::now_ms()),
        });
        let cmd = redis::cmd("EVAL")
            .arg(
                "if redis.call('HEXISTS', KEYS[1], 'role') == 0 then \
                   redis.call('HSET', KEYS[1], 'role', ARGV[1], 'epoch', ARGV[2]) \
                   if ARGV[1] == 'active' then redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) end \
                 end return 1",
            )
            .arg(2)
            .arg(keys::ROLE)
            .arg(keys::EPOCHS)
            .arg(role.as_str())
            .arg(epoch)
            .arg(record.to_string())
            .clone();
        let _: i64 = self.store.query(&cmd).await?;
        Ok(())
    }

    /// Reads the role from Redis now and publishes it.
    pub async fn refresh(&self) -> RoleState {
        let mut state = self.current();
        match self.store.role().await {
            Ok(Some(r)) => {
                state.known = true;
                state.role = r.role;
                state.epoch = r.epoch.0;
                state.paused = r.paused;
                let enforced = self.lease.lock().expect("lease lock").enforced;
                if !enforced {
                    if let Ok(Some(_)) = self
                        .store
                        .query::<Option<String>>(
                            redis::cmd("HGET").arg(keys::ROLE).arg(fields::FENCING),
                        )
                        .await
                    {
                        // A restarted node must not write on an old grant: wait for a lease.
                        self.lease.lock().expect("lease lock").enforced = true;
                    }
                }
            }
            Ok(None) => state.known = false,
            Err(e) => {
                tracing::debug!(error = %e, "role refresh failed; keeping the last known role")
            }
        }
        if state.known && state.role == Role::Active {
            let peer = self.peer_view().and_then(|(_, p)| p);
            if let Some(p) = peer.filter(|p| p.role == Some(Role::Active) && p.epoch > state.epoch)
            {
                // Rejoin: the peer went on at a higher epoch while we were away. Step
                // down but keep our own epoch: the replicator recognises the rejoin by
                // the peer's higher epoch, quarantines what we wrote past that epoch's
                // start, and only then moves us to the new epoch.
                tracing::warn!(
                    our_epoch = state.epoch,
                    peer_epoch = p.epoch,
                    "the peer is active at a higher epoch; becoming standby"
                );
                if self.store_role(Role::Standby, state.epoch).await.is_ok() {
                    state.role = Role::Standby;
                }
            }
            state.fenced =
                state.role == Role::Active && self.lease_lapsed() && !self.vouched(state.epoch);
        } else {
            state.fenced = false;
        }
        self.tx.send_if_modified(|old| {
            let changed = *old != state;
            if changed && (old.role != state.role || old.epoch != state.epoch || old.fenced != state.fenced) {
                tracing::info!(role = %state.role, epoch = state.epoch, fenced = state.fenced, "role changed");
            }
            *old = state;
            changed
        });
        state
    }

    /// Refreshes the role until `stop` is set.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        loop {
            if self.peer.is_some() {
                // A word of the peer is as old as the moment it was asked for: the peer
                // may have recorded a promotion intent just after answering, and a reply
                // that took long on a loaded machine must not stretch it (`vouched`).
                // A finding that it is unreachable is as young as the wait that ended.
                let asked = Instant::now();
                let status = self.peer_status().await;
                let now = Instant::now();
                if status.is_some() {
                    *self.peer_last_ok.lock().expect("peer lock") = Some(now);
                }
                let at = if status.is_some() { asked } else { now };
                *self.peer_view.lock().expect("peer view lock") = Some((at, status));
            }
            self.refresh().await;
            if self.peer.is_some() {
                self.follow_vouch().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Whether the peer's Redis answers: `None` when no peer is configured or it has not
    /// been read yet; `Some(false)` once it has not answered for [`PEER_DOWN_AFTER`]
    /// (one slow reading on a loaded machine is not an outage).
    pub fn peer_reachable(&self) -> Option<bool> {
        self.peer_view()?;
        let last_ok = *self.peer_last_ok.lock().expect("peer lock");
        Some(last_ok.is_some_and(|at| at.elapsed() < PEER_DOWN_AFTER))
    }

    fn peer_view(&self) -> Option<PeerReading> {
        *self.peer_view.lock().expect("peer view lock")
    }

    /// The peer confirmed, recently, that no epoch above ours exists or is coming.
    fn vouched(&self, epoch: u64) -> bool {
        self.peer_view().is_some_and(|(at, status)| {
            at.elapsed() < VOUCH_TTL
                && status.is_some_and(|p| p.epoch <= epoch && p.intent_epoch <= epoch)
        })
    }

    /// Whether this node may write now. Checked at write time (not only through the
    /// cached, polled state): a node resuming from a pause sees its lease lapsed at once.
    pub fn may_write(&self) -> bool {
        let state = self.current();
        let lease_ok = !self.lease_lapsed() || self.vouched(state.epoch);
        state.writable() && lease_ok
    }

    fn lease_lapsed(&self) -> bool {
        let lease = self.lease.lock().expect("lease lock");
        lease.enforced && lease.until.is_none_or(|until| Instant::now() >= until)
    }

    /// The peer region's role, epoch and promotion intent, read from its Redis; `None`
    /// when no peer is configured or it cannot be read (which vouches for nothing).
    ///
    /// Role and intent are read in one transaction. Read one after the other, a
    /// promotion that finished in between (it drops its intent as it stores the new
    /// role) showed the old role and no intent: a word that vouched for an epoch the
    /// peer had just left, and the old active wrote into the new epoch (chaos seed 9402,
    /// SIGSTOP of the old active's region: 2 commits 10-23 ms into the new epoch).
    pub async fn peer_status(&self) -> Option<PeerStatus> {
        let peer = self.peer.as_ref()?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(keys::ROLE)
            .arg(&eventlog::RoleRecord::FIELDS[..])
            .cmd("HGET")
            .arg(keys::PROMOTION_INTENT)
            .arg("epoch");
        let (values, intent): (Vec<Option<String>>, Option<String>) =
            peer.query_pipe(&pipe).await.ok()?;
        let role = eventlog::RoleRecord::from_hmget(&values).ok()?;
        Some(PeerStatus {
            role: role.map(|r| r.role),
            epoch: role.map(|r| r.epoch.0).unwrap_or(0),
            intent_epoch: intent.and_then(|e| e.parse::<u64>().ok()).unwrap_or(0),
        })
    }

    async fn store_role(&self, role: Role, epoch: u64) -> Result<Vec<String>, StoreError> {
        let mut inv = SET_ROLE.prepare_invoke();
        inv.key(keys::ROLE).arg(role.as_str()).arg(epoch);
        self.store.invoke(&inv).await
    }

    /// Renews the lease of the active region at `epoch` for `ttl`, ending no later than
    /// `not_after` (the gateway's bound of the renewal, by its wall clock) when given.
    ///
    /// The cap matters when this node or its Redis stalls with the renewal in hand: the
    /// gateway stops counting on a renewal at `not_after` and may promote the peer once
    /// that has passed (plus its margin). Counted from when the stall ended, the window
    /// would outlive that bound, and a commit held up in the same stall would be applied
    /// after the peer's epoch began (chaos finding F1: SIGSTOP of a Redis or a region).
    /// The cap compares wall clocks of different hosts; they must agree to well within
    /// the gateway's lease margin (NTP does).
    pub async fn grant_lease(
        &self,
        epoch: u64,
        ttl: Duration,
        not_after: Option<SystemTime>,
    ) -> Result<RoleState, RoleError> {
        let started = Instant::now();
        let deadline = wall_deadline(ttl, not_after)?;
        let stored = self.store.role().await?.ok_or(RoleError::StaleEpoch {
            requested: epoch,
            stored: 0,
        })?;
        if stored.epoch.0 != epoch || stored.role != Role::Active {
            return Err(RoleError::StaleEpoch {
                requested: epoch,
                stored: stored.epoch.0,
            });
        }
        // A renewal may be stale (sent before this node was paused and overtaken by a
        // promotion): ask the peer now, unless the watcher has just found it
        // unreachable. An unreachable peer cannot object. (After a pause the finding is
        // old, so the peer is asked.)
        let peer_known_unreachable = self
            .peer_view()
            .is_some_and(|(at, status)| status.is_none() && at.elapsed() < UNREACHABLE_TTL);
        let peer = if peer_known_unreachable {
            None
        } else {
            self.peer_status().await
        };
        if let Some(p) = peer {
            if p.epoch > epoch || p.intent_epoch > epoch {
                return Err(RoleError::StaleEpoch {
                    requested: epoch,
                    stored: p.epoch.max(p.intent_epoch),
                });
            }
        }
        // Redis' copy of the lease first, counted from before we answer (and capped by
        // the deadline), so it ends no later than the gateway's bound.
        let opened = self.open_write_window(ttl, deadline, true).await?;
        if let WindowEnd::Passed { late_ms } = opened {
            tracing::warn!(
                epoch,
                late_ms,
                "lease renewal reached Redis after its deadline; no write window opened"
            );
            return Err(RoleError::LeaseExpired { late_ms });
        }
        {
            let mut lease = self.lease.lock().expect("lease lock");
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            lease.until = Some((started + ttl).min(Instant::now() + left));
            lease.enforced = true;
        }
        Ok(self.refresh().await)
    }

    /// Moves the region's write window in Redis (see [`fields::WRITE_UNTIL`]) to at
    /// least `len` from now by Redis' clock, but not past `deadline` (wall clock: Redis
    /// may run the script long after it was sent, if it was paused); `fencing` marks the
    /// lease as enforced.
    async fn open_write_window(
        &self,
        len: Duration,
        deadline: SystemTime,
        fencing: bool,
    ) -> Result<WindowEnd, StoreError> {
        let mut inv = OPEN_WRITE_WINDOW.prepare_invoke();
        inv.key(keys::ROLE)
            .arg(len.as_millis() as u64)
            .arg(if fencing { "1" } else { "0" })
            .arg(unix_ms(deadline));
        let late: i64 = self.store.invoke(&inv).await?;
        Ok(if late > 0 {
            WindowEnd::Passed {
                late_ms: late as u64,
            }
        } else {
            WindowEnd::Open
        })
    }

    /// While the lease has lapsed but the peer has just vouched for our epoch, the write
    /// window in Redis follows the peer's word (it ends when the word does).
    async fn follow_vouch(&self) {
        let state = self.current();
        if state.role != Role::Active || !self.lease_lapsed() {
            return;
        }
        let Some((at, Some(p))) = self.peer_view() else {
            return;
        };
        if p.epoch > state.epoch || p.intent_epoch > state.epoch {
            return;
        }
        let left = VOUCH_TTL.saturating_sub(at.elapsed());
        if left.is_zero() {
            return;
        }
        let deadline = SystemTime::now() + left;
        if let Err(e) = self.open_write_window(left, deadline, false).await {
            tracing::debug!(error = %e, "could not extend the write window on the peer's word");
        }
    }

    pub fn lease_remaining(&self) -> Option<Duration> {
        let lease = self.lease.lock().expect("lease lock");
        lease
            .until
            .map(|u| u.saturating_duration_since(Instant::now()))
    }

    /// Called once a promotion stored the active role at `epoch`: a fresh promotion
    /// starts unfenced (the gateway's next probe renews the lease).
    /// The window ends by `not_after` at the latest (as in Redis, see `promotion::PROMOTE`).
    pub async fn promoted(&self, epoch: u64, not_after: Option<SystemTime>) -> RoleState {
        {
            let mut lease = self.lease.lock().expect("lease lock");
            if lease.enforced {
                let left = not_after.map_or(PROMOTION_GRACE, |t| {
                    t.duration_since(SystemTime::now()).unwrap_or_default()
                });
                lease.until = Some(Instant::now() + PROMOTION_GRACE.min(left));
            }
        }
        let state = self.refresh().await;
        tracing::debug!(epoch, ?state, "role after promotion");
        state
    }

    /// Stores `role` at `epoch` if the epoch is allowed: a promotion needs an epoch above
    /// the stored one (or the same, when already active: a repeated call), a demotion
    /// one at least as high.
    pub async fn transition(&self, role: Role, epoch: u64) -> Result<RoleState, RoleError> {
        let reply = self.store_role(role, epoch).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => {
                if role == Role::Active {
                    // A fresh promotion starts unfenced; the gateway's next probe renews.
                    let deadline = SystemTime::now() + PROMOTION_GRACE;
                    self.open_write_window(PROMOTION_GRACE, deadline, false)
                        .await?;
                    let mut lease = self.lease.lock().expect("lease lock");
                    if lease.enforced {
                        lease.until = Some(Instant::now() + PROMOTION_GRACE);
                    }
                }
                Ok(self.refresh().await)
            }
            _ => Err(RoleError::StaleEpoch {
                requested: epoch,
                stored: reply.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            }),
        }
    }
}

/// KEYS: role. ARGV: window length (ms), fencing ("1": the lease is enforced from now
/// on), deadline (unix ms). Moves `write_until` to at least now + length by Redis' clock,
/// but not past the deadline (never back). Returns by how many ms the deadline had
/// passed when the script ran (0: the window is open).
static OPEN_WRITE_WINDOW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[3])
if deadline <= now then return now - deadline + 1 end
local want = math.min(now + tonumber(ARGV[1]), deadline)
local cur = tonumber(redis.call('HGET', KEYS[1], '{until}') or '0')
if want > cur then redis.call('HSET', KEYS[1], '{until}', want) end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], '{fencing}', 'lease') end
return 0
"#,
        until = fields::WRITE_UNTIL,
        fencing = fields::FENCING
    ))
});

/// What [`OPEN_WRITE_WINDOW`] did.
enum WindowEnd {
    Open,
    Passed { late_ms: u64 },
}

/// The end of a window of `ttl` from now, capped by the grantor's `not_after`; an error
/// when `not_after` has already passed by this host's clock.
fn wall_deadline(ttl: Duration, not_after: Option<SystemTime>) -> Result<SystemTime, RoleError> {
    let now = SystemTime::now();
    let own = now + ttl;
    let Some(cap) = not_after else {
        return Ok(own);
    };
    match cap.duration_since(now) {
        Ok(_) => Ok(own.min(cap)),
        Err(e) => Err(RoleError::LeaseExpired {
            late_ms: e.duration().as_millis().max(1) as u64,
        }),
    }
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

static SET_ROLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local cur = redis.call('HMGET', KEYS[1], '{role}', '{epoch}')
local stored = tonumber(cur[2] or '0')
local want = tonumber(ARGV[2])
local ok
if ARGV[1] == 'active' then
  ok = want > stored or (want == stored and cur[1] == 'active')
else
  ok = want >= stored
end
if not ok then return {{'stale', tostring(stored)}} end
if ARGV[1] == 'active' then
  redis.call('HDEL', KEYS[1], '{demoted}')
elseif cur[1] == 'active' then
  redis.call('HSET', KEYS[1], '{demoted}', tostring(stored))
end
redis.call('HSET', KEYS[1], '{role}', ARGV[1], '{epoch}', ARGV[2])
return {{'ok'}}
"#,
        role = fields::ROLE,
        epoch = fields::EPOCH,
        demoted = fields::DEMOTED_FROM
    ))
});
