//! Saga timeouts (seed 003; API.md `NODE_SAGA_TIMEOUT_MS`): an order not paid (or
//! ended) that long after it was placed is compensated through ordinary events, by
//! [`orders::time_out`] (OrderCancelled with reason `saga_timeout`; the inventory and
//! payments groups then release its stock and refund a charge, as for any
//! cancellation). The state machine decides which orders qualify (`Input::SagaTimeout`).
//!
//! The deadline is derived from replicated data only, so the region that is active when
//! it passes enforces it, whichever region placed the order:
//! - an order was placed when its `OrderPlaced` entry was appended: the entry id's
//!   milliseconds. The replicator copies entries with their ids, so both regions read
//!   the same time. The event stream is thus its own index of deadlines: every
//!   `OrderPlaced` entry up to `now - timeout` is due.
//! - how far the watch has got is the position of the consumer group
//!   [`CURSOR_GROUP`], moved with `XGROUP SETID` once the entries up to it are dealt
//!   with (no entry is ever delivered to it, so it holds no pending entries). The
//!   replicator copies group positions too, so a newly promoted region resumes the
//!   watch where the old active left it; what the old active did after the last copy
//!   is checked again, which is harmless ([`orders::time_out`] does nothing to an order
//!   already cancelled, paid or ended).
//!
//! Only the active region acts: the watch runs while the region is writable, and every
//! cancellation is committed like any other write (epoch-checked, compare-and-set on
//! the order), so a cancellation racing a payment loses or wins cleanly: a charge that
//! lands first is refunded.

use crate::orders;
use crate::store::{Store, StoreError};
use crate::workflow::{Retry, Workflow, WorkflowError};
use eventlog::envelope::StreamId;
use eventlog::{keys, Envelope};
use orders_model::events::{Cause, EventType};
use orders_model::flow::next;
use orders_model::{Input, Next, OrderId, Status};
use redis::{Script, Value};
use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::sync::watch;

/// The consumer group whose position is the watch's cursor on `tandem:events`. Not one
/// of the workflow's groups: it never reads, so it has no lag or pending entries to
/// report, and it trails the stream's end by the timeout on purpose.
pub const CURSOR_GROUP: &str = "saga-timeouts";

/// Stream entries examined per round trip (in Redis, see [`SCAN`]).
const BATCH: usize = 1000;

/// Reads `(cursor, horizon]` of the event stream in Redis and returns only what the
/// watch needs: the last id examined, how many entries were, and the `OrderPlaced`
/// entries among them (id, envelope JSON) whose order is still in a status the saga
/// timeout applies to ([`timed_out_statuses`]: PENDING and CONFIRMED).
/// The other events, and the orders that were paid or ended long ago (nearly all of
/// them), never cross the network. The filter is only a shortcut: a status moves
/// forward only, so an order seen past CONFIRMED stays past it, and an entry it lets
/// through is decided again on fresh state by `orders::time_out`. Anything it cannot
/// read is let through.
static SCAN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local open_status = {}
for i = 6, #ARGV do open_status[ARGV[i]] = true end
local due = {}
local last = ''
for _, e in ipairs(entries) do
  last = e[1]
  local f = e[2]
  local ty, ev = nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'type' then ty = f[i + 1] elseif f[i] == 'event' then ev = f[i + 1] end
  end
  if ty == ARGV[4] and ev then
    local open = true
    local ok, env = pcall(cjson.decode, ev)
    if ok and type(env) == 'table' and type(env.aggregateId) == 'string' then
      local raw = redis.call('GET', ARGV[5] .. env.aggregateId)
      if raw then
        local ok2, order = pcall(cjson.decode, raw)
        if ok2 and type(order) == 'table' and type(order.status) == 'string' then
          open = open_status[order.status] == true
        end
      end
    end
    if open then
      due[#due + 1] = e[1]
      due[#due + 1] = ev
    end
  end
end
return {last, #entries, due}
",
    )
});

