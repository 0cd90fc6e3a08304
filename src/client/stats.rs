//! Counters of what the client did, for benches, tests and dashboards.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a client's counters (all clones of a client share them).
/// Every count is since the client was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls made (a `get_many` counts one per key).
    pub requests: u64,
    /// Attempts sent or tried, first attempts included.
    pub attempts: u64,
    /// Retries after a lost reply or a server error (each withdrew a token
    /// from the retry budget).
    pub retries: u64,
    /// Attempts moved to another node because the request could not be sent
    /// (failover: no budget, no backoff).
    pub failovers: u64,
    /// Attempts that got no reply in time.
    pub timeouts: u64,
    /// Retries refused by the retry budget.
    pub budget_refusals: u64,
    /// Calls that ended in [`ClientError::MaybeApplied`](super::ClientError::MaybeApplied).
    pub maybe_applied: u64,
    /// Calls refused with [`ClientError::Busy`](super::ClientError::Busy).
    pub busy: u64,
    /// Connections opened.
    pub connects: u64,
    /// Connects that failed.
    pub connect_failures: u64,
    /// Cluster map refreshes that succeeded.
    pub refreshes: u64,
    /// Requests sent with a request id.
    pub request_ids_sent: u64,
}

/// The live counters behind [`ClientStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    pub failovers: AtomicU64,
    pub timeouts: AtomicU64,
    pub budget_refusals: AtomicU64,
    pub maybe_applied: AtomicU64,
    pub busy: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub refreshes: AtomicU64,
    pub request_ids_sent: AtomicU64,
}

/// Adds one.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> ClientStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            requests: get(&self.requests),
            attempts: get(&self.attempts),
            retries: get(&self.retries),
            failovers: get(&self.failovers),
            timeouts: get(&self.timeouts),
            budget_refusals: get(&self.budget_refusals),
            maybe_applied: get(&self.maybe_applied),
            busy: get(&self.busy),
            connects: get(&self.connects),
            connect_failures: get(&self.connect_failures),
            refreshes: get(&self.refreshes),
            request_ids_sent: get(&self.request_ids_sent),
        }
    }
}
