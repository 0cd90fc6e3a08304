//! Quorum tracking: a plain state machine that counts answers from replicas
//! and says when a request is decided. No I/O and no clock: the coordinator
//! feeds it answers and asks it what to do (sans-IO).

use super::ring::NodeId;

/// Where a quorum stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Enough replicas have answered.
    Met,
    /// Too many replicas failed for the quorum to be met any more.
    Failed,
    /// Still waiting.
    Pending,
}

/// What a write needs from the replicas other than its primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Any this many of the replicas asked (none: 0).
    Any(usize),
    /// Per replica set, how many of which nodes (while partitions move:
    /// W on the current owners and W on the new ones).
    Sets(Vec<(usize, Vec<NodeId>)>),
}

impl Need {
    /// The quorum to count answers toward, out of `asked` replicas;
    /// `None` when the write needs no other replica.
    pub fn quorum(&self, asked: usize) -> Option<Quorum> {
        match self {
            Need::Any(0) => None,
            Need::Any(n) => Some(Quorum::new(*n, asked)),
            Need::Sets(s) if s.is_empty() => None,
            Need::Sets(s) => Some(Quorum::of_sets(s.clone(), asked)),
        }
    }
}

/// Counts successes and failures toward `needed` out of `asked` replicas;
/// or, for a write while partitions move ([`Quorum::of_sets`]), toward a
/// number per replica set, each node counting for every set it is in.
#[derive(Debug, Clone)]
pub struct Quorum {
    needed: usize,
    asked: usize,
    /// Per replica set: how many of its nodes must succeed, and the nodes.
    /// Empty: any `needed` of the `asked`.
    sets: Vec<(usize, Vec<NodeId>)>,
    ok: Vec<NodeId>,
    failed: Vec<(NodeId, String)>,
}

impl Quorum {
    /// A quorum of `needed` successes out of `asked` replicas, none counted
    /// yet.
    ///
    /// # Panics
    /// If `needed` is 0: a quorum of nobody is a programmer error.
    pub fn new(needed: usize, asked: usize) -> Self {
        assert!(needed > 0, "a quorum needs at least one replica");
        Self {
            needed,
            asked,
            sets: Vec::new(),
            ok: Vec::with_capacity(asked),
            failed: Vec::new(),
        }
    }

    /// A quorum met when, for every `(needed, nodes)` of `sets`, `needed`
    /// of `nodes` succeeded; `asked` nodes are asked (the union). Failed as
    /// soon as one set can no longer be met.
    ///
    /// # Panics
    /// If `sets` is empty or a set needs nobody.
    pub fn of_sets(sets: Vec<(usize, Vec<NodeId>)>, asked: usize) -> Self {
        assert!(
            !sets.is_empty() && sets.iter().all(|(n, _)| *n > 0),
            "a quorum needs at least one replica"
        );
        Self {
            needed: sets.iter().map(|(n, _)| *n).max().unwrap_or(1),
            asked,
            sets,
            ok: Vec::with_capacity(asked),
            failed: Vec::new(),
        }
    }

    /// Counts `node`'s success (each node at most once) and says where the
    /// quorum stands.
    pub fn succeeded(&mut self, node: NodeId) -> Decision {
        debug_assert!(!self.ok.contains(&node), "node {node} answered twice");
        self.ok.push(node);
        self.decision()
    }

    /// Counts `node`'s failure, kept with `why` for [`Quorum::explain`], and
    /// says where the quorum stands.
    pub fn failed(&mut self, node: NodeId, why: String) -> Decision {
        self.failed.push((node, why));
        self.decision()
    }

    /// Where the quorum stands: met, failed (too few replicas left that
    /// could still succeed), or pending.
    pub fn decision(&self) -> Decision {
        if !self.sets.is_empty() {
            let count = |nodes: &[NodeId], of: &mut dyn Iterator<Item = NodeId>| {
                of.filter(|n| nodes.contains(n)).count()
            };
            let mut met = true;
            for (needed, nodes) in &self.sets {
                let ok = count(nodes, &mut self.ok.iter().copied());
                let failed = count(nodes, &mut self.failed.iter().map(|f| f.0));
                if nodes.len() - failed < *needed {
                    return Decision::Failed;
                }
                met &= ok >= *needed;
            }
            return if met {
                Decision::Met
            } else {
                Decision::Pending
            };
        }
        if self.ok.len() >= self.needed {
            Decision::Met
        } else if self.asked - self.failed.len() < self.needed {
            Decision::Failed
        } else {
            Decision::Pending
        }
    }

