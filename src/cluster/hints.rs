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
//!
//! Hints cost what they say. A target's hints are encoded back to back in
//! chunks of [`CHUNK_BYTES`], and the bytes counted are the chunks held.
//! Held one by one, as a key and a value each, 100,000 hints of 100-byte
//! values were counted at 17 MB while they fragmented the heap: the live
//! nodes of a cluster with one replica down reached 400 MiB of RSS at
//! `-m 64`, and kept it after delivery (glibc could neither reuse nor return
//! the holes between the small, long-lived hint blocks). Chunks are large
//! blocks that go back whole once their hints are delivered.

use std::collections::{BTreeMap, VecDeque};

use super::ring::NodeId;
use crate::store::KeyState;

/// Bytes of one chunk of encoded hints (a hint larger than this gets a
/// chunk of its own size).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Bounds of a [`HintStore`] (`[cluster]` `hint_*` and `hints_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintLimits {
    /// Hints held per target node; 0 turns hints off.
    pub per_target_max: usize,
    /// Bytes held over all targets: the chunks their hints are encoded in.
    pub bytes_max: usize,
    /// Milliseconds a hint is kept before it expires undelivered.
    pub window_ms: u64,
}

/// One write held for a replica: the key's state to apply there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hint {
    /// The key written.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Its state after the write, applied on delivery (highest version wins).
    pub state: KeyState,
    /// Unix ms after which the hint is dropped undelivered.
    pub expires_at_ms: u64,
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

/// One target's hints, oldest first: each a 4-byte length and its postcard
/// encoding, back to back in chunks.
#[derive(Debug, Default)]
struct Queue {
    /// Each chunk with where its oldest hint starts.
    chunks: VecDeque<(usize, Vec<u8>)>,
    /// The expiry (unix ms) of every hint held, oldest first, so expiry and
    /// the oldest-first choice read no encoding.
    expiries: VecDeque<u64>,
}

/// Bytes counted per hint for its place in [`Queue::expiries`] (a slot and
/// the room a growing deque keeps).
const INDEX_BYTES_PER_HINT: usize = 16;

impl Queue {
    fn len(&self) -> usize {
        self.expiries.len()
    }

    /// Bytes held: the chunks' capacity and the index.
    fn bytes(&self) -> usize {
        self.chunks.iter().map(|(_, c)| c.capacity()).sum::<usize>()
            + self.len() * INDEX_BYTES_PER_HINT
    }

    /// What appending a record of `len` bytes adds to [`Queue::bytes`],
    /// with new chunks of `chunk` bytes.
    fn growth(&self, len: usize, chunk: usize) -> usize {
        let need = 4 + len;
        let fits = self
            .chunks
            .back()
            .is_some_and(|(_, c)| c.capacity() - c.len() >= need);
        INDEX_BYTES_PER_HINT + if fits { 0 } else { need.max(chunk) }
    }

    /// When the oldest hint expires.
    fn front_expiry(&self) -> Option<u64> {
        self.expiries.front().copied()
    }

    /// Appends `record` (an encoded hint) expiring at `expires_at_ms`, in
    /// a new chunk of `chunk` bytes if the last is full.
    fn push_back(&mut self, record: &[u8], expires_at_ms: u64, chunk: usize) {
        if self.growth(record.len(), chunk) > INDEX_BYTES_PER_HINT {
            self.chunks
                .push_back((0, Vec::with_capacity((4 + record.len()).max(chunk))));
        }
        let (_, chunk) = self.chunks.back_mut().expect("a chunk with room");
        put_record(chunk, record);
        self.expiries.push_back(expires_at_ms);
    }

    /// Puts `hints`, oldest first, in front of every hint held, in a chunk
    /// of their own.
    fn push_front(&mut self, hints: &[(Vec<u8>, u64)]) {
        let mut chunk = Vec::with_capacity(hints.iter().map(|(r, _)| 4 + r.len()).sum());
        for (record, _) in hints {
            put_record(&mut chunk, record);
        }
        self.chunks.push_front((0, chunk));
        for &(_, expires_at_ms) in hints.iter().rev() {
            self.expiries.push_front(expires_at_ms);
        }
    }

    /// Removes and decodes the oldest hint.
    fn pop_front(&mut self) -> Option<Hint> {
        self.expiries.pop_front()?;
        let (at, chunk) = self.chunks.front_mut().expect("a hint is held");
        let len = u32::from_le_bytes(chunk[*at..*at + 4].try_into().expect("4 bytes")) as usize;
        let hint = postcard::from_bytes(&chunk[*at + 4..*at + 4 + len])
            .expect("a hint this store encoded decodes");
        *at += 4 + len;
        if *at == chunk.len() && (self.chunks.len() > 1 || self.expiries.is_empty()) {
            // Done with this chunk: it goes back whole.
            self.chunks.pop_front();
        }
        if self.expiries.is_empty() {
            *self = Self::default();
        }
        Some(hint)
    }
}

/// Appends one record: its length, then its bytes.
fn put_record(chunk: &mut Vec<u8>, record: &[u8]) {
    let len = u32::try_from(record.len()).expect("a hint under 4 GiB");
    chunk.extend_from_slice(&len.to_le_bytes());
    chunk.extend_from_slice(record);
}

/// Hints per target node, oldest first, within [`HintLimits`].
#[derive(Debug)]
pub struct HintStore {
    limits: HintLimits,
    by_target: BTreeMap<NodeId, Queue>,
    /// Counters since the store was made.
    pub counts: HintCounts,
}

