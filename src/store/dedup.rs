//! Request-id records: what makes a retried mutation safe.
//!
//! A client that lost a reply cannot tell whether its `incr` ran, so it
//! retries with the same request id. The item remembers the ids of the
//! mutations that produced it, with their results, in a small area after its
//! value; a mutation whose id is already there is not applied again and
//! answers with the recorded result. The area belongs to the item: it is
//! charged to the memory limit with it, replicated with it (so a retry that
//! lands on another replica, or on a new primary after a failover, finds
//! it), and goes when the item is evicted, expires or is flushed. A delete
//! that carries an id leaves a tombstone that keeps the area.
//!
//! Bounds: a record older than the dedup window is dropped at the next write
//! of its key and ignored before that; a key keeps its newest
//! `records_max` records (a retry that arrives after that many other
//! id-carrying mutations of the same key is applied again, and the drop is
//! counted).
//!
//! Encoding, little-endian, records oldest first:
//!
//! ```text
//! | id_len u8 | id (1..=32) | at_ms u64 | kind u8 | number u64 | cas u64 |
//! ```

use crate::limits::{REQUEST_ID_BYTES_MAX, REQUEST_ID_RECORDS_PER_KEY_LIMIT};

/// Bytes of a record besides its id.
const FIXED_BYTES: usize = 1 + 8 + 1 + 8 + 8;

/// The largest area an item can carry; it fits the header's `u16` length.
pub const AREA_BYTES_MAX: usize =
    REQUEST_ID_RECORDS_PER_KEY_LIMIT * (FIXED_BYTES + REQUEST_ID_BYTES_MAX);
const _: () = assert!(AREA_BYTES_MAX <= u16::MAX as usize);

/// What a recorded mutation answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A store (`ms` in any mode) that stored, at this CAS.
    Stored {
        /// The CAS the store produced.
        cas: u64,
    },
    /// A delete that deleted.
    Deleted,
    /// An `ma` that produced this number at this CAS (or created the item
    /// with it).
    Value {
        /// The number the item held after the `ma`.
        number: u64,
        /// The CAS the `ma` produced.
        cas: u64,
    },
}

impl Outcome {
    fn encode(self) -> (u8, u64, u64) {
        match self {
            Outcome::Stored { cas } => (1, 0, cas),
            Outcome::Deleted => (2, 0, 0),
            Outcome::Value { number, cas } => (3, number, cas),
        }
    }

    fn decode(kind: u8, number: u64, cas: u64) -> Option<Self> {
        match kind {
            1 => Some(Outcome::Stored { cas }),
            2 => Some(Outcome::Deleted),
            3 => Some(Outcome::Value { number, cas }),
            _ => None,
        }
    }
}

/// The dedup rules a store applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Records older than this are void.
    pub window_ms: u64,
    /// Records kept per key, newest first (at least 1).
    pub records_max: usize,
}

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The request id: 1 to 32 printable bytes, no comma ([`valid_id`]).
    pub id: &'a [u8],
    /// The primary's clock when it applied the mutation.
    pub at_ms: u64,
    /// What the mutation answered, to answer a retry with.
    pub outcome: Outcome,
}

/// Whether `id` is a valid request id: 1 to 32 printable ASCII bytes, no
/// comma (the `P` token separates its items with commas).
pub fn valid_id(id: &[u8]) -> bool {
    (1..=REQUEST_ID_BYTES_MAX).contains(&id.len())
        && id.iter().all(|&b| b.is_ascii_graphic() && b != b',')
}

