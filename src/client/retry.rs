//! When to try a request again, and how long to wait first. Pure: time and
//! randomness come in as arguments, so every rule here is unit-tested
//! without sockets or sleeps.
//!
//! Three mechanisms, each answering a different question:
//!
//! 1. **Is a retry safe?** ([`decide`]) Only if the request was never sent,
//!    or running it twice gives the same result as running it once: reads,
//!    `set`, `touch`, key listing, and any mutation carrying a request id
//!    (a webvac server answers a repeated id with the original result).
//!    Anything else that lost its reply is reported as "maybe applied".
//! 2. **How long to wait?** ([`full_jitter`]) Exponential backoff with full
//!    jitter: `random(0, min(cap, base * 2^retry))`. Spreading retries over
//!    the whole window keeps a burst of failed clients from retrying in
//!    lockstep (AWS architecture blog, "Exponential Backoff And Jitter").
//! 3. **Is this client retrying too much?** ([`RetryBudget`]) A token bucket
//!    in the style of Finagle's and gRPC's retry budgets: each first attempt
//!    deposits a fraction of a token, each retry withdraws a whole one, and
//!    a small floor refills over time. In steady state at most that fraction
//!    of requests are retries, so when a whole cluster is failing the
//!    client adds a bounded amount of load instead of multiplying it by the
//!    attempt count (a retry storm).

use std::time::{Duration, Instant};

use rand::Rng;

/// What a failed attempt tells us about the request's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It never left this process (connect refused, node marked down, the
    /// connection closed before the write): nothing ran, so trying another
    /// node is always safe.
    NotSent,
    /// It was written (or may have been) and no reply came: timeout, or a
    /// connection that broke mid-request. It may have run.
    Unknown,
    /// The server answered with an error that another attempt may not get
    /// (`SERVER_ERROR`, e.g. a write quorum that was not met). It may have
    /// partly run, so it counts like [`Failure::Unknown`].
    Transient,
    /// The server answered with an error another attempt would repeat
    /// (`CLIENT_ERROR`, `ERROR`, an object too large).
    Permanent,
    /// The client refused to send it (too many in flight): backpressure for
    /// the caller, not something to retry behind its back.
    Busy,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try the next node at once. Only for requests that were not sent:
    /// this is failover, not a retry, so it needs no budget and no backoff.
    FailOver,
    /// Retry after this long, if the retry budget allows.
    RetryAfter(Duration),
    /// Stop; the request may have run and repeating it is not safe.
    GiveUpMaybeApplied,
    /// Stop with the attempt's error.
    GiveUp,
}

/// Backoff and attempt limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per call, the first included (so 1 = never retry).
    pub max_attempts: u32,
    /// Backoff window before the first retry.
    pub backoff_base: Duration,
    /// Largest backoff window.
    pub backoff_cap: Duration,
}

/// Decides what follows attempt number `attempts_made` (1 = the first
/// attempt just failed) of a request. `retry_safe`: the request is
/// idempotent or carries a request id honoured by the server.
pub fn decide(
    policy: &Policy,
    failure: Failure,
    retry_safe: bool,
    attempts_made: u32,
    rng: &mut impl Rng,
) -> Decision {
    let unsafe_outcome = if retry_safe {
        Decision::GiveUp
    } else {
        Decision::GiveUpMaybeApplied
    };
    match failure {
        Failure::Busy | Failure::Permanent => Decision::GiveUp,
        _ if attempts_made >= policy.max_attempts => match failure {
            Failure::NotSent => Decision::GiveUp,
            _ => unsafe_outcome,
        },
        Failure::NotSent => Decision::FailOver,
        Failure::Unknown | Failure::Transient if !retry_safe => Decision::GiveUpMaybeApplied,
        Failure::Unknown | Failure::Transient => Decision::RetryAfter(full_jitter(
            policy.backoff_base,
            policy.backoff_cap,
            attempts_made - 1,
            rng,
        )),
    }
}

/// The backoff window before retry number `retry` (0 = the first retry):
/// `min(cap, base * 2^retry)`, saturating.
pub fn backoff_window(base: Duration, cap: Duration, retry: u32) -> Duration {
    // 2^31 times any base is past every sensible cap; stop shifting there.
    let factor = 1u32 << retry.min(31);
    base.checked_mul(factor).unwrap_or(Duration::MAX).min(cap)
}

/// Full jitter: uniformly random in `0..=backoff_window(base, cap, retry)`.
pub fn full_jitter(base: Duration, cap: Duration, retry: u32, rng: &mut impl Rng) -> Duration {
    let window = backoff_window(base, cap, retry);
    random_up_to(window, rng)
}

/// Equal jitter: half the window fixed, half random, so the delay is at least
/// `window / 2`. Used for reconnects, where a guaranteed spacing between
/// dials to a dead node matters more than spreading.
pub fn equal_jitter(base: Duration, cap: Duration, retry: u32, rng: &mut impl Rng) -> Duration {
    let window = backoff_window(base, cap, retry);
    let half = window / 2;
    half + random_up_to(window - half, rng)
}

