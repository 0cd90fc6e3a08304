//! A skewed, drifting wall clock, for fault injection (`[faults]
//! clock_offset_ms`, `clock_rate`, and the `fault` command).
//!
//! It wraps the node's real clock and is what the store reads, so every use
//! of time on the node (version stamps, expiry, tombstone and dedup ages,
//! hint windows, anti-entropy pacing) sees the skewed time, as on a machine
//! whose clock is off. The server wraps its clock only when a clock fault is
//! configured or `control` is on: otherwise nothing here runs.
//!
//! ```text
//!  now = real + skew(real)
//!  skew(real) = anchor_skew + (real - anchor_real) × (rate - 1)
//! ```
//!
//! The anchor is the node's start (where the skew is the configured
//! offset), and moves to "now" on every change. A new rate bends the clock
//! without a jump, keeping the skew gained so far. A new offset steps it, as
//! setting a real clock would: from then on it reads exactly that far ahead,
//! the drift gained so far dropped, so `offset 0` puts a drifting clock back
//! in sync (it goes on drifting at its rate).
//!
//! The three anchor fields change together, so readers take them through a
//! sequence lock: the writer makes the sequence odd, writes, makes it even
//! again; a reader retries if the sequence was odd or moved under it. Reads
//! take no lock; writes (a test's command) are serialised by a mutex.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering, fence};

use parking_lot::Mutex;

use crate::store::Clock;

/// A clock that reads `offset` ahead of its inner clock and runs at `rate`.
pub struct FaultClock {
    /// The real clock.
    inner: Arc<dyn Clock>,
    /// The offset last set, in ms: what `stats` reports as the setting (the
    /// skew itself lives in the anchor).
    offset_ms: AtomicI64,
    /// Even while the anchor fields are consistent; odd while one is written.
    seq: AtomicU64,
    /// Inner-clock ms of the last change.
    anchor_real_ms: AtomicU64,
    /// Skew at `anchor_real_ms`, in ms (f64 bits).
    anchor_skew_bits: AtomicU64,
    /// Clock rate against the inner clock (f64 bits).
    rate_bits: AtomicU64,
    /// Serialises writers of the anchor fields.
    writer: Mutex<()>,
}

/// One consistent reading of the anchor fields.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    real_ms: u64,
    skew_ms: f64,
    rate: f64,
}

impl Anchor {
    /// Skew in ms at inner-clock time `real_ms`.
    fn skew_at(self, real_ms: u64) -> f64 {
        let elapsed = real_ms as f64 - self.real_ms as f64;
        self.skew_ms + elapsed * (self.rate - 1.0)
    }
}

impl std::fmt::Debug for FaultClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultClock")
            .field("offset_ms", &self.offset_ms())
            .field("rate", &self.rate())
            .field("skew_ms", &self.skew_ms())
            .finish()
    }
}

impl FaultClock {
    /// `inner` skewed by `offset_ms` and running at `rate` from now on. The
    /// caller checks the values ([`crate::config::FaultsConfig`]).
    ///
    /// # Panics
    /// If `rate` is not a positive finite number (a programmer error).
    pub fn new(inner: Arc<dyn Clock>, offset_ms: i64, rate: f64) -> Self {
        assert!(rate.is_finite() && rate > 0.0, "clock rate {rate}");
        let now = inner.now_ms();
        Self {
            inner,
            offset_ms: AtomicI64::new(offset_ms),
            seq: AtomicU64::new(0),
            anchor_real_ms: AtomicU64::new(now),
            anchor_skew_bits: AtomicU64::new((offset_ms as f64).to_bits()),
            rate_bits: AtomicU64::new(rate.to_bits()),
            writer: Mutex::new(()),
        }
    }

    /// The offset last set, in ms.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// The rate now.
    pub fn rate(&self) -> f64 {
        self.anchor().rate
    }

    /// How far ahead of the real time the clock reads now, in ms: the
    /// offset plus the drift gained since it was set.
    pub fn skew_ms(&self) -> i64 {
        let anchor = self.anchor();
        anchor.skew_at(self.inner.now_ms()).round() as i64
    }

    /// Steps the clock: from now on it reads exactly `offset_ms` ahead of
    /// the real time (the drift gained so far is dropped), and goes on
    /// drifting at its rate from there.
    pub fn set_offset_ms(&self, offset_ms: i64) {
        let _writer = self.writer.lock();
        let rate = self.anchor().rate;
        self.publish(Anchor {
            real_ms: self.inner.now_ms(),
            skew_ms: offset_ms as f64,
            rate,
        });
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// Makes the clock run at `rate` from now on, continuing from where the
    /// old rate brought it.
    ///
    /// # Panics
    /// As [`FaultClock::new`].
    pub fn set_rate(&self, rate: f64) {
        assert!(rate.is_finite() && rate > 0.0, "clock rate {rate}");
        let _writer = self.writer.lock();
        let real = self.inner.now_ms();
        self.publish(Anchor {
            real_ms: real,
            skew_ms: self.anchor().skew_at(real),
            rate,
        });
    }

    /// Writes the anchor fields as one; the caller holds `writer`.
    fn publish(&self, a: Anchor) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.anchor_real_ms.store(a.real_ms, Ordering::Relaxed);
        self.anchor_skew_bits
            .store(a.skew_ms.to_bits(), Ordering::Relaxed);
        self.rate_bits.store(a.rate.to_bits(), Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The anchor fields, consistent with each other.
    fn anchor(&self) -> Anchor {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 0 {
                let anchor = Anchor {
                    real_ms: self.anchor_real_ms.load(Ordering::Relaxed),
                    skew_ms: f64::from_bits(self.anchor_skew_bits.load(Ordering::Relaxed)),
                    rate: f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
                };
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return anchor;
                }
            }
            std::hint::spin_loop();
        }
    }
}

