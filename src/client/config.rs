//! Client settings, per-request options, and the client's limits as named
//! constants (every default below is one).

use std::time::Duration;

use super::error::{ClientError, Result};
use super::retry::{BudgetConfig, Policy};

/// Connections per node when the configuration does not say. Each is
/// pipelined, so a handful carry thousands of requests in flight.
pub const POOL_SIZE_DEFAULT: usize = 2;
/// Most connections per node a configuration may ask for.
pub const POOL_SIZE_MAX: usize = 64;
/// Requests in flight on one connection before calls get
/// [`ClientError::Busy`].
pub const IN_FLIGHT_MAX_DEFAULT: usize = 1024;
/// Upper bound of [`ClientConfig::in_flight_max`].
pub const IN_FLIGHT_MAX_MAX: usize = 65_536;
/// Default per-attempt timeout. Above the server's default hop timeout
/// (1 s), so a request the server fails over internally is not abandoned
/// by the client first.
pub const ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_millis(2000);
/// Default overall deadline of one call, retries and backoff included.
pub const DEADLINE_DEFAULT: Duration = Duration::from_millis(6000);
/// Default attempts per call, the first included.
pub const MAX_ATTEMPTS_DEFAULT: u32 = 3;
/// Most attempts per call a configuration may ask for.
pub const MAX_ATTEMPTS_MAX: u32 = 100;
/// Default backoff window before the first retry.
pub const BACKOFF_BASE_DEFAULT: Duration = Duration::from_millis(10);
/// Default largest backoff window.
pub const BACKOFF_CAP_DEFAULT: Duration = Duration::from_millis(1000);
/// Default retry budget: retries may be 10 % of requests...
pub const RETRY_RATIO_DEFAULT: f64 = 0.1;
/// ...plus this many per second...
pub const MIN_RETRIES_PER_SEC_DEFAULT: f64 = 10.0;
/// ...with bursts of at most this many.
pub const RETRY_TOKENS_MAX_DEFAULT: f64 = 100.0;
/// Default time between cluster map refreshes.
pub const REFRESH_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// Soonest a refresh follows the previous one when connection failures ask
/// for one (periodic refreshes follow their own interval).
pub const REFRESH_AFTER_FAILURE_MIN: Duration = Duration::from_millis(500);
/// Default connect timeout.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_millis(1000);
/// Default reconnect backoff window after the first failed connect...
pub const RECONNECT_BACKOFF_BASE_DEFAULT: Duration = Duration::from_millis(50);
/// ...doubling up to this.
pub const RECONNECT_BACKOFF_CAP_DEFAULT: Duration = Duration::from_millis(2000);
/// Default largest reply the client accepts (a value block plus its line).
/// webvac's and memcached's default item limit is 1 MiB; this leaves room
/// for servers run with a larger `-I`.
pub const REPLY_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// A reply line (without a value block) longer than this is garbage.
pub const REPLY_LINE_BYTES_MAX: usize = 64 * 1024;
/// Bytes read from a socket per read call.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most requests one write system call carries.
pub const WRITE_BATCH_MAX: usize = 256;
/// Most keys of one `get_many` in flight at once.
pub const GET_MANY_CONCURRENCY_MAX: usize = 256;
/// Most keys one `lk` call may ask for (the protocol's limit).
pub const LIST_COUNT_MAX: u32 = crate::limits::LIST_KEYS_PER_CALL_MAX as u32;
/// Longest request id the protocol allows.
pub use crate::limits::REQUEST_ID_BYTES_MAX;
/// Most members a cluster map may list (a larger `stats cluster` answer is
/// refused as garbage).
pub const MEMBERS_MAX: usize = 4096;