    /// Successes counted so far.
    pub fn acks(&self) -> usize {
        self.ok.len()
    }

    /// Successes needed to meet the quorum.
    pub fn needed(&self) -> usize {
        self.needed
    }

    /// A reason a client can act on: how many answered, of how many needed,
    /// and what happened to the others.
    pub fn explain(&self) -> String {
        format!(
            "{} of {} replicas answered{}",
            self.ok.len(),
            self.needed,
            self.failures()
        )
    }

    /// What happened to the replicas that did not count: `; node 3: why`
    /// for each failure, then how many stayed silent.
    pub fn failures(&self) -> String {
        let mut s = String::new();
        for (node, why) in &self.failed {
            s.push_str(&format!("; node {node}: {why}"));
        }
        let silent = self.asked - self.ok.len() - self.failed.len();
        if silent > 0 {
            s.push_str(&format!("; {silent} did not answer in time"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn met_as_soon_as_enough_answer() {
        let mut q = Quorum::new(2, 3);
        assert_eq!(q.succeeded(1), Decision::Pending);
        assert_eq!(q.failed(2, "down".into()), Decision::Pending);
        assert_eq!(q.succeeded(3), Decision::Met);
    }

    #[test]
    fn fails_as_soon_as_it_cannot_be_met() {
        let mut q = Quorum::new(2, 3);
        assert_eq!(q.failed(2, "down".into()), Decision::Pending);
        assert_eq!(q.failed(3, "timeout".into()), Decision::Failed);
        assert!(q.explain().contains("node 3: timeout"), "{}", q.explain());
    }

    #[test]
    fn asking_fewer_than_needed_fails_at_once() {
        let q = Quorum::new(3, 2);
        assert_eq!(q.decision(), Decision::Failed);
        assert!(q.explain().contains("0 of 3"));
    }

    #[test]
    fn a_moving_write_needs_its_quorum_on_both_replica_sets() {
        // Old set {1 (primary), 2, 3}, new set {1, 3, 4}: node 2 leaves,
        // node 4 joins; W = 2 on each.
        let sets = || vec![(1, vec![2, 3]), (1, vec![3, 4])];
        let mut q = Quorum::of_sets(sets(), 3);
        assert_eq!(q.succeeded(2), Decision::Pending, "the leaver alone");
        assert_eq!(q.succeeded(4), Decision::Met);
        let mut q = Quorum::of_sets(sets(), 3);
        assert_eq!(q.succeeded(3), Decision::Met, "node 3 is in both");
        let mut q = Quorum::of_sets(sets(), 3);
        assert_eq!(q.failed(3, "down".into()), Decision::Pending);
        assert_eq!(q.succeeded(2), Decision::Pending);
        assert_eq!(q.failed(4, "down".into()), Decision::Failed);
    }

    #[test]
    fn a_moving_write_matches_counting_each_set_alone() {
        // Exhaustive over every order of answers from 4 nodes with every
        // outcome: met exactly when each set alone would be met.
        let sets = vec![(2, vec![1, 2, 3]), (1, vec![3, 4])];
        for outcomes in 0..(1u32 << 4) {
            let mut q = Quorum::of_sets(sets.clone(), 4);
            let mut last = Decision::Pending;
            for node in 1..=4u16 {
                last = if outcomes & (1 << (node - 1)) != 0 {
                    q.succeeded(node)
                } else {
                    q.failed(node, "no".into())
                };
                if last != Decision::Pending {
                    break;
                }
            }
            let ok = |n: u16| outcomes & (1 << (n - 1)) != 0;
            let want = [1, 2, 3].into_iter().filter(|&n| ok(n)).count() >= 2
                && [3, 4].into_iter().filter(|&n| ok(n)).count() >= 1;
            assert_eq!(last == Decision::Met, want, "outcomes {outcomes:04b}");
        }
    }

    #[test]
    fn silent_replicas_are_named_in_the_reason() {
        let mut q = Quorum::new(2, 3);
        q.succeeded(1);
        assert!(q.explain().contains("2 did not answer"), "{}", q.explain());
    }
}
