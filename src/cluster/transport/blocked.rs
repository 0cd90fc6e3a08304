//! Injected partitions: the members a node cuts itself off from.
//!
//! `[faults] drop_peers` (and the `fault drop_peers` command) name members
//! whose peer traffic is dropped silently, both ways: requests, replies,
//! heartbeats and handshakes. The transport consults this set where it sends
//! and receives frames, so callers see exactly what a real partition shows
//! them: calls time out, heartbeats go unanswered, the peer goes down, and
//! redials time out until the partition heals. No root and no `tc` needed.
//!
//! One bit per possible member id (4,096 bits), so the check on every frame
//! is one relaxed atomic load. The set is replaced word by word: a frame
//! racing with a change may see part of the old set and part of the new,
//! which is no different from a real partition starting or healing while a
//! packet is in flight.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::NodeId;

/// Member ids the bit set covers: every id an HLC stamp can carry.
const IDS: usize = 1 << crate::store::hlc::NODE_BITS;
/// Words of the bit set.
const WORDS: usize = IDS / 64;

const _: () = assert!(IDS % 64 == 0);

/// The members whose peer traffic this node drops, changeable while it runs.
pub struct BlockedPeers {
    /// Bit `id % 64` of word `id / 64` is set when member `id` is cut off.
    words: [AtomicU64; WORDS],
}

impl Default for BlockedPeers {
    fn default() -> Self {
        Self {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl fmt::Debug for BlockedPeers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ids()).finish()
    }
}

impl BlockedPeers {
    /// Whether traffic to and from `id` is dropped. Ids past the set (no
    /// member can have one) are never blocked.
    #[inline]
    pub fn contains(&self, id: NodeId) -> bool {
        let id = usize::from(id);
        self.words
            .get(id / 64)
            .is_some_and(|w| w.load(Relaxed) & (1 << (id % 64)) != 0)
    }

    /// Replaces the set with `ids` (empty: heals every partition).
    ///
    /// # Panics
    /// On an id past [`crate::store::hlc::NODE_ID_MAX`]: config validation
    /// and the `fault` command accept only member ids.
    pub fn set(&self, ids: &[NodeId]) {
        let mut words = [0u64; WORDS];
        for &id in ids {
            let id = usize::from(id);
            assert!(
                id < IDS,
                "member id {id} cannot be blocked: past the id space"
            );
            words[id / 64] |= 1 << (id % 64);
        }
        for (word, bits) in self.words.iter().zip(words) {
            word.store(bits, Relaxed);
        }
    }

    /// The blocked ids, ascending.
    pub fn ids(&self) -> Vec<NodeId> {
        let mut ids = Vec::new();
        for (i, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                ids.push(NodeId::try_from(i * 64 + bit).expect("ids fit the id space"));
                bits &= bits - 1;
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exactly_the_ids_it_was_given() {
        let b = BlockedPeers::default();
        assert!(b.ids().is_empty());
        b.set(&[3, 64, 1, 4095, 3]);
        assert_eq!(b.ids(), vec![1, 3, 64, 4095]);
        for id in [0, 2, 63, 65, 4094] {
            assert!(!b.contains(id), "{id}");
        }
        for id in [1, 3, 64, 4095] {
            assert!(b.contains(id), "{id}");
        }
        // A caller id no member can have is simply not blocked.
        assert!(!b.contains(4096) && !b.contains(u16::MAX));
        b.set(&[2]);
        assert_eq!(b.ids(), vec![2]);
        b.set(&[]);
        assert!(b.ids().is_empty() && !b.contains(2));
        assert_eq!(format!("{b:?}"), "{}");
    }

    #[test]
    #[should_panic(expected = "past the id space")]
    fn an_id_past_the_space_is_a_programmer_error() {
        BlockedPeers::default().set(&[4096]);
    }
}
