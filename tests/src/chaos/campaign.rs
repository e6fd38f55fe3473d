//! One campaign: catalogue, clients, the fault plan carried out against a backend, the
//! final heal, the settle, both regions' snapshots and the checker's verdict.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};

use super::backend::{Backend, Endpoints};
use super::checker::{self, CheckInput, Verdict};
use super::clients::{self, ClientSettings, Clients};
use super::history::History;
use super::schedule::{Fault, FaultKind, Schedule, Step};
use super::snapshot::{self, RegionSnapshot};
use super::Durability;

#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub faults: usize,
    pub durability: Durability,
    /// Concurrent order clients.
    pub clients: usize,
    /// Orders per second, all clients together.
    pub rate: f64,
    /// Share of acknowledged orders cancelled at once, in percent.
    pub cancel_percent: u64,
    /// Longest wait for the system to settle after the final heal.
    pub settle_timeout: Duration,
}

/// What happened to one planned fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub fault: Fault,
    /// When it was injected and healed (ms since the campaign's start).
    pub injected_ms: Option<u64>,
    pub healed_ms: Option<u64>,
    /// `ok`, the switchover's answer, or why the backend could not do it.
    pub result: String,
    /// From the injection to the next acknowledged new write.
    pub rto_ms: Option<u64>,
    /// The backend could not inject it (its error is the result).
    pub refused: bool,
    /// The backend could not heal it (its error is in the result).
    pub heal_failed: bool,
}

impl FaultRecord {
    /// Carried out: injected by the backend, or a switchover asked of the gateway
    /// (whatever it answered).
    pub fn injected(&self) -> bool {
        self.injected_ms.is_some() && !self.refused
    }
}

/// How the settle ended.
#[derive(Debug, Clone)]
pub struct Settle {
    pub converged: bool,
    pub waited: Duration,
    /// What was still missing at the last look (empty when converged).
    pub missing: String,
    /// Both regions' roles and stream tops when it converged.
    pub fingerprint: String,
}

#[derive(Debug)]
pub struct Report {
    pub settings: Settings,
    pub backend: &'static str,
    pub schedule: Schedule,
    pub faults: Vec<FaultRecord>,
    pub history: History,
    pub settle: Settle,
    pub verdict: Verdict,
    /// Things worth reading that are not violations (processes that died by
    /// themselves, refusals that raced with a lost write, ...).
    pub notes: Vec<String>,
    /// Where the logs were kept (only when there were violations).
    pub logs: Vec<(String, PathBuf)>,
}

/// Time the clients keep writing after the final heal, so the last faults' recovery
/// is measured too.
const COOL_DOWN: Duration = Duration::from_secs(3);

