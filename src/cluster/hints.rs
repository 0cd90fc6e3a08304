//! Hinted handoff's storage: writes held for a replica that could not be
//! reached, to hand over when it is back. A plain bounded structure with
//! the time passed in (sans-IO); the coordinator stores into it and a
//! background task drains it.
//!
//! Bounds: a count per target and bytes in total. When either is full the
//! oldest hints go first (counted as dropped): a replica that stays away
//! long loses the oldest writes it missed, which repair must then bring.
//! Hints older than the window expire (counted): DESIGN keeps tombstones
//! longer than this window, so an expired hint never undoes a delete.

use std::collections::{BTreeMap, VecDeque};

use super::ring::NodeId;
use crate::store::KeyState;

/// Accounting overhead per hint, on top of its key and value.
const HINT_OVERHEAD_BYTES: usize = 64;

/// Bounds of a [`HintStore`] (`[cluster]` `hint_*` and `hints_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintLimits {
    /// Hints held per target node; 0 turns hints off.
    pub per_target_max: usize,
    /// Bytes held over all targets, counting key, value, request-id
    /// records and a fixed 64 bytes per hint.
    pub bytes_max: usize,
    /// Milliseconds a hint is kept before it expires undelivered.
    pub window_ms: u64,
}

/// One write held for a replica: the key's state to apply there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    /// The key written.
    pub key: Vec<u8>,
    /// Its state after the write, applied on delivery (highest version wins).
    pub state: KeyState,
    /// Unix ms after which the hint is dropped undelivered.
    pub expires_at_ms: u64,
}

impl Hint {
    fn bytes(&self) -> usize {
        self.key.len() + self.state.payload_bytes() + HINT_OVERHEAD_BYTES
    }
}

/// Counters for `stats cluster`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HintCounts {
    /// Hints accepted.
    pub stored: u64,
    /// Hints handed to their target (as told by [`HintStore::delivered`]).
    pub delivered: u64,
    /// Hints refused or pushed out by a bound before delivery.
    pub dropped: u64,
    /// Hints that outlived the window undelivered.
    pub expired: u64,
}

/// Hints per target node, oldest first, within [`HintLimits`].
#[derive(Debug)]
pub struct HintStore {
    limits: HintLimits,
    by_target: BTreeMap<NodeId, VecDeque<Hint>>,
    bytes: usize,
    /// Counters since the store was made.
    pub counts: HintCounts,
}

impl HintStore {
    /// An empty store with these bounds.
    pub fn new(limits: HintLimits) -> Self {
        Self {
            limits,
            by_target: BTreeMap::new(),
            bytes: 0,
            counts: HintCounts::default(),
        }
    }

    /// Holds `state` for `target`, dropping the oldest hints if a bound
    /// would be exceeded. A hint larger than the whole budget (or any hint,
    /// with hints off) is dropped: returns whether it is held.
    #[must_use]
    pub fn add(&mut self, target: NodeId, key: &[u8], state: KeyState, now_ms: u64) -> bool {
        let hint = Hint {
            key: key.to_vec(),
            state,
            expires_at_ms: now_ms.saturating_add(self.limits.window_ms),
        };
        let size = hint.bytes();
        if size > self.limits.bytes_max || self.limits.per_target_max == 0 {
            self.counts.dropped += 1;
            return false;
        }
        while self
            .by_target
            .get(&target)
            .is_some_and(|q| q.len() >= self.limits.per_target_max)
        {
            self.drop_oldest_of(target);
        }
        while self.bytes + size > self.limits.bytes_max {
            let oldest = self
                .by_target
                .iter()
                .filter_map(|(t, q)| q.front().map(|h| (h.expires_at_ms, *t)))
                .min()
                .map(|(_, t)| t)
                .expect("over budget, so some hint is held");
            self.drop_oldest_of(oldest);
        }
        self.bytes += size;
        self.counts.stored += 1;
        self.by_target.entry(target).or_default().push_back(hint);
        true
    }

    fn drop_oldest_of(&mut self, target: NodeId) {
        if let Some(h) = self
            .by_target
            .get_mut(&target)
            .and_then(VecDeque::pop_front)
        {
            self.bytes -= h.bytes();
            self.counts.dropped += 1;
        }
        if self.by_target.get(&target).is_some_and(VecDeque::is_empty) {
            self.by_target.remove(&target);
        }
    }

    /// Drops every hint past its window.
    pub fn expire(&mut self, now_ms: u64) {
        let targets: Vec<NodeId> = self.by_target.keys().copied().collect();
        for t in targets {
            while self
                .by_target
                .get(&t)
                .and_then(VecDeque::front)
                .is_some_and(|h| h.expires_at_ms <= now_ms)
            {
                self.drop_oldest_of(t);
                self.counts.dropped -= 1;
                self.counts.expired += 1;
            }
        }
    }

    /// Targets that have hints waiting.
    pub fn targets(&self) -> Vec<NodeId> {
        self.by_target.keys().copied().collect()
    }

