//! Deciding the next layout: one single-decree Paxos per epoch (issue 19).
//!
//! Slot `s` decides the layout of epoch `s`. Its voters are the members of
//! the committed layout of epoch `s - 1`, and an acceptor votes on slot `s`
//! only once it has installed epoch `s - 1` (a proposal carries its base).
//! So each decree's voters are fixed by the one before it, and two changes
//! proposed on the same base cannot both commit: the second proposer either
//! finds the first's value accepted and must finish it, or is refused.
//!
//! Sans-IO, as the rest of `cluster`: [`Acceptor`] and [`Proposer`] take
//! messages and return messages; the coordinator moves them and pushes the
//! chosen layout to every member.
//!
//! ```text
//!  proposer                         acceptors (members of epoch s-1)
//!    Prepare{s, b}  ──────────────▶  promise b, or Nack (promised higher,
//!    ◀──── Promise{s, b, accepted}     slot decided, behind, abstaining)
//!    (majority: value = the highest-ballot accepted one, else its own)
//!    Accept{s, b, v} ─────────────▶  accept if b ≥ promised
//!    ◀──── Accepted{s, b}
//!    (majority: v is chosen for epoch s)
//! ```
//!
//! **Restarts.** Nodes keep no disk state. A restarted acceptor has lost
//! its promises, so it could vote twice. It therefore starts *recovering*:
//! it votes on nothing until recovered acceptors of a majority of the
//! voters have reported the highest slot they know of, and then abstains
//! from every slot up to one above the highest report (see
//! [`recovery_floor`] for why that covers every slot it may have voted
//! on). Safe while fewer than a majority of voters are recovering at once;
//! a cluster of which a majority restarted at once starts again from its
//! configured layout, as a cluster restarted whole does. A recovered
//! acceptor that abstains from the next slot asks for an empty decree
//! (the same layout, one epoch on) so that it votes again at once: else a
//! rolling restart of every member, one at a time, would leave too few
//! voters for the next change.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::ring::NodeId;

/// A proposal number: higher rounds win, the node id breaks ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    /// Raised by a proposer on each new try.
    pub round: u64,
    /// The proposer's id, so that two proposers never share a ballot.
    pub node: NodeId,
}

impl Ballot {
    /// Below every ballot a proposer uses.
    pub const ZERO: Ballot = Ballot { round: 0, node: 0 };
}

/// Why an acceptor did not take part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// It promised a higher ballot for this slot.
    Promised(Ballot),
    /// The slot is decided: this acceptor has installed epoch `.0 ≥ slot`.
    Decided(u64),
    /// It has not installed the slot's base yet (its epoch is `.0`).
    Behind(u64),
    /// It restarted and abstains from this slot (recovering, or at or
    /// below its recovery floor).
    Abstains,
}

/// What an acceptor answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote<T> {
    /// Phase 1: promised `ballot`; the value it accepted in this slot, if
    /// any, with its ballot.
    Promise {
        /// The ballot promised.
        ballot: Ballot,
        /// Its last accepted value for the slot.
        accepted: Option<(Ballot, T)>,
    },
    /// Phase 2: accepted `ballot`'s value.
    Accepted {
        /// The ballot accepted.
        ballot: Ballot,
    },
    /// Did not take part.
    Refused(Refusal),
}

/// One node's acceptor.
#[derive(Debug, Clone)]
pub struct Acceptor<T> {
    /// The epoch this node has installed: it votes on `installed + 1` only.
    installed: u64,
    /// Highest ballot promised for slot `installed + 1`.
    promised: Ballot,
    /// Last value accepted for slot `installed + 1`.
    accepted: Option<(Ballot, T)>,
    /// `None`: recovering, votes on nothing. `Some(f)`: abstains from
    /// slots `≤ f`.
    floor: Option<u64>,
}

impl<T: Clone> Acceptor<T> {
    /// The acceptor of a node that has never voted (the first start of a
    /// cluster, whose epoch 0 is given by configuration).
    pub fn fresh(installed: u64) -> Self {
        Self {
            installed,
            promised: Ballot::ZERO,
            accepted: None,
            floor: Some(0),
        }
    }

    /// The acceptor of a node that may have voted before a restart: it
    /// votes on nothing until [`Acceptor::recovered`].
    pub fn recovering(installed: u64) -> Self {
        Self {
            floor: None,
            ..Self::fresh(installed)
        }
    }

