//! The dead-letter stream as operators read it: pages with a cursor, filters by group
//! and event type, and bulk replay of a filter. Parking an entry and replaying one are
//! the bus's ([`bus::replay`]); this module chooses which entries.
//!
//! `tandem:dlq` is append-only (the replicator copies appends, never deletions): an entry
//! that was replayed stays in the stream and is marked by its `DeadLetterReplayed` event,
//! so every listing leaves marked entries out ([`bus::unreplayed`]). The cursor is the
//! stream entry id, so paging is stable while entries are added or replayed, and it means
//! the same in both regions (ids are copied unchanged).

use crate::bus::{self, Group, ReplayError, Replayed};
use crate::store::{Entry, Store, StoreError};
use crate::workflow::Workflow;
use eventlog::envelope::StreamId;
use eventlog::keys;
use orders_model::EventType;

/// Most entries in one page or one bulk replay.
pub const MAX_LIMIT: usize = 1000;
/// Entries read per round trip.
const CHUNK: usize = 500;
/// A sparse filter stops after examining this many entries and hands back a cursor.
const MAX_SCAN: usize = 10_000;

/// Which dead-letter entries an operator means. Empty: all of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub group: Option<Group>,
    pub event_type: Option<EventType>,
}

impl Filter {
    pub fn matches(&self, entry: &Entry) -> bool {
        let group_ok = self
            .group
            .is_none_or(|g| entry.field_str("group") == Some(g.name()));
        let type_ok = self
            .event_type
            .is_none_or(|t| entry.field_str("eventType") == Some(t.as_str()));
        group_ok && type_ok
    }
}

/// One page of entries not yet replayed, oldest first.
#[derive(Debug)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// Where the next page starts (`after`); `None` once the stream's end was reached.
    /// A page may hold fewer than `limit` entries (a sparse filter stops after examining
    /// [`MAX_SCAN`] entries) and still have a `next`.
    pub next: Option<String>,
}

/// Entries after `after` that match `filter` and were not replayed, at most `limit`.
pub async fn page(
    store: &Store,
    filter: &Filter,
    after: Option<StreamId>,
    limit: usize,
) -> Result<Page, StoreError> {
    let mut start = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
    let mut entries = Vec::new();
    let mut examined = 0;
    loop {
        let batch = store.xrange(keys::DLQ, &start, "+", CHUNK).await?;
        let Some(last) = batch.last().map(|e| e.id.clone()) else {
            return Ok(Page {
                entries,
                next: None,
            });
        };
        let full = batch.len() == CHUNK;
        examined += batch.len();
        for entry in bus::unreplayed(store, batch).await? {
            if filter.matches(&entry) {
                let id = entry.id.clone();
                entries.push(entry);
                if entries.len() == limit {
                    // There may be more: the next page starts after this one.
                    return Ok(Page {
                        entries,
                        next: Some(id),
                    });
                }
            }
        }
        if !full {
            return Ok(Page {
                entries,
                next: None,
            });
        }
        if examined >= MAX_SCAN {
            return Ok(Page {
                entries,
                next: Some(last),
            });
        }
        start = format!("({last}");
    }
}

/// What a bulk replay did, entry by entry.
#[derive(Debug)]
pub struct BulkReplay {
    /// Each entry taken, oldest first, with its outcome. A failed one (the handler
    /// still fails, or the entry cannot be read) stays in the dead-letter list.
    pub outcomes: Vec<(String, Result<Replayed, ReplayError>)>,
    /// Where a further bulk replay of the same filter continues (`after`), past the
    /// entries that failed; `None` once the stream's end was reached.
    pub next: Option<String>,
}

/// Replays, one after the other, the entries [`page`] gives for the same arguments.
/// Each replay is the single-entry replay: its own `DeadLetterReplayed` event, a
/// replicated fact. A failure of the region itself (Redis away, not active) stops the
/// bulk replay and is returned with the number of entries replayed before it; an
/// operator lists the dead letters again and continues.
pub async fn replay_matching(
    wf: &Workflow,
    filter: &Filter,
    after: Option<StreamId>,
    limit: usize,
) -> Result<BulkReplay, (ReplayError, usize)> {
    let page = page(&wf.store, filter, after, limit)
        .await
        .map_err(|e| (ReplayError::Failed(e.into()), 0))?;
    let mut report = BulkReplay {
        outcomes: Vec::new(),
        next: page.next,
    };
    for entry in page.entries {
        let outcome = bus::replay(wf, &entry.id).await;
        if let Err(e) = &outcome {
            if e.is_systemic() {
                let done = report.outcomes.iter().filter(|(_, o)| o.is_ok()).count();
                return Err((outcome.unwrap_err(), done));
            }
        }
        report.outcomes.push((entry.id, outcome));
    }
    Ok(report)
}