    /// Up to `max` of `target`'s oldest hints, removed from the store; give
    /// back what could not be delivered with [`HintStore::put_back`].
    pub fn take(&mut self, target: NodeId, max: usize) -> Vec<Hint> {
        let Some(q) = self.by_target.get_mut(&target) else {
            return Vec::new();
        };
        let n = max.min(q.len());
        let batch: Vec<Hint> = q.drain(..n).collect();
        for h in &batch {
            self.bytes -= h.bytes();
        }
        if q.is_empty() {
            self.by_target.remove(&target);
        }
        batch
    }

    /// Returns undelivered hints to the front of `target`'s queue, oldest
    /// first, within the bounds.
    pub fn put_back(&mut self, target: NodeId, hints: Vec<Hint>) {
        let q = self.by_target.entry(target).or_default();
        for h in hints.into_iter().rev() {
            self.bytes += h.bytes();
            q.push_front(h);
        }
        while self
            .by_target
            .get(&target)
            .is_some_and(|q| q.len() > self.limits.per_target_max)
            || self.bytes > self.limits.bytes_max
        {
            self.drop_oldest_of(target);
        }
    }

    /// Counts `n` hints as delivered (the caller took them with
    /// [`HintStore::take`] and its target applied them).
    pub fn delivered(&mut self, n: usize) {
        self.counts.delivered += n as u64;
    }

    /// Counts `n` hints as dropped: taken with [`HintStore::take`], and
    /// refused by their target for good (older than its last `flush_all`,
    /// no memory for them, a version too far ahead of its clock). They are
    /// not put back, so they cannot block the rest of the queue.
    pub fn refused(&mut self, n: usize) {
        self.counts.dropped += n as u64;
    }

    /// Hints held, over all targets.
    pub fn pending(&self) -> usize {
        self.by_target.values().map(VecDeque::len).sum()
    }

    /// Bytes held, as counted against [`HintLimits::bytes_max`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: u64, len: usize) -> KeyState {
        KeyState::Item {
            version: v,
            flags: 0,
            exptime: 0,
            bits: 0,
            value: vec![b'x'; len],
            dedup: Vec::new(),
        }
    }

    fn limits() -> HintLimits {
        HintLimits {
            per_target_max: 3,
            bytes_max: 10_000,
            window_ms: 1_000,
        }
    }

    #[test]
    fn per_target_bound_drops_the_oldest() {
        let mut h = HintStore::new(limits());
        for v in 1..=5 {
            assert!(h.add(2, format!("k{v}").as_bytes(), item(v, 10), 0));
        }
        let kept: Vec<u64> = h.take(2, 10).iter().map(|x| x.state.version()).collect();
        assert_eq!(kept, vec![3, 4, 5]);
        assert_eq!((h.counts.stored, h.counts.dropped), (5, 2));
        assert_eq!(h.bytes(), 0);
    }

    #[test]
    fn total_bound_drops_the_oldest_of_any_target() {
        let mut h = HintStore::new(HintLimits {
            per_target_max: 100,
            bytes_max: 3 * (2 + 1000 + HINT_OVERHEAD_BYTES),
            window_ms: 1_000,
        });
        assert!(h.add(2, b"k1", item(1, 1000), 0));
        assert!(h.add(3, b"k2", item(2, 1000), 1));
        assert!(h.add(2, b"k3", item(3, 1000), 2));
        assert!(h.add(3, b"k4", item(4, 1000), 3));
        assert_eq!(h.pending(), 3);
        assert_eq!(h.counts.dropped, 1);
        assert!(h.take(2, 10).iter().all(|x| x.key != b"k1"));
        assert!(h.bytes() <= 3 * (2 + 1000 + HINT_OVERHEAD_BYTES));
        let huge = HintStore::new(limits()).limits.bytes_max + 1;
        let mut h = HintStore::new(limits());
        assert!(!h.add(2, b"big", item(9, huge), 0), "too big to hold");
        assert_eq!((h.pending(), h.counts.dropped), (0, 1));
        // Hints off: nothing is held, and the caller is told so.
        let mut off = HintStore::new(HintLimits {
            per_target_max: 0,
            ..limits()
        });
        assert!(!off.add(2, b"k", item(1, 1), 0));
        assert_eq!((off.pending(), off.counts.dropped), (0, 1));
    }

    #[test]
    fn hints_expire_after_the_window() {
        let mut h = HintStore::new(limits());
        assert!(h.add(2, b"a", item(1, 1), 0));
        assert!(h.add(2, b"b", item(2, 1), 500));
        h.expire(1_000);
        assert_eq!((h.pending(), h.counts.expired, h.counts.dropped), (1, 1, 0));
        h.expire(1_500);
        assert_eq!((h.pending(), h.counts.expired), (0, 2));
        assert!(h.targets().is_empty());
    }

    #[test]
    fn undelivered_hints_go_back_in_order() {
        let mut h = HintStore::new(limits());
        for v in 1..=3 {
            assert!(h.add(2, b"k", item(v, 1), 0));
        }
        let batch = h.take(2, 2);
        assert_eq!(h.pending(), 1);
        h.put_back(2, batch);
        let order: Vec<u64> = h.take(2, 10).iter().map(|x| x.state.version()).collect();
        assert_eq!(order, vec![1, 2, 3]);
    }
}
