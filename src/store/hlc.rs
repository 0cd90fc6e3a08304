//! Hybrid logical clock: the version stamp of every write.
//!
//! A version is one `u64`, ordered as a number:
//!
//! ```text
//!  63                          22 21        12 11         0
//! +------------------------------+------------+------------+
//! | physical ms since 2024-01-01 |  logical   |  node id   |
//! |          (42 bits)           | (10 bits)  | (12 bits)  |
//! +------------------------------+------------+------------+
//! ```
//!
//! The physical part follows the wall clock; the logical counter orders writes
//! within one millisecond (and keeps the stamp moving forward if the wall
//! clock steps back); the node id breaks ties between nodes. Because the stamp
//! is a single number, "highest version wins" is a plain comparison and the
//! 64-bit CAS that clients see *is* the version, identical on every replica.
//! 42 bits of milliseconds last until 2163. A node doing more than 1,024
//! writes in one millisecond borrows from the next millisecond; the stamp runs
//! slightly ahead of the wall clock and falls back in step once load drops.

// The one lock-free primitive in the store: model-checked with loom
// (`RUSTFLAGS="--cfg webvac_loom" cargo test --lib --release hlc::loom_model`).
#[cfg(webvac_loom)]
use ::loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(webvac_loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// 2024-01-01T00:00:00Z in unix milliseconds.
pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;
/// Low bits of a version that hold the node id.
pub const NODE_BITS: u32 = 12;
/// Bits of a version, above the node id, that count writes within one
/// millisecond.
pub const LOGICAL_BITS: u32 = 10;
/// The largest node id a version can carry (4,095).
pub const NODE_ID_MAX: u16 = (1 << NODE_BITS) - 1;
/// The largest stamp without its node bits. The clock never issues past it
/// (it would wrap to 0 once shifted): it stops there instead. Only a clock
/// 140 years off, or a forged version that the drift bound lets through,
/// could reach it; the store refuses versions far ahead of its clock.
const STAMP_MAX: u64 = (1 << (64 - NODE_BITS)) - 1;

/// Issues strictly increasing version stamps for one node.
#[derive(Debug)]
pub struct Hlc {
    /// The last issued stamp without the node bits: `physical << 10 | logical`.
    last: AtomicU64,
    node_id: u16,
}

impl Hlc {
    /// # Panics
    /// If `node_id` does not fit in [`NODE_BITS`].
    pub fn new(node_id: u16) -> Self {
        assert!(
            node_id <= NODE_ID_MAX,
            "node id {node_id} exceeds {NODE_ID_MAX}"
        );
        Self {
            last: AtomicU64::new(0),
            node_id,
        }
    }

    /// A new stamp, greater than every stamp this clock issued or observed.
    pub fn next(&self, now_unix_ms: u64) -> u64 {
        let physical = now_unix_ms.saturating_sub(EPOCH_UNIX_MS) << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            // Checked: `last` is at most STAMP_MAX, and a candidate past it
            // would wrap when shifted (every later write "older").
            let candidate = physical.max(last.saturating_add(1)).min(STAMP_MAX);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return (candidate << NODE_BITS) | u64::from(self.node_id),
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a stamp seen elsewhere (a replicated write), so
    /// this node's next write orders after it.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version >> NODE_BITS, Ordering::Relaxed);
    }
}

/// The highest stamp any node can issue in the same millisecond as
/// `version`: a barrier that every write of that millisecond falls below.
pub fn end_of_millisecond(version: u64) -> u64 {
    version | ((1 << (LOGICAL_BITS + NODE_BITS)) - 1)
}

/// The unix milliseconds a version stamp was issued at (its physical part).
pub fn version_unix_ms(version: u64) -> u64 {
    (version >> (NODE_BITS + LOGICAL_BITS)) + EPOCH_UNIX_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_within_one_millisecond_and_across_clock_steps_back() {
        let hlc = Hlc::new(7);
        let a = hlc.next(EPOCH_UNIX_MS + 5_000);
        let b = hlc.next(EPOCH_UNIX_MS + 5_000);
        let c = hlc.next(EPOCH_UNIX_MS + 1_000); // wall clock stepped back
        assert!(a < b && b < c);
        assert_eq!(a & u64::from(NODE_ID_MAX), 7);
        assert_eq!(version_unix_ms(a), EPOCH_UNIX_MS + 5_000);
    }

    #[test]
    fn observe_orders_local_writes_after_remote_ones() {
        let local = Hlc::new(1);
        let remote = Hlc::new(2);
        let far = remote.next(EPOCH_UNIX_MS + 9_000);
        local.observe(far);
        assert!(local.next(EPOCH_UNIX_MS + 1_000) > far);
    }

    #[test]
    fn the_clock_saturates_instead_of_wrapping() {
        let hlc = Hlc::new(1);
        hlc.observe(u64::MAX);
        let a = hlc.next(EPOCH_UNIX_MS);
        let b = hlc.next(EPOCH_UNIX_MS);
        assert_eq!(a >> NODE_BITS, STAMP_MAX, "stops at the top");
        assert!(b >= a, "never wraps below an earlier stamp");
        assert_eq!(a & u64::from(NODE_ID_MAX), 1);
    }

    #[test]
    fn stamps_are_unique_across_threads() {
        let hlc = std::sync::Arc::new(Hlc::new(3));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let hlc = hlc.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .map(|_| hlc.next(EPOCH_UNIX_MS + 42))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}

#[cfg(all(test, webvac_loom))]
mod loom_model {
    use super::*;
    use ::loom::sync::Arc;

    /// Every interleaving of concurrent `next` and `observe` calls yields
    /// unique stamps, each thread's strictly increasing, and all above an
    /// observed remote stamp once `observe` returned.
    #[test]
    fn concurrent_stamps_are_unique_and_monotonic() {
        ::loom::model(|| {
            let hlc = Arc::new(Hlc::new(5));
            let remote = (3_000u64 << (LOGICAL_BITS + NODE_BITS)) | 9;
            let threads: Vec<_> = (0..2)
                .map(|i| {
                    let hlc = hlc.clone();
                    ::loom::thread::spawn(move || {
                        if i == 0 {
                            hlc.observe(remote);
                        }
                        let a = hlc.next(EPOCH_UNIX_MS + 1_000);
                        let b = hlc.next(EPOCH_UNIX_MS + 1_000);
                        assert!(a < b);
                        if i == 0 {
                            assert!(a > remote);
                        }
                        [a, b]
                    })
                })
                .collect();
            let mut all: Vec<u64> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 4);
        });
    }
}