impl HintStore {
    /// An empty store with these bounds.
    pub fn new(limits: HintLimits) -> Self {
        Self {
            limits,
            by_target: BTreeMap::new(),
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
        self.push(target, &hint)
    }

    /// Appends `hint` to `target`'s queue within the bounds.
    fn push(&mut self, target: NodeId, hint: &Hint) -> bool {
        let record = postcard::to_allocvec(hint).expect("a hint encodes");
        if 4 + record.len() + INDEX_BYTES_PER_HINT > self.limits.bytes_max
            || self.limits.per_target_max == 0
        {
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
        // Make room for what this push adds (a new chunk, if the last is
        // full).
        let chunk = self.chunk_bytes();
        let growth = |store: &Self| {
            store.by_target.get(&target).map_or_else(
                || Queue::default().growth(record.len(), chunk),
                |q| q.growth(record.len(), chunk),
            )
        };
        while self.pending() > 0 && self.bytes() + growth(self) > self.limits.bytes_max {
            let oldest = self
                .by_target
                .iter()
                .filter_map(|(t, q)| q.front_expiry().map(|e| (e, *t)))
                .min()
                .map(|(_, t)| t)
                .expect("hints are held");
            self.drop_oldest_of(oldest);
        }
        self.counts.stored += 1;
        self.by_target
            .entry(target)
            .or_default()
            .push_back(&record, hint.expires_at_ms, chunk);
        true
    }

    /// Bytes of a new chunk: [`CHUNK_BYTES`], or a quarter of the budget if
    /// that is smaller.
    fn chunk_bytes(&self) -> usize {
        CHUNK_BYTES.min(self.limits.bytes_max / 4).max(1)
    }

    fn drop_oldest_of(&mut self, target: NodeId) {
        if let Some(q) = self.by_target.get_mut(&target) {
            if q.pop_front().is_some() {
                self.counts.dropped += 1;
            }
            if q.len() == 0 {
                self.by_target.remove(&target);
            }
        }
    }

    /// Drops every hint past its window.
    pub fn expire(&mut self, now_ms: u64) {
        let targets: Vec<NodeId> = self.by_target.keys().copied().collect();
        for t in targets {
            while self
                .by_target
                .get(&t)
                .and_then(Queue::front_expiry)
                .is_some_and(|e| e <= now_ms)
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
        let batch: Vec<Hint> = std::iter::from_fn(|| q.pop_front()).take(max).collect();
        if q.len() == 0 {
            self.by_target.remove(&target);
        }
        batch
    }

    /// Returns undelivered hints to the front of `target`'s queue, oldest
    /// first, within the bounds.
    pub fn put_back(&mut self, target: NodeId, hints: Vec<Hint>) {
        if hints.is_empty() {
            return;
        }
        let records: Vec<(Vec<u8>, u64)> = hints
            .iter()
            .map(|h| {
                (
                    postcard::to_allocvec(h).expect("a hint encodes"),
                    h.expires_at_ms,
                )
            })
            .collect();
        self.by_target
            .entry(target)
            .or_default()
            .push_front(&records);
        while self.by_target.get(&target).is_some_and(|q| {
            q.len() > self.limits.per_target_max || self.bytes() > self.limits.bytes_max
        }) {
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
        self.by_target.values().map(Queue::len).sum()
    }

    /// Bytes held, as counted against [`HintLimits::bytes_max`]: the
    /// chunks the hints are encoded in, and their index.
    pub fn bytes(&self) -> usize {
        self.by_target.values().map(Queue::bytes).sum()
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
        // Chunks of 2 KiB: two hints of 1,000-byte values each.
        let mut h = HintStore::new(HintLimits {
            per_target_max: 100,
            bytes_max: 8 * 1024,
            window_ms: 1_000,
        });
        for v in 1..=12 {
            assert!(h.add(
                2 + (v % 2) as u16,
                format!("k{v}").as_bytes(),
                item(v, 1000),
                v
            ));
            assert!(h.bytes() <= 8 * 1024, "{} bytes held", h.bytes());
        }
        assert!(h.counts.dropped >= 4, "{:?}", h.counts);
        assert_eq!(h.pending() as u64 + h.counts.dropped, 12);
        // The oldest went first, whatever their target.
        let mut kept: Vec<u64> = h.take(2, 100).iter().map(|x| x.state.version()).collect();
        kept.extend(h.take(3, 100).iter().map(|x| x.state.version()));
        kept.sort();
        let first_kept = 13 - kept.len() as u64;
        assert_eq!(kept, (first_kept..=12).collect::<Vec<_>>());
        assert_eq!(h.bytes(), 0, "every chunk given back");
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

    /// Issue 16, row 10: hints are counted as the chunks they are encoded
    /// in, which go back whole once delivered.
    #[test]
    fn hints_are_counted_as_the_chunks_that_hold_them() {
        let mut h = HintStore::new(HintLimits {
            per_target_max: 100_000,
            bytes_max: 64 << 20,
            window_ms: 1_000,
        });
        for v in 0..10_000u64 {
            assert!(h.add(2, format!("key:{v}").as_bytes(), item(v, 100), 0));
        }
        let chunks = h.bytes() - 10_000 * INDEX_BYTES_PER_HINT;
        assert_eq!(chunks % CHUNK_BYTES, 0, "{chunks}");
        // About 130 bytes a hint: 4 chunks of 256 KiB for 10,000.
        assert!((4..=6).contains(&(chunks / CHUNK_BYTES)), "{chunks}");
        let batch = h.take(2, 5_000);
        assert_eq!(batch.len(), 5_000);
        assert!(h.bytes() < chunks, "delivered chunks go back");
        h.put_back(2, batch);
        let order: Vec<u64> = h
            .take(2, 100_000)
            .iter()
            .map(|x| x.state.version())
            .collect();
        assert_eq!(order, (0..10_000).collect::<Vec<_>>());
        assert_eq!(h.bytes(), 0);
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
