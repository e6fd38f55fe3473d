//! The epoch history: `tandem:epochs` (epoch -> `{"region","startOffsets","at"}`) is
//! copied from the active peer, so the standby knows where each epoch began. That is
//! what a later rejoin of either region compares against, whichever region survives.
//!
//! Fields are only added or overwritten, never removed: an epoch, once begun, keeps its
//! start offsets, and the active peer's record of it is the authoritative one.

use crate::link::{Link, LinkError};
use crate::reply;
use eventlog::keys;
use serde::Deserialize;
use std::collections::BTreeMap;

/// One epoch's record, as the node writes it when it is promoted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EpochRecord {
    #[serde(default)]
    pub region: Option<String>,
    /// Stream -> id of its last entry when the epoch began.
    #[serde(default)]
    pub start_offsets: BTreeMap<String, String>,
    #[serde(default)]
    pub at: Option<serde_json::Value>,
}

async fn hgetall(link: &Link, key: &str) -> Result<BTreeMap<String, Vec<u8>>, LinkError> {
    let v = link.query(redis::cmd("HGETALL").arg(key)).await?;
    Ok(reply::pairs(&v)
        .into_iter()
        .filter_map(|(k, v)| Some((k, reply::bytes(v)?.to_vec())))
        .collect())
}

/// Copies every field that is missing or different locally. Returns how many changed.
pub async fn copy(local: &Link, peer: &Link) -> Result<usize, LinkError> {
    let theirs = hgetall(peer, keys::EPOCHS).await?;
    if theirs.is_empty() {
        return Ok(0);
    }
    let ours = hgetall(local, keys::EPOCHS).await?;
    let changed: Vec<(&String, &Vec<u8>)> = theirs
        .iter()
        .filter(|(k, v)| ours.get(*k) != Some(*v))
        .collect();
    if changed.is_empty() {
        return Ok(0);
    }
    let mut cmd = redis::cmd("HSET");
    cmd.arg(keys::EPOCHS);
    for (k, v) in &changed {
        cmd.arg(k.as_str()).arg(&v[..]);
    }
    local.query(&cmd).await?;
    tracing::info!(fields = changed.len(), "copied epoch history from the peer");
    Ok(changed.len())
}

/// The peer's record of one epoch, `None` when it has none.
pub async fn peer_record(peer: &Link, epoch: u64) -> Result<Option<EpochRecord>, LinkError> {
    let v = peer
        .query(redis::cmd("HGET").arg(keys::EPOCHS).arg(epoch))
        .await?;
    let Some(bytes) = reply::bytes(&v) else {
        return Ok(None);
    };
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        LinkError::Other(format!(
            "peer's tandem:epochs field {epoch} is not an epoch record: {e}"
        ))
    })
}

/// The highest epoch in the peer's history: the last epoch it was (or is) active in.
pub async fn last_epoch(peer: &Link) -> Result<Option<eventlog::Epoch>, LinkError> {
    let v = peer.query(redis::cmd("HKEYS").arg(keys::EPOCHS)).await?;
    Ok(reply::array(&v)
        .unwrap_or_default()
        .iter()
        .filter_map(|k| reply::string(k)?.parse::<u64>().ok())
        .max()
        .map(eventlog::Epoch))
}
