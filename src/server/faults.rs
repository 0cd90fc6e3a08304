//! Fault injection on the client port, for testing only: drop or delay a
//! fraction of requests or replies, so clients' timeouts and retries can be
//! tested against a real server. Off unless `[faults]` sets a fraction.
//! (The clock and partition faults live in [`super::fault_clock`] and the
//! transport.)
//!
//! Choices come from a seeded counter-based generator (SplitMix64), so one
//! connection sending the same requests sees the same faults on every run;
//! several connections share the sequence in whatever order they arrive.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::config::FaultsConfig;

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Handled as usual.
    None,
    /// Read and ignored: not executed, no reply.
    DropRequest,
    /// Executed; its reply is not sent.
    DropReply,
    /// Held this long, then executed as usual.
    Delay(Duration),
}

/// The node's fault settings and generator.
#[derive(Debug)]
pub struct Faults {
    config: FaultsConfig,
    state: AtomicU64,
    /// Requests read and ignored (`stats`).
    pub dropped_requests: AtomicU64,
    /// Requests executed whose replies were not sent (`stats`).
    pub dropped_replies: AtomicU64,
    /// Requests held before they were executed (`stats`).
    pub delayed: AtomicU64,
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Faults {
    /// `None` when every fraction is 0: no cost on the request path.
    pub fn new(config: &FaultsConfig) -> Option<Self> {
        config.client_port_any().then(|| Self {
            config: config.clone(),
            state: AtomicU64::new(config.seed),
            dropped_requests: AtomicU64::new(0),
            dropped_replies: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
        })
    }

    /// A uniform draw from [0, 1).
    fn draw(&self) -> f64 {
        let z = mix(self
            .state
            .fetch_add(GOLDEN_GAMMA, Relaxed)
            .wrapping_add(GOLDEN_GAMMA));
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The fault for the next request: three independent draws, in the
    /// order request drop, reply drop, delay.
    pub fn next(&self) -> Fault {
        let c = &self.config;
        let (a, b, d) = (self.draw(), self.draw(), self.draw());
        if a < c.drop_request {
            self.dropped_requests.fetch_add(1, Relaxed);
            Fault::DropRequest
        } else if b < c.drop_reply {
            self.dropped_replies.fetch_add(1, Relaxed);
            Fault::DropReply
        } else if d < c.delay {
            self.delayed.fetch_add(1, Relaxed);
            Fault::Delay(Duration::from_millis(c.delay_ms))
        } else {
            Fault::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(drop_reply: f64, seed: u64) -> FaultsConfig {
        FaultsConfig {
            drop_reply,
            seed,
            ..FaultsConfig::default()
        }
    }

    #[test]
    fn off_unless_a_fraction_is_set() {
        assert!(Faults::new(&FaultsConfig::default()).is_none());
        assert!(Faults::new(&config(0.1, 0)).is_some());
    }

    #[test]
    fn the_same_seed_gives_the_same_faults() {
        let run = |seed| {
            let f = Faults::new(&config(0.5, seed)).unwrap();
            (0..64).map(|_| f.next()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn the_fraction_holds_over_many_draws() {
        let f = Faults::new(&config(0.2, 42)).unwrap();
        let n = 100_000;
        let dropped = (0..n).filter(|_| f.next() == Fault::DropReply).count();
        // Binomial(100000, 0.2): sd 126; 6 sd either side.
        assert!((19_240..=20_760).contains(&dropped), "{dropped}");
        assert_eq!(f.dropped_replies.load(Relaxed), dropped as u64);
    }
}
