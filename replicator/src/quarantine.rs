//! The rejoin's decisions (DESIGN.md 4, "Failback"), free of I/O: what becomes of each
//! local entry past the new epoch's start offset. [`crate::rejoin`] reads the entries,
//! asks the peer and carries the decisions out.
//!
//! Entries right after the start that the peer holds as they are (same id, same fields:
//! copied to it late) stay where they are. From the first entry the peer lacks on,
//! everything goes: the lacking ones to the region-local quarantine stream (reported,
//! never silently dropped), the others only out of the way, to come back by the copy in
//! the peer's order (the peer's newer entries may have lower ids than the removed tail).

/// What a rejoin does with one local entry past the start offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The peer holds it and nothing before it diverged: it stays.
    Keep,
    /// The peer holds it, but after a divergence: deleted, the copy brings it back.
    Delete,
    /// The peer never received it: moved to the quarantine stream.
    Quarantine,
}

impl Fate {
    /// The flag the move script takes for it (a kept entry never reaches the script).
    pub fn flag(self) -> &'static [u8] {
        match self {
            Fate::Keep => b"k",
            Fate::Delete => b"d",
            Fate::Quarantine => b"q",
        }
    }
}

/// The fate of each entry of one batch, in stream order, from whether the peer holds
/// it. `diverged` carries over from one batch to the next of the same stream.
pub fn fates(held_by_peer: &[bool], diverged: &mut bool) -> Vec<Fate> {
    held_by_peer
        .iter()
        .map(|&held| {
            if !*diverged && held {
                return Fate::Keep;
            }
            *diverged = true;
            if held {
                Fate::Delete
            } else {
                Fate::Quarantine
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fate::*;

    #[test]
    fn the_common_prefix_stays_and_everything_after_the_first_gap_goes() {
        let mut diverged = false;
        assert_eq!(
            fates(&[true, true, false, true, false], &mut diverged),
            [Keep, Keep, Quarantine, Delete, Quarantine]
        );
        assert!(diverged);
        // The next batch of the same stream: past the divergence, nothing stays.
        assert_eq!(fates(&[true, false], &mut diverged), [Delete, Quarantine]);
    }

    #[test]
    fn a_tail_the_peer_holds_whole_stays() {
        let mut diverged = false;
        assert_eq!(fates(&[true, true], &mut diverged), [Keep, Keep]);
        assert!(!diverged);
    }
}
