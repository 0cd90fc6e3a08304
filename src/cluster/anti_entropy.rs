//! Anti-entropy: replicas compare hash trees and exchange only the keys they
//! differ on. Sans-IO: the state machines here take what a peer answered
//! (and `now`) and say what to ask next; `coordinator` moves the messages.
//!
//! One round, for a batch of partitions shared with one peer:
//!
//! ```text
//!  roots ──differ──▶ level-1 nodes ──differ──▶ leaves ──differ──▶ (key, version) lists
//!                                                                   │
//!        pull the keys the peer has newer, push the keys we have newer ◀┘
//! ```
//!
//! Each level asks only for the children of nodes that differed, so replicas
//! that agree cost one message of roots per round. A round stops early when
//! it has handled its share of keys; what is left still differs next cycle.
//! Of every pair of replicas the one with the lower id starts the exchange,
//! so each pair compares once per cycle, and an exchange goes both ways.

use std::collections::BTreeMap;

use crate::cluster::ring::{NodeId, Ring};
use crate::store::KeyVersion;
use crate::store::merkle::{DEPTH, TreeNode};

/// Anti-entropy's settings (`[cluster]` `anti_entropy_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Milliseconds between rounds.
    pub interval_ms: u64,
    /// Partitions a round compares with each peer.
    pub partitions_per_round: usize,
    /// Keys a round lists, pulls or pushes with each peer.
    pub keys_per_round: usize,
    /// Bytes per second sent to and asked of each peer.
    pub bytes_per_sec: u64,
}

impl Settings {
    /// `None` with anti-entropy off.
    pub fn of(config: &crate::config::ClusterConfig) -> Option<Self> {
        config.anti_entropy.then_some(Self {
            interval_ms: config.anti_entropy_interval_ms,
            partitions_per_round: config.anti_entropy_partitions_per_round,
            keys_per_round: config.anti_entropy_keys_per_round,
            bytes_per_sec: config.anti_entropy_bytes_per_sec,
        })
    }
}

/// What to do next in an [`Exchange`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask the peer for the hashes of these nodes (all on one level).
    Hashes(Vec<TreeNode>),
    /// List these leaves here, whole leaves up to `max_entries` entries
    /// (at least one leaf), then ask the peer for the same leaves.
    Leaves {
        /// The leaves, as (partition, leaf index), in order.
        leaves: Vec<(u32, u16)>,
        /// The most entries to list, summed over leaves.
        max_entries: usize,
    },
    /// Fetch `pull` from the peer and apply it here; send `push` to it.
    Transfer {
        /// Keys the peer holds newer, or that only the peer holds.
        pull: Vec<Vec<u8>>,
        /// Keys this node holds newer, or that only this node holds.
        push: Vec<Vec<u8>>,
    },
    /// The round is over for this peer.
    Done,
}

/// What one exchange found and did, for the stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Partitions whose roots were compared.
    pub partitions_compared: u64,
    /// Partitions whose roots differed.
    pub partitions_differing: u64,
    /// Leaves that differed.
    pub leaves_differing: u64,
    /// (key, version) entries listed, counting the longer of the two
    /// sides' lists.
    pub keys_listed: u64,
    /// Keys found newer on, or only on, the peer: to fetch and apply here.
    pub keys_pulled: u64,
    /// Keys found newer on, or only on, this node: to send to the peer.
    pub keys_pushed: u64,
}

/// One round's comparison of a batch of partitions with one peer.
#[derive(Debug)]
pub struct Exchange {
    /// Differing leaves not listed yet, in order.
    leaves: Vec<(u32, u16)>,
    /// Entries this round may still list (on either side; at most as many
    /// keys move).
    keys_left: usize,
    /// Partitions whose roots differed.
    pub differing: Vec<u32>,
    /// What the exchange has found and moved so far.
    pub outcome: Outcome,
}

impl Exchange {
    /// Starts a round over `partitions`; the first step asks for their roots.
    pub fn start(partitions: &[u32], keys_per_round: usize) -> (Self, Step) {
        let ex = Self {
            leaves: Vec::new(),
            keys_left: keys_per_round,
            differing: Vec::new(),
            outcome: Outcome {
                partitions_compared: partitions.len() as u64,
                ..Outcome::default()
            },
        };
        let roots = partitions.iter().map(|p| TreeNode::root(*p)).collect();
        let step = if partitions.is_empty() {
            Step::Done
        } else {
            Step::Hashes(roots)
        };
        (ex, step)
    }

