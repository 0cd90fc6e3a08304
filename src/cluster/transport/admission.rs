//! Caps on the connections a node accepts from peers.
//!
//! Until peers authenticate, anyone who reaches the peer port and speaks
//! the handshake is a peer, and even a real member may be confused. So the
//! acceptor holds every accepted connection to two caps:
//!
//! - in all: a connection takes a [`Slot`] before its handshake is read, so
//!   connections still in the handshake count; past the cap a new
//!   connection is closed at once ([`TransportStats::accepts_refused`]);
//! - per member, once the handshake names one: a member dials one
//!   connection to each peer (two for a moment while it redials), so past
//!   the cap the member's OLDEST connection is closed
//!   ([`TransportStats::accepts_evicted`]), never the new one. An impostor
//!   naming a real member can then at worst take turns with it; it cannot
//!   lock it out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{NodeId, TransportStats};

/// Who holds the accepted connections now.
#[derive(Debug, Default)]
struct Held {
    /// Connections holding a slot, handshaken or not.
    open: usize,
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
        if held.open >= self.total_max {
            drop(held);
            stats.accepts_refused.fetch_add(1, Relaxed);
            return None;
        }
        held.open += 1;
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
    /// connections past the per-member cap (counted).
    pub fn admit(&mut self, member: NodeId, stats: &TransportStats) {
        assert!(self.member.is_none(), "a connection names one member");
        self.member = Some(member);
        let cap = self.connections.per_member_max;
        let mut held = self.connections.held.lock();
        let mine = held.by_member.entry(member).or_default();
        mine.push_back((self.number, self.evict.clone()));
        while mine.len() > cap {
            let (_, oldest) = mine.pop_front().expect("past a nonzero cap");
            // Stored if the connection is not waiting yet: it ends as soon
            // as it does.
            oldest.notify_one();
            stats.accepts_evicted.fetch_add(1, Relaxed);
        }
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
            slot.admit(7, &stats);
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
        other.admit(8, &stats);
        assert_eq!(stats.accepts_evicted.load(Relaxed), 1);
        drop(slots);
        assert_eq!(caps.open(), 1);
        assert!(!caps.held.lock().by_member.contains_key(&7));
    }
}