/// Runs a campaign against `backend`. `Err` when the system could not even be set up
/// (no catalogue, no acknowledged order before the first fault).
pub async fn run<B: Backend>(backend: &mut B, settings: Settings) -> Result<Report, String> {
    let clock = Instant::now();
    let endpoints = backend.endpoints().clone();
    let schedule = Schedule::generate(settings.seed, settings.faults, backend.capabilities());
    let skus = clients::catalogue();
    put_catalogue(&endpoints.gateway, &skus).await?;
    let initial_stock: BTreeMap<String, i64> =
        skus.iter().map(|s| (s.sku.clone(), s.stock)).collect();

    let clients = Clients::start(
        ClientSettings {
            gateway: endpoints.gateway.clone(),
            seed: settings.seed,
            durability: settings.durability,
            workers: settings.clients,
            rate: settings.rate,
            skus,
            cancel_percent: settings.cancel_percent,
        },
        clock,
    );
    let warm = Instant::now();
    while clients.acked() == 0 {
        if warm.elapsed() > Duration::from_secs(60) {
            return Err("no order was acknowledged within 60 s of the start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let now_ms = || clock.elapsed().as_millis() as u64;
    let phase = tokio::time::Instant::now();
    let mut records: Vec<FaultRecord> = schedule
        .faults
        .iter()
        .map(|f| FaultRecord {
            fault: *f,
            injected_ms: None,
            healed_ms: None,
            result: String::new(),
            rto_ms: None,
            refused: false,
            heal_failed: false,
        })
        .collect();
    let mut switchovers = Vec::new();
    let mut notes = Vec::new();
    for step in schedule.steps() {
        tokio::time::sleep_until(phase + Duration::from_millis(step.at_ms())).await;
        match step {
            Step::Inject(f) => {
                let rec = &mut records[f.id - 1];
                rec.injected_ms = Some(now_ms());
                eprintln!("[chaos] {:>8.2}s inject {f}", secs(now_ms()));
                if f.kind == FaultKind::Switchover {
                    switchovers.push((f.id, tokio::spawn(switchover(endpoints.clone()))));
                } else {
                    rec.result = match backend.inject(f.kind).await {
                        Ok(()) => "ok".into(),
                        Err(e) => {
                            rec.refused = true;
                            e
                        }
                    };
                }
            }
            Step::Heal(f) => {
                eprintln!(
                    "[chaos] {:>8.2}s heal   #{} {}",
                    secs(now_ms()),
                    f.id,
                    f.kind
                );
                if let Err(e) = backend.heal(f.kind).await {
                    let rec = &mut records[f.id - 1];
                    rec.result = format!("{}; heal: {e}", rec.result);
                    rec.heal_failed = true;
                }
                records[f.id - 1].healed_ms = Some(now_ms());
            }
        }
        notes.extend(backend.unexpected_exits().await);
    }
    for (id, task) in switchovers {
        records[id - 1].result = task
            .await
            .unwrap_or_else(|e| format!("switchover task failed: {e}"));
    }
    eprintln!("[chaos] {:>8.2}s final heal", secs(now_ms()));
    notes.extend(backend.heal_all().await);
    // A restarted container may answer on another published port now.
    let endpoints = backend.endpoints().clone();
    tokio::time::sleep(COOL_DOWN).await;
    eprintln!(
        "[chaos] {:>8.2}s waiting for the clients' last answers",
        secs(now_ms())
    );
    let history = clients.finish(settings.settle_timeout).await;
    eprintln!("[chaos] {:>8.2}s settling", secs(now_ms()));
    let (settle, a, b) = settle_and_read(&endpoints, settings.settle_timeout).await?;
    let verdict = checker::check(&CheckInput {
        durability: settings.durability,
        history: &history,
        initial_stock: &initial_stock,
        a: &a,
        b: &b,
        unsettled: (!settle.converged).then_some(settle.missing.as_str()),
    });
    for r in &mut records {
        if let Some(at) = r.injected_ms {
            r.rto_ms = history.next_write_ack_after(at).map(|ack| ack - at);
        }
    }
    let unresolved = history
        .orders
        .iter()
        .filter(|o| o.fate == super::history::Fate::Unresolved)
        .count();
    if unresolved > 0 {
        notes.push(format!(
            "{unresolved} orders had no definitive answer within {:?} after the final heal",
            settings.settle_timeout
        ));
    }
    notes.extend(verdict.notes.iter().cloned());
    let logs = if verdict.violations() > 0 || !settle.converged {
        backend.keep_logs().await
    } else {
        Vec::new()
    };
    Ok(Report {
        backend: backend.name(),
        settings,
        schedule,
        faults: records,
        history,
        settle,
        verdict,
        notes,
        logs,
    })
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// PUTs every product through the gateway, retried until accepted.
async fn put_catalogue(gateway: &str, skus: &[clients::Sku]) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    for s in skus {
        loop {
            let r = http
                .put(format!("{gateway}/api/v1/products/{}", s.sku))
                .json(&json!({"name": s.sku, "price": 1000, "currency": "USD", "stock": s.stock}))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => break,
                other if start.elapsed() > Duration::from_secs(60) => {
                    return Err(format!("PUT product {}: {other:?}", s.sku));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

/// A planned switchover to whichever region is standby now.
async fn switchover(endpoints: Endpoints) -> String {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(h) => h,
        Err(e) => return e.to_string(),
    };
    let regions: Value = match http
        .get(format!("{}/gateway/regions", endpoints.gateway))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(e) => return format!("GET /gateway/regions: {e}"),
    };
    let to = match regions["active"].as_str() {
        Some("a") => "b",
        Some("b") => "a",
        other => return format!("no active region to switch from ({other:?})"),
    };
    let mut req = http
        .post(format!("{}/gateway/failover", endpoints.gateway))
        .json(&json!({ "to": to }));
    if let Some(t) = &endpoints.gateway_admin_token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if status == 200 {
                format!(
                    "switched to {} at epoch {} (lostEvents {})",
                    body["active"].as_str().unwrap_or("?"),
                    body["epoch"],
                    body["lostEvents"]
                )
            } else {
                format!(
                    "{status} {} (to {to})",
                    body["error"]["code"].as_str().unwrap_or("")
                )
            }
        }
        Err(e) => format!("POST /gateway/failover: {e}"),
    }
}

/// Settles, then reads both regions; reads again when the system moved meanwhile (a
/// late failover on a loaded machine), so the checker judges one consistent moment.
async fn settle_and_read(
    endpoints: &Endpoints,
    deadline: Duration,
) -> Result<(Settle, RegionSnapshot, RegionSnapshot), String> {
    let start = Instant::now();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        let mut s = settle(endpoints, left).await;
        s.waited = start.elapsed();
        let a = RegionSnapshot::read("a", &endpoints.redis[0]).await?;
        let b = RegionSnapshot::read("b", &endpoints.redis[1]).await?;
        let after = fingerprint(endpoints).await;
        if !s.converged || after.as_ref() == Some(&s.fingerprint) || start.elapsed() > deadline {
            if s.converged && after.as_ref() != Some(&s.fingerprint) {
                s.converged = false;
                s.missing = "the regions kept changing while they were read".into();
            }
            return Ok((s, a, b));
        }
        eprintln!("[chaos] the regions changed while they were read; settling again");
    }
}

/// Roles, epochs and stream tops of both regions: equal fingerprints mean nothing was
/// written or promoted in between.
async fn fingerprint(endpoints: &Endpoints) -> Option<String> {
    let mut out = String::new();
    for url in &endpoints.redis {
        let mut c = snapshot::connect(url).await.ok()?;
        let p = tokio::time::timeout(Duration::from_secs(5), progress(&mut c))
            .await
            .ok()?
            .ok()?;
        out.push_str(&p.fingerprint());
        out.push('|');
    }
    Some(out)
}

/// One region's progress, read from its Redis.
#[derive(Debug, Default)]
struct Progress {
    role: Option<String>,
    epoch: u64,
    events: (u64, String),
    dlq: (u64, String),
    cursor: Option<String>,
    /// Consumer groups of the event stream not yet delivered everything or still
    /// holding unacknowledged entries.
    busy_groups: Vec<String>,
    groups: usize,
    /// Orders PENDING, CONFIRMED or PAID.
    in_flight: i64,
}

impl Progress {
    fn fingerprint(&self) -> String {
        format!(
            "{:?}@{} events {:?} dlq {:?}",
            self.role, self.epoch, self.events, self.dlq
        )
    }
}

async fn progress(conn: &mut MultiplexedConnection) -> redis::RedisResult<Progress> {
    use eventlog::keys;
    let (role, epoch): (Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(keys::ROLE)
        .arg("role")
        .arg("epoch")
        .query_async(conn)
        .await?;
    let mut p = Progress {
        role,
        epoch: epoch.unwrap_or(0),
        ..Progress::default()
    };
    p.events = top(conn, keys::EVENTS).await?;
    p.dlq = top(conn, keys::DLQ).await?;
    p.cursor = redis::cmd("GET")
        .arg(keys::PROJECTION_CURSOR)
        .query_async(conn)
        .await?;
    let counts: Vec<Option<i64>> = redis::cmd("HMGET")
        .arg(keys::ORDER_COUNTS)
        .arg("PENDING")
        .arg("CONFIRMED")
        .arg("PAID")
        .query_async(conn)
        .await?;
    p.in_flight = counts.into_iter().flatten().sum();
    if p.events.0 > 0 {
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys::EVENTS)
            .query_async(conn)
            .await?;
        p.groups = groups.groups.len();
        for g in groups.groups {
            if g.pending > 0 || g.last_delivered_id != p.events.1 {
                p.busy_groups
                    .push(format!("{} (pending {})", g.name, g.pending));
            }
        }
    }
    Ok(p)
}

/// `(XLEN, last entry id)` of a stream.
async fn top(conn: &mut MultiplexedConnection, key: &str) -> redis::RedisResult<(u64, String)> {
    let len: u64 = redis::cmd("XLEN").arg(key).query_async(conn).await?;
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok((
        len,
        last.into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_default(),
    ))
}

/// Polls both regions until they agree and the workflow rests: one region active and
/// the other standby, the same event and dead-letter streams, the standby's projection
/// at the end, every consumer group of the active region done, no order on its way;
/// and nothing moved for a second (two looks, the same roles and stream tops).
pub async fn settle(endpoints: &Endpoints, deadline: Duration) -> Settle {
    const STABLE: Duration = Duration::from_secs(1);
    let start = Instant::now();
    let mut conns: [Option<MultiplexedConnection>; 2] = [None, None];
    let mut candidate: Option<(String, Instant)> = None;
    loop {
        let mut seen: Vec<Result<Progress, String>> = Vec::new();
        for (i, url) in endpoints.redis.iter().enumerate() {
            if conns[i].is_none() {
                conns[i] = snapshot::connect(url).await.ok();
            }
            let r = match conns[i].as_mut() {
                None => Err(format!("{url} unreachable")),
                Some(c) => match tokio::time::timeout(Duration::from_secs(5), progress(c)).await {
                    Ok(Ok(p)) => Ok(p),
                    Ok(Err(e)) => {
                        conns[i] = None;
                        Err(format!("{url}: {e}"))
                    }
                    Err(_) => {
                        conns[i] = None;
                        Err(format!("{url}: no answer in 5 s"))
                    }
                },
            };
            seen.push(r);
        }
        let (missing, print) = match (&seen[0], &seen[1]) {
            (Ok(a), Ok(b)) => (
                settled(a, b),
                format!("{}|{}|", a.fingerprint(), b.fingerprint()),
            ),
            (Err(e), _) | (_, Err(e)) => (e.clone(), String::new()),
        };
        if missing.is_empty() {
            match &candidate {
                Some((p, since)) if *p == print && since.elapsed() >= STABLE => {
                    return Settle {
                        converged: true,
                        waited: start.elapsed(),
                        missing,
                        fingerprint: print,
                    };
                }
                Some((p, _)) if *p == print => {}
                _ => candidate = Some((print, Instant::now())),
            }
        } else {
            candidate = None;
        }
        if start.elapsed() > deadline {
            return Settle {
                converged: false,
                waited: start.elapsed(),
                missing: if missing.is_empty() {
                    "still changing".into()
                } else {
                    missing
                },
                fingerprint: String::new(),
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What keeps two regions from being settled ("" when nothing does).
fn settled(a: &Progress, b: &Progress) -> String {
    let (active, standby) = match (a.role.as_deref(), b.role.as_deref()) {
        (Some("active"), Some("standby")) => (a, b),
        (Some("standby"), Some("active")) => (b, a),
        (ra, rb) => return format!("roles a {ra:?}@{} b {rb:?}@{}", a.epoch, b.epoch),
    };
    let mut missing = Vec::new();
    if a.events != b.events {
        missing.push(format!("event streams a {:?} b {:?}", a.events, b.events));
    }
    if a.dlq != b.dlq {
        missing.push(format!("dead-letter streams a {:?} b {:?}", a.dlq, b.dlq));
    }
    if standby.cursor.as_deref().unwrap_or("") != standby.events.1 {
        missing.push(format!(
            "standby projection at {:?} of {}",
            standby.cursor, standby.events.1
        ));
    }
    if !active.busy_groups.is_empty() || (active.events.0 > 0 && active.groups == 0) {
        missing.push(format!("groups busy: {:?}", active.busy_groups));
    }
    if active.in_flight > 0 {
        missing.push(format!("{} orders on their way", active.in_flight));
    }
    missing.join("; ")
}
