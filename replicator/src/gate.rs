//! The role gate (DESIGN.md 3, "loop prevention is by role"): from the role records of
//! both sides, decide whether to copy, to rejoin, or to stay idle. Pure decisions, no
//! I/O: [`crate::roles`] reads the records and acts on the decision.
//!
//! Only the active region's log flows, and only into a standby that has not moved past
//! the peer's epoch. Roles themselves are never copied: each region's role is set by the
//! gateway through its own node (and by a rejoin, see [`crate::rejoin`]).

use eventlog::{Epoch, Role, RoleRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The peer is active and the local region is its standby: copy.
    Copy {
        peer_epoch: Epoch,
    },
    /// The peer is active at a higher epoch than the local region: set aside what the
    /// local region wrote past that epoch's start, then become its standby.
    Rejoin {
        peer_epoch: Epoch,
    },
    Idle {
        reason: String,
    },
}

impl Gate {
    pub fn is_copy(&self) -> bool {
        matches!(self, Gate::Copy { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Gate::Copy { .. } => "copying",
            Gate::Rejoin { .. } => "rejoining",
            Gate::Idle { .. } => "idle",
        }
    }
}

/// The decision itself, free of I/O.
pub fn decide(local: Option<RoleRecord>, peer: Option<RoleRecord>) -> Gate {
    let idle = |reason: &str| Gate::Idle {
        reason: reason.to_string(),
    };
    let Some(peer) = peer else {
        return idle("peer region has no role record yet");
    };
    let Some(local) = local else {
        return idle("local region has no role record yet");
    };
    if peer.role != Role::Active {
        return idle("peer region is not active");
    }
    if peer.epoch > local.epoch {
        // Whatever the local role says, a higher epoch on an active peer wins: the local
        // region was left behind by a failover and must rejoin as its standby.
        return Gate::Rejoin {
            peer_epoch: peer.epoch,
        };
    }
    if local.role == Role::Active {
        return idle("local region is active (both active at the same epoch: not copying)");
    }
    if local.demoted_from.is_some() && peer.epoch == local.epoch {
        // Demoted by the gateway at the new active's epoch: the local log may end in
        // events the new active never received (an unplanned failover promoted it
        // without them). Compare and set them aside first; after a planned switchover
        // nothing differs and the rejoin moves nothing.
        return Gate::Rejoin {
            peer_epoch: peer.epoch,
        };
    }
    if local.epoch > peer.epoch {
        return idle("local epoch is ahead of the peer's: the peer is stale");
    }
    Gate::Copy {
        peer_epoch: peer.epoch,
    }
}

/// A promotion of the local region that has recorded its intent (DESIGN.md 4) but not
/// yet taken effect overrides the decision: the node is about to record the new
/// epoch's start offsets, and a batch copied after that would sit past them although
/// the new epoch did not write it. An intent that the peer's epoch has reached or
/// passed lost to another promotion and is ignored.
pub fn hold_for_promotion(
    gate: Gate,
    local: Option<RoleRecord>,
    peer: Option<RoleRecord>,
    intent: Option<Epoch>,
) -> Gate {
    let (Some(intent), Some(local)) = (intent, local) else {
        return gate;
    };
    let peer_epoch = peer.map(|p| p.epoch).unwrap_or_default();
    if intent > local.epoch && intent > peer_epoch && !matches!(gate, Gate::Idle { .. }) {
        return Gate::Idle {
            reason: format!("local promotion to epoch {intent} in progress"),
        };
    }
    gate
}

/// Whether the gate may need to follow a demoted peer: both standby, the peer at a
/// higher epoch. Only then does the role task read the peer's epoch history for
/// [`follow_demoted`].
pub fn peer_maybe_demoted(local: Option<RoleRecord>, peer: Option<RoleRecord>) -> bool {
    matches!((local, peer), (Some(l), Some(p))
        if l.role == Role::Standby && p.role == Role::Standby && p.epoch > l.epoch)
}

/// A planned switchover first demotes the active region at the new epoch, then waits
/// for the standby to hold its last event before promoting it. Meanwhile nobody is
/// active, and a standby that stopped copying would never catch up. So a standby keeps
/// copying from a peer demoted at a higher epoch, but only if the last epoch the peer
/// was active in (`peer_last_active`, the highest epoch in its history) is the one this
/// region follows: a peer that was active at some later epoch wrote a log this region
/// may have diverged from, and only a rejoin (once the peer is active again) may join
/// the two. The same holds when the local region was itself demoted from active
/// ([`RoleRecord::demoted_from`]): its log may end in events the peer never received,
/// and the peer's events copied after them would repeat work (chaos seed 4006: order
/// sequences 6 after 7 once it was promoted).
pub fn follow_demoted(
    gate: Gate,
    local: Option<RoleRecord>,
    peer: Option<RoleRecord>,
    peer_last_active: Option<Epoch>,
) -> Gate {
    match local {
        Some(l)
            if matches!(gate, Gate::Idle { .. })
                && l.demoted_from.is_none()
                && peer_maybe_demoted(local, peer)
                && peer_last_active == Some(l.epoch) =>
        {
            Gate::Copy {
                peer_epoch: l.epoch,
            }
        }
        _ => gate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(role: Role, epoch: u64) -> Option<RoleRecord> {
        Some(RoleRecord {
            role,
            epoch: Epoch(epoch),
            paused: false,
            demoted_from: None,
        })
    }

    #[test]
    fn follows_a_peer_demoted_for_a_switchover_but_not_a_stale_one() {
        let (l, p) = (rec(Role::Standby, 4), rec(Role::Standby, 5));
        assert!(matches!(decide(l, p), Gate::Idle { .. }));
        // The peer was last active at our epoch: its final events are ours to copy.
        assert_eq!(
            follow_demoted(decide(l, p), l, p, Some(Epoch(4))),
            Gate::Copy {
                peer_epoch: Epoch(4)
            }
        );
        // We were active ourselves before the demotion: our log may have diverged.
        let mut demoted = l.unwrap();
        demoted.demoted_from = Some(Epoch(3));
        assert!(matches!(
            follow_demoted(decide(Some(demoted), p), Some(demoted), p, Some(Epoch(4))),
            Gate::Idle { .. }
        ));
        // The peer was active at an epoch we never followed: wait for a rejoin.
        assert!(matches!(
            follow_demoted(decide(l, p), l, p, Some(Epoch(5))),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            follow_demoted(decide(l, p), l, p, None),
            Gate::Idle { .. }
        ));
        // Never while the local region is active, or the peer is at our epoch.
        let active = rec(Role::Active, 4);
        assert!(matches!(
            follow_demoted(decide(active, p), active, p, Some(Epoch(4))),
            Gate::Idle { .. }
        ));
        let same = rec(Role::Standby, 4);
        assert!(matches!(
            follow_demoted(decide(l, same), l, same, Some(Epoch(4))),
            Gate::Idle { .. }
        ));
    }

    #[test]
    fn a_region_demoted_at_the_peers_epoch_rejoins_before_it_copies() {
        let mut demoted = rec(Role::Standby, 5).unwrap();
        demoted.demoted_from = Some(Epoch(4));
        assert_eq!(
            decide(Some(demoted), rec(Role::Active, 5)),
            Gate::Rejoin {
                peer_epoch: Epoch(5)
            }
        );
        // Until the peer is promoted there is nothing to rejoin.
        assert!(matches!(
            decide(Some(demoted), rec(Role::Standby, 4)),
            Gate::Idle { .. }
        ));
    }

    #[test]
    fn copies_from_an_active_peer_into_a_standby() {
        assert_eq!(
            decide(rec(Role::Standby, 1), rec(Role::Active, 1)),
            Gate::Copy {
                peer_epoch: Epoch(1)
            }
        );
    }

    #[test]
    fn idles_when_roles_forbid() {
        assert!(matches!(
            decide(rec(Role::Active, 1), rec(Role::Active, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 1), rec(Role::Standby, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Active, 2), rec(Role::Standby, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 3), rec(Role::Active, 2)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(None, rec(Role::Active, 2)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 1), None),
            Gate::Idle { .. }
        ));
    }

    #[test]
    fn a_local_promotion_in_progress_holds_copying() {
        let (l, p) = (rec(Role::Standby, 1), rec(Role::Active, 1));
        let held = hold_for_promotion(decide(l, p), l, p, Some(Epoch(2)));
        assert!(matches!(held, Gate::Idle { .. }));
        // An intent the peer's epoch has passed lost; an old one is done.
        let p3 = rec(Role::Active, 3);
        assert_eq!(
            hold_for_promotion(decide(l, p3), l, p3, Some(Epoch(2))),
            Gate::Rejoin {
                peer_epoch: Epoch(3)
            }
        );
        let l2 = rec(Role::Standby, 2);
        let p2 = rec(Role::Active, 2);
        assert_eq!(
            hold_for_promotion(decide(l2, p2), l2, p2, Some(Epoch(2))),
            Gate::Copy {
                peer_epoch: Epoch(2)
            }
        );
    }

    #[test]
    fn a_higher_active_epoch_means_rejoin() {
        assert_eq!(
            decide(rec(Role::Active, 1), rec(Role::Active, 2)),
            Gate::Rejoin {
                peer_epoch: Epoch(2)
            }
        );
        assert_eq!(
            decide(rec(Role::Standby, 1), rec(Role::Active, 2)),
            Gate::Rejoin {
                peer_epoch: Epoch(2)
            }
        );
    }
}
