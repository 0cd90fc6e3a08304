//! memcached's exptime rules, applied once when a write is accepted.
//!
//! The store keeps absolute unix seconds (0 = never). Clients send:
//! - `0`: never expires;
//! - `1 ..= 2_592_000` (30 days): seconds from now;
//! - above 30 days: an absolute unix time (in the past means already expired);
//! - negative: already expired.

use crate::limits::EXPTIME_RELATIVE_MAX_SECS;

/// The absolute expiry stored for an item that is dead on arrival.
pub const EXPIRED: u32 = 1;

/// Turns a client exptime into absolute unix seconds (`0` = never).
pub fn absolute(exptime: i64, now_secs: u32) -> u32 {
    if exptime == 0 {
        0
    } else if exptime < 0 {
        EXPIRED
    } else if exptime <= EXPTIME_RELATIVE_MAX_SECS {
        now_secs.saturating_add(exptime as u32)
    } else if exptime <= i64::from(now_secs) {
        EXPIRED
    } else {
        u32::try_from(exptime).unwrap_or(u32::MAX)
    }
}

/// Whether an item with this absolute expiry is dead at `now_secs`.
#[inline]
pub fn is_expired(exptime: u32, now_secs: u32) -> bool {
    exptime != 0 && exptime <= now_secs
}

/// Seconds left before expiry, as the meta protocol reports them (`-1` = never).
pub fn remaining(exptime: u32, now_secs: u32) -> i64 {
    if exptime == 0 {
        -1
    } else {
        i64::from(exptime) - i64::from(now_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u32 = 1_800_000_000;

    #[test]
    fn memcached_exptime_rules() {
        assert_eq!(absolute(0, NOW), 0);
        assert_eq!(absolute(1, NOW), NOW + 1);
        assert_eq!(absolute(2_592_000, NOW), NOW + 2_592_000);
        // One past 30 days is an absolute time, long past.
        assert_eq!(absolute(2_592_001, NOW), EXPIRED);
        assert_eq!(absolute(i64::from(NOW) + 10, NOW), NOW + 10);
        assert_eq!(absolute(i64::from(NOW), NOW), EXPIRED);
        assert_eq!(absolute(-1, NOW), EXPIRED);
        assert!(is_expired(EXPIRED, NOW));
        assert!(!is_expired(0, NOW));
        assert!(is_expired(NOW, NOW));
        assert!(!is_expired(NOW + 1, NOW));
        assert_eq!(remaining(0, NOW), -1);
        assert_eq!(remaining(NOW + 5, NOW), 5);
    }
}