/// The records of an area, oldest first. Stops at the first malformed
/// record: an area comes from this node or from a peer's replicated state,
/// and a bad one must not crash the node.
pub fn records(area: &[u8]) -> impl Iterator<Item = Record<'_>> {
    let mut rest = area;
    std::iter::from_fn(move || {
        let (&id_len, tail) = rest.split_first()?;
        let id_len = usize::from(id_len);
        if id_len == 0 || id_len > REQUEST_ID_BYTES_MAX || tail.len() < id_len + FIXED_BYTES - 1 {
            rest = &[];
            return None;
        }
        let (id, tail) = tail.split_at(id_len);
        let u64_at = |at: usize| u64::from_le_bytes(tail[at..at + 8].try_into().expect("8 bytes"));
        let (at_ms, kind, number, cas) = (u64_at(0), tail[8], u64_at(9), u64_at(17));
        rest = &tail[FIXED_BYTES - 1..];
        let Some(outcome) = Outcome::decode(kind, number, cas) else {
            rest = &[];
            return None;
        };
        Some(Record { id, at_ms, outcome })
    })
}

fn live(r: &Record<'_>, now_ms: u64, policy: Policy) -> bool {
    r.at_ms.saturating_add(policy.window_ms) > now_ms
}

/// The recorded outcome of the mutation `id`, if it is in the area and
/// inside the window.
pub fn find(area: &[u8], id: &[u8], now_ms: u64, policy: Policy) -> Option<Outcome> {
    if area.is_empty() {
        return None;
    }
    records(area)
        .filter(|r| r.id == id && live(r, now_ms, policy))
        .last()
        .map(|r| r.outcome)
}