    /// Ends recovery: abstain from every slot up to `floor` (see
    /// [`recovery_floor`]).
    pub fn recovered(&mut self, floor: u64) {
        self.floor = Some(floor);
    }

    /// Whether it has ended recovery.
    pub fn is_recovered(&self) -> bool {
        self.floor.is_some()
    }

    /// Where it stands, as `stats cluster` shows it: `recovering`,
    /// `abstains` (from the next slot) or `votes`.
    pub fn standing(&self) -> &'static str {
        match self.floor {
            None => "recovering",
            Some(f) if f > self.installed => "abstains",
            Some(_) => "votes",
        }
    }

    /// Whether it has ended recovery and still abstains from the next
    /// slot (`installed + 1`): until a decree passes that slot without
    /// it, it cannot vote.
    pub fn abstains_from_next(&self) -> bool {
        self.floor.is_some_and(|f| f > self.installed)
    }

    /// What it reports to a recovering peer: the highest slot it knows a
    /// value of (installed, or accepted in), or its own recovery floor.
    /// A promise alone does not count: the argument of [`recovery_floor`]
    /// rests on accepted values, and counting promises would make every
    /// failed prepare push a recovering node's floor past the next slot,
    /// which then could never gather a majority. `None` while it is
    /// recovering itself (its report would be a lie).
    pub fn report(&self) -> Option<u64> {
        let floor = self.floor?;
        let accepted = self.accepted.is_some();
        Some((self.installed + u64::from(accepted)).max(floor))
    }

    /// The node installed epoch `epoch` (decided by any means): promises
    /// and votes for slots up to it are done with.
    pub fn installed(&mut self, epoch: u64) {
        if epoch > self.installed {
            self.installed = epoch;
            self.promised = Ballot::ZERO;
            self.accepted = None;
        }
    }

    /// Whether it may vote on `slot` at all; the refusal if not.
    fn check(&self, slot: u64) -> Result<(), Refusal> {
        if slot <= self.installed {
            return Err(Refusal::Decided(self.installed));
        }
        if slot > self.installed + 1 {
            return Err(Refusal::Behind(self.installed));
        }
        match self.floor {
            Some(f) if slot > f => Ok(()),
            _ => Err(Refusal::Abstains),
        }
    }

    /// Phase 1.
    pub fn prepare(&mut self, slot: u64, ballot: Ballot) -> Vote<T> {
        if let Err(r) = self.check(slot) {
            return Vote::Refused(r);
        }
        if ballot <= self.promised {
            return Vote::Refused(Refusal::Promised(self.promised));
        }
        self.promised = ballot;
        Vote::Promise {
            ballot,
            accepted: self.accepted.clone(),
        }
    }

    /// Phase 2.
    pub fn accept(&mut self, slot: u64, ballot: Ballot, value: T) -> Vote<T> {
        if let Err(r) = self.check(slot) {
            return Vote::Refused(r);
        }
        if ballot < self.promised {
            return Vote::Refused(Refusal::Promised(self.promised));
        }
        self.promised = ballot;
        self.accepted = Some((ballot, value));
        Vote::Accepted { ballot }
    }
}

/// The floor a recovering acceptor abstains up to, from the reports
/// ([`Acceptor::report`]) of recovered voters: `None` until there are more
/// than `voters - majority` of them (a majority of an odd number of
/// voters; half of an even number).
///
/// Why that is safe: the node voted on slot `s` before it restarted only
/// after installing `s - 1`, so a majority `Q` had accepted `s - 1`. A
/// member of `Q` reports at least `s - 1` for ever after: its installed
/// epoch or pending slot does, and if it restarted, its own floor does (by
/// the same argument). The reports come from the other voters, and `Q`
/// has at least `majority - 1` of them; more than `voters - majority`
/// reports and those `majority - 1` add up to more than `voters - 1`, the
/// other voters, so the two sets meet. The floor, one above the highest
/// report, is then at least `s`. (With four voters two reports suffice:
/// two members restarted one after the other, the first not yet recovered,
/// can still recover.)
pub fn recovery_floor(voters: usize, reports: &[u64]) -> Option<u64> {
    let majority = voters / 2 + 1;
    (reports.len() > voters - majority).then(|| reports.iter().max().copied().unwrap_or(0) + 1)
}