impl Clock for FaultClock {
    fn now_ms(&self) -> u64 {
        // The anchor before the real time: the real time is then never
        // before the anchor read (a change anchors at its own now).
        let anchor = self.anchor();
        let real = self.inner.now_ms();
        // Offsets are bounded (a year) and the drift by rate × uptime, so
        // the sum stays far inside f64's exact integers; a reading before
        // 1970 is 0.
        let now = i64::try_from(real).unwrap_or(i64::MAX) as f64 + anchor.skew_at(real);
        if now <= 0.0 { 0 } else { now.round() as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;

    const T0: u64 = 1_800_000_000_000;

    fn skewed(offset_ms: i64, rate: f64) -> (Arc<ManualClock>, FaultClock) {
        let real = Arc::new(ManualClock::new(T0));
        let clock = FaultClock::new(real.clone(), offset_ms, rate);
        (real, clock)
    }

    #[test]
    fn an_offset_moves_every_reading() {
        let (real, clock) = skewed(1500, 1.0);
        assert_eq!(clock.now_ms(), T0 + 1500);
        real.advance_ms(250);
        assert_eq!(clock.now_ms(), T0 + 1750);
        assert_eq!(clock.now_secs(), u32::try_from((T0 + 1750) / 1000).unwrap());
        clock.set_offset_ms(-2000);
        assert_eq!(clock.now_ms(), T0 + 250 - 2000);
        assert_eq!((clock.offset_ms(), clock.skew_ms()), (-2000, -2000));
    }

    #[test]
    fn a_rate_drifts_from_the_start_and_bends_without_a_jump() {
        let (real, clock) = skewed(0, 1.5);
        assert_eq!(clock.now_ms(), T0);
        real.advance_ms(1000);
        assert_eq!(clock.now_ms(), T0 + 1500);
        // Slower from here on, continuing from T0 + 1500.
        clock.set_rate(0.5);
        assert_eq!(clock.now_ms(), T0 + 1500);
        assert_eq!(clock.rate(), 0.5);
        real.advance_ms(1000);
        assert_eq!(clock.now_ms(), T0 + 2000);
        // Back in step: the drift gained so far (none, now) stays.
        clock.set_rate(1.0);
        real.advance_ms(1000);
        assert_eq!(clock.now_ms(), T0 + 3000);
    }

    #[test]
    fn an_offset_replaces_the_drift_gained_and_the_rate_goes_on() {
        let (real, clock) = skewed(0, 2.0);
        real.advance_ms(10);
        clock.set_rate(1.0);
        real.advance_ms(10);
        // The 10 ms gained at double speed stay once in step again ...
        assert_eq!(clock.now_ms(), T0 + 20 + 10);
        assert_eq!((clock.offset_ms(), clock.skew_ms()), (0, 10));
        // ... until an offset is set: then exactly that, drifting on.
        clock.set_rate(1.5);
        clock.set_offset_ms(100);
        assert_eq!(clock.now_ms(), T0 + 20 + 100);
        real.advance_ms(10);
        assert_eq!(clock.now_ms(), T0 + 30 + 100 + 5);
        assert_eq!(
            (clock.offset_ms(), clock.skew_ms(), clock.rate()),
            (100, 105, 1.5)
        );
        clock.set_offset_ms(0);
        assert_eq!(clock.now_ms(), T0 + 30);
    }

    #[test]
    fn a_reading_before_the_epoch_is_zero() {
        let real = Arc::new(ManualClock::new(1000));
        let clock = FaultClock::new(real, -5000, 1.0);
        assert_eq!(clock.now_ms(), 0);
    }

    #[test]
    fn readers_never_see_a_half_written_anchor() {
        // Three anchors that all read the same at the (standing) real time
        // T0, while any mixture of their fields reads 500 to 1000 ms off: a
        // torn read would show.
        let (_real, clock) = skewed(0, 1.0);
        let clock = Arc::new(clock);
        let states = [
            Anchor {
                real_ms: T0,
                skew_ms: 0.0,
                rate: 2.0,
            },
            Anchor {
                real_ms: T0 - 1000,
                skew_ms: -1000.0,
                rate: 2.0,
            },
            Anchor {
                real_ms: T0 - 1000,
                skew_ms: -500.0,
                rate: 1.5,
            },
        ];
        for s in states {
            assert_eq!(s.skew_at(T0), 0.0);
        }
        let writer = {
            let clock = clock.clone();
            std::thread::spawn(move || {
                for i in 0..100_000 {
                    let _w = clock.writer.lock();
                    clock.publish(states[i % 3]);
                }
            })
        };
        for _ in 0..300_000 {
            assert_eq!(clock.now_ms(), T0);
        }
        writer.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "clock rate")]
    fn a_zero_rate_is_a_programmer_error() {
        skewed(0, 1.0).1.set_rate(0.0);
    }
}