/// Watches deadlines until `stop` turns true. `timeout` is positive (0 turns the
/// watch off before it is started).
pub async fn run(wf: Workflow, timeout: Duration, mut stop: watch::Receiver<bool>) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut roles = wf.roles.subscribe();
    // Read from the group when the region becomes active, then kept here: only this
    // task moves it while the region is active.
    let mut cursor: Option<StreamId> = None;
    let mut failures = 0u32;
    while !*stop.borrow() {
        if !wf.roles.current().writable() {
            cursor = None;
            tokio::select! {
                _ = roles.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let pause = match round(&wf, timeout, &mut cursor).await {
            Ok(Round::More) => {
                failures = 0;
                continue;
            }
            Ok(Round::CaughtUp) => {
                failures = 0;
                tick
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(error = %e, failures, "saga timeout watch failed; retrying");
                }
                // The position may have moved meanwhile (a promotion): read it again.
                cursor = None;
                tick.max(Duration::from_millis(200))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// How a round ended.
enum Round {
    /// A whole batch was due: go on at once.
    More,
    /// Every entry due by now was dealt with.
    CaughtUp,
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
}

/// Deals with the `OrderPlaced` entries from the cursor up to `now - timeout`, one
/// batch, and moves the cursor past what it dealt with.
async fn round(
    wf: &Workflow,
    timeout: Duration,
    cursor: &mut Option<StreamId>,
) -> Result<Round, WatchError> {
    let from = match *cursor {
        Some(c) => c,
        None => {
            let c = position(&wf.store).await?;
            *cursor = Some(c);
            c
        }
    };
    let horizon = eventlog::time::now_ms().saturating_sub(timeout.as_millis() as u64);
    if horizon <= from.ms {
        return Ok(Round::CaughtUp);
    }
    let mut scan = SCAN.key(keys::EVENTS);
    scan.arg(from.to_string())
        // `ms` alone ends the range after every entry of that millisecond.
        .arg(horizon)
        .arg(BATCH)
        .arg(EventType::OrderPlaced.as_str())
        .arg(keys::order(""))
        .arg(timed_out_statuses());
    let (last, examined, placed): (String, usize, Vec<String>) = wf.store.invoke(&scan).await?;
    let mut done = from;
    let mut result = Ok(());
    for pair in placed.chunks_exact(2) {
        let (Some(id), json) = (StreamId::parse(&pair[0]), &pair[1]) else {
            continue;
        };
        if let Err(e) = expire(wf, json).await {
            result = Err(e);
            break;
        }
        done = id;
    }
    if result.is_ok() {
        done = StreamId::parse(&last).unwrap_or(done);
    }
    if done != from {
        set_position(&wf.store, done).await?;
        *cursor = Some(done);
    }
    result?;
    Ok(if examined >= BATCH {
        Round::More
    } else {
        Round::CaughtUp
    })
}

/// The statuses in which the state machine times an order out.
fn timed_out_statuses() -> Vec<&'static str> {
    Status::ALL
        .into_iter()
        .filter(|s| matches!(next(*s, None, Input::SagaTimeout), Next::Steps(_)))
        .map(Status::as_str)
        .collect()
}

/// Times out the order an `OrderPlaced` entry placed, if it is still unpaid. An entry
/// that cannot be read, or an order whose state cannot be, is logged and passed over:
/// it would stop every later deadline otherwise.
async fn expire(wf: &Workflow, json: &str) -> Result<(), WorkflowError> {
    let env: Envelope = match serde_json::from_str(json) {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(error = %e, "OrderPlaced entry unreadable; its saga timeout is skipped");
            return Ok(());
        }
    };
    let Some(order_id) = OrderId::parse(&env.aggregate_id) else {
        tracing::error!(aggregate = %env.aggregate_id, "OrderPlaced for an invalid order id; skipped");
        return Ok(());
    };
    // The cancellation continues the order's correlation and trace, caused by the
    // placement whose deadline passed.
    match orders::time_out(wf, &order_id, &Cause::event(&env)).await {
        Ok(true) => {
            wf.metrics.saga_timeouts.inc();
            tracing::info!(order = %order_id, placed = %env.occurred_at, "saga timed out; order cancelled");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) if e.retry() == Retry::Never => {
            tracing::error!(order = %order_id, error = %e, "saga timeout cannot be decided; skipped");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The cursor group's position, creating the group at the stream's start when it does
/// not exist (a region that never watched: every order it holds is checked once).
async fn position(store: &Store) -> Result<StreamId, StoreError> {
    let created: Result<String, StoreError> = store
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(keys::EVENTS)
                .arg(CURSOR_GROUP)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match created {
        Ok(_) => {}
        Err(StoreError::Redis(msg)) if msg.contains("BUSYGROUP") => {}
        Err(e) => return Err(e),
    }
    let groups: Vec<HashMap<String, Value>> = store
        .query(redis::cmd("XINFO").arg("GROUPS").arg(keys::EVENTS))
        .await?;
    let last = groups
        .iter()
        .find(|g| {
            g.get("name")
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .is_some_and(|n| n == CURSOR_GROUP)
        })
        .and_then(|g| g.get("last-delivered-id"))
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
        .and_then(|s| StreamId::parse(&s));
    last.ok_or_else(|| StoreError::Redis(format!("consumer group {CURSOR_GROUP} has no position")))
}

async fn set_position(store: &Store, id: StreamId) -> Result<(), StoreError> {
    let _: String = store
        .query(
            redis::cmd("XGROUP")
                .arg("SETID")
                .arg(keys::EVENTS)
                .arg(CURSOR_GROUP)
                .arg(id.to_string()),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_lets_through_the_statuses_the_state_machine_times_out() {
        assert_eq!(timed_out_statuses(), ["PENDING", "CONFIRMED"]);
    }
}
