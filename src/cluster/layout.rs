//! The cluster's layout and one node's published view of it.
//!
//! A [`Layout`] is what every member must agree on to place a key: the
//! members, the partition count, N and the default quorums, numbered by an
//! epoch. A [`Topology`] is one node's snapshot of a layout together with
//! the peer handles that reach its members, so a lookup of a member's
//! handle in a snapshot cannot fail: the two are built and published as one
//! value (see [`Topology::new`]).
//!
//! The coordinator publishes its topology through an [`arc_swap::ArcSwap`]:
//! the request path takes a snapshot with one atomic load (no shared
//! reference count, no lock), a request keeps the snapshot it started with
//! to its end, and a new layout is installed with one store. That is the
//! groundwork of membership changes (issue 19): today the layout comes from
//! the `--member` flags and its epoch is 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::coordinator::PairRepair;
use super::message::{PeerRequest, PeerResponse};
use super::quorum::Need;
use super::ring::{NodeId, Ring};
use super::transport::{Peer, PeerState};
use crate::config::{ClusterConfig, MemberConfig};

type PeerHandle = Peer<PeerRequest, PeerResponse>;

/// Members, placement and quorums at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Version of the layout; every change makes a higher one.
    pub epoch: u64,
    /// Members, ascending by id.
    pub members: Vec<MemberConfig>,
    /// Members that hold no partitions yet (joined with `--join`), ascending:
    /// they coordinate requests and vote on layouts, and the rings leave
    /// them out.
    pub standby: Vec<NodeId>,
    /// The first N members per partition: its replicas.
    pub ring: Ring,
    /// Every member per partition in ring order: past the first N are the
    /// nodes that hold hints for unreachable replicas.
    pub full_ring: Ring,
    /// R when a request names none (at most N).
    pub read_quorum: usize,
    /// W when a request names none (at most N).
    pub write_quorum: usize,
    /// While partitions move (a transition epoch): where they move to.
    /// Writes go to both rings' replicas and need W on each; reads stay on
    /// [`Layout::ring`] until the move settles.
    pub target: Option<Move>,
}

/// Where a move under way takes the partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The members that hold partitions once the move settles, ascending.
    pub members: Vec<NodeId>,
    /// Their ring.
    pub ring: Ring,
    /// The members that gain a partition in the move (computed once: the
    /// request path, the stats and every tick of the move ask).
    pub gainers: Vec<NodeId>,
}

impl Layout {
    /// The layout of a configuration's member list (the genesis layout,
    /// epoch 0).
    pub fn of(config: &ClusterConfig) -> Self {
        let mut members = config.members.clone();
        members.sort_by_key(|m| m.id);
        Self::build(
            0,
            members,
            Vec::new(),
            config.partitions,
            [
                config.replicas_effective(),
                config.read_quorum_effective(),
                config.write_quorum_effective(),
            ],
        )
    }

    /// The layout of `members` (ascending by id) of which `standby` hold
    /// nothing, over `partitions` partitions with `[N, R, W]`: the rings
    /// are built over the other members.
    pub fn build(
        epoch: u64,
        members: Vec<MemberConfig>,
        standby: Vec<NodeId>,
        partitions: u32,
        [n, r, w]: [usize; 3],
    ) -> Self {
        let active: Vec<NodeId> = members
            .iter()
            .map(|m| m.id)
            .filter(|id| !standby.contains(id))
            .collect();
        Self {
            epoch,
            ring: Ring::new(&active, partitions, n),
            full_ring: Ring::new(&active, partitions, active.len()),
            members,
            standby,
            read_quorum: r,
            write_quorum: w,
            target: None,
        }
    }

    /// This layout with partitions moving to `target` (ascending member
    /// ids, at least N of them): the transition epoch of a change.
    pub fn moving_to(&self, target: Vec<NodeId>) -> Self {
        let ring = Ring::new(&target, self.ring.partitions(), self.ring.replicas());
        let gained = |node: NodeId| {
            (0..ring.partitions()).any(|p| {
                ring.preference_list(p).contains(&node)
                    && !self.ring.preference_list(p).contains(&node)
            })
        };
        let gainers = target.iter().copied().filter(|&n| gained(n)).collect();
        Self {
            target: Some(Move {
                members: target,
                ring,
                gainers,
            }),
            ..self.clone()
        }
    }

    /// The layout once the move settles: the target members hold the
    /// partitions; a member that held partitions and is not among them
    /// leaves the layout; a standby among them is a standby no more.
    /// `None` when nothing is moving.
    pub fn settled(&self) -> Option<Self> {
        let target = &self.target.as_ref()?.members;
        let members: Vec<MemberConfig> = self
            .members
            .iter()
            .filter(|m| target.contains(&m.id) || self.is_standby(m.id))
            .cloned()
            .collect();
        let standby = self
            .standby
            .iter()
            .copied()
            .filter(|id| !target.contains(id))
            .collect();
        Some(Self::build(
            self.epoch,
            members,
            standby,
            self.ring.partitions(),
            [self.ring.replicas(), self.read_quorum, self.write_quorum],
        ))
    }