fn random_up_to(limit: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=nanos))
}

/// Settings of a [`RetryBudget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Tokens each first attempt deposits: the steady-state fraction of
    /// requests that may be retries (0.1 = 10 %).
    pub retry_ratio: f64,
    /// Tokens added per second whatever the traffic, so a client with little
    /// traffic can still retry now and then.
    pub min_retries_per_sec: f64,
    /// Most tokens the bucket holds: the largest burst of retries.
    pub max_tokens: f64,
}

/// Fixed-point scale of [`RetryBudget`]'s tokens: a millionth of a token.
/// Integer tokens make "ten deposits of 0.1 earn exactly one retry" exact,
/// which floating point does not (0.1 × 10 < 1.0 there).
const MICROS_PER_TOKEN: u64 = 1_000_000;

fn to_micros(tokens: f64) -> u64 {
    // Saturating float-to-int cast; the config is validated non-negative.
    (tokens * MICROS_PER_TOKEN as f64).round() as u64
}

/// A token bucket limiting retries to a share of requests (see the module
/// doc). Starts full.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Deposit per first attempt, in micro-tokens.
    deposit: u64,
    /// Floor refill, in micro-tokens per second.
    refill_per_sec: u64,
    /// Capacity, in micro-tokens.
    max: u64,
    /// Micro-tokens available now, `0..=max`.
    tokens: u64,
    /// When the floor refill was last applied.
    refilled_at: Instant,
}