    /// The peer answered `theirs` for `asked`, where we hold `ours`:
    /// descend into the nodes that differ.
    ///
    /// # Panics
    /// If the three lists differ in length (the driver checks the peer's).
    pub fn on_hashes(&mut self, asked: &[TreeNode], ours: &[u64], theirs: &[u64]) -> Step {
        assert!(asked.len() == ours.len() && ours.len() == theirs.len());
        let differing: Vec<TreeNode> = asked
            .iter()
            .zip(ours.iter().zip(theirs))
            .filter(|(_, (o, t))| o != t)
            .map(|(n, _)| *n)
            .collect();
        if differing.is_empty() {
            return self.next_leaves();
        }
        match differing[0].level {
            0 => {
                self.outcome.partitions_differing += differing.len() as u64;
                self.differing = differing.iter().map(|n| n.partition).collect();
            }
            DEPTH => self.outcome.leaves_differing += differing.len() as u64,
            _ => {}
        }
        if differing[0].is_leaf() {
            self.leaves
                .extend(differing.iter().map(|n| (n.partition, n.index)));
            return self.next_leaves();
        }
        Step::Hashes(differing.iter().flat_map(|n| n.children()).collect())
    }

    /// Lists the next differing leaves, or ends the round.
    fn next_leaves(&mut self) -> Step {
        if self.leaves.is_empty() || self.keys_left == 0 {
            return Step::Done;
        }
        Step::Leaves {
            leaves: self.leaves.clone(),
            max_entries: self.keys_left,
        }
    }

    /// `ours` lists a prefix of the leaves asked for here, one list per
    /// leaf, and `theirs` the peer's lists of a prefix of those: says which
    /// keys to move.
    pub fn on_entries(
        &mut self,
        mut ours: Vec<Vec<KeyVersion>>,
        theirs: Vec<Vec<KeyVersion>>,
    ) -> Step {
        let covered = theirs.len().min(ours.len()).min(self.leaves.len());
        self.leaves.drain(..covered);
        ours.truncate(covered);
        let ours: Vec<KeyVersion> = ours.into_iter().flatten().collect();
        let theirs: Vec<KeyVersion> = theirs.into_iter().take(covered).flatten().collect();
        let listed = theirs.len().max(ours.len());
        self.outcome.keys_listed += listed as u64;
        // Listing is the round's work; what moves is at most what was listed.
        self.keys_left = self.keys_left.saturating_sub(listed);
        let (pull, push) = diff_entries(ours, theirs);
        self.outcome.keys_pulled += pull.len() as u64;
        self.outcome.keys_pushed += push.len() as u64;
        if covered == 0 {
            // The peer listed nothing: stop rather than ask forever.
            self.leaves.clear();
        }
        if pull.is_empty() && push.is_empty() {
            return self.next_leaves();
        }
        Step::Transfer { pull, push }
    }

    /// The transfer finished: list more leaves, or end the round.
    pub fn on_transferred(&mut self) -> Step {
        self.next_leaves()
    }
}

/// Keys the peer holds newer than we do or we lack (`pull`), and keys we
/// hold newer or the peer lacks (`push`). A key listed twice (a walk that
/// saw an index grow) counts at its newest version.
pub fn diff_entries(
    ours: Vec<KeyVersion>,
    theirs: Vec<KeyVersion>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let newest = |list: Vec<KeyVersion>| {
        let mut m: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for (k, v) in list {
            let e = m.entry(k).or_insert(v);
            *e = (*e).max(v);
        }
        m
    };
    let (mut ours, theirs) = (newest(ours), newest(theirs));
    let mut pull = Vec::new();
    let mut push = Vec::new();
    for (key, v) in theirs {
        match ours.remove(&key) {
            Some(o) if o > v => push.push(key),
            Some(o) if o == v => {}
            _ => pull.push(key),
        }
    }
    push.extend(ours.into_keys());
    (pull, push)
}

/// Cycles a futile comparison is put off for, at most: `2^FUTILE_LEVEL_MAX`.
pub const FUTILE_BACKOFF_CYCLES_MAX: u64 = 1 << FUTILE_LEVEL_MAX;
const FUTILE_LEVEL_MAX: u32 = 6;

