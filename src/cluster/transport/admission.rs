//! Caps on the connections a node accepts from peers.
//!
//! Until peers authenticate, anyone who reaches the peer port and speaks
//! the handshake is a peer, and even a real member may be confused. So the
//! acceptor holds every accepted connection to two caps:
//!
//! - in all: a connection takes a [`Slot`] before its handshake is read, so
//!   connections still in the handshake count; past the cap a new
//!   connection is closed at once ([`TransportStats::accepts_refused`]);
//! - in the handshake: at most a few at once, so connections that never
//!   finish one cannot take the places of members' connections;
//! - per member, once the handshake names one: only the members of the
//!   installed layout are admitted, and newcomers: a node that dials as a
//!   joiner (`--join`) or that shows a newer layout epoch than this node's
//!   (a member added while this node was away), both having proved they
//!   hold the cluster's key; any other id is refused. A member dials
//!   one connection to each peer (two for a moment while it redials), so
//!   past the cap the member's OLDEST connection is closed
//!   ([`TransportStats::accepts_evicted`]), never the new one. The total is
//!   sized so that every member's connections fit beside the handshakes.
//!   An impostor naming a real member can still take turns with it, closing
//!   its connections as fast as it dials: only peer authentication (#18)
//!   ends that.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{NodeId, TransportStats};

/// Whether an id is a member of the layout installed now.
pub type IsMember = Box<dyn Fn(NodeId) -> bool + Send + Sync>;

/// [`IsMember`], printable.
struct Membership(IsMember);

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Membership")
    }
}

/// Who holds the accepted connections now.
#[derive(Debug, Default)]
struct Held {
    /// Connections holding a slot, handshaken or not.
    open: usize,
    /// Of those, connections still in the handshake.
    handshaking: usize,
    /// Source of slot numbers: a member's older connections have lower ones.
    next_slot: u64,
    /// Per named member, its connections oldest first: slot number and the
    /// signal that closes it.
    by_member: HashMap<NodeId, VecDeque<(u64, Arc<Notify>)>>,
}

/// The caps on one node's accepted peer connections, and who holds them.
#[derive(Debug)]
pub struct PeerConnections {
    /// Most connections at once, in the handshake or past it.
    total_max: usize,
    /// Most connections at once that name one member.
    per_member_max: usize,
    /// Most connections at once still in the handshake.
    handshakes_max: usize,
    /// Whether a handshake may name an id (a newcomer aside); `None`: any.
    members: Option<Membership>,
    /// Locked only to count and to pick whom to close, never across `.await`.
    held: Mutex<Held>,
}

impl PeerConnections {
    /// Caps of `total_max` connections in all and `per_member_max` per member.
    ///
    /// # Panics
    /// If either cap is zero: no peer could ever connect.
    pub fn new(total_max: usize, per_member_max: usize) -> Arc<Self> {
        assert!(total_max > 0 && per_member_max > 0, "a cap of zero");
        Arc::new(Self {
            total_max,
            per_member_max,
            handshakes_max: total_max,
            members: None,
            held: Mutex::new(Held::default()),
        })
    }

    /// Caps for a cluster whose membership changes: `is_member` says who
    /// is a member now; the total leaves room for the most members a
    /// layout may have ([`crate::cluster::layout::LAYOUT_MEMBERS_MAX`]).
    ///
    /// # Panics
    /// If a cap is zero.
    pub fn for_cluster(
        is_member: IsMember,
        per_member_max: usize,
        handshakes_max: usize,
    ) -> Arc<Self> {
        assert!(per_member_max > 0 && handshakes_max > 0, "a cap of zero");
        Arc::new(Self {
            total_max: crate::cluster::layout::LAYOUT_MEMBERS_MAX * per_member_max + handshakes_max,
            per_member_max,
            handshakes_max,
            members: Some(Membership(is_member)),
            held: Mutex::new(Held::default()),
        })
    }

    /// No caps: for harnesses that serve one connection at a time and do
    /// their own accounting.
    pub fn unbounded() -> Arc<Self> {
        Self::new(usize::MAX, usize::MAX)
    }

    /// A slot for a newly accepted connection, or `None` (counted) when
    /// the total cap is reached: close the connection then.
    pub fn try_open(self: &Arc<Self>, stats: &TransportStats) -> Option<Slot> {
        let mut held = self.held.lock();
        if held.open >= self.total_max || held.handshaking >= self.handshakes_max {
            drop(held);
            stats.accepts_refused.fetch_add(1, Relaxed);
            return None;
        }
        held.open += 1;
        held.handshaking += 1;
        let number = held.next_slot;
        held.next_slot += 1;
        Some(Slot {
            connections: self.clone(),
            number,
            member: None,
            evict: Arc::new(Notify::new()),
        })
    }

    /// Connections open now, in the handshake or past it.
    pub fn open(&self) -> usize {
        self.held.lock().open
    }
}