const _: () = assert!(POOL_SIZE_DEFAULT >= 1 && POOL_SIZE_DEFAULT <= POOL_SIZE_MAX);
const _: () = assert!(IN_FLIGHT_MAX_DEFAULT >= 1 && IN_FLIGHT_MAX_DEFAULT <= IN_FLIGHT_MAX_MAX);
const _: () = assert!(GET_MANY_CONCURRENCY_MAX <= IN_FLIGHT_MAX_DEFAULT);
const _: () = assert!(MAX_ATTEMPTS_DEFAULT >= 1 && MAX_ATTEMPTS_DEFAULT <= MAX_ATTEMPTS_MAX);
const _: () = assert!(ATTEMPT_TIMEOUT_DEFAULT.as_millis() <= DEADLINE_DEFAULT.as_millis());
const _: () = assert!(BACKOFF_BASE_DEFAULT.as_millis() <= BACKOFF_CAP_DEFAULT.as_millis());
const _: () = assert!(REPLY_LINE_BYTES_MAX < REPLY_BYTES_MAX_DEFAULT);
// A 16-byte random id hex-encodes to exactly the longest id allowed.
const _: () = assert!(REQUEST_ID_BYTES_MAX == 32);
const _: () = assert!(crate::limits::LIST_KEYS_PER_CALL_MAX <= u32::MAX as usize);

/// Fault injection for tests: makes a connection lose or delay requests on
/// purpose, so retry, timeout and request-id behaviour can be tested
/// against a real server. All zero (the default) means no faults.
///
/// Probabilities are drawn from a generator seeded with `seed`, so a single
/// task issuing requests one after another sees the same faults every run.
/// The `*_first_*` counts are exact: the client's first N requests (in the
/// order they are sent) lose their request or reply, whatever the seed.
/// Discovery traffic (`version`, `stats cluster`) is never faulted.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClientFaults {
    /// Fraction of requests never written; their callers time out.
    pub drop_request: f64,
    /// Fraction of replies read from the socket and discarded; their callers
    /// time out although the server did the work.
    pub drop_reply: f64,
    /// Fraction of requests held `delay_ms` before being written.
    pub delay: f64,
    /// How long a delayed request is held.
    pub delay_ms: u64,
    /// Seed of the fault generator.
    pub seed: u64,
    /// The client's first this-many requests are never written.
    pub drop_first_requests: u32,
    /// The replies to the client's first this-many requests are discarded.
    pub drop_first_replies: u32,
}

impl ClientFaults {
    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        self.drop_request > 0.0
            || self.drop_reply > 0.0
            || (self.delay > 0.0 && self.delay_ms > 0)
            || self.drop_first_requests > 0
            || self.drop_first_replies > 0
    }
}