impl RetryBudget {
    /// A full bucket.
    ///
    /// # Panics
    /// If a setting is negative or not finite (validated in the client's
    /// configuration first).
    pub fn new(config: BudgetConfig, now: Instant) -> RetryBudget {
        for (name, v) in [
            ("retry_ratio", config.retry_ratio),
            ("min_retries_per_sec", config.min_retries_per_sec),
            ("max_tokens", config.max_tokens),
        ] {
            assert!(v.is_finite() && v >= 0.0, "retry budget {name} = {v}");
        }
        let max = to_micros(config.max_tokens);
        RetryBudget {
            deposit: to_micros(config.retry_ratio),
            refill_per_sec: to_micros(config.min_retries_per_sec),
            max,
            tokens: max,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = self.refilled_at.max(now);
        let added = elapsed.as_nanos() * u128::from(self.refill_per_sec) / 1_000_000_000;
        self.add(u64::try_from(added).unwrap_or(u64::MAX));
    }

    fn add(&mut self, micros: u64) {
        self.tokens = self.tokens.saturating_add(micros).min(self.max);
    }

    /// A first attempt started: deposit `retry_ratio`.
    pub fn on_request(&mut self, now: Instant) {
        self.refill(now);
        self.add(self.deposit);
    }

    /// A retry wants to go: withdraws one token and returns `true`, or
    /// returns `false` (and withdraws nothing) when less than one is left.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= MICROS_PER_TOKEN {
            self.tokens -= MICROS_PER_TOKEN;
            true
        } else {
            false
        }
    }

    /// Tokens available now (after refill).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens as f64 / MICROS_PER_TOKEN as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const MS: Duration = Duration::from_millis(1);

    fn policy(max_attempts: u32) -> Policy {
        Policy {
            max_attempts,
            backoff_base: 10 * MS,
            backoff_cap: 500 * MS,
        }
    }

    #[test]
    fn backoff_window_doubles_up_to_the_cap() {
        let windows: Vec<u64> = (0..8)
            .map(|r| backoff_window(10 * MS, 500 * MS, r).as_millis() as u64)
            .collect();
        assert_eq!(windows, [10, 20, 40, 80, 160, 320, 500, 500]);
        // Huge retry numbers saturate instead of overflowing.
        assert_eq!(backoff_window(10 * MS, 500 * MS, 1000), 500 * MS);
        assert_eq!(
            backoff_window(Duration::from_secs(u64::MAX / 2), Duration::MAX, 40),
            Duration::MAX
        );
        assert_eq!(backoff_window(Duration::ZERO, 500 * MS, 3), Duration::ZERO);
    }

    #[test]
    fn full_jitter_stays_in_its_window_and_spreads_over_it() {
        let mut rng = SmallRng::seed_from_u64(7);
        for retry in 0..10 {
            let window = backoff_window(10 * MS, 500 * MS, retry);
            let samples: Vec<Duration> = (0..2000)
                .map(|_| full_jitter(10 * MS, 500 * MS, retry, &mut rng))
                .collect();
            assert!(samples.iter().all(|&d| d <= window), "retry {retry}");
            // Full jitter uses the whole window: both ends get samples.
            assert!(samples.iter().any(|&d| d < window / 10), "retry {retry}");
            assert!(
                samples.iter().any(|&d| d > window * 9 / 10),
                "retry {retry}"
            );
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            assert!(
                mean > window * 4 / 10 && mean < window * 6 / 10,
                "retry {retry}: mean {mean:?} of window {window:?}"
            );
        }
        assert_eq!(full_jitter(MS, Duration::ZERO, 3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn equal_jitter_keeps_half_the_window() {
        let mut rng = SmallRng::seed_from_u64(8);
        for retry in 0..10 {
            let window = backoff_window(20 * MS, 2000 * MS, retry);
            for _ in 0..500 {
                let d = equal_jitter(20 * MS, 2000 * MS, retry, &mut rng);
                assert!(d >= window / 2 && d <= window, "{d:?} for {window:?}");
            }
        }
    }

    #[test]
    fn jitter_is_deterministic_for_a_seed() {
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..20)
                .map(|r| full_jitter(MS, Duration::from_secs(1), r, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn decisions() {
        let mut rng = SmallRng::seed_from_u64(1);
        let p = policy(3);
        let mut d = |failure, safe, made| decide(&p, failure, safe, made, &mut rng);
        // Not sent: fail over at once, safe or not, until attempts run out.
        assert_eq!(d(Failure::NotSent, false, 1), Decision::FailOver);
        assert_eq!(d(Failure::NotSent, true, 2), Decision::FailOver);
        assert_eq!(d(Failure::NotSent, false, 3), Decision::GiveUp);
        // Lost replies: retry only what is safe to repeat.
        assert!(matches!(d(Failure::Unknown, true, 1), Decision::RetryAfter(w) if w <= 10 * MS));
        assert!(matches!(d(Failure::Unknown, true, 2), Decision::RetryAfter(w) if w <= 20 * MS));
        assert!(matches!(
            d(Failure::Transient, true, 2),
            Decision::RetryAfter(_)
        ));
        assert_eq!(d(Failure::Unknown, false, 1), Decision::GiveUpMaybeApplied);
        assert_eq!(
            d(Failure::Transient, false, 1),
            Decision::GiveUpMaybeApplied
        );
        assert_eq!(d(Failure::Unknown, true, 3), Decision::GiveUp);
        assert_eq!(d(Failure::Unknown, false, 3), Decision::GiveUpMaybeApplied);
        // Never retried: the caller's mistake, or backpressure.
        assert_eq!(d(Failure::Permanent, true, 1), Decision::GiveUp);
        assert_eq!(d(Failure::Busy, true, 1), Decision::GiveUp);
        assert_eq!(d(Failure::Busy, false, 1), Decision::GiveUp);
        // One attempt means no retry at all.
        let once = policy(1);
        assert_eq!(
            decide(&once, Failure::Unknown, true, 1, &mut rng),
            Decision::GiveUp
        );
    }

    fn budget(ratio: f64, floor: f64, max: f64, now: Instant) -> RetryBudget {
        RetryBudget::new(
            BudgetConfig {
                retry_ratio: ratio,
                min_retries_per_sec: floor,
                max_tokens: max,
            },
            now,
        )
    }

    #[test]
    fn budget_refuses_retries_once_exhausted() {
        let t0 = Instant::now();
        let mut b = budget(0.1, 0.0, 5.0, t0);
        // A full bucket allows a burst of max_tokens retries...
        for _ in 0..5 {
            assert!(b.try_withdraw(t0));
        }
        // ...then refuses.
        assert!(!b.try_withdraw(t0));
        assert!(!b.try_withdraw(t0));
        // Ten first attempts earn exactly one retry.
        for _ in 0..9 {
            b.on_request(t0);
            assert!(!b.try_withdraw(t0));
        }
        b.on_request(t0);
        assert!(b.try_withdraw(t0 + Duration::from_nanos(1)));
        assert!(!b.try_withdraw(t0));
    }

    #[test]
    fn budget_holds_retries_to_its_ratio_under_a_full_outage() {
        // Every request fails and wants to retry: only ~10 % may.
        let t0 = Instant::now();
        let mut b = budget(0.1, 0.0, 10.0, t0);
        let requests = 10_000;
        let mut retries = 0;
        for _ in 0..requests {
            b.on_request(t0);
            if b.try_withdraw(t0) {
                retries += 1;
            }
        }
        // 10 banked tokens plus one per ten requests (the very first
        // deposit finds the bucket full and is lost).
        assert_eq!(retries, 10 + (requests - 1) / 10);
    }

    #[test]
    fn budget_floor_refills_over_time_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = budget(0.0, 10.0, 3.0, t0);
        for _ in 0..3 {
            assert!(b.try_withdraw(t0));
        }
        assert!(!b.try_withdraw(t0));
        // 10 per second: one token after 100 ms.
        assert!(!b.try_withdraw(t0 + Duration::from_millis(50)));
        assert!(b.try_withdraw(t0 + Duration::from_millis(101)));
        // A long quiet spell refills to the cap, not beyond.
        let later = t0 + Duration::from_secs(3600);
        assert!((b.available(later) - 3.0).abs() < 1e-9);
        // A clock that goes backwards adds nothing.
        assert!((b.available(t0) - 3.0).abs() < 1e-9);
    }

    #[test]
    #[should_panic(expected = "retry budget retry_ratio")]
    fn budget_rejects_negative_settings() {
        budget(-1.0, 0.0, 1.0, Instant::now());
    }
}
