//! Anti-entropy's moving parts: the background task that runs
//! [`anti_entropy::Exchange`]s with peers, and the peer-side answers. The
//! decisions (what differs, what to move, how fast) are in
//! [`super::anti_entropy`]; this file only carries messages and touches the
//! store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tracing::{debug, info};

use super::anti_entropy::{Bandwidth, Exchange, Outcome, Schedule, Step};
use super::{Cluster, Local, PeerHandle};
use crate::cluster::message::{PeerRequest, PeerResponse};
use crate::cluster::transport::PeerState;
use crate::limits::{
    ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX, ANTI_ENTROPY_MESSAGE_BYTES_MAX,
    ANTI_ENTROPY_NODES_PER_MESSAGE_MAX,
};
use crate::store::merkle::{LEAVES, TreeNode};
use crate::store::{Applied, Fill, KeyState, KeyVersion, Store, valid_key};

/// Wire bytes charged per tree node asked for and answered (partition,
/// level, index, hash), and per listed entry beyond its key.
const TREE_NODE_WIRE_BYTES: u64 = 4 + 1 + 2 + 8;
const ENTRY_WIRE_BYTES: u64 = 8 + 2;

/// Keys in one pull or push message.
const KEYS_PER_MESSAGE_MAX: usize = ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX;

fn state_bytes(key: &[u8], state: &KeyState) -> usize {
    key.len() + 24 + state.payload_bytes()
}

/// Lists `leaves` from `store`, whole leaves up to `max_entries` (at least
/// one), a shard's worth at a time with a yield in between, so a long walk
/// does not hold up the connections sharing this thread.
async fn list_leaves(
    store: &Store,
    leaves: &[(u32, u16)],
    max_entries: usize,
) -> Vec<Vec<KeyVersion>> {
    let Some(trees) = store.trees() else {
        return Vec::new();
    };
    let partitions = trees.partitions();
    let mut out: Vec<Vec<KeyVersion>> = Vec::new();
    let mut listed = 0;
    let mut rest = leaves;
    while !rest.is_empty() {
        let shards = store.shards_of_partition(rest[0].0, partitions);
        let group = rest
            .iter()
            .take_while(|(p, _)| store.shards_of_partition(*p, partitions) == shards)
            .count();
        let (now, later) = rest.split_at(group);
        rest = later;
        let room = if out.is_empty() {
            max_entries
        } else {
            max_entries.saturating_sub(listed)
        };
        if room == 0 {
            break;
        }
        let lists = store.leaf_entries(now, room);
        let whole = lists.len() == now.len();
        listed += lists.iter().map(Vec::len).sum::<usize>();
        out.extend(lists);
        if !whole {
            break;
        }
        tokio::task::yield_now().await;
    }
    out
}

/// Answer to [`PeerRequest::FetchStates`]: the states of a prefix of
/// `keys`, within [`ANTI_ENTROPY_MESSAGE_BYTES_MAX`].
pub(super) fn serve_fetch_states(store: &Store, keys: &[Vec<u8>]) -> PeerResponse {
    if keys.len() > KEYS_PER_MESSAGE_MAX || keys.iter().any(|k| !valid_key(k)) {
        return PeerResponse::Refused("invalid key list".into());
    }
    let mut states = Vec::new();
    let mut bytes = 0;
    let mut answered = 0u32;
    for key in keys {
        if answered > 0 && bytes >= ANTI_ENTROPY_MESSAGE_BYTES_MAX {
            break;
        }
        answered += 1;
        if let Some(state) = store.replica_state(key) {
            bytes += state_bytes(key, &state);
            states.push((key.clone(), state));
        }
    }
    PeerResponse::States { states, answered }
}

impl Cluster {
    /// Answer to [`PeerRequest::TreeHashes`].
    pub(super) fn serve_tree_hashes(&self, store: &Store, nodes: &[TreeNode]) -> PeerResponse {
        let Some(trees) = store.trees() else {
            return PeerResponse::Refused("anti-entropy is off here".into());
        };
        if nodes.len() > ANTI_ENTROPY_NODES_PER_MESSAGE_MAX
            || nodes.iter().any(|n| !n.is_valid(trees.partitions()))
        {
            return PeerResponse::Refused("invalid tree nodes".into());
        }
        PeerResponse::Hashes(nodes.iter().map(|n| trees.hash(*n)).collect())
    }

