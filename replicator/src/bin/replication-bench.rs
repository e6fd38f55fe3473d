//! Load generator and probe for `bench/replication.sh` (not a test).
//!
//! - `payload`: prints the envelope JSON used for every event (for redis-benchmark).
//! - `load`: pipelines N events into a stream, as fast as it can.
//! - `wait-copied`: polls the local stream until it holds N entries; reports the copy
//!   rate from the first copied entry to the last.
//! - `steady`: writes events at a fixed rate into the peer while a consumer group on the
//!   peer reads and acknowledges them, and measures when each entry and each
//!   acknowledgement is visible in the local Redis.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use eventlog::{Envelope, ENVELOPE_VERSION};
use redis::{Connection, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Payload,
    Load {
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "tandem:events")]
        stream: String,
        #[arg(long)]
        count: u64,
    },
    WaitCopied {
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "tandem:events")]
        stream: String,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    Steady {
        #[arg(long)]
        peer: String,
        #[arg(long)]
        local: String,
        #[arg(long, default_value = "tandem:events")]
        stream: String,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn envelope(n: u64) -> Envelope {
    Envelope {
        event_id: format!("6f1c2a9e-0b7d-4c1e-9a55-{n:012}"),
        event_type: "OrderPlaced".into(),
        aggregate_id: format!("ord-{n:010}"),
        aggregate_type: "order".into(),
        sequence: 1,
        occurred_at: eventlog::time::rfc3339_ms(eventlog::time::now_ms()),
        version: ENVELOPE_VERSION,
        correlation_id: format!("req-{n:010}"),
        causation_id: format!("req-{n:010}"),
        region: "a".into(),
        epoch: 1,
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        payload: serde_json::json!({
            "customerId": "c-1",
            "items": [{"sku": "WIDGET-001", "quantity": 2, "unitPrice": 1000}],
            "amount": 2000,
            "currency": "USD",
        }),
    }
}

fn connect(url: &str) -> Connection {
    let client = redis::Client::open(url).expect("redis url");
    let con = client.get_connection().expect("connect");
    con.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    con
}

fn main() {
    match Cli::parse().cmd {
        Cmd::Payload => {
            let [(_, ty), (_, json)] = envelope(0).to_fields();
            println!("{json}");
            eprintln!("type={ty} event bytes={}", json.len());
        }
        Cmd::Load { url, stream, count } => load(&url, &stream, count),
        Cmd::WaitCopied {
            url,
            stream,
            count,
            timeout_s,
        } => wait_copied(&url, &stream, count, timeout_s),
        Cmd::Steady {
            peer,
            local,
            stream,
            rate,
            seconds,
        } => steady(&peer, &local, &stream, rate, seconds),
    }
}

fn load(url: &str, stream: &str, count: u64) {
    let mut con = connect(url);
    let started = Instant::now();
    let mut n = 0;
    while n < count {
        let end = (n + 1000).min(count);
        let mut pipe = redis::pipe();
        for i in n..end {
            let [(f1, v1), (f2, v2)] = envelope(i).to_fields();
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(f1)
                .arg(v1)
                .arg(f2)
                .arg(v2)
                .ignore();
        }
        let () = pipe.query(&mut con).expect("pipelined XADD");
        n = end;
    }
    let s = started.elapsed().as_secs_f64();
    println!(
        "loaded {count} events into {stream} in {s:.2} s ({:.0}/s)",
        count as f64 / s
    );
}

fn xlen(con: &mut Connection, stream: &str) -> u64 {
    redis::cmd("XLEN").arg(stream).query(con).expect("XLEN")
}

fn wait_copied(url: &str, stream: &str, count: u64, timeout_s: u64) {
    let mut con = connect(url);
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let (first_at, first_n) = loop {
        let n = xlen(&mut con, stream);
        if n > 0 {
            break (Instant::now(), n);
        }
        assert!(
            Instant::now() < deadline,
            "nothing copied within {timeout_s} s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    loop {
        let n = xlen(&mut con, stream);
        if n >= count {
            let s = first_at.elapsed().as_secs_f64();
            let rate = (n - first_n) as f64 / s;
            println!("copied {n} events; {} of them in {s:.3} s after the first appeared: {rate:.0} events/s", n - first_n);
            println!("COPY_RATE {rate:.0}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {count} copied within {timeout_s} s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn entries_ids(v: Value) -> Vec<String> {
    eventlog::entry::Entry::from_read(v)
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// A stream id as `(ms, seq)`, ordered like Redis orders them.
type Id = (u64, u64);
/// (last-delivered id, lowest pending id, when seen) of the standby's group.
type GroupSample = (Id, Option<Id>, Instant);

fn parse_id(id: &str) -> Id {
    let (a, b) = id.split_once('-').expect("stream id");
    (a.parse().unwrap(), b.parse().unwrap())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i]
}

fn report(name: &str, mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, p999, max) = (
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        percentile(&v, 99.9),
        v.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "{name}: n={} p50={p50:.2} ms p99={p99:.2} ms p99.9={p999:.2} ms max={max:.2} ms",
        v.len()
    );
    (p50, p99)
}

fn steady(peer: &str, local: &str, stream: &str, rate: u64, seconds: u64) {
    let total = rate * seconds;
    let group = "bench-workflow";
    {
        let mut con = connect(peer);
        let _: Value = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("$")
            .arg("MKSTREAM")
            .query(&mut con)
            .expect("XGROUP CREATE");
    }
    let start_id: String = {
        let mut con = connect(local);
        // Wait until the local stream has caught up before measuring.
        let mut p = connect(peer);
        loop {
            let a = xlen(&mut p, stream);
            let b = xlen(&mut con, stream);
            if a == b {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let v: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(stream)
            .query(&mut con)
            .expect("XINFO");
        let mut last = "0-0".to_string();
        if let Value::Array(kv) = v {
            for c in kv.chunks(2) {
                if redis::from_redis_value::<String>(c[0].clone())
                    .ok()
                    .as_deref()
                    == Some("last-generated-id")
                {
                    last = redis::from_redis_value(c[1].clone()).unwrap();
                }
            }
        }
        last
    };
    // The group must exist locally before acks can be measured.
    {
        let mut con = connect(local);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v: Result<Value, _> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query(&mut con);
            if matches!(v, Ok(Value::Array(ref a)) if !a.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "group not copied to the local region"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let acked: Arc<Mutex<Vec<(Id, Instant)>>> = Arc::default();
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));

    // Local reader: when each entry appears in the standby.
    let reader = {
        let (arrived, local, stream, start_id) = (
            arrived.clone(),
            local.to_string(),
            stream.to_string(),
            start_id.clone(),
        );
        std::thread::spawn(move || {
            let mut con = connect(&local);
            let mut last = start_id;
            let mut n = 0;
            while n < total {
                let v: Value = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(2000)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&last)
                    .query(&mut con)
                    .expect("XREAD");
                let now = Instant::now();
                let ids = entries_ids(v);
                if ids.is_empty() {
                    continue;
                }
                let mut a = arrived.lock().unwrap();
                for id in ids {
                    a.insert(id.clone(), now);
                    last = id;
                    n += 1;
                }
            }
        })
    };

    // Peer consumer: reads with the group and acknowledges each entry at once.
    let consumer = {
        let (acked, peer, stream, done) = (
            acked.clone(),
            peer.to_string(),
            stream.to_string(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let mut con = connect(&peer);
            let mut n = 0;
            while n < total && !done.load(Ordering::Relaxed) {
                let v: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg("c1")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query(&mut con)
                    .expect("XREADGROUP");
                let ids = entries_ids(v);
                if ids.is_empty() {
                    continue;
                }
                let mut c = redis::cmd("XACK");
                c.arg(&stream).arg(group);
                for id in &ids {
                    c.arg(id);
                }
                let _: i64 = c.query(&mut con).expect("XACK");
                let now = Instant::now();
                let mut a = acked.lock().unwrap();
                for id in ids {
                    a.push((parse_id(&id), now));
                    n += 1;
                }
            }
        })
    };

    // Local group probe: when the standby's group has delivered past an id and no longer
    // holds it pending (the consumer acks in order, so the lowest pending id tells).
    // (last-delivered id, lowest pending id, when seen)
    let probe_samples: Arc<Mutex<Vec<GroupSample>>> = Arc::default();
    let probe = {
        let (samples, local, stream, done) = (
            probe_samples.clone(),
            local.to_string(),
            stream.to_string(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let mut con = connect(&local);
            while !done.load(Ordering::Relaxed) {
                let mut pipe = redis::pipe();
                pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
                pipe.cmd("XPENDING").arg(&stream).arg(group);
                let (groups, pending): (Value, Value) = pipe.query(&mut con).expect("probe");
                let now = Instant::now();
                let mut last_delivered = None;
                if let Value::Array(gs) = groups {
                    for g in gs {
                        if let Value::Array(kv) = g {
                            let m: HashMap<String, Value> = kv
                                .chunks(2)
                                .map(|c| {
                                    (redis::from_redis_value(c[0].clone()).unwrap(), c[1].clone())
                                })
                                .collect();
                            if redis::from_redis_value::<String>(m["name"].clone()).unwrap()
                                == group
                            {
                                last_delivered = Some(parse_id(
                                    &redis::from_redis_value::<String>(
                                        m["last-delivered-id"].clone(),
                                    )
                                    .unwrap(),
                                ));
                            }
                        }
                    }
                }
                let min_pending = match pending {
                    Value::Array(p) if p.len() >= 2 => match &p[1] {
                        Value::Nil => None,
                        v => Some(parse_id(
                            &redis::from_redis_value::<String>(v.clone()).unwrap(),
                        )),
                    },
                    _ => None,
                };
                if let Some(ld) = last_delivered {
                    samples.lock().unwrap().push((ld, min_pending, now));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    // Writer: a fixed rate, one XADD per event, paced against absolute deadlines.
    let mut con = connect(peer);
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let t0 = Instant::now();
    for i in 0..total {
        let due = t0 + interval * i as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let [(f1, v1), (f2, v2)] = envelope(i).to_fields();
        let at = Instant::now();
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(f1)
            .arg(v1)
            .arg(f2)
            .arg(v2)
            .query(&mut con)
            .expect("XADD");
        sent.lock().unwrap().insert(id, at);
    }
    let wrote = t0.elapsed().as_secs_f64();
    println!(
        "wrote {total} events in {wrote:.2} s ({:.0}/s)",
        total as f64 / wrote
    );
    reader.join().expect("reader");
    consumer.join().expect("consumer");
    // Let the group catch up, then stop the probe.
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    probe.join().expect("probe");

    let sent = sent.lock().unwrap();
    let arrived = arrived.lock().unwrap();
    let lags: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            arrived
                .get(id)
                .map(|a| a.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    assert_eq!(lags.len() as u64, total, "every event arrived");
    // When the slowest events were sent (seconds into the run): clusters at a fixed
    // period would point at a periodic task, scattered ones at the machine.
    let mut slow: Vec<(f64, f64)> = sent
        .iter()
        .filter_map(|(id, at)| {
            let lag = arrived
                .get(id)?
                .saturating_duration_since(*at)
                .as_secs_f64()
                * 1000.0;
            Some((lag, at.saturating_duration_since(t0).as_secs_f64()))
        })
        .filter(|(lag, _)| *lag > 10.0)
        .collect();
    slow.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
    let mut episodes: Vec<(f64, f64, usize)> = Vec::new(); // (start s, worst ms, events)
    for (lag, at) in slow {
        match episodes.last_mut() {
            Some(e) if at - e.0 < 0.3 => {
                e.1 = e.1.max(lag);
                e.2 += 1;
            }
            _ => episodes.push((at, lag, 1)),
        }
    }
    let shown: Vec<String> = episodes
        .iter()
        .map(|(t, w, n)| format!("{t:.2}s:{w:.0}ms/{n}"))
        .collect();
    println!(
        "events over 10 ms, by episode (start: worst/count): {}",
        shown.join(" ")
    );
    let (_, event_p99) = report("event lag (XADD on peer -> visible in standby)", lags);

    // Group lag: for each acked id, the first probe sample after the ack in which the
    // standby's group has delivered past it and does not hold it pending.
    let samples = probe_samples.lock().unwrap();
    let acked = acked.lock().unwrap();
    let mut group_lags = Vec::with_capacity(acked.len());
    let mut j = 0;
    for (id, at) in acked.iter() {
        while j < samples.len() && samples[j].2 < *at {
            j += 1;
        }
        // Samples are in time order; synced-ness of a given id is monotonic.
        let synced = samples[j..]
            .iter()
            .find(|(ld, minp, _)| ld >= id && minp.is_none_or(|m| m > *id))
            .map(|(_, _, t)| t.saturating_duration_since(*at).as_secs_f64() * 1000.0);
        if let Some(l) = synced {
            group_lags.push(l);
        }
    }
    let (_, group_p99) = report(
        "group lag (XACK on peer -> position and ack visible in standby)",
        group_lags,
    );
    println!("EVENT_P99_MS {event_p99:.2}");
    println!("GROUP_P99_MS {group_p99:.2}");
}
