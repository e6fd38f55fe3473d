//! Regions, roles and epochs (DESIGN.md section 4).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A region id such as `a`: short, lowercase letters, digits and dashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionId(String);

impl RegionId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(RegionId(s))
        } else {
            Err(format!("invalid region id {s:?}: use 1-32 of [a-z0-9-]"))
        }
    }
}

impl FromStr for RegionId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RegionId::try_from(s.to_string())
    }
}

impl From<RegionId> for String {
    fn from(r: RegionId) -> String {
        r.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A number that only grows: each promotion starts a new epoch, so a write stamped
/// with an older epoch can be recognised and fenced.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes and runs the workflow handlers.
    Active,
    /// Applies replicated events to its state and serves reads.
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(Role::Active),
            "standby" => Ok(Role::Standby),
            other => Err(format!(
                "unknown role {other:?}: expected `active` or `standby`"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role record stored in the region's Redis under [`crate::keys::ROLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleRecord {
    pub role: Role,
    pub epoch: Epoch,
    /// True while derived state is being rebuilt: commits wait.
    pub paused: bool,
    /// Set when the region was demoted from active (by the gateway, at the new epoch):
    /// the epoch it was active in. Its log may hold events the new active never
    /// received, so it must rejoin (compare and quarantine) before it copies, even
    /// though its epoch already equals the new active's. Cleared by the rejoin and by
    /// a promotion.
    pub demoted_from: Option<Epoch>,
}

/// Field names of the role hash.
pub mod fields {
    pub const ROLE: &str = "role";
    pub const EPOCH: &str = "epoch";
    pub const PAUSED: &str = "paused";
    /// Which rebuild holds the pause (rebuilds take turns).
    pub const PAUSED_BY: &str = "paused_by";
    /// Set once a gateway has granted the region a lease: from then on writes need a
    /// live write window (below).
    pub const FENCING: &str = "fencing";
    /// Unix ms, by the Redis server's clock, until which the node may write: the end of
    /// the lease it holds, or of the peer's word that no higher epoch exists. The commit
    /// script checks it against Redis' `TIME`, so a write that reaches Redis late (the
    /// node or Redis was paused after the node's own check) is refused.
    pub const WRITE_UNTIL: &str = "write_until";
    /// See [`super::RoleRecord::demoted_from`].
    pub const DEMOTED_FROM: &str = "demoted_from";
}

impl RoleRecord {
    /// The fields [`Self::from_hmget`] reads, in its order.
    pub const FIELDS: [&'static str; 4] = [
        fields::ROLE,
        fields::EPOCH,
        fields::PAUSED,
        fields::DEMOTED_FROM,
    ];

    /// Reads the record from `HMGET role epoch paused demoted_from` ([`Self::FIELDS`]);
    /// `None` when no role is stored.
    ///
    /// `paused` holds a deadline (Unix ms), not a flag: the rebuild that set it extends it
    /// while it runs, so a node killed in the middle of a rebuild cannot leave the region
    /// paused for good. A value in the past (or the old flag value "1") is not a pause.
    pub fn from_hmget(values: &[Option<String>]) -> Result<Option<RoleRecord>, String> {
        let (Some(role), epoch) = (
            values.first().cloned().flatten(),
            values.get(1).cloned().flatten(),
        ) else {
            return Ok(None);
        };
        let role = role.parse()?;
        let epoch = epoch
            .unwrap_or_else(|| "0".into())
            .parse::<u64>()
            .map_err(|e| format!("stored epoch is not a number: {e}"))?;
        let paused = values
            .get(2)
            .cloned()
            .flatten()
            .and_then(|p| p.parse::<u64>().ok())
            .is_some_and(|until| until > crate::time::now_ms());
        let demoted_from = values
            .get(3)
            .cloned()
            .flatten()
            .and_then(|e| e.parse::<u64>().ok())
            .map(Epoch);
        Ok(Some(RoleRecord {
            role,
            epoch: Epoch(epoch),
            paused,
            demoted_from,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_ids_are_validated() {
        assert!("a".parse::<RegionId>().is_ok());
        assert!("eu-west-1".parse::<RegionId>().is_ok());
        assert!("".parse::<RegionId>().is_err());
        assert!("A".parse::<RegionId>().is_err());
    }

    #[test]
    fn role_record_parses_from_hash_values() {
        let r =
            RoleRecord::from_hmget(&[Some("active".into()), Some("3".into()), Some("1".into())])
                .unwrap();
        assert_eq!(
            r,
            Some(RoleRecord {
                role: Role::Active,
                epoch: Epoch(3),
                paused: false,
                demoted_from: None,
            })
        );
        assert_eq!(RoleRecord::from_hmget(&[None, None, None]).unwrap(), None);
        let until = (crate::time::now_ms() + 60_000).to_string();
        let paused =
            RoleRecord::from_hmget(&[Some("active".into()), Some("3".into()), Some(until)])
                .unwrap()
                .unwrap();
        assert!(paused.paused, "a pause deadline in the future pauses");
        let demoted = RoleRecord::from_hmget(&[
            Some("standby".into()),
            Some("5".into()),
            None,
            Some("4".into()),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(demoted.demoted_from, Some(Epoch(4)));
        assert!(RoleRecord::from_hmget(&[Some("boss".into()), None, None]).is_err());
    }
}