    /// Answer to [`PeerRequest::LeafEntries`].
    pub(super) async fn serve_leaf_entries(
        &self,
        store: &Store,
        leaves: &[(u32, u16)],
        max_entries: u32,
    ) -> PeerResponse {
        if store.trees().is_none() {
            return PeerResponse::Refused("anti-entropy is off here".into());
        }
        if leaves.len() > ANTI_ENTROPY_NODES_PER_MESSAGE_MAX
            || leaves
                .iter()
                .any(|(p, l)| *p >= self.partitions || usize::from(*l) >= LEAVES)
        {
            return PeerResponse::Refused("invalid leaves".into());
        }
        let max = (max_entries as usize).clamp(1, ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX);
        PeerResponse::Entries(list_leaves(store, leaves, max).await)
    }

    /// Answer to [`PeerRequest::Repair`]: applies into free memory only.
    pub(super) fn serve_repair(
        &self,
        store: &Store,
        states: &[(Vec<u8>, KeyState)],
    ) -> PeerResponse {
        if states.len() > KEYS_PER_MESSAGE_MAX || states.iter().any(|(k, _)| !valid_key(k)) {
            return PeerResponse::Refused("invalid states".into());
        }
        let mut no_room = Vec::new();
        for (i, (key, state)) in states.iter().enumerate() {
            if store.apply_with(key, state, Fill::FreeOnly) == Applied::NoRoom {
                no_room.push(i as u32);
            }
        }
        PeerResponse::Repaired { no_room }
    }

    /// Anti-entropy, until the node stops: every interval, compares the
    /// next batch of partitions with each peer that replicates them and
    /// whose id is above this node's, and exchanges the keys they differ
    /// on. Skips peers that are not up. Does nothing with anti-entropy off.
    pub async fn anti_entropy(self: Arc<Self>, local: Arc<dyn Local>) {
        let Some(settings) = self.anti_entropy else {
            return;
        };
        if local.store().trees().is_none() {
            return;
        }
        let mut view = self.view();
        let mut schedule = Schedule::new(&view.layout.ring, self.me);
        info!(
            partitions = schedule.len(),
            interval_ms = settings.interval_ms,
            "anti-entropy running"
        );
        let clock = local.store().clock_arc();
        let mut bandwidth: BTreeMap<u16, Bandwidth> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(settings.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A new layout moves partitions between pairs: plan again.
            let now = self.view();
            if now.layout.epoch != view.layout.epoch {
                schedule = Schedule::new(&now.layout.ring, self.me);
            }
            view = now;
            if schedule.is_empty() {
                continue;
            }
            for (node, partitions) in schedule.next_round(settings.partitions_per_round) {
                let Some(peer) = view.peer(node) else {
                    continue;
                };
                if peer.state() != PeerState::Up {
                    continue;
                }
                let bw = bandwidth
                    .entry(node)
                    .or_insert_with(|| Bandwidth::new(settings.bytes_per_sec, clock.now_ms()));
                let mut run = Run {
                    cluster: &self,
                    store: local.store(),
                    peer,
                    bandwidth: bw,
                    clock: clock.as_ref(),
                    moved: BTreeMap::new(),
                };
                let (outcome, differing, failed) =
                    run.exchange(&partitions, settings.keys_per_round).await;
                if failed.is_none() {
                    if let Some(pair) = view.ae_pair(node) {
                        pair.last_ms.store(clock.now_ms().max(1), Relaxed);
                        pair.exchanges.fetch_add(1, Relaxed);
                        pair.keys_moved
                            .fetch_add(outcome.keys_pulled + outcome.keys_pushed, Relaxed);
                    }
                    for p in &partitions {
                        match run.moved.get(p) {
                            Some(&(0, refused)) if refused > 0 => schedule.futile(node, *p),
                            Some(_) => schedule.fruitful(node, *p),
                            None if !differing.contains(p) => schedule.fruitful(node, *p),
                            None => {}
                        }
                    }
                }
                let s = &self.stats;
                s.ae_partitions_compared
                    .fetch_add(outcome.partitions_compared, Relaxed);
                s.ae_partitions_differing
                    .fetch_add(outcome.partitions_differing, Relaxed);
                s.ae_keys_listed.fetch_add(outcome.keys_listed, Relaxed);
                s.ae_keys_pulled.fetch_add(outcome.keys_pulled, Relaxed);
                s.ae_keys_pushed.fetch_add(outcome.keys_pushed, Relaxed);
                if let Some(why) = failed {
                    s.ae_errors.fetch_add(1, Relaxed);
                    debug!(peer = node, error = %why, "anti-entropy exchange cut short");
                }
            }
            self.stats.ae_rounds.fetch_add(1, Relaxed);
        }
    }
}