    /// The layout as it was before the move (the move cancelled). `None`
    /// when nothing is moving.
    pub fn cancelled(&self) -> Option<Self> {
        self.target.as_ref()?;
        Some(Self {
            target: None,
            ..self.clone()
        })
    }

    /// The members that gain partitions in the move, and those that lose
    /// them all (they leave when it settles).
    pub fn movers(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        let Some(Move {
            members: target, ..
        }) = &self.target
        else {
            return (Vec::new(), Vec::new());
        };
        let active: Vec<NodeId> = self.ring.members().to_vec();
        let joining = target
            .iter()
            .copied()
            .filter(|id| !active.contains(id))
            .collect();
        let leaving = active
            .into_iter()
            .filter(|id| !target.contains(id))
            .collect();
        (joining, leaving)
    }

    /// Whether `node` holds `key` in the target ring but not in the
    /// current one: a key it must be given before the move settles.
    pub fn gains(&self, node: NodeId, key: &[u8]) -> bool {
        self.target.as_ref().is_some_and(|m| {
            m.ring.preference_list_for_key(key).contains(&node)
                && !self.ring.preference_list_for_key(key).contains(&node)
        })
    }

    /// Whether `node` gains any partition in the move.
    pub fn gains_any(&self, node: NodeId) -> bool {
        self.target
            .as_ref()
            .is_some_and(|m| m.gainers.contains(&node))
    }

    /// The partitions `node` gains in the move, ascending.
    pub fn gained(&self, node: NodeId) -> Vec<u32> {
        let Some(m) = self.target.as_ref().filter(|m| m.gainers.contains(&node)) else {
            return Vec::new();
        };
        (0..m.ring.partitions())
            .filter(|&p| {
                m.ring.preference_list(p).contains(&node)
                    && !self.ring.preference_list(p).contains(&node)
            })
            .collect()
    }

    /// Whether `node` replicates `key` now or once the move settles.
    pub fn writes_to(&self, node: NodeId, key: &[u8]) -> bool {
        self.ring.preference_list_for_key(key).contains(&node)
            || self
                .target
                .as_ref()
                .is_some_and(|m| m.ring.preference_list_for_key(key).contains(&node))
    }

    /// The nodes other than `me` a write of `key` goes to while partitions
    /// move: `current` (the key's other current replicas), then the target
    /// ring's that are not among them. Nothing moving: `current` itself,
    /// nothing allocated.
    pub fn write_set<'a>(
        &self,
        key: &[u8],
        me: NodeId,
        current: &'a [NodeId],
    ) -> std::borrow::Cow<'a, [NodeId]> {
        let Some(m) = &self.target else {
            return std::borrow::Cow::Borrowed(current);
        };
        let mut set = current.to_vec();
        for &n in m.ring.preference_list_for_key(key) {
            if n != me && !set.contains(&n) {
                set.push(n);
            }
        }
        std::borrow::Cow::Owned(set)
    }

    /// What a write of `key` at quorum `w` needs from replicas other than
    /// `me` (the primary, which holds it): per replica set, how many of
    /// which nodes. One set normally; while partitions move, W on the
    /// current set and W on the target set, so that no write counts as
    /// acknowledged by a leaving node, nor is missing from the new owners'
    /// quorum. Sets `me` alone meets are left out.
    ///
    /// Nothing moving: any W − 1 of the others, with nothing allocated (the
    /// write path asks this for every write).
    pub fn write_need(&self, key: &[u8], me: NodeId, w: usize) -> Need {
        let Some(m) = &self.target else {
            return Need::Any(w.saturating_sub(1));
        };
        let need = |pref: &[NodeId]| {
            let others: Vec<NodeId> = pref.iter().copied().filter(|&n| n != me).collect();
            let needed = w.saturating_sub(usize::from(pref.contains(&me)));
            (needed, others)
        };
        let mut sets = vec![
            need(self.ring.preference_list_for_key(key)),
            need(m.ring.preference_list_for_key(key)),
        ];
        sets.retain(|(needed, _)| *needed > 0);
        Need::Sets(sets)
    }

    /// This layout's epoch, P, N, R and W with `members` (ascending by
    /// id), of which `standby` (ascending) hold nothing.
    /// A move under way goes on to the same target.
    pub fn with_members(&self, members: Vec<MemberConfig>, standby: Vec<NodeId>) -> Self {
        let layout = Self::build(
            self.epoch,
            members,
            standby,
            self.ring.partitions(),
            [self.ring.replicas(), self.read_quorum, self.write_quorum],
        );
        match &self.target {
            Some(m) => layout.moving_to(m.members.clone()),
            None => layout,
        }
    }

    /// Whether member `id` holds no partitions (joined, not yet given any).
    pub fn is_standby(&self, id: NodeId) -> bool {
        self.standby.binary_search(&id).is_ok()
    }

    /// Members that hold partitions.
    pub fn active_count(&self) -> usize {
        self.members.len() - self.standby.len()
    }

    /// Member ids, ascending.
    pub fn member_ids(&self) -> Vec<NodeId> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Whether `id` is a member.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.members.binary_search_by_key(&id, |m| m.id).is_ok()
    }
}