/// How a [`Client`](super::Client) behaves. [`Default`] gives the named
/// defaults of this module; tests shorten the timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Pipelined connections per node, `1..=POOL_SIZE_MAX`.
    pub pool_size: usize,
    /// Requests in flight per connection before [`ClientError::Busy`].
    pub in_flight_max: usize,
    /// How long one attempt waits for its reply.
    pub attempt_timeout: Duration,
    /// How long one call may take in all, retries and backoff included.
    pub deadline: Duration,
    /// Attempts per call, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff window before the first retry (full jitter within it).
    pub backoff_base: Duration,
    /// Largest backoff window.
    pub backoff_cap: Duration,
    /// Retry budget: tokens each first attempt deposits (the share of
    /// requests that may be retries).
    pub retry_ratio: f64,
    /// Retry budget: tokens added per second regardless of traffic.
    pub min_retries_per_sec: f64,
    /// Retry budget: most tokens banked (the largest burst of retries).
    pub retry_tokens_max: f64,
    /// Time between cluster map refreshes (also refreshed, at most every
    /// [`REFRESH_AFTER_FAILURE_MIN`], after connection failures).
    pub refresh_interval: Duration,
    /// How long a connect may take.
    pub connect_timeout: Duration,
    /// Reconnect backoff after the first failed connect to a node.
    pub reconnect_backoff_base: Duration,
    /// Largest reconnect backoff.
    pub reconnect_backoff_cap: Duration,
    /// Largest reply accepted; a larger one closes its connection.
    pub reply_bytes_max: usize,
    /// Send request ids and rely on them (webvac servers only). On by
    /// default; off makes non-idempotent ops behave as against memcached.
    pub request_ids: bool,
    /// TLS to every node (nodes started with `-Z`); `None`: plaintext.
    pub tls: Option<super::tls::ClientTls>,
    /// memcached's ASCII authentication (nodes started with `-Y`): every
    /// connection first sends `set` with the value "user password".
    pub auth: Option<(String, String)>,
    /// Fault injection, for tests.
    pub faults: ClientFaults,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            pool_size: POOL_SIZE_DEFAULT,
            in_flight_max: IN_FLIGHT_MAX_DEFAULT,
            attempt_timeout: ATTEMPT_TIMEOUT_DEFAULT,
            deadline: DEADLINE_DEFAULT,
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            backoff_base: BACKOFF_BASE_DEFAULT,
            backoff_cap: BACKOFF_CAP_DEFAULT,
            retry_ratio: RETRY_RATIO_DEFAULT,
            min_retries_per_sec: MIN_RETRIES_PER_SEC_DEFAULT,
            retry_tokens_max: RETRY_TOKENS_MAX_DEFAULT,
            refresh_interval: REFRESH_INTERVAL_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            reconnect_backoff_base: RECONNECT_BACKOFF_BASE_DEFAULT,
            reconnect_backoff_cap: RECONNECT_BACKOFF_CAP_DEFAULT,
            reply_bytes_max: REPLY_BYTES_MAX_DEFAULT,
            request_ids: true,
            tls: None,
            auth: None,
            faults: ClientFaults::default(),
        }
    }
}

impl ClientConfig {
    /// Checks every bound.
    ///
    /// # Errors
    /// [`ClientError::InvalidArgument`] naming the first bad setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ClientError::InvalidArgument(what));
        if !(1..=POOL_SIZE_MAX).contains(&self.pool_size) {
            return bad(format!(
                "pool_size {} outside 1..={POOL_SIZE_MAX}",
                self.pool_size
            ));
        }
        if !(1..=IN_FLIGHT_MAX_MAX).contains(&self.in_flight_max) {
            return bad(format!(
                "in_flight_max {} outside 1..={IN_FLIGHT_MAX_MAX}",
                self.in_flight_max
            ));
        }
        if !(1..=MAX_ATTEMPTS_MAX).contains(&self.max_attempts) {
            return bad(format!(
                "max_attempts {} outside 1..={MAX_ATTEMPTS_MAX}",
                self.max_attempts
            ));
        }
        for (name, d) in [
            ("attempt_timeout", self.attempt_timeout),
            ("deadline", self.deadline),
            ("refresh_interval", self.refresh_interval),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} is zero"));
            }
        }
        if self.backoff_base > self.backoff_cap {
            return bad("backoff_base exceeds backoff_cap".into());
        }
        if self.reconnect_backoff_base > self.reconnect_backoff_cap {
            return bad("reconnect_backoff_base exceeds reconnect_backoff_cap".into());
        }
        for (name, v) in [
            ("retry_ratio", self.retry_ratio),
            ("min_retries_per_sec", self.min_retries_per_sec),
            ("retry_tokens_max", self.retry_tokens_max),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} {v} is not a finite non-negative number"));
            }
        }
        let f = &self.faults;
        for (name, p) in [
            ("faults.drop_request", f.drop_request),
            ("faults.drop_reply", f.drop_reply),
            ("faults.delay", f.delay),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} {p} outside 0..=1"));
            }
        }
        if self.reply_bytes_max <= REPLY_LINE_BYTES_MAX {
            return bad(format!(
                "reply_bytes_max {} not above the line limit {REPLY_LINE_BYTES_MAX}",
                self.reply_bytes_max
            ));
        }
        Ok(())
    }

    pub(crate) fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
        }
    }

    pub(crate) fn budget(&self) -> BudgetConfig {
        BudgetConfig {
            retry_ratio: self.retry_ratio,
            min_retries_per_sec: self.min_retries_per_sec,
            max_tokens: self.retry_tokens_max,
        }
    }
}

