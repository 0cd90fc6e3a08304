//! Rate limits for warnings that an outsider can make repeat (a flood of
//! failed peer handshakes, say): at most one line a period, saying how many
//! it stands for.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default period between two lines of one kind.
pub const LOG_PERIOD: Duration = Duration::from_secs(1);

/// Milliseconds since the first use in this process (never 0).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// One kind of warning's limit.
#[derive(Debug)]
pub struct LogLimit {
    period_ms: u64,
    /// When a line was last let through (0: never).
    last_ms: AtomicU64,
    /// Lines held back since then.
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(LOG_PERIOD)
    }
}

impl LogLimit {
    /// At most one line every `period_ms` milliseconds (a `const`, for
    /// a `static` per call site: see [`crate::warn_limited`]).
    pub const fn per_ms(period_ms: u64) -> Self {
        Self {
            period_ms,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// At most one line every `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to log this line: `Some(n)` with the `n` lines held back
    /// since the last one, or `None` to hold this one back too.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.period_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `tracing::warn!`, at most once a second from this call site (in this
/// process), with `suppressed` counting the lines held back since the last
/// one: for warnings that a client, a peer or a failing network can make
/// repeat.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::per_ms(
            $crate::log_limit::LOG_PERIOD.as_millis() as u64,
        );
        if let Some(suppressed) = LIMIT.allow() {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// A remote's text (a refusal's reason, say), cut to a length fit for one
/// log line, so whoever answers cannot fill the log with one message.
pub fn clip(text: &str) -> &str {
    const LOGGED_TEXT_CHARS_MAX: usize = 200;
    match text.char_indices().nth(LOGGED_TEXT_CHARS_MAX) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_counting_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0), "the first goes through");
        for _ in 0..999 {
            assert_eq!(limit.allow(), None);
        }
        let every = LogLimit::new(Duration::ZERO);
        assert_eq!(every.allow(), Some(0));
        assert_eq!(
            every.allow(),
            Some(0),
            "a zero period lets every line through"
        );
        assert_eq!(limit.suppressed.load(Ordering::Relaxed), 999);
    }

    #[test]
    fn remote_text_is_clipped() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        assert_eq!(clip(&long).chars().count(), 200);
    }
}