/// One accepted connection's place under the caps; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    connections: Arc<PeerConnections>,
    /// Orders a member's connections: lower is older.
    number: u64,
    /// The member the handshake named, once [`Slot::admit`] ran.
    member: Option<NodeId>,
    /// Notified when a newer connection of the same member closes this one.
    evict: Arc<Notify>,
}

impl Slot {
    /// Counts this connection as `member`'s; closes that member's oldest
    /// connections past the per-member cap (counted). False, and nothing
    /// counted, if `member` is not one of the cluster's and not a
    /// `newcomer` (a joiner, or a member of a newer layout): refuse it then.
    #[must_use]
    pub fn admit(&mut self, member: NodeId, newcomer: bool, stats: &TransportStats) -> bool {
        assert!(self.member.is_none(), "a connection names one member");
        if let Some(Membership(is_member)) = &self.connections.members {
            if !newcomer && !is_member(member) {
                return false;
            }
        }
        self.member = Some(member);
        let cap = self.connections.per_member_max;
        let mut held = self.connections.held.lock();
        held.handshaking -= 1;
        let mine = held.by_member.entry(member).or_default();
        mine.push_back((self.number, self.evict.clone()));
        while mine.len() > cap {
            let (_, oldest) = mine.pop_front().expect("past a nonzero cap");
            // Stored if the connection is not waiting yet: it ends as soon
            // as it does.
            oldest.notify_one();
            stats.accepts_evicted.fetch_add(1, Relaxed);
        }
        true
    }

    /// Resolves when a newer connection of the same member closes this one.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.connections.held.lock();
        held.open -= 1;
        if self.member.is_none() {
            held.handshaking -= 1;
        }
        if let Some(member) = self.member {
            if let Some(mine) = held.by_member.get_mut(&member) {
                mine.retain(|(number, _)| *number != self.number);
                if mine.is_empty() {
                    held.by_member.remove(&member);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_members_are_admitted_and_handshakes_have_their_own_cap() {
        let stats = TransportStats::default();
        let caps = PeerConnections::for_cluster(Box::new(|id| (1..=3).contains(&id)), 2, 2);
        let mut a = caps.try_open(&stats).expect("room");
        let mut b = caps.try_open(&stats).expect("room");
        assert!(
            caps.try_open(&stats).is_none(),
            "two in the handshake at most"
        );
        assert!(!a.admit(9, false, &stats), "not a member");
        assert!(b.admit(2, false, &stats));
        // b left the handshake: room for another.
        let mut c = caps.try_open(&stats).expect("room");
        assert!(c.admit(3, false, &stats));
        // A newcomer (a joiner, or a member of a newer layout) is let in.
        let mut newcomer = caps.try_open(&stats).expect("room");
        assert!(newcomer.admit(9, true, &stats));
        drop(newcomer);
        drop(a);
        // Members' connections never take handshake places: six of them
        // and two handshakes fit.
        let mut members: Vec<Slot> = Vec::new();
        for id in [1, 1, 2, 3] {
            let mut s = caps.try_open(&stats).expect("room");
            assert!(s.admit(id, false, &stats));
            members.push(s);
        }
        let _h1 = caps.try_open(&stats).expect("a handshake place");
        let _h2 = caps.try_open(&stats).expect("a handshake place");
        assert_eq!(caps.open(), 2 + 6);
        drop((b, c));
    }

    #[test]
    fn the_total_cap_refuses_and_a_closed_slot_makes_room() {
        let stats = TransportStats::default();
        let caps = PeerConnections::new(2, 1);
        let a = caps.try_open(&stats).expect("room");
        let _b = caps.try_open(&stats).expect("room");
        assert!(caps.try_open(&stats).is_none(), "past the total cap");
        assert_eq!(stats.accepts_refused.load(Relaxed), 1);
        drop(a);
        let _c = caps.try_open(&stats).expect("room again");
        assert_eq!(caps.open(), 2);
    }

    #[tokio::test]
    async fn a_members_newest_connection_closes_its_oldest() {
        let stats = TransportStats::default();
        let caps = PeerConnections::new(10, 2);
        let mut slots: Vec<Slot> = (0..3).map(|_| caps.try_open(&stats).unwrap()).collect();
        for slot in &mut slots {
            assert!(slot.admit(7, false, &stats));
        }
        assert_eq!(stats.accepts_evicted.load(Relaxed), 1);
        // The oldest is told; the others are not.
        tokio::time::timeout(std::time::Duration::from_secs(1), slots[0].evicted())
            .await
            .expect("the oldest is evicted");
        let newer = tokio::time::timeout(std::time::Duration::from_millis(20), slots[1].evicted());
        assert!(newer.await.is_err(), "a newer one is not");
        // Another member's connection evicts nobody.
        let mut other = caps.try_open(&stats).unwrap();
        assert!(other.admit(8, false, &stats));
        assert_eq!(stats.accepts_evicted.load(Relaxed), 1);
        drop(slots);
        assert_eq!(caps.open(), 1);
        assert!(!caps.held.lock().by_member.contains_key(&7));
    }
}