/// One exchange with one peer (anti-entropy's, and a handoff's check of
/// what it was handed against another owner).
pub(super) struct Run<'a> {
    pub(super) cluster: &'a Cluster,
    pub(super) store: &'a Store,
    pub(super) peer: &'a PeerHandle,
    pub(super) bandwidth: &'a mut Bandwidth,
    pub(super) clock: &'a dyn crate::store::Clock,
    /// Per partition: keys moved, and keys turned away for lack of room.
    pub(super) moved: BTreeMap<u32, (u64, u64)>,
}

impl Run<'_> {
    /// Runs the exchange to its end; returns what it did, the partitions
    /// whose roots differed and, if a call failed, why it stopped early.
    pub(super) async fn exchange(
        &mut self,
        partitions: &[u32],
        keys_per_round: usize,
    ) -> (Outcome, Vec<u32>, Option<String>) {
        let (mut ex, mut step) = Exchange::start(partitions, keys_per_round);
        loop {
            let next = match step {
                Step::Done => return (ex.outcome, ex.differing, None),
                Step::Hashes(nodes) => self
                    .hashes(&nodes)
                    .await
                    .map(|(ours, theirs)| ex.on_hashes(&nodes, &ours, &theirs)),
                Step::Leaves {
                    leaves,
                    max_entries,
                } => self
                    .leaves(&leaves, max_entries)
                    .await
                    .map(|(ours, theirs)| ex.on_entries(ours, theirs)),
                Step::Transfer { pull, push } => match self.pull(&pull).await {
                    Ok(()) => self.push(&push).await.map(|()| ex.on_transferred()),
                    Err(e) => Err(e),
                },
            };
            match next {
                Ok(s) => step = s,
                Err(why) => return (ex.outcome, ex.differing, Some(why)),
            }
        }
    }

    /// One call, paced by the bandwidth bound; `bytes` is charged up front.
    async fn call(&mut self, request: PeerRequest, bytes: u64) -> Result<PeerResponse, String> {
        let wait = self.bandwidth.wait_ms(self.clock.now_ms());
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        self.charge(bytes);
        match self
            .peer
            .call_timeout(request, self.cluster.hop_timeout)
            .await
        {
            Ok(PeerResponse::Refused(why)) => Err(format!("refused: {why}")),
            Ok(r) => Ok(r),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Counts a key moved (`taken`) or turned away for lack of room.
    fn count_move(&mut self, key: &[u8], taken: bool) {
        let p = crate::cluster::ring::partition_of(key, self.cluster.partitions);
        let e = self.moved.entry(p).or_default();
        if taken {
            e.0 += 1;
        } else {
            e.1 += 1;
            self.cluster.stats.ae_no_room.fetch_add(1, Relaxed);
        }
    }

    fn charge(&mut self, bytes: u64) {
        self.bandwidth.charge(bytes, self.clock.now_ms());
        self.cluster.stats.ae_bytes.fetch_add(bytes, Relaxed);
    }

    /// Our hashes of `nodes` and the peer's.
    async fn hashes(&mut self, nodes: &[TreeNode]) -> Result<(Vec<u64>, Vec<u64>), String> {
        let trees = self.store.trees().ok_or("anti-entropy is off here")?;
        let mut theirs = Vec::with_capacity(nodes.len());
        for chunk in nodes.chunks(ANTI_ENTROPY_NODES_PER_MESSAGE_MAX) {
            let bytes = chunk.len() as u64 * TREE_NODE_WIRE_BYTES;
            let request = PeerRequest::TreeHashes {
                nodes: chunk.to_vec(),
            };
            match self.call(request, bytes).await? {
                PeerResponse::Hashes(h) if h.len() == chunk.len() => theirs.extend(h),
                other => return Err(format!("unexpected answer to tree hashes: {other:?}")),
            }
        }
        let ours = nodes.iter().map(|n| trees.hash(*n)).collect();
        Ok((ours, theirs))
    }

    /// Our listing of a prefix of `leaves` and the peer's of a prefix of
    /// that.
    async fn leaves(
        &mut self,
        leaves: &[(u32, u16)],
        max_entries: usize,
    ) -> Result<(Vec<Vec<KeyVersion>>, Vec<Vec<KeyVersion>>), String> {
        let leaves = &leaves[..leaves.len().min(ANTI_ENTROPY_NODES_PER_MESSAGE_MAX)];
        let max = max_entries.clamp(1, ANTI_ENTROPY_ENTRIES_PER_MESSAGE_MAX);
        let ours = list_leaves(self.store, leaves, max).await;
        let request = PeerRequest::LeafEntries {
            leaves: leaves[..ours.len()].to_vec(),
            max_entries: max as u32,
        };
        match self.call(request, ours.len() as u64 * 6).await? {
            PeerResponse::Entries(theirs) if theirs.len() <= ours.len() => {
                let bytes: u64 = theirs
                    .iter()
                    .flatten()
                    .map(|(k, _)| k.len() as u64 + ENTRY_WIRE_BYTES)
                    .sum();
                self.charge(bytes);
                Ok((ours, theirs))
            }
            other => Err(format!("unexpected answer to leaf entries: {other:?}")),
        }
    }

    /// Fetches `keys` from the peer and applies them here, into free memory.
    async fn pull(&mut self, keys: &[Vec<u8>]) -> Result<(), String> {
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(KEYS_PER_MESSAGE_MAX)];
            let asked: u64 = chunk.iter().map(|k| k.len() as u64 + 2).sum();
            let request = PeerRequest::FetchStates {
                keys: chunk.to_vec(),
            };
            match self.call(request, asked).await? {
                PeerResponse::States { states, answered }
                    if answered >= 1 && answered as usize <= chunk.len() =>
                {
                    let mut bytes = 0;
                    for (key, state) in &states {
                        if !valid_key(key) {
                            return Err("peer sent an invalid key".into());
                        }
                        bytes += state_bytes(key, state) as u64;
                        let taken =
                            self.store.apply_with(key, state, Fill::FreeOnly) != Applied::NoRoom;
                        self.count_move(key, taken);
                    }
                    self.charge(bytes);
                    rest = &rest[answered as usize..];
                }
                other => return Err(format!("unexpected answer to fetch: {other:?}")),
            }
        }
        Ok(())
    }

    /// Sends our states of `keys` to the peer.
    async fn push(&mut self, keys: &[Vec<u8>]) -> Result<(), String> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (i, key) in keys.iter().enumerate() {
            if let Some(state) = self.store.replica_state(key) {
                bytes += state_bytes(key, &state);
                batch.push((key.clone(), state));
            }
            let last = i + 1 == keys.len();
            let full =
                bytes >= ANTI_ENTROPY_MESSAGE_BYTES_MAX || batch.len() >= KEYS_PER_MESSAGE_MAX;
            if (full || last) && !batch.is_empty() {
                let states = std::mem::take(&mut batch);
                let request = PeerRequest::Repair {
                    states: states.clone(),
                };
                match self.call(request, bytes as u64).await? {
                    PeerResponse::Repaired { no_room } => {
                        let mut refused = vec![false; states.len()];
                        for i in no_room {
                            if let Some(r) = refused.get_mut(i as usize) {
                                *r = true;
                            }
                        }
                        for ((key, _), refused) in states.iter().zip(refused) {
                            self.count_move(key, !refused);
                        }
                    }
                    other => return Err(format!("unexpected answer to repair: {other:?}")),
                }
                bytes = 0;
            }
        }
        Ok(())
    }
}
