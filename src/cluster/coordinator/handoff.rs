//! Partition handoff: the moving parts of a layout change that moves
//! partitions (a member taking its share, leaving, or replaced).
//!
//! A change is two decrees. The *transition* epoch keeps the current rings
//! for reads and names the members partitions move to
//! ([`Layout::target`](crate::cluster::layout::Layout)); writes go to both
//! replica sets and need W on each (the primary's side is in
//! `execute_as_primary`). Then, on every member, [`Cluster::run_moves`]:
//!
//! - a node that gains partitions pulls their keys (tombstones and
//!   request-id records with them) in bulk from one current owner each,
//!   paced by `handoff_bytes_per_sec`, then checks them against every
//!   other owner that is up by comparing hash trees and taking what
//!   differs (a whole second pull where the store keeps no trees). It is
//!   done once each partition is covered by at least N − W + 1 of its
//!   owners and by every owner that is up: every write acknowledged before
//!   the transition is on W of them, and every write since reaches W of
//!   the new owners directly;
//! - the *driver*, the lowest-id member this node does not know to be down,
//!   asks every gaining member whether it is done and then proposes the
//!   *settled* epoch (the target members hold the partitions; a member that
//!   holds none leaves the layout), or, past `handoff_timeout_secs`, the
//!   *cancelled* one (the layout before the move: every write also reached
//!   W of the old owners, so a cancel loses nothing). Both are Paxos
//!   decrees, so two drivers cannot both win;
//! - once a layout without a move is installed on every member (none can
//!   still send a read to an old owner), each node drops the copies of
//!   partitions it no longer replicates.
//!
//! A node that dies mid-transfer starts its pull again when it comes back
//! (it kept nothing of the count); a source that dies is replaced by the
//! others; a driver that dies is replaced by the next lowest id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::repair::Run;
use super::{Cluster, Local};
use crate::cluster::anti_entropy::Bandwidth;
use crate::cluster::layout::{Layout, Topology};
use crate::cluster::message::{PeerRequest, PeerResponse};
use crate::cluster::ring::NodeId;
use crate::cluster::transport::PeerState;
use crate::store::{Fill, valid_key};

/// How often a node looks at the move under way (pull, drive, drop).
const MOVES_TICK_MS: u64 = 200;

/// Attempts at one page of a pull before the source is left for the next
/// tick.
const PULL_PAGE_TRIES: usize = 3;

/// Seconds between progress lines in the log while a node pulls.
const PULL_LOG_EVERY: Duration = Duration::from_secs(5);

/// This node's part in the move under way, and in the last one settled.
#[derive(Debug, Default)]
pub(super) struct Moves {
    /// The transition epoch the pull below is for.
    epoch: u64,
    /// Per partition this node gains: the current owners it holds every
    /// key of that partition from (pulled in bulk, or checked against).
    covered: BTreeMap<u32, Vec<NodeId>>,
    /// Whether the pull is complete (or there is nothing to pull).
    done: bool,
    /// Keys and bytes pulled for this epoch.
    keys: u64,
    bytes: u64,
    /// When this node first saw the transition epoch (the driver's clock
    /// for cancelling a move that does not finish).
    since: Option<Instant>,
    /// The settled epoch whose stale copies this node has dropped.
    dropped_for: u64,
}

impl Moves {
    /// No move seen yet; the copies of layouts up to `epoch` need no drop
    /// (the node starts with nothing of other partitions).
    pub(super) fn starting_at(epoch: u64) -> Self {
        Self {
            dropped_for: epoch,
            ..Self::default()
        }
    }
}