/// Where a proposal stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Still collecting votes.
    Pending,
    /// `value` is decided for the slot; `own`: it is the proposer's own
    /// value (not an earlier proposal it had to finish).
    Chosen {
        /// The decided value.
        value: T,
        /// Whether it is the value this proposer put forward.
        own: bool,
    },
    /// Cannot succeed with this ballot: a try with a higher one may.
    Preempted(Ballot),
    /// The slot is already decided: fetch the layout of epoch `.0`.
    Decided(u64),
    /// Too many voters refused (behind or abstaining) for a majority.
    NoMajority,
}

/// Messages a proposer sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask<T> {
    /// Phase 1 to every voter.
    Prepare {
        /// The slot.
        slot: u64,
        /// Its ballot.
        ballot: Ballot,
    },
    /// Phase 2 to every voter.
    Accept {
        /// The slot.
        slot: u64,
        /// Its ballot.
        ballot: Ballot,
        /// The value to decide.
        value: T,
    },
}

/// One try at deciding `slot` with one ballot.
#[derive(Debug, Clone)]
pub struct Proposer<T> {
    slot: u64,
    ballot: Ballot,
    voters: BTreeSet<NodeId>,
    own: T,
    /// Phase 1 answers (the accepted values they reported).
    promises: BTreeMap<NodeId, Option<(Ballot, T)>>,
    /// Phase 2: the value sent and who accepted it.
    sent: Option<(T, bool)>,
    accepted: BTreeSet<NodeId>,
    refused: BTreeSet<NodeId>,
    outcome: Outcome<T>,
}

impl<T: Clone + PartialEq> Proposer<T> {
    /// A try at deciding `own` for `slot` among `voters` with `ballot`, and
    /// its first message (to every voter).
    pub fn start(slot: u64, ballot: Ballot, voters: BTreeSet<NodeId>, own: T) -> (Self, Ask<T>) {
        let p = Self {
            slot,
            ballot,
            voters,
            own,
            promises: BTreeMap::new(),
            sent: None,
            accepted: BTreeSet::new(),
            refused: BTreeSet::new(),
            outcome: Outcome::Pending,
        };
        (p, Ask::Prepare { slot, ballot })
    }

    fn majority(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Where it stands.
    pub fn outcome(&self) -> &Outcome<T> {
        &self.outcome
    }

    /// Takes voter `from`'s answer; returns the phase 2 message when phase
    /// 1 reaches a majority. Answers from non-voters, for another ballot,
    /// repeated, or after the outcome is settled are ignored.
    pub fn on_vote(&mut self, from: NodeId, vote: Vote<T>) -> Option<Ask<T>> {
        if self.outcome != Outcome::Pending || !self.voters.contains(&from) {
            return None;
        }
        match vote {
            Vote::Promise { ballot, accepted } if ballot == self.ballot && self.sent.is_none() => {
                self.promises.insert(from, accepted);
                if self.promises.len() >= self.majority() {
                    let earlier = self
                        .promises
                        .values()
                        .flatten()
                        .max_by_key(|(b, _)| *b)
                        .map(|(_, v)| v.clone());
                    let (value, own) = match earlier {
                        Some(v) => {
                            let own = v == self.own;
                            (v, own)
                        }
                        None => (self.own.clone(), true),
                    };
                    self.sent = Some((value.clone(), own));
                    return Some(Ask::Accept {
                        slot: self.slot,
                        ballot: self.ballot,
                        value,
                    });
                }
            }
            Vote::Accepted { ballot } if ballot == self.ballot && self.sent.is_some() => {
                self.accepted.insert(from);
                if self.accepted.len() >= self.majority() {
                    let (value, own) = self.sent.clone().expect("phase 2");
                    self.outcome = Outcome::Chosen { value, own };
                }
            }
            Vote::Refused(Refusal::Promised(b)) if b > self.ballot => {
                self.outcome = Outcome::Preempted(b);
            }
            Vote::Refused(Refusal::Decided(e)) => self.outcome = Outcome::Decided(e),
            Vote::Refused(_) => {
                self.refused.insert(from);
                if self.voters.len() - self.refused.len() < self.majority() {
                    self.outcome = Outcome::NoMajority;
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests;