/// Which partitions to compare with which peer, round after round: walks the
/// partitions this node holds, a batch per round, pairing each with the
/// replicas whose id is above this node's.
///
/// A comparison is *futile* when the replicas differ but every key that
/// should have moved was turned away for lack of free memory (a full cache
/// whose replicas evicted different keys). Such a pair is put off for 2, 4,
/// 8 … up to [`FUTILE_BACKOFF_CYCLES_MAX`] cycles, so a cache under memory
/// pressure does not resend the same keys every cycle; any comparison that
/// moves a key, or finds agreement, ends the backoff.
#[derive(Debug)]
pub struct Schedule {
    /// Per partition this node holds: the peers it compares it with.
    held: Vec<(u32, Vec<NodeId>)>,
    cursor: usize,
    /// Full passes over `held` so far.
    cycle: u64,
    /// (peer, partition) → (backoff level, first cycle to compare again).
    futile: BTreeMap<(NodeId, u32), (u32, u64)>,
}

impl Schedule {
    /// The schedule for node `me`: the partitions it holds that have a
    /// replica with a higher id, starting at the first.
    pub fn new(ring: &Ring, me: NodeId) -> Self {
        let held = ring
            .partitions_of(me)
            .filter_map(|(p, _)| {
                let peers: Vec<NodeId> = ring
                    .preference_list(p)
                    .iter()
                    .copied()
                    .filter(|n| *n > me)
                    .collect();
                (!peers.is_empty()).then_some((p, peers))
            })
            .collect();
        Self {
            held,
            cursor: 0,
            cycle: 0,
            futile: BTreeMap::new(),
        }
    }

    /// Partitions this node starts exchanges for.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether this node starts no exchanges (it shares no partition with
    /// a higher-id node).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The next `batch` partitions, grouped by peer, leaving out pairs put
    /// off as futile.
    pub fn next_round(&mut self, batch: usize) -> BTreeMap<NodeId, Vec<u32>> {
        let mut out: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for _ in 0..batch.min(self.held.len()) {
            let (p, peers) = &self.held[self.cursor];
            for peer in peers {
                let put_off = self
                    .futile
                    .get(&(*peer, *p))
                    .is_some_and(|(_, until)| *until > self.cycle);
                if !put_off {
                    out.entry(*peer).or_default().push(*p);
                }
            }
            self.cursor += 1;
            if self.cursor == self.held.len() {
                self.cursor = 0;
                self.cycle += 1;
            }
        }
        out
    }

    /// The comparison of `partition` with `peer` was futile: put it off.
    pub fn futile(&mut self, peer: NodeId, partition: u32) {
        let e = self.futile.entry((peer, partition)).or_insert((0, 0));
        e.0 = (e.0 + 1).min(FUTILE_LEVEL_MAX);
        e.1 = self.cycle + (1 << e.0);
    }

    /// The comparison of `partition` with `peer` agreed or moved keys.
    pub fn fruitful(&mut self, peer: NodeId, partition: u32) {
        self.futile.remove(&(peer, partition));
    }
}

/// A token bucket of bytes: anti-entropy's bandwidth bound. Messages are
/// charged when sent or received, which may run the bucket into debt (an
/// answer's size is known only when it arrives); the next message waits
/// until the debt is paid.
#[derive(Debug)]
pub struct Bandwidth {
    bytes_per_sec: u64,
    /// Tokens, in bytes; negative is debt.
    tokens: i64,
    last_ms: u64,
}

