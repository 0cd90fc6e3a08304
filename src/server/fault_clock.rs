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
//!  now = real + offset + drift(real)
//!  drift(real) = anchor_drift + (real - anchor_real) × (rate - 1)
//! ```
//!
//! The anchor is the node's start, and moves to "now" whenever the rate
//! changes, so a new rate bends the clock without a jump. An offset change
//! does jump it, as stepping a real clock would.
//!
//! The three drift fields change together, so readers take them through a
//! sequence lock: the writer makes the sequence odd, writes, makes it even
//! again; a reader retries if the sequence was odd or moved under it. Reads
//! take no lock, writes (a test's command) are serialised by a mutex.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering, fence};

use parking_lot::Mutex;

use crate::store::Clock;

/// A clock that reads `offset` ahead of its inner clock and runs at `rate`.
pub struct FaultClock {
    /// The real clock.
    inner: Arc<dyn Clock>,
    /// Fixed skew in ms, added to every reading.
    offset_ms: AtomicI64,
    /// Even while the drift fields are consistent; odd while one is written.
    seq: AtomicU64,
    /// Inner-clock ms at which the current rate took effect.
    anchor_real_ms: AtomicU64,
    /// Drift accumulated up to `anchor_real_ms`, ms (f64 bits).
    anchor_drift_bits: AtomicU64,
    /// Clock rate against the inner clock (f64 bits).
    rate_bits: AtomicU64,
    /// Serialises writers of the drift fields.
    writer: Mutex<()>,
}

/// One consistent reading of the drift fields.
#[derive(Debug, Clone, Copy)]
struct Drift {
    anchor_real_ms: u64,
    anchor_drift_ms: f64,
    rate: f64,
}

impl Drift {
    /// Drift in ms at inner-clock time `real_ms`.
    fn at(self, real_ms: u64) -> f64 {
        let elapsed = real_ms as f64 - self.anchor_real_ms as f64;
        self.anchor_drift_ms + elapsed * (self.rate - 1.0)
    }
}

impl std::fmt::Debug for FaultClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultClock")
            .field("offset_ms", &self.offset_ms())
            .field("rate", &self.rate())
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
            anchor_drift_bits: AtomicU64::new(0f64.to_bits()),
            rate_bits: AtomicU64::new(rate.to_bits()),
            writer: Mutex::new(()),
        }
    }

    /// The fixed skew now, in ms.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// The rate now.
    pub fn rate(&self) -> f64 {
        self.drift().rate
    }

    /// Steps the clock: from now on it reads `offset_ms` (plus the drift)
    /// ahead of the real time.
    pub fn set_offset_ms(&self, offset_ms: i64) {
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
        self.publish(Drift {
            anchor_real_ms: real,
            anchor_drift_ms: self.drift().at(real),
            rate,
        });
    }

    /// Writes the drift fields as one; the caller holds `writer`.
    fn publish(&self, d: Drift) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.anchor_real_ms
            .store(d.anchor_real_ms, Ordering::Relaxed);
        self.anchor_drift_bits
            .store(d.anchor_drift_ms.to_bits(), Ordering::Relaxed);
        self.rate_bits.store(d.rate.to_bits(), Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The drift fields, consistent with each other.
    fn drift(&self) -> Drift {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 0 {
                let drift = Drift {
                    anchor_real_ms: self.anchor_real_ms.load(Ordering::Relaxed),
                    anchor_drift_ms: f64::from_bits(self.anchor_drift_bits.load(Ordering::Relaxed)),
                    rate: f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
                };
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return drift;
                }
            }
            std::hint::spin_loop();
        }
    }
}

impl Clock for FaultClock {
    fn now_ms(&self) -> u64 {
        // The drift before the real time: the real time is then never
        // before the anchor read (a rate change anchors at its own now).
        let drift = self.drift();
        let real = self.inner.now_ms();
        // Offsets are bounded (a year) and the drift by rate × uptime, so
        // the sum stays far inside f64's exact integers; a reading before
        // 1970 is 0.
        let skew = self.offset_ms() as f64 + drift.at(real);
        let now = i64::try_from(real).unwrap_or(i64::MAX) as f64 + skew;
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
        assert_eq!(clock.offset_ms(), -2000);
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
        // Back in step: the drift gained so far (0 now) stays.
        clock.set_rate(1.0);
        real.advance_ms(1000);
        assert_eq!(clock.now_ms(), T0 + 3000);
        // Offset and drift add up.
        clock.set_rate(2.0);
        clock.set_offset_ms(100);
        real.advance_ms(10);
        assert_eq!(clock.now_ms(), T0 + 3000 + 20 + 100);
    }

    #[test]
    fn a_reading_before_the_epoch_is_zero() {
        let real = Arc::new(ManualClock::new(1000));
        let clock = FaultClock::new(real, -5000, 1.0);
        assert_eq!(clock.now_ms(), 0);
    }

    #[test]
    fn readers_never_see_a_half_written_drift() {
        // Three drift states that all read the same at the (standing) real
        // time R, while any mixture of their fields reads 500 to 1000 ms
        // off: a torn read would show.
        let (_real, clock) = skewed(0, 1.0);
        let clock = Arc::new(clock);
        let r = T0;
        let states = [
            Drift {
                anchor_real_ms: r,
                anchor_drift_ms: 0.0,
                rate: 2.0,
            },
            Drift {
                anchor_real_ms: r - 1000,
                anchor_drift_ms: -1000.0,
                rate: 2.0,
            },
            Drift {
                anchor_real_ms: r - 1000,
                anchor_drift_ms: -500.0,
                rate: 1.5,
            },
        ];
        for s in states {
            assert_eq!(s.at(r), 0.0);
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
