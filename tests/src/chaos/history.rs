//! What the careful clients sent and saw: every attempt of every write with its times
//! and outcome, and each write's final fate. The checker judges this against both
//! regions' final streams; the report counts errors and measures recovery from it.
//!
//! Times are milliseconds since the campaign's start (one monotonic clock for clients
//! and faults).

use std::collections::BTreeMap;

/// How one HTTP attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An answer: status, `error.code` ("" for none), the region that served it
    /// (`X-Region`), whether it said `Tandem-Durability: local` and whether it was a
    /// replayed first answer (`Idempotent-Replayed: true`).
    Answer {
        status: u16,
        code: String,
        region: Option<String>,
        local: bool,
        replayed: bool,
        /// `orderId` of a 201.
        order_id: Option<String>,
    },
    /// No answer: `timeout`, `connect` or `io`.
    Transport(String),
}

impl Outcome {
    /// The key errors are counted by: `503 region_not_active`, `transport timeout`;
    /// `None` for a success.
    pub fn error_key(&self) -> Option<String> {
        match self {
            Outcome::Answer { status, .. } if (200..300).contains(status) => None,
            Outcome::Answer { status, code, .. } if code.is_empty() => Some(status.to_string()),
            Outcome::Answer { status, code, .. } => Some(format!("{status} {code}")),
            Outcome::Transport(kind) => Some(format!("transport {kind}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub sent_ms: u64,
    pub done_ms: u64,
    pub outcome: Outcome,
}

/// How a durable acknowledgement was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckDurability {
    /// After the local write only: `async` durability, a `replicated` node's
    /// `Tandem-Durability: local` fallback, or a write `replicated` does not cover.
    Local,
    /// After the standby held it (`replicated`, no `local` header).
    Replicated,
}

/// A write's final fate as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// A 2xx: the system said yes.
    Acked {
        at_ms: u64,
        region: Option<String>,
        durability: AckDurability,
    },
    /// A 4xx that means "no": status and code.
    Refused { status: u16, code: String },
    /// No definitive answer before the client gave up (after the heal and its deadline).
    Unresolved,
}

/// One `POST /orders` with its own Idempotency-Key, retried with the same key and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderWrite {
    pub key: String,
    /// `(sku, quantity)` lines.
    pub items: Vec<(String, u64)>,
    pub payment_token: String,
    /// The `orderId` of the acknowledgement.
    pub order_id: Option<String>,
    pub attempts: Vec<Attempt>,
    pub fate: Fate,
}

/// One `POST /orders/{id}/cancel`, retried until answered. Its `reason` is unique, so
/// the checker finds the `OrderCancelled` event this request wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelWrite {
    pub order_id: String,
    pub reason: String,
    pub attempts: Vec<Attempt>,
    pub fate: Fate,
}

/// Everything the clients recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub orders: Vec<OrderWrite>,
    pub cancels: Vec<CancelWrite>,
    /// Reads (order and product GETs) by outcome key (`200`, `404 not_found`, ...).
    pub reads: BTreeMap<String, u64>,
}

impl History {
    pub fn acked_orders(&self) -> impl Iterator<Item = &OrderWrite> {
        self.orders
            .iter()
            .filter(|o| matches!(o.fate, Fate::Acked { .. }))
    }

    /// Client-visible errors of every write attempt, by key.
    pub fn write_errors(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let attempts = self
            .orders
            .iter()
            .flat_map(|o| &o.attempts)
            .chain(self.cancels.iter().flat_map(|c| &c.attempts));
        for a in attempts {
            if let Some(k) = a.outcome.error_key() {
                *out.entry(k).or_default() += 1;
            }
        }
        out
    }

    /// When the first new write (not a replayed answer) sent at or after `from_ms`
    /// was acknowledged: the end of the outage a fault at `from_ms` caused.
    pub fn next_write_ack_after(&self, from_ms: u64) -> Option<u64> {
        let attempts = self
            .orders
            .iter()
            .flat_map(|o| &o.attempts)
            .chain(self.cancels.iter().flat_map(|c| &c.attempts));
        attempts
            .filter(|a| a.sent_ms >= from_ms)
            .filter(|a| {
                matches!(&a.outcome, Outcome::Answer { status, replayed: false, .. } if (200..300).contains(status))
            })
            .map(|a| a.done_ms)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, code: &str, replayed: bool) -> Outcome {
        Outcome::Answer {
            status,
            code: code.into(),
            region: Some("a".into()),
            local: false,
            replayed,
            order_id: None,
        }
    }

    #[test]
    fn recovery_is_the_first_new_write_acknowledged_after_the_fault() {
        let h = History {
            orders: vec![OrderWrite {
                key: "k".into(),
                items: vec![],
                payment_token: "tok_ok".into(),
                order_id: None,
                attempts: vec![
                    Attempt {
                        sent_ms: 90,
                        done_ms: 150,
                        outcome: answer(201, "", false),
                    },
                    Attempt {
                        sent_ms: 100,
                        done_ms: 400,
                        outcome: Outcome::Transport("timeout".into()),
                    },
                    Attempt {
                        sent_ms: 410,
                        done_ms: 500,
                        outcome: answer(201, "", true),
                    },
                    Attempt {
                        sent_ms: 420,
                        done_ms: 700,
                        outcome: answer(201, "", false),
                    },
                ],
                fate: Fate::Unresolved,
            }],
            ..History::default()
        };
        // The answer to a write sent before the fault and the replay do not count.
        assert_eq!(h.next_write_ack_after(100), Some(700));
        assert_eq!(h.next_write_ack_after(800), None);
        let errors = h.write_errors();
        assert_eq!(errors.get("transport timeout"), Some(&1));
        assert_eq!(errors.len(), 1);
    }
}