impl Cluster {
    /// Takes part in partition moves until the node stops: pulls what this
    /// node gains, drives the move to its end when it is the driver, and
    /// drops what moved away once every member has the settled layout.
    pub async fn run_moves(self: Arc<Self>, local: Arc<dyn Local>) {
        let _ = self.local.set(Arc::downgrade(&local));
        let mut tick = tokio::time::interval(Duration::from_millis(MOVES_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let view = self.view();
            if view.layout.target.is_some() {
                self.pull(&view, &*local).await;
                self.drive(&view).await;
            } else {
                self.drop_moved(&view, &*local).await;
            }
        }
    }

    /// Moves not finished, as `stats cluster` reports them: during a move,
    /// the members still to be given partitions (until it settles); after
    /// it, 1 while this node still holds copies it no longer replicates.
    pub(super) fn transfers_pending(&self, layout: &Layout) -> usize {
        if let Some(m) = &layout.target {
            m.gainers.len()
        } else {
            usize::from(self.moves.lock().dropped_for < layout.epoch)
        }
    }

    /// Whether this node holds every key it gains in the move of `epoch`,
    /// with what it pulled so far ([`PeerRequest::TransferStatus`]).
    pub(super) fn transfer_status(&self, layout: &Layout, epoch: u64) -> PeerResponse {
        let m = self.moves.lock();
        let mine = m.epoch == epoch;
        PeerResponse::Transfer {
            done: (mine && m.done) || (layout.epoch == epoch && !layout.gains_any(self.me)),
            keys: if mine { m.keys } else { 0 },
            bytes: if mine { m.bytes } else { 0 },
            epoch: layout.epoch,
            warm: self.warm.load(Relaxed),
        }
    }

    /// The pull of the keys this node gains in `view`'s move, from each
    /// current owner it has not finished with; marks it done once it is
    /// complete.
    async fn pull(&self, view: &Topology, local: &dyn Local) {
        let layout = &view.layout;
        let epoch = layout.epoch;
        {
            let mut m = self.moves.lock();
            if m.epoch != epoch {
                let dropped_for = m.dropped_for;
                *m = Moves {
                    epoch,
                    since: Some(Instant::now()),
                    done: !layout.gains_any(self.me),
                    dropped_for,
                    ..Moves::default()
                };
                if !m.done {
                    info!(epoch, "handoff: pulling the partitions this node gains");
                }
            }
            if m.done {
                return;
            }
        }
        let gained = layout.gained(self.me);
        // 1. Bulk: each partition from one owner (the first that is up),
        //    in one paced stream per owner. 2. Every other owner that is
        //    up: compare hash trees and take what differs (writes that
        //    reached it and not the bulk source); without trees
        //    (anti-entropy off), pull it whole.
        for bulk in [true, false] {
            let plan = self.plan(view, &gained, bulk);
            for (source, parts) in plan {
                let done = if bulk || local.store().trees().is_none() {
                    self.pull_from(view, local, source, &parts).await
                } else {
                    self.compare_with(view, local, source, &parts).await
                };
                match done {
                    Ok(()) => {
                        let mut m = self.moves.lock();
                        for p in parts {
                            m.covered.entry(p).or_default().push(source);
                        }
                    }
                    Err(why) => debug!(epoch, source, bulk, why, "handoff: not finished"),
                }
                if self.view().layout.epoch != epoch {
                    return;
                }
            }
        }
        let mut m = self.moves.lock();
        let floor = (layout.ring.replicas() + 1)
            .saturating_sub(layout.write_quorum)
            .max(1);
        let complete = gained.iter().all(|p| {
            let covered = m.covered.get(p).map_or(&[][..], Vec::as_slice);
            let old = layout.ring.preference_list(*p);
            covered.len() >= floor
                && !old
                    .iter()
                    .any(|n| !covered.contains(n) && !view.is_down(self.me, *n))
        });
        if complete && m.epoch == epoch {
            m.done = true;
            info!(
                epoch,
                keys = m.keys,
                bytes = m.bytes,
                partitions = gained.len(),
                "handoff: every partition this node gains is here"
            );
        }
    }

    /// Which owners to ask for which of the `gained` partitions: for the
    /// `bulk` pull, the first owner that is up of each partition not
    /// covered yet; for the check, every owner that is up and has not
    /// covered a partition the bulk pull has.
    fn plan(&self, view: &Topology, gained: &[u32], bulk: bool) -> BTreeMap<NodeId, Vec<u32>> {
        let up = |n: NodeId| view.peer(n).is_some_and(|p| p.state() == PeerState::Up);
        let m = self.moves.lock();
        let mut plan: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for &p in gained {
            let covered = m.covered.get(&p).map_or(&[][..], Vec::as_slice);
            let mut owners = view
                .layout
                .ring
                .preference_list(p)
                .iter()
                .copied()
                .filter(|&n| up(n) && !covered.contains(&n));
            if bulk == covered.is_empty() {
                let take = if bulk { 1 } else { usize::MAX };
                for n in owners.by_ref().take(take) {
                    plan.entry(n).or_default().push(p);
                }
            }
        }
        plan
    }

    /// Compares this node's hash trees of `parts` with `source`'s and
    /// takes what it holds newer or alone (anti-entropy's exchange, run to
    /// its end, paced at the handoff rate).
    async fn compare_with(
        &self,
        view: &Topology,
        local: &dyn Local,
        source: NodeId,
        parts: &[u32],
    ) -> Result<(), String> {
        let peer = view.peer(source).ok_or("not a member")?;
        // Only against an owner at this move's epoch with its store whole
        // (not refilling after a restart): what it lacks, this node would
        // lack too.
        let epoch = view.layout.epoch;
        match peer
            .call_at(
                epoch,
                PeerRequest::TransferStatus { epoch },
                self.hop_timeout,
            )
            .await
        {
            Ok(PeerResponse::Transfer {
                epoch: theirs,
                warm: true,
                ..
            }) if theirs == epoch => {}
            other => return Err(format!("not a source yet: {other:?}")),
        }
        let clock = local.store().clock_arc();
        let mut bandwidth = Bandwidth::new(self.handoff_rate, clock.now_ms());
        let mut run = Run {
            cluster: self,
            store: local.store(),
            peer,
            bandwidth: &mut bandwidth,
            clock: clock.as_ref(),
            moved: BTreeMap::new(),
        };
        // No cap on the keys listed: the check is complete or it failed.
        let (outcome, _, failed) = run.exchange(parts, usize::MAX / 2).await;
        // A key turned away for lack of room here is a key this node
        // lacks: not covered (the next tick tries again).
        let turned_away: u64 = run.moved.values().map(|m| m.1).sum();
        self.stats
            .handoff_keys
            .fetch_add(outcome.keys_pulled, Relaxed);
        let mut m = self.moves.lock();
        if m.epoch == view.layout.epoch {
            m.keys += outcome.keys_pulled;
        }
        match failed {
            None if turned_away == 0 => Ok(()),
            None => Err(format!("{turned_away} keys turned away for lack of room")),
            Some(why) => Err(why),
        }
    }

    /// Pulls from `source` every key this node gains in partitions
    /// `parts`, a page at a time, paced at the handoff byte rate.
    async fn pull_from(
        &self,
        view: &Topology,
        local: &dyn Local,
        source: NodeId,
        parts: &[u32],
    ) -> Result<(), String> {
        let peer = view.peer(source).ok_or("not a member")?;
        let epoch = view.layout.epoch;
        let started = Instant::now();
        let mut last_log = started;
        let (mut cursor, mut pulled) = (0u64, 0u64);
        loop {
            let mut tries = 0;
            let page = loop {
                let req = PeerRequest::Scan {
                    for_node: self.me,
                    cursor,
                    moving: true,
                    only: parts.to_vec(),
                };
                match peer.call_at(epoch, req, self.hop_timeout).await {
                    Ok(PeerResponse::Page { states, next }) => break (states, next),
                    Ok(PeerResponse::StaleEpoch { epoch }) => {
                        return Err(format!("the source is at epoch {epoch}"));
                    }
                    other => {
                        tries += 1;
                        if tries >= PULL_PAGE_TRIES {
                            return Err(format!("{other:?}"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            let (states, next) = page;
            let mut bytes = 0u64;
            let mut keys = 0u64;
            for (key, state) in &states {
                if valid_key(key) && view.layout.gains(self.me, key) {
                    bytes += (key.len() + state.payload_bytes()) as u64;
                    keys += 1;
                    local.store().apply_with(key, state, Fill::Evict);
                }
            }
            {
                let mut m = self.moves.lock();
                if m.epoch == epoch {
                    m.keys += keys;
                    m.bytes += bytes;
                }
            }
            self.stats.handoff_keys.fetch_add(keys, Relaxed);
            self.stats.handoff_bytes.fetch_add(bytes, Relaxed);
            pulled += bytes;
            if last_log.elapsed() >= PULL_LOG_EVERY {
                last_log = Instant::now();
                let m = self.moves.lock();
                info!(
                    epoch,
                    source,
                    keys = m.keys,
                    bytes = m.bytes,
                    "handoff: pulling"
                );
            }
            // Paced: this stream's bytes stay under the configured rate.
            let due = Duration::from_secs_f64(pulled as f64 / self.handoff_rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            match next {
                Some(c) => cursor = c,
                None => return Ok(()),
            }
            if self.view().layout.epoch != epoch {
                return Err("the layout changed".into());
            }
        }
    }

    /// As the driver of `view`'s move: settles it once every gaining
    /// member is done, or cancels it once it has run past the handoff
    /// timeout.
    async fn drive(&self, view: &Topology) {
        let layout = &view.layout;
        // Not a member that leaves in this move: it could decide its own
        // removal and stop before the others learn of it.
        let (_, leaving) = layout.movers();
        let driver = layout
            .members
            .iter()
            .map(|m| m.id)
            .find(|&id| !view.is_down(self.me, id) && !leaving.contains(&id));
        if driver != Some(self.me) {
            return;
        }
        let epoch = layout.epoch;
        let mut all_done = true;
        let gainers = layout.target.as_ref().map_or(&[][..], |m| &m.gainers[..]);
        for &id in gainers {
            let done = if id == self.me {
                matches!(
                    self.transfer_status(layout, epoch),
                    PeerResponse::Transfer { done: true, .. }
                )
            } else {
                let req = PeerRequest::TransferStatus { epoch };
                matches!(
                    view.handle(id).call_at(epoch, req, self.hop_timeout).await,
                    Ok(PeerResponse::Transfer { done: true, .. })
                )
            };
            all_done &= done;
        }
        let overdue = self
            .moves
            .lock()
            .since
            .is_some_and(|t| t.elapsed() > self.handoff_timeout);
        if !all_done && !overdue {
            return;
        }
        let (what, next): (&str, fn(&Layout) -> Option<Layout>) = if all_done {
            ("the move settles", Layout::settled)
        } else {
            warn!(
                epoch,
                timeout_secs = self.handoff_timeout.as_secs(),
                "handoff: the move did not finish in time; cancelling it"
            );
            ("the move is cancelled", Layout::cancelled)
        };
        let decided = self
            .propose(what, |base| {
                if base.epoch != epoch {
                    return Err(format!("epoch {} is installed, not {epoch}", base.epoch));
                }
                next(base).ok_or_else(|| "nothing is moving".to_string())
            })
            .await;
        match decided {
            Ok(e) => info!(epoch = e, from = epoch, what, "handoff: decided"),
            Err(e) => debug!(epoch, why = e.why, "handoff: not decided yet"),
        }
    }

    /// Once every member has installed `view`'s layout (which moves
    /// nothing), drops the copies of keys this node does not replicate in
    /// it. Once per epoch.
    async fn drop_moved(&self, view: &Topology, local: &dyn Local) {
        let epoch = view.layout.epoch;
        if self.moves.lock().dropped_for >= epoch {
            return;
        }
        // A member still on an older layout may send a read here. One that
        // is down is not waited for: whatever it sends when it is back is
        // stamped with its older epoch and refused here (it then fetches
        // the layout).
        for (_, peer) in view.peers() {
            if matches!(peer.state(), PeerState::Down { .. }) {
                continue;
            }
            match peer
                .call_timeout(PeerRequest::LayoutReport, self.hop_timeout)
                .await
            {
                Ok(PeerResponse::LayoutReport { installed, .. }) if installed >= epoch => {}
                _ => return,
            }
        }
        let mut cursor = Some(0);
        let mut dropped = 0;
        while let Some(c) = cursor {
            if self.view().layout.epoch != epoch {
                return;
            }
            let (n, next) = local
                .store()
                .drop_step(c, |key| !view.layout.writes_to(self.me, key));
            dropped += n;
            cursor = next;
            tokio::task::yield_now().await;
        }
        self.moves.lock().dropped_for = epoch;
        self.stats
            .handoff_keys_dropped
            .fetch_add(dropped as u64, Relaxed);
        if dropped > 0 {
            info!(
                epoch,
                dropped, "handoff: dropped the copies of partitions that moved away"
            );
        }
    }
}