impl Bandwidth {
    /// A full bucket of one second's bytes.
    pub fn new(bytes_per_sec: u64, now_ms: u64) -> Self {
        assert!(bytes_per_sec > 0, "a bandwidth of zero never sends");
        Self {
            bytes_per_sec,
            tokens: i64::try_from(bytes_per_sec).unwrap_or(i64::MAX),
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let earned = u128::from(elapsed) * u128::from(self.bytes_per_sec) / 1000;
        let cap = i64::try_from(self.bytes_per_sec).unwrap_or(i64::MAX);
        let earned = i64::try_from(earned).unwrap_or(i64::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(cap);
    }

    /// Charges `bytes` sent or received.
    pub fn charge(&mut self, bytes: u64, now_ms: u64) {
        self.refill(now_ms);
        self.tokens = self
            .tokens
            .saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Milliseconds to wait before the next message (0: now).
    pub fn wait_ms(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        if self.tokens >= 0 {
            return 0;
        }
        let debt = self.tokens.unsigned_abs();
        (u128::from(debt) * 1000)
            .div_ceil(u128::from(self.bytes_per_sec))
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::merkle::{Trees, leaf_of};

    /// Runs an exchange between two in-memory replicas, the way the driver
    /// does, and applies the transfers; returns the outcome and the number
    /// of messages.
    fn run(
        a: &mut BTreeMap<Vec<u8>, u64>,
        b: &mut BTreeMap<Vec<u8>, u64>,
        partitions: u32,
        keys_per_round: usize,
    ) -> (Outcome, usize) {
        let tree = |m: &BTreeMap<Vec<u8>, u64>| {
            let t = Trees::new(partitions);
            for (k, v) in m {
                t.toggle(crate::store::key_hash(k), *v);
            }
            t
        };
        let list = |m: &BTreeMap<Vec<u8>, u64>, leaves: &[(u32, u16)], max: usize| {
            let mut out: Vec<Vec<KeyVersion>> = Vec::new();
            let mut total = 0;
            for l in leaves {
                let entries: Vec<KeyVersion> = m
                    .iter()
                    .filter(|(k, _)| {
                        let h = crate::store::key_hash(k);
                        (
                            crate::cluster::ring::partition_of_hash(h, partitions),
                            leaf_of(h),
                        ) == *l
                    })
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                total += entries.len();
                if !out.is_empty() && total > max {
                    break;
                }
                out.push(entries);
            }
            out
        };
        let all: Vec<u32> = (0..partitions).collect();
        let (mut ex, mut step) = Exchange::start(&all, keys_per_round);
        let mut messages = 0;
        loop {
            messages += 1;
            assert!(messages < 1000, "an exchange must end");
            step = match step {
                Step::Hashes(nodes) => {
                    let (ta, tb) = (tree(a), tree(b));
                    let ours: Vec<u64> = nodes.iter().map(|n| ta.hash(*n)).collect();
                    let theirs: Vec<u64> = nodes.iter().map(|n| tb.hash(*n)).collect();
                    ex.on_hashes(&nodes, &ours, &theirs)
                }
                Step::Leaves {
                    leaves,
                    max_entries,
                } => {
                    // Each side answers whole leaves within max_entries.
                    let ours = list(a, &leaves, max_entries);
                    let theirs = list(b, &leaves[..ours.len()], max_entries);
                    ex.on_entries(ours, theirs)
                }
                Step::Transfer { pull, push } => {
                    for k in pull {
                        let v = b[&k];
                        let e = a.entry(k).or_insert(v);
                        *e = (*e).max(v);
                    }
                    for k in push {
                        let v = a[&k];
                        let e = b.entry(k).or_insert(v);
                        *e = (*e).max(v);
                    }
                    ex.on_transferred()
                }
                Step::Done => return (ex.outcome, messages),
            };
        }
    }

    fn keys(range: std::ops::Range<u64>, version: u64) -> BTreeMap<Vec<u8>, u64> {
        range
            .map(|i| (format!("key:{i}").into_bytes(), version))
            .collect()
    }

    #[test]
    fn agreeing_replicas_exchange_roots_only() {
        let mut a = keys(0..2000, 5);
        let mut b = a.clone();
        let (out, messages) = run(&mut a, &mut b, 64, 10_000);
        assert_eq!(out.partitions_differing, 0);
        assert_eq!(messages, 2, "one message of roots, then done");
    }

    #[test]
    fn replicas_converge_to_the_newest_version_of_every_key() {
        let mut a = keys(0..3000, 5);
        let mut b = keys(1000..4000, 5);
        // Newer on a for some shared keys, newer on b for others.
        for i in 1000..1100 {
            a.insert(format!("key:{i}").into_bytes(), 9);
        }
        for i in 1100..1200 {
            b.insert(format!("key:{i}").into_bytes(), 9);
        }
        let mut want = a.clone();
        for (k, v) in &b {
            let e = want.entry(k.clone()).or_insert(*v);
            *e = (*e).max(*v);
        }
        let (out, _) = run(&mut a, &mut b, 64, usize::MAX);
        assert_eq!(a, want);
        assert_eq!(b, want);
        assert_eq!(out.keys_pulled, 1000 + 100);
        assert_eq!(out.keys_pushed, 1000 + 100);
        assert!(out.keys_listed < 4000 + 500, "listed {}", out.keys_listed);
        let (again, messages) = run(&mut a, &mut b, 64, usize::MAX);
        assert_eq!((again.partitions_differing, messages), (0, 2));
    }

    #[test]
    fn one_differing_key_moves_alone() {
        let mut a = keys(0..5000, 5);
        let mut b = a.clone();
        b.insert(b"key:42".to_vec(), 6);
        let (out, messages) = run(&mut a, &mut b, 64, usize::MAX);
        assert_eq!(out.partitions_differing, 1);
        assert_eq!(out.leaves_differing, 1);
        assert_eq!((out.keys_pulled, out.keys_pushed), (1, 0));
        assert!(out.keys_listed < 10, "listed {}", out.keys_listed);
        // roots, level 1, leaves, listing, transfer, done.
        assert_eq!(messages, 6);
        assert_eq!(a, b);
    }

    #[test]
    fn a_round_stops_at_its_key_budget_and_later_rounds_finish() {
        let mut a = keys(0..4000, 5);
        let mut b = BTreeMap::new();
        let mut rounds = 0;
        loop {
            let (out, _) = run(&mut a, &mut b, 16, 500);
            // A leaf is listed whole, so a round may pass its budget by
            // one leaf's keys (a few here).
            assert!(out.keys_listed <= 500 + 32, "{out:?}");
            rounds += 1;
            if out.partitions_differing == 0 {
                break;
            }
            assert!(rounds < 100, "no convergence");
        }
        assert_eq!(a, b);
        assert!(rounds >= 8, "4000 keys at 500 a round took {rounds} rounds");
    }

    #[test]
    fn diff_takes_the_newest_of_duplicates() {
        let ours = vec![(b"a".to_vec(), 1), (b"a".to_vec(), 3), (b"b".to_vec(), 2)];
        let theirs = vec![(b"a".to_vec(), 2), (b"c".to_vec(), 1), (b"b".to_vec(), 2)];
        let (pull, push) = diff_entries(ours, theirs);
        assert_eq!(pull, vec![b"c".to_vec()]);
        assert_eq!(push, vec![b"a".to_vec()]);
    }

    #[test]
    fn each_pair_of_replicas_compares_once_per_cycle() {
        let ring = Ring::new(&[1, 2, 3, 4, 5], 64, 3);
        let mut pairs: BTreeMap<(u32, NodeId, NodeId), usize> = BTreeMap::new();
        for me in 1..=5 {
            let mut s = Schedule::new(&ring, me);
            let n = s.len();
            for (peer, parts) in s.next_round(n) {
                for p in parts {
                    *pairs.entry((p, me, peer)).or_default() += 1;
                }
            }
        }
        // Every partition has 3 replicas: 3 pairs, each once.
        assert_eq!(pairs.len(), 64 * 3);
        assert!(pairs.values().all(|c| *c == 1));
        for ((p, a, b), _) in pairs {
            assert!(a < b);
            let pref = ring.preference_list(p);
            assert!(pref.contains(&a) && pref.contains(&b));
        }
    }

    #[test]
    fn futile_comparisons_back_off_and_a_fruitful_one_ends_it() {
        let ring = Ring::new(&[1, 2], 8, 2);
        let mut s = Schedule::new(&ring, 1);
        assert_eq!(s.len(), 8);
        let count = |s: &mut Schedule| s.next_round(8).get(&2).map_or(0, Vec::len);
        assert_eq!(count(&mut s), 8);
        s.futile(2, 3);
        // Put off for 2 cycles, then back.
        assert_eq!(count(&mut s), 7);
        assert_eq!(count(&mut s), 7);
        assert_eq!(count(&mut s), 8);
        // Futile again: 4 cycles; the backoff doubles up to its cap.
        s.futile(2, 3);
        let skipped = (0..10).take_while(|_| count(&mut s) == 7).count();
        assert_eq!(skipped, 4);
        for _ in 0..20 {
            s.futile(2, 3);
        }
        let skipped = (0..200).take_while(|_| count(&mut s) == 7).count() as u64;
        assert_eq!(skipped, FUTILE_BACKOFF_CYCLES_MAX);
        s.futile(2, 3);
        s.fruitful(2, 3);
        assert_eq!(count(&mut s), 8);
    }

    #[test]
    fn bandwidth_waits_out_its_debt() {
        let mut bw = Bandwidth::new(1000, 0);
        assert_eq!(bw.wait_ms(0), 0);
        bw.charge(3000, 0);
        // 2000 bytes of debt at 1000 bytes/s.
        assert_eq!(bw.wait_ms(0), 2000);
        assert_eq!(bw.wait_ms(1500), 500);
        assert_eq!(bw.wait_ms(2000), 0);
        // Never more than a second's worth saved up.
        assert_eq!(bw.wait_ms(60_000), 0);
        bw.charge(1500, 60_000);
        assert_eq!(bw.wait_ms(60_000), 500);
    }
}
