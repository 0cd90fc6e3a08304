//! The in-flight budget: the one bound on the memory a node holds beside
//! its items, for requests whose data is still arriving, replies not yet
//! written, replica answers being gathered and peer frames.
//!
//! memcached reads a value straight into item memory, so a client half-way
//! through a large `set` is held to the memory limit. webvac buffers the value
//! in the connection until it is complete; this budget holds those buffers to
//! a limit of their own. A connection whose pending data block is larger than
//! [`INFLIGHT_FREE_BYTES`] reserves its whole frame here first; when the
//! budget is spent the request is refused exactly as memcached refuses one it
//! cannot allocate: `SERVER_ERROR out of memory storing object`, the data
//! discarded, and the old value of a `set` dropped.
//!
//! Replies draw on the same budget: memcached writes a reply from the items
//! themselves, webvac copies it into the connection, so a reply waiting for
//! a client that does not read holds memory too. Past
//! [`INFLIGHT_FREE_BYTES`], a connection holds its pending reply bytes here;
//! when the budget is spent the reply is memcached's
//! `SERVER_ERROR out of memory writing get response`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use crate::limits::INFLIGHT_FREE_BYTES;
use crate::limits::{INFLIGHT_BUDGET_BYTES_MIN, INFLIGHT_BUDGET_SHARE_OF_ITEMS};

/// The budget for a node whose item memory limit is `memory_limit_bytes`:
/// an eighth of it, at least [`INFLIGHT_BUDGET_BYTES_MIN`].
pub fn limit_for(memory_limit_bytes: usize) -> usize {
    (memory_limit_bytes / INFLIGHT_BUDGET_SHARE_OF_ITEMS).max(INFLIGHT_BUDGET_BYTES_MIN)
}

/// Bytes of incomplete requests and unsent replies all connections may hold
/// beyond [`INFLIGHT_FREE_BYTES`] each, of gathered replica answers, and of
/// peer frames.
#[derive(Debug)]
pub struct InflightBudget {
    /// Bytes reserved now.
    used: AtomicUsize,
    limit: usize,
    /// Holders waiting for room ([`Reservation::hold_within`]); releases
    /// wake them only when there are any.
    waiters: AtomicUsize,
    room: tokio::sync::Notify,
}

impl InflightBudget {
    /// A budget of `limit` bytes, none reserved.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            waiters: AtomicUsize::new(0),
            room: tokio::sync::Notify::new(),
        }
    }

    /// Bytes reserved now, over all connections (`stats` `inflight_bytes`).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most that may be reserved at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    // SeqCst on `used` and `waiters`: a waiter adds itself then reads
    // `used`, a release lowers `used` then reads `waiters`; with weaker
    // orderings both could read the old value and the wakeup be lost.
    fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::SeqCst);
        assert!(
            before >= bytes,
            "in-flight budget released more than reserved"
        );
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }
}

/// One holder's share of the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<InflightBudget>,
    bytes: usize,
}

impl Reservation {
    /// An empty reservation against `budget`.
    pub fn new(budget: &Arc<InflightBudget>) -> Self {
        Self {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// A reservation of `bytes`, or `None` if the budget has no room.
    pub fn of(budget: &Arc<InflightBudget>, bytes: usize) -> Option<Self> {
        let mut r = Self::new(budget);
        r.hold(bytes).then_some(r)
    }

    /// Bytes this connection holds reserved now (0 when none).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reserves `bytes` for the frame now pending. False if the budget has no
    /// room (nothing is reserved then).
    pub fn reserve(&mut self, bytes: usize) -> bool {
        debug_assert_eq!(self.bytes, 0, "one pending frame at a time");
        if self.budget.try_reserve(bytes) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }

    /// Holds `bytes` in all, reserving only what is not held yet (a reply
    /// that grows). False if the budget has no room for the difference
    /// (what was held stays held).
    pub fn hold(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if self.budget.try_reserve(bytes - self.bytes) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }

    /// Holds exactly `bytes`: gives back what is held past it, or reserves
    /// what is missing. False if the budget has no room for the difference
    /// (what was held stays held).
    pub fn hold_exactly(&mut self, bytes: usize) -> bool {
        if bytes < self.bytes {
            self.budget.release(self.bytes - bytes);
            self.bytes = bytes;
        }
        self.hold(bytes)
    }

    /// Holds exactly `bytes` like [`Self::hold_exactly`], waiting up to
    /// `wait` for room to come back if there is none now. False if none
    /// came (what was held stays held).
    pub async fn hold_within(&mut self, bytes: usize, wait: std::time::Duration) -> bool {
        if self.hold_exactly(bytes) {
            return true;
        }
        /// Counts one waiter for as long as it lives, so a wait that is
        /// dropped part-way (its task ended) is not counted forever.
        struct Waiting<'a>(&'a InflightBudget);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.waiters.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let budget = self.budget.clone();
        budget.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&budget);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the retry, so a release between the two
            // still wakes this holder.
            let notified = budget.room.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.hold(bytes) {
                break true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break self.hold(bytes);
            }
        }
    }

    /// Gives the reservation back (the frame completed).
    pub fn clear(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
            self.bytes = 0;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_returned() {
        let budget = Arc::new(InflightBudget::new(100));
        let mut a = Reservation::new(&budget);
        let mut b = Reservation::new(&budget);
        assert!(a.reserve(60));
        assert!(!b.reserve(60), "over the limit");
        assert_eq!(budget.used(), 60);
        a.clear();
        assert!(b.reserve(60));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_held_reply_grows_by_its_difference() {
        let budget = Arc::new(InflightBudget::new(100));
        let mut reply = Reservation::new(&budget);
        assert!(reply.hold(40));
        assert!(reply.hold(30), "already held");
        assert!(reply.hold(90));
        assert_eq!(budget.used(), 90);
        assert!(!reply.hold(120), "past the limit");
        assert_eq!(reply.bytes(), 90, "what was held stays held");
        reply.clear();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn holding_exactly_gives_back_the_excess() {
        let budget = Arc::new(InflightBudget::new(100));
        let mut line = Reservation::new(&budget);
        assert!(line.hold_exactly(80));
        assert!(line.hold_exactly(30));
        assert_eq!(budget.used(), 30, "the excess goes back");
        assert!(!line.hold_exactly(120));
        assert_eq!(line.bytes(), 30, "what was held stays held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_holder_gets_room_given_back_and_gives_up_at_its_deadline() {
        use std::time::Duration;
        let budget = Arc::new(InflightBudget::new(100));
        let mut hog = Reservation::new(&budget);
        assert!(hog.hold(90));
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut line = Reservation::new(&budget);
                let held = line.hold_within(50, Duration::from_secs(2)).await;
                (held, line.bytes())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "no room yet");
        hog.clear();
        assert_eq!(
            waiter.await.expect("waiter"),
            (true, 50),
            "woken by the release"
        );
        assert_eq!(budget.used(), 0);

        assert!(hog.hold(90));
        let mut late = Reservation::new(&budget);
        let started = tokio::time::Instant::now();
        assert!(!late.hold_within(50, Duration::from_secs(2)).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "gave up at the deadline"
        );
        assert_eq!(budget.waiters.load(Ordering::Relaxed), 0);
    }
}