fn put(out: &mut Vec<u8>, r: &Record<'_>) {
    debug_assert!(valid_id(r.id));
    let (kind, number, cas) = r.outcome.encode();
    out.push(r.id.len() as u8);
    out.extend_from_slice(r.id);
    out.extend_from_slice(&r.at_ms.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(&cas.to_le_bytes());
}

/// What a new version of an item carries: the old area's records still in
/// the window, plus `new` (if any) as the newest, keeping at most
/// `records_max`. Returns the area and how many live records were dropped
/// for the per-key bound.
pub fn carry(old: &[u8], new: Option<Record<'_>>, now_ms: u64, policy: Policy) -> (Vec<u8>, usize) {
    if old.is_empty() && new.is_none() {
        return (Vec::new(), 0);
    }
    let kept: Vec<Record<'_>> = records(old)
        .filter(|r| live(r, now_ms, policy) && new.is_none_or(|n| n.id != r.id))
        .collect();
    let room = policy.records_max.max(1) - usize::from(new.is_some());
    let dropped = kept.len().saturating_sub(room);
    let mut out = Vec::new();
    for r in kept[dropped..].iter().chain(new.as_ref()) {
        put(&mut out, r);
    }
    debug_assert!(out.len() <= AREA_BYTES_MAX);
    (out, dropped)
}

/// The records of two states of one key, merged: every record of `newer`
/// still in the window (the winning state's history, already bounded when
/// it was written), then as many of `older`'s other live ids as there is
/// room for, newest by time, one per id. What replicas keep when states
/// meet, so that an id recorded on one copy is never lost to a newer copy
/// that did not carry it (a write through a primary that had not seen the
/// record). The winner's records go last, so the next write's [`carry`]
/// drops the loser's first.
///
/// Never by time alone: `at_ms` is each primary's own clock, and a record
/// written by a primary whose clock is behind the one that wrote the
/// loser's records would be the first to go (found in review: the id of
/// the command just applied was dropped, and its retry ran again).
/// Returns the area and how many live records the per-key bound dropped.
pub fn merge(newer: &[u8], older: &[u8], now_ms: u64, policy: Policy) -> (Vec<u8>, usize) {
    if older.is_empty() || newer == older {
        return (newer.to_vec(), 0);
    }
    let room = policy.records_max.max(1);
    let mut won: Vec<Record<'_>> = records(newer).filter(|r| live(r, now_ms, policy)).collect();
    // A peer with a larger bound may send more than this node keeps.
    let mut dropped = won.len().saturating_sub(room);
    won.drain(..dropped);
    let mut lost: Vec<Record<'_>> = records(older)
        .filter(|r| live(r, now_ms, policy) && !won.iter().any(|n| n.id == r.id))
        .collect();
    // Stable: records of equal time keep their order.
    lost.sort_by_key(|r| r.at_ms);
    let over = lost.len().saturating_sub(room - won.len());
    dropped += over;
    let mut out = Vec::new();
    for r in lost[over..].iter().chain(&won) {
        put(&mut out, r);
    }
    debug_assert!(out.len() <= AREA_BYTES_MAX);
    (out, dropped)
}

/// The area without the records stamped after `latest_ms`.
pub fn not_after(area: &[u8], latest_ms: u64) -> Vec<u8> {
    retain(area, |r| r.at_ms <= latest_ms)
}

/// The area without request `id`'s record.
pub fn without(area: &[u8], id: &[u8]) -> Vec<u8> {
    retain(area, |r| r.id != id)
}

/// The area without the records of mutations that produced the state at
/// `version` (their outcome's CAS is that version): what is left of a
/// state's records once the state itself is abandoned. A delete's record
/// names no CAS and stays.
pub fn without_made_at(area: &[u8], version: u64) -> Vec<u8> {
    retain(
        area,
        |r| !matches!(r.outcome, Outcome::Stored { cas } | Outcome::Value { cas, .. } if cas == version),
    )
}

/// The area with only the records `keep` accepts, in their order.
fn retain(area: &[u8], keep: impl Fn(&Record<'_>) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(area.len());
    for r in records(area).filter(|r| keep(r)) {
        put(&mut out, &r);
    }
    out
}

/// Whether an area decodes whole (a peer's replicated state is checked
/// before it is stored).
pub fn well_formed(area: &[u8]) -> bool {
    let mut len = 0;
    let mut count = 0;
    for r in records(area) {
        if !valid_id(r.id) {
            return false;
        }
        len += 1 + r.id.len() + FIXED_BYTES - 1;
        count += 1;
    }
    len == area.len() && count <= REQUEST_ID_RECORDS_PER_KEY_LIMIT
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: Policy = Policy {
        window_ms: 600_000,
        records_max: 4,
    };

    fn rec(id: &[u8], at_ms: u64, n: u64) -> Record<'_> {
        Record {
            id,
            at_ms,
            outcome: Outcome::Value {
                number: n,
                cas: n + 1,
            },
        }
    }

    #[test]
    fn ids_are_graphic_ascii_without_commas() {
        assert!(valid_id(b"a"));
        assert!(valid_id(&[b'z'; 32]));
        for bad in [&b""[..], &[b'z'; 33], b"a,b", b"a b", b"\x7f", b"\xc3\xa9"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_record_is_found_within_the_window_only() {
        let (area, _) = carry(&[], Some(rec(b"x", 1000, 5)), 1000, POLICY);
        assert_eq!(
            find(&area, b"x", 1000 + 599_999, POLICY),
            Some(Outcome::Value { number: 5, cas: 6 })
        );
        assert_eq!(find(&area, b"x", 1000 + 600_000, POLICY), None);
        assert_eq!(find(&area, b"y", 1000, POLICY), None);
    }

    #[test]
    fn expired_records_are_dropped_at_the_next_write() {
        let (area, _) = carry(&[], Some(rec(b"old", 0, 1)), 0, POLICY);
        let (area, dropped) = carry(&area, Some(rec(b"new", 700_000, 2)), 700_000, POLICY);
        assert_eq!(dropped, 0, "expired records are not counted as dropped");
        let ids: Vec<_> = records(&area).map(|r| r.id.to_vec()).collect();
        assert_eq!(ids, vec![b"new".to_vec()]);
    }

    #[test]
    fn malformed_areas_decode_to_a_prefix_and_never_panic() {
        let (area, _) = carry(&[], Some(rec(b"abc", 1, 1)), 1, POLICY);
        assert!(well_formed(&area));
        for cut in 0..area.len() {
            assert_eq!(records(&area[..cut]).count(), 0);
            assert_eq!(well_formed(&area[..cut]), cut == 0);
        }
        let mut bad_kind = area.clone();
        bad_kind[1 + 3 + 8] = 9;
        assert!(!well_formed(&bad_kind));
        assert_eq!(find(&bad_kind, b"abc", 1, POLICY), None);
    }

    #[test]
    fn merge_keeps_every_live_id_once_preferring_the_newer_state() {
        let (older, _) = carry(&[], Some(rec(b"a", 10, 1)), 10, POLICY);
        let (older, _) = carry(&older, Some(rec(b"b", 20, 2)), 20, POLICY);
        let (newer, _) = carry(&[], Some(rec(b"b", 30, 9)), 30, POLICY);
        let (newer, _) = carry(&newer, Some(rec(b"c", 40, 3)), 40, POLICY);
        let (merged, dropped) = merge(&newer, &older, 40, POLICY);
        assert_eq!(dropped, 0);
        assert!(well_formed(&merged));
        let got: Vec<_> = records(&merged).map(|r| (r.id.to_vec(), r.at_ms)).collect();
        assert_eq!(
            got,
            vec![
                (b"a".to_vec(), 10),
                (b"b".to_vec(), 30),
                (b"c".to_vec(), 40)
            ],
            "one record per id, the newer state's, oldest first"
        );
        assert_eq!(
            find(&merged, b"b", 40, POLICY),
            Some(Outcome::Value { number: 9, cas: 10 })
        );
        // Either side empty: the other as it is.
        assert_eq!(merge(&newer, &[], 40, POLICY).0, newer);
        assert_eq!(merge(&[], &older, 40, POLICY).0.len(), older.len());
    }

    #[test]
    fn merge_honours_the_window_and_the_per_key_bound() {
        let mut older = Vec::new();
        for (i, id) in [b"a", b"b", b"c"].into_iter().enumerate() {
            older = carry(&older, Some(rec(id, 100 * i as u64, i as u64)), 0, POLICY).0;
        }
        let mut newer = Vec::new();
        for (i, id) in [b"d", b"e", b"f"].into_iter().enumerate() {
            newer = carry(&newer, Some(rec(id, 1000 + i as u64, i as u64)), 0, POLICY).0;
        }
        // Six live ids, four kept: the newest by time.
        let (merged, dropped) = merge(&newer, &older, 2000, POLICY);
        assert_eq!(dropped, 2);
        let ids: Vec<_> = records(&merged).map(|r| r.id.to_vec()).collect();
        assert_eq!(
            ids,
            vec![b"c".to_vec(), b"d".to_vec(), b"e".to_vec(), b"f".to_vec()]
        );
        // Past the window of the older ones: only the newer survive.
        let (merged, _) = merge(&newer, &older, 600_250, POLICY);
        let ids: Vec<_> = records(&merged).map(|r| r.id.to_vec()).collect();
        assert_eq!(ids, vec![b"d".to_vec(), b"e".to_vec(), b"f".to_vec()]);
    }

    /// Found in review: `at_ms` is each primary's clock. A winning state
    /// written by a primary whose clock is behind the one that wrote the
    /// loser's records lost its newest record (the command it had just
    /// applied) to the bound, and that command's retry ran again.
    #[test]
    fn merge_keeps_the_winning_states_records_whatever_their_times() {
        let mut older = Vec::new();
        for (i, id) in [b"a", b"b", b"c", b"d"].into_iter().enumerate() {
            older = carry(&older, Some(rec(id, 5_000 + i as u64, i as u64)), 0, POLICY).0;
        }
        // The winner: `carry` on its primary already dropped "a" for "x",
        // stamped by a clock 3 s behind.
        let (newer, _) = carry(&older, Some(rec(b"x", 2_000, 9)), 2_000, POLICY);
        let (merged, dropped) = merge(&newer, &older, 5_100, POLICY);
        let ids: Vec<_> = records(&merged).map(|r| r.id.to_vec()).collect();
        assert_eq!(
            ids,
            vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec(), b"x".to_vec()]
        );
        assert_eq!(dropped, 1);
        assert!(find(&merged, b"x", 5_100, POLICY).is_some());
        // Room left over goes to the loser's newest.
        let (small, _) = carry(&[], Some(rec(b"x", 2_000, 9)), 2_000, POLICY);
        let (merged, dropped) = merge(&small, &older, 5_100, POLICY);
        let ids: Vec<_> = records(&merged).map(|r| r.id.to_vec()).collect();
        assert_eq!(
            ids,
            vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec(), b"x".to_vec()]
        );
        assert_eq!(dropped, 1);
    }

    #[test]
    fn areas_with_ids_a_request_could_not_carry_are_not_well_formed() {
        let (good, _) = carry(&[], Some(rec(b"ok", 1, 1)), 1, POLICY);
        assert!(well_formed(&good));
        // Same length, a comma in the id: decodes, but no parser made it.
        let mut bad = good.clone();
        bad[2] = b',';
        assert_eq!(records(&bad).count(), 1);
        assert!(!well_formed(&bad));
    }

    #[test]
    fn not_after_drops_records_stamped_past_a_time() {
        let (area, _) = carry(&[], Some(rec(b"now", 1_000, 1)), 1_000, POLICY);
        let (area, _) = carry(&area, Some(rec(b"future", u64::MAX, 2)), 1_000, POLICY);
        let kept: Vec<_> = records(&not_after(&area, 10_000))
            .map(|r| r.id.to_vec())
            .collect();
        assert_eq!(kept, vec![b"now".to_vec()]);
    }

    proptest! {
        /// Against a model: after any sequence of recorded mutations, the
        /// area holds exactly the newest `records_max` distinct live ids,
        /// each with its latest outcome, and fits its bound.
        #[test]
        fn carry_keeps_the_newest_live_records(
            ops in proptest::collection::vec((0u8..8, 0u64..400_000), 1..60),
            records_max in 1usize..6,
        ) {
            let policy = Policy { window_ms: 600_000, records_max };
            let mut area = Vec::new();
            let mut model: Vec<(Vec<u8>, u64, u64)> = Vec::new();
            let mut now = 0u64;
            for (i, (id, step)) in ops.into_iter().enumerate() {
                now += step;
                let id = vec![b'a' + id];
                let n = i as u64;
                let (next, dropped) = carry(&area, Some(rec(&id, now, n)), now, policy);
                area = next;
                model.retain(|(m, at, _)| *m != id && at + policy.window_ms > now);
                model.push((id, now, n));
                let over = model.len().saturating_sub(records_max);
                prop_assert_eq!(dropped, over);
                model.drain(..over);
                prop_assert!(well_formed(&area));
                prop_assert!(area.len() <= AREA_BYTES_MAX);
                let got: Vec<_> = records(&area)
                    .map(|r| (r.id.to_vec(), r.at_ms, match r.outcome {
                        Outcome::Value { number, .. } => number,
                        _ => unreachable!(),
                    }))
                    .collect();
                prop_assert_eq!(&got, &model);
                for (m, _, n) in &model {
                    prop_assert_eq!(
                        find(&area, m, now, policy),
                        Some(Outcome::Value { number: *n, cas: n + 1 })
                    );
                }
            }
        }

        /// Decoding arbitrary bytes never panics and never yields an
        /// invalid id.
        #[test]
        fn arbitrary_areas_are_harmless(area in proptest::collection::vec(any::<u8>(), 0..200)) {
            for r in records(&area) {
                prop_assert!((1..=REQUEST_ID_BYTES_MAX).contains(&r.id.len()));
            }
            let _ = well_formed(&area);
            let _ = find(&area, b"x", 0, POLICY);
        }
    }
}