/// Per-request options of the storage, arithmetic and delete calls.
/// `Options::default()` is: no expiry, flags 0, an automatic request id
/// where one is needed, the cluster's own quorums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Expiry in memcached's exptime form: seconds from now up to 30 days,
    /// a unix time beyond. `None`: never expire (stores); leave the expiry
    /// unchanged (`incr`/`decr`, which then send no `T`).
    pub ttl: Option<u32>,
    /// 32-bit client flags stored with the value (stores only).
    pub flags: u32,
    /// A request id to send instead of the automatic one (webvac only): 1 to
    /// 32 printable ASCII bytes (`!` to `~`) without `,`. Use one when the
    /// *caller* retries an operation across client calls or processes and
    /// wants it applied once. Ignored against plain memcached.
    ///
    /// The server records an id with the outcome it produced in the key's
    /// item: a store, a delete, or an `incr`/`decr` result. An attempt that
    /// changed nothing (a miss, `NOT_STORED`, a CAS mismatch) records
    /// nothing, so the same id may then be used again, e.g. for the `incr`
    /// that follows creating a missing counter.
    pub request_id: Option<String>,
    /// Read quorum R for this request (webvac only).
    pub read_quorum: Option<u8>,
    /// Write quorum W for this request (webvac only).
    pub write_quorum: Option<u8>,
}

impl Options {
    /// Options with only a TTL.
    pub fn ttl(ttl: u32) -> Options {
        Options {
            ttl: Some(ttl),
            ..Options::default()
        }
    }
}

/// Checks a request id against the protocol's rule: 1 to 32 bytes, each
/// printable ASCII `0x21..=0x7E` other than `,` (which separates items of
/// the `P` token).
///
/// # Errors
/// [`ClientError::InvalidArgument`] saying which rule it breaks.
pub fn validate_request_id(id: &str) -> Result<()> {
    // The rule is the server's own; the rest only says which part broke.
    if crate::store::dedup::valid_id(id.as_bytes()) {
        return Ok(());
    }
    if id.is_empty() || id.len() > REQUEST_ID_BYTES_MAX {
        return Err(ClientError::InvalidArgument(format!(
            "request id of {} bytes (1..={REQUEST_ID_BYTES_MAX})",
            id.len()
        )));
    }
    if let Some(b) = id
        .bytes()
        .find(|&b| !(0x21..=0x7e).contains(&b) || b == b',')
    {
        return Err(ClientError::InvalidArgument(format!(
            "request id byte {b:#04x} (printable ASCII other than ',' only)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ClientConfig::default().validate().unwrap();
        assert!(!ClientFaults::default().any());
    }

    #[test]
    fn bad_settings_are_named() {
        let check = |f: fn(&mut ClientConfig), name: &str| {
            let mut c = ClientConfig::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        };
        check(|c| c.pool_size = 0, "pool_size");
        check(|c| c.in_flight_max = 0, "in_flight_max");
        check(|c| c.max_attempts = 0, "max_attempts");
        check(|c| c.attempt_timeout = Duration::ZERO, "attempt_timeout");
        check(|c| c.backoff_base = Duration::from_secs(9), "backoff_base");
        check(|c| c.retry_ratio = f64::NAN, "retry_ratio");
        check(|c| c.faults.drop_reply = 1.5, "faults.drop_reply");
        check(|c| c.reply_bytes_max = 10, "reply_bytes_max");
    }

    #[test]
    fn request_id_rules() {
        validate_request_id("a").unwrap();
        validate_request_id(&"f".repeat(32)).unwrap();
        validate_request_id("!~x-_:.").unwrap();
        for bad in ["", &"f".repeat(33), "a,b", "a b", "é", "a\x7f"] {
            assert!(validate_request_id(bad).is_err(), "{bad:?}");
        }
    }
}
