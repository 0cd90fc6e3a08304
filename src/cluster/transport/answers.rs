//! Where a served connection's queued answers are counted until they are
//! written: its own small allowance, else the node's in-flight budget. A
//! second count of the same kind holds the connection's requests while
//! their handlers run.
//!
//! Each answer frame is counted before it is queued and given back once the
//! writer has written it whole. The first [`INFLIGHT_FREE_BYTES`] a
//! connection has queued come from its allowance, a per-connection counter,
//! so the many small answers of a busy link never touch the budget's shared
//! atomic; past that an answer reserves its size from the budget. When the
//! budget has no room the caller gets a small `Failed` instead (its call
//! fails at once, as a client's `get` gets memcached's out-of-memory
//! error).
//!
//! A connection whose last answer did not fit then answers its next
//! requests with `Failed` without running them, for as long as the budget
//! could still not hold an answer of that size: a peer that asks for large
//! answers and never reads them would otherwise make the node build (and
//! throw away) every one of its thousand in-flight answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::budget::{INFLIGHT_FREE_BYTES, InflightBudget, Reservation};

/// The reason a `Failed` answer gives when the budget had no room.
pub(super) const OUT_OF_MEMORY: &str = "out of memory";

/// One served connection's count of its queued answers.
#[derive(Debug)]
pub(super) struct Answers {
    /// The node's in-flight budget, for answers past the allowance.
    budget: Arc<InflightBudget>,
    /// Bytes of queued answers counted against the allowance.
    free_bytes: AtomicUsize,
    /// Bytes of queued answers held in the budget.
    budget_bytes: AtomicUsize,
    /// Size of the last answer the budget could not hold; 0 once one fits.
    refused_bytes: AtomicUsize,
}

/// Where one queued answer's bytes are counted; given back when dropped.
#[derive(Debug)]
pub(super) enum Held {
    /// Nothing: a `Failed` or control frame, small and bounded in number by
    /// the connection's in-flight permits.
    Nothing,
    /// In the connection's allowance.
    Free {
        /// The connection's count.
        answers: Arc<Answers>,
        /// The answer's bytes.
        bytes: usize,
    },
    /// In the node's budget.
    Budget {
        /// The connection's count.
        answers: Arc<Answers>,
        /// The answer's bytes.
        bytes: usize,
        /// Given back when the answer is dropped.
        _reservation: Reservation,
    },
}

impl Drop for Held {
    fn drop(&mut self) {
        match self {
            Held::Free { answers, bytes } => {
                answers.free_bytes.fetch_sub(*bytes, Relaxed);
            }
            Held::Budget { answers, bytes, .. } => {
                answers.budget_bytes.fetch_sub(*bytes, Relaxed);
            }
            Held::Nothing => {}
        }
    }
}

impl Answers {
    /// A connection's count, nothing queued.
    pub(super) fn new(budget: Arc<InflightBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget,
            free_bytes: AtomicUsize::new(0),
            budget_bytes: AtomicUsize::new(0),
            refused_bytes: AtomicUsize::new(0),
        })
    }

    /// Counts an answer of `bytes`: in the allowance if it fits, else in
    /// the budget; `None` if neither has room (remembered for
    /// [`Answers::refusing`]).
    pub(super) fn hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        let free = self
            .free_bytes
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(bytes)
                    .filter(|&n| n <= INFLIGHT_FREE_BYTES)
            })
            .is_ok();
        let held = if free {
            Held::Free {
                answers: self.clone(),
                bytes,
            }
        } else if let Some(reservation) = Reservation::of(&self.budget, bytes) {
            self.budget_bytes.fetch_add(bytes, Relaxed);
            Held::Budget {
                answers: self.clone(),
                bytes,
                _reservation: reservation,
            }
        } else {
            self.refused_bytes.store(bytes, Relaxed);
            return None;
        };
        // Load first: the common case writes nothing.
        if self.refused_bytes.load(Relaxed) != 0 {
            self.refused_bytes.store(0, Relaxed);
        }
        Some(held)
    }

    /// Whether the next request should be answered `Failed` unrun: the
    /// last answer did not fit, one of its size still would not, and this
    /// connection's own answers are not draining (some are still queued,
    /// unwritten). Pressure from elsewhere alone never stops a connection
    /// whose peer reads what it is sent.
    pub(super) fn refusing(&self) -> bool {
        let refused = self.refused_bytes.load(Relaxed);
        refused != 0
            && self.free_bytes.load(Relaxed) + self.budget_bytes.load(Relaxed) > 0
            && self.budget.used().saturating_add(refused) > self.budget.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_answers_use_the_allowance_and_large_ones_the_budget() {
        let budget = Arc::new(InflightBudget::new(100_000));
        let answers = Answers::new(budget.clone());
        let small = answers.hold(INFLIGHT_FREE_BYTES / 2).expect("room");
        assert!(matches!(small, Held::Free { .. }));
        assert_eq!(budget.used(), 0, "the allowance does not touch the budget");
        let large = answers.hold(INFLIGHT_FREE_BYTES).expect("room");
        assert!(matches!(large, Held::Budget { .. }));
        assert_eq!(budget.used(), INFLIGHT_FREE_BYTES);
        drop((small, large));
        assert_eq!(budget.used(), 0);
        assert_eq!(answers.free_bytes.load(Relaxed), 0);
        assert_eq!(answers.budget_bytes.load(Relaxed), 0);
    }

    #[test]
    fn an_answer_past_the_budget_refuses_until_one_of_its_size_fits() {
        let budget = Arc::new(InflightBudget::new(100_000));
        let answers = Answers::new(budget.clone());
        let big = answers.hold(80_000).expect("room");
        assert!(!answers.refusing());
        assert!(answers.hold(30_000).is_none(), "past the budget");
        assert!(answers.refusing(), "its own answers are queued");
        let other = Answers::new(budget.clone());
        assert!(other.hold(30_000).is_none(), "past the budget");
        assert!(
            !other.refusing(),
            "nothing of its own is queued: the pressure is not its doing"
        );
        drop(big);
        assert!(!answers.refusing(), "now it would");
        let _again = answers.hold(30_000).expect("room");
        assert!(!answers.refusing());
    }
}
