//! Request limits: a per-client token bucket, header and body size checks, and the
//! retry budget that keeps retries from multiplying load on a struggling region.

use hyper::http::HeaderMap;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;
/// Above this many tracked clients in a shard, idle buckets are swept.
const SWEEP_AT: usize = 4096;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Who a rate limit applies to: the authenticated client when auth is on (many users
/// may share one address behind a NAT; one user may come from many), else the address.
#[derive(Debug, Clone, Copy, Hash)]
pub enum ClientKey<'a> {
    Addr(IpAddr),
    Subject(&'a str),
}

/// Token bucket per client: `rate` tokens a second, up to `burst`. Buckets are keyed
/// by a keyed hash of the client, so a subject is never copied into the table.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<u64, Bucket, BuildHasherDefault<KeyIsHash>>>>,
}

/// The bucket table's keys are already keyed hashes of the client: hashing them a second
/// time (SipHash, `HashMap`'s default) would be work for nothing on every request.
#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl RateLimiter {
    /// `rate` 0 turns the limiter off.
    pub fn new(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate,
            burst,
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }

    /// Takes a token; `Err(seconds)` says when the client may try again.
    pub fn check(&self, client: ClientKey<'_>) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let key = self.hasher.hash_one(client);
        // Middle bits: the table itself uses the lowest (bucket) and highest (tag) ones.
        let shard = (key >> 32) as usize % SHARDS;
        let now = Instant::now();
        let mut map = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > SWEEP_AT {
            let full_after = self.burst / self.rate;
            map.retain(|_, b| now.duration_since(b.last).as_secs_f64() < full_after);
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.rate;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

/// Bytes of all header names and values, as a client sent them (roughly).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Envoy's retry budget: retries in flight may be at most `percent` of the requests in
/// flight, but never fewer than `min` — so a failing region sees at most ~1.2x load.
pub struct RetryBudget {
    percent: u32,
    min: u32,
    active: AtomicU32,
    retries: AtomicU32,
}

/// Held while a request is in flight.
pub struct ActiveGuard<'a>(&'a RetryBudget);
/// Held while a retry attempt is in flight.
pub struct RetryGuard<'a>(&'a RetryBudget);

impl RetryBudget {
    pub fn new(percent: u32, min: u32) -> RetryBudget {
        RetryBudget {
            percent,
            min,
            active: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        }
    }

    pub fn enter(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self)
    }

    /// A permit for one retry, or `None` when the budget is spent.
    pub fn try_retry(&self) -> Option<RetryGuard<'_>> {
        let active = self.active.load(Ordering::Acquire);
        let allowed = (active.saturating_mul(self.percent) / 100).max(self.min);
        let mut cur = self.retries.load(Ordering::Acquire);
        loop {
            if cur >= allowed {
                return None;
            }
            match self.retries.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(RetryGuard(self)),
                Err(actual) => cur = actual,
            }
        }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_after_burst_and_says_when() {
        let l = RateLimiter::new(1.0, 2.0);
        let ip = ClientKey::Addr("127.0.0.1".parse().unwrap());
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_ok());
        assert_eq!(l.check(ip), Err(1));
        assert!(l
            .check(ClientKey::Addr("127.0.0.2".parse().unwrap()))
            .is_ok());
        // Subjects have buckets of their own, apart from addresses.
        assert!(l.check(ClientKey::Subject("c-1")).is_ok());
        assert!(l.check(ClientKey::Subject("c-1")).is_ok());
        assert_eq!(l.check(ClientKey::Subject("c-1")), Err(1));
        assert!(l.check(ClientKey::Subject("c-2")).is_ok());
    }

    #[test]
    fn budget_allows_min_then_percent() {
        let b = RetryBudget::new(20, 3);
        let _a: Vec<_> = (0..20).map(|_| b.enter()).collect();
        let r: Vec<_> = (0..10).filter_map(|_| b.try_retry()).collect();
        assert_eq!(r.len(), 4);
        drop(r);
        assert!(b.try_retry().is_some());
    }
}