/// Layout epochs stay below this (2^48): the transport packs an epoch with
/// a node id into 64 bits, and a peer's claim of a higher one is refused.
pub const EPOCH_LIMIT: u64 = 1 << 48;

/// Longest member address a layout may carry (`host:port`).
pub const ADDRESS_BYTES_MAX: usize = 256;

/// Most members a layout may have (the transport heartbeats make a full
/// mesh: see the README's "Known limits").
pub const LAYOUT_MEMBERS_MAX: usize = 64;

/// A layout as it travels between nodes ([`PeerRequest::LayoutGet`]): what
/// every node needs to build the same [`Layout`]. Rings are rebuilt by the
/// receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutDesc {
    /// The layout's epoch.
    pub epoch: u64,
    /// Members as `(id, client address, peer address)`, ascending by id.
    pub members: Vec<(NodeId, String, String)>,
    /// Members that hold no partitions, ascending.
    pub standby: Vec<NodeId>,
    /// P, fixed for the life of the cluster.
    pub partitions: u32,
    /// N (at most the member count).
    pub replicas: u8,
    /// R when a request names none.
    pub read_quorum: u8,
    /// W when a request names none.
    pub write_quorum: u8,
    /// While partitions move: the members that will hold them, ascending.
    pub target: Option<Vec<NodeId>>,
}

impl Layout {
    /// The layout as it travels.
    pub fn desc(&self) -> LayoutDesc {
        let small = |n: usize| u8::try_from(n).unwrap_or(u8::MAX);
        LayoutDesc {
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|m| (m.id, m.client.clone(), m.peer.clone()))
                .collect(),
            standby: self.standby.clone(),
            partitions: self.ring.partitions(),
            replicas: small(self.ring.replicas()),
            read_quorum: small(self.read_quorum),
            write_quorum: small(self.write_quorum),
            target: self.target.as_ref().map(|m| m.members.clone()),
        }
    }

    /// The layout a peer sent, checked as a configuration would be, for a
    /// cluster of `partitions` partitions.
    ///
    /// # Errors
    /// Naming what is wrong: another partition count, no members or more
    /// than [`LAYOUT_MEMBERS_MAX`], duplicate or zero ids, standby ids that
    /// are not members (or not ascending), N above the members that hold
    /// partitions, or quorums outside `1..=N`. Addresses are not checked here: a member's address
    /// is dialled, never trusted.
    pub fn from_desc(desc: &LayoutDesc, partitions: u32) -> Result<Self, String> {
        if desc.epoch >= EPOCH_LIMIT {
            return Err(format!("layout epoch {} out of range", desc.epoch));
        }
        if desc.partitions != partitions {
            return Err(format!(
                "layout epoch {} has {} partitions, this cluster {partitions}",
                desc.epoch, desc.partitions
            ));
        }
        let count = desc.members.len();
        if count == 0 || count > LAYOUT_MEMBERS_MAX {
            return Err(format!(
                "layout epoch {} has {count} members (1..={LAYOUT_MEMBERS_MAX})",
                desc.epoch
            ));
        }
        let ids: Vec<NodeId> = desc.members.iter().map(|m| m.0).collect();
        if ids.contains(&0)
            || ids.windows(2).any(|w| w[0] >= w[1])
            || ids.iter().any(|&id| id > crate::store::hlc::NODE_ID_MAX)
        {
            return Err(format!(
                "layout epoch {}: member ids not ascending, distinct and in 1..={}",
                desc.epoch,
                crate::store::hlc::NODE_ID_MAX
            ));
        }
        if desc
            .members
            .iter()
            .any(|(_, c, p)| c.len() > ADDRESS_BYTES_MAX || p.len() > ADDRESS_BYTES_MAX)
        {
            return Err(format!(
                "layout epoch {}: a member address over {ADDRESS_BYTES_MAX} bytes",
                desc.epoch
            ));
        }
        if desc.standby.windows(2).any(|w| w[0] >= w[1])
            || desc.standby.iter().any(|id| ids.binary_search(id).is_err())
        {
            return Err(format!(
                "layout epoch {}: standby ids not ascending members",
                desc.epoch
            ));
        }
        let active = count - desc.standby.len();
        let n = usize::from(desc.replicas);
        let (r, w) = (
            usize::from(desc.read_quorum),
            usize::from(desc.write_quorum),
        );
        if !(1..=active).contains(&n) || !(1..=n).contains(&r) || !(1..=n).contains(&w) {
            return Err(format!(
                "layout epoch {}: N={n} R={r} W={w} with {active} members holding partitions",
                desc.epoch
            ));
        }
        let members = desc
            .members
            .iter()
            .map(|(id, client, peer)| MemberConfig {
                id: *id,
                client: client.clone(),
                peer: peer.clone(),
            })
            .collect();
        let layout = Self::build(
            desc.epoch,
            members,
            desc.standby.clone(),
            partitions,
            [n, r, w],
        );
        match &desc.target {
            None => Ok(layout),
            Some(target) => {
                if target.len() < n
                    || target.windows(2).any(|w| w[0] >= w[1])
                    || target.iter().any(|id| ids.binary_search(id).is_err())
                {
                    return Err(format!(
                        "layout epoch {}: the members partitions move to are not {n} or more ascending members",
                        desc.epoch
                    ));
                }
                Ok(layout.moving_to(target.clone()))
            }
        }
    }
}

