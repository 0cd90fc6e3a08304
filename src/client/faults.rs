//! Deterministic fault injection for tests (see [`ClientFaults`]): decides,
//! per request, whether the connection drops it, drops its reply, or holds
//! it back. The connection carries the decision out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::config::ClientFaults;

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Never write it.
    pub drop_request: bool,
    /// Read its reply and throw it away.
    pub drop_reply: bool,
    /// Hold it this long before writing it.
    pub delay: Option<Duration>,
}

/// Draws [`FaultPlan`]s; one per client, shared by its connections.
#[derive(Debug)]
pub struct FaultInjector {
    config: ClientFaults,
    /// Requests planned so far (for the `*_first_*` counts).
    planned: AtomicU64,
    /// Seeded from `config.seed`; a tiny critical section per draw.
    rng: Mutex<SmallRng>,
}

impl FaultInjector {
    pub fn new(config: ClientFaults) -> FaultInjector {
        FaultInjector {
            config,
            planned: AtomicU64::new(0),
            rng: Mutex::new(SmallRng::seed_from_u64(config.seed)),
        }
    }

    /// The plan for the next request.
    pub fn plan(&self) -> FaultPlan {
        if !self.config.any() {
            return FaultPlan::default();
        }
        let c = &self.config;
        let n = self.planned.fetch_add(1, Ordering::Relaxed);
        let mut rng = self.rng.lock();
        // Draw all three every time, so one knob does not shift the others'
        // sequence.
        let (p_request, p_reply, p_delay) =
            (rng.r#gen::<f64>(), rng.r#gen::<f64>(), rng.r#gen::<f64>());
        FaultPlan {
            drop_request: n < u64::from(c.drop_first_requests) || p_request < c.drop_request,
            drop_reply: n < u64::from(c.drop_first_replies) || p_reply < c.drop_reply,
            delay: (p_delay < c.delay && c.delay_ms > 0).then(|| Duration::from_millis(c.delay_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_faults_by_default() {
        let f = FaultInjector::new(ClientFaults::default());
        for _ in 0..100 {
            assert_eq!(f.plan(), FaultPlan::default());
        }
    }

    #[test]
    fn first_counts_are_exact() {
        let f = FaultInjector::new(ClientFaults {
            drop_first_replies: 2,
            drop_first_requests: 1,
            ..ClientFaults::default()
        });
        let plans: Vec<(bool, bool)> = (0..5)
            .map(|_| f.plan())
            .map(|p| (p.drop_request, p.drop_reply))
            .collect();
        assert_eq!(
            plans,
            [
                (true, true),
                (false, true),
                (false, false),
                (false, false),
                (false, false)
            ]
        );
    }

    #[test]
    fn fractions_follow_the_seed() {
        let config = ClientFaults {
            drop_reply: 0.3,
            delay: 0.5,
            delay_ms: 7,
            seed: 99,
            ..ClientFaults::default()
        };
        let draw = || {
            let f = FaultInjector::new(config);
            (0..1000).map(|_| f.plan()).collect::<Vec<_>>()
        };
        let plans = draw();
        assert_eq!(plans, draw(), "same seed, same faults");
        let dropped = plans.iter().filter(|p| p.drop_reply).count();
        let delayed = plans.iter().filter(|p| p.delay.is_some()).count();
        assert!((230..=370).contains(&dropped), "{dropped}");
        assert!((430..=570).contains(&delayed), "{delayed}");
        assert!(plans.iter().all(|p| !p.drop_request));
        assert!(
            plans
                .iter()
                .all(|p| p.delay.is_none_or(|d| d == Duration::from_millis(7)))
        );
    }
}