/// One node's snapshot: a layout and a handle for each of its members but
/// this node.
#[derive(Debug)]
pub struct Topology {
    /// The layout this snapshot is of.
    pub layout: Arc<Layout>,
    peers: BTreeMap<NodeId, PeerHandle>,
    ae_pairs: BTreeMap<NodeId, Arc<PairRepair>>,
}

impl Topology {
    /// The snapshot of `layout` as seen by member `me`, with `peers`
    /// reaching the other members and `ae_pairs` their anti-entropy
    /// counters (made fresh for a member that has none).
    ///
    /// # Panics
    /// If `peers` is not exactly the members other than `me`: a snapshot
    /// that named a member without a handle would turn a lookup into a
    /// crash, and one with a handle for a non-member would send it work.
    pub fn new(
        layout: Arc<Layout>,
        me: NodeId,
        peers: BTreeMap<NodeId, PeerHandle>,
        mut ae_pairs: BTreeMap<NodeId, Arc<PairRepair>>,
    ) -> Self {
        let others: Vec<NodeId> = layout
            .members
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != me)
            .collect();
        let handles: Vec<NodeId> = peers.keys().copied().collect();
        assert_eq!(
            others, handles,
            "epoch {}: peer handles do not match the members",
            layout.epoch
        );
        ae_pairs.retain(|id, _| peers.contains_key(id));
        for &id in peers.keys() {
            ae_pairs.entry(id).or_default();
        }
        Self {
            layout,
            peers,
            ae_pairs,
        }
    }

    /// The handle reaching member `id`; `None` for this node or a
    /// non-member.
    pub fn peer(&self, id: NodeId) -> Option<&PeerHandle> {
        self.peers.get(&id)
    }

    /// The handle reaching member `id`, taken from this snapshot's own
    /// layout (a preference list, the member list).
    ///
    /// # Panics
    /// If `id` is this node or not a member of this snapshot: the caller
    /// mixed two snapshots.
    pub fn handle(&self, id: NodeId) -> &PeerHandle {
        match self.peers.get(&id) {
            Some(p) => p,
            None => panic!(
                "node {id} has no peer handle at layout epoch {}",
                self.layout.epoch
            ),
        }
    }

    /// Every other member's handle, by id.
    pub fn peers(&self) -> impl Iterator<Item = (NodeId, &PeerHandle)> {
        self.peers.iter().map(|(&id, p)| (id, p))
    }

    /// Whether the transport knows member `id` to be down. A node that is
    /// not a peer in this snapshot counts as down: nothing can reach it.
    /// This node is never down.
    pub fn is_down(&self, me: NodeId, id: NodeId) -> bool {
        id != me
            && self
                .peers
                .get(&id)
                .is_none_or(|p| matches!(p.state(), PeerState::Down { .. }))
    }

    /// Anti-entropy counters of the pair with member `id`.
    pub fn ae_pair(&self, id: NodeId) -> Option<&PairRepair> {
        self.ae_pairs.get(&id).map(|p| &**p)
    }

    /// The anti-entropy counters, to carry over into the next snapshot.
    pub fn ae_pairs(&self) -> BTreeMap<NodeId, Arc<PairRepair>> {
        self.ae_pairs.clone()
    }

    /// The handles, to carry over into the next snapshot.
    pub fn peer_handles(&self) -> BTreeMap<NodeId, PeerHandle> {
        self.peers.clone()
    }
}
