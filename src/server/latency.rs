//! Per-command service time, for the `/metrics` endpoint's
//! `webvac_command_duration_seconds` histograms.
//!
//! A request is timed from the moment it is parsed to the moment its reply
//! is composed (waiting for replicas included, writing to the socket not),
//! so the figure is the node's own, whatever the client's network does.
//! Recording is two reads of the CPU's time-stamp counter (through
//! `quanta`, calibrated against the monotonic clock once per process: a
//! `clock_gettime` pair cost 3% of the requests' instructions at depth 1)
//! and two relaxed atomic additions (a bucket and the sum) on one of
//! [`STRIPES`] cache-line-padded copies, picked per thread, so worker
//! threads do not contend for one line. A scrape adds the stripes up.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::protocol::Request;
use crate::protocol::meta::MetaRequest;
use crate::store::Mode;

/// Upper bounds of the buckets, in nanoseconds (Prometheus' `le`), from
/// 10 µs (a local hit) to 5 s (past every timeout); a last bucket, `+Inf`,
/// takes the rest.
pub const BUCKET_BOUNDS_NS: [u64; 18] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Copies of every histogram; a thread records into one of them.
const STRIPES: usize = 8;

/// The commands timed, by the `command` label they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `get`, `gets`, `gat`, `gats`.
    Get,
    /// `set`.
    Set,
    /// `add`.
    Add,
    /// `replace`.
    Replace,
    /// `append`.
    Append,
    /// `prepend`.
    Prepend,
    /// `cas`.
    Cas,
    /// `incr`.
    Incr,
    /// `decr`.
    Decr,
    /// `delete`.
    Delete,
    /// `touch`.
    Touch,
    /// `mg`.
    MetaGet,
    /// `ms`.
    MetaSet,
    /// `md`.
    MetaDelete,
    /// `ma`.
    MetaArith,
    /// `stats`, `flush_all`, `version`, `mn`, errors, …
    Other,
}

impl Command {
    /// Every command, in label order.
    pub const ALL: [Command; 16] = [
        Command::Get,
        Command::Set,
        Command::Add,
        Command::Replace,
        Command::Append,
        Command::Prepend,
        Command::Cas,
        Command::Incr,
        Command::Decr,
        Command::Delete,
        Command::Touch,
        Command::MetaGet,
        Command::MetaSet,
        Command::MetaDelete,
        Command::MetaArith,
        Command::Other,
    ];

    /// The `command` label: memcached's command names (`mg`, `ms`, … for
    /// the meta commands).
    pub fn label(self) -> &'static str {
        match self {
            Command::Get => "get",
            Command::Set => "set",
            Command::Add => "add",
            Command::Replace => "replace",
            Command::Append => "append",
            Command::Prepend => "prepend",
            Command::Cas => "cas",
            Command::Incr => "incr",
            Command::Decr => "decr",
            Command::Delete => "delete",
            Command::Touch => "touch",
            Command::MetaGet => "mg",
            Command::MetaSet => "ms",
            Command::MetaDelete => "md",
            Command::MetaArith => "ma",
            Command::Other => "other",
        }
    }

    /// The command a request is timed as (`gets`, `gat` and `gats` count
    /// as `get`).
    pub fn of(request: &Request<'_>) -> Command {
        match request {
            Request::Get(_) => Command::Get,
            Request::Storage(s) => match (s.mode, s.cas) {
                (_, Some(_)) => Command::Cas,
                (Mode::Set, None) => Command::Set,
                (Mode::Add, None) => Command::Add,
                (Mode::Replace, None) => Command::Replace,
                (Mode::Append, None) => Command::Append,
                (Mode::Prepend, None) => Command::Prepend,
            },
            Request::Arith(a) if a.incr => Command::Incr,
            Request::Arith(_) => Command::Decr,
            Request::Delete(_) => Command::Delete,
            Request::Touch(_) => Command::Touch,
            Request::Meta(MetaRequest::Get(_)) => Command::MetaGet,
            Request::Meta(MetaRequest::Set(_)) => Command::MetaSet,
            Request::Meta(MetaRequest::Delete(_)) => Command::MetaDelete,
            Request::Meta(MetaRequest::Arith(_)) => Command::MetaArith,
            _ => Command::Other,
        }
    }
}

/// One histogram's counts: per bucket (not cumulative; their total is the
/// request count) and the sum of the times.
#[derive(Debug, Default)]
struct Counts {
    buckets: [AtomicU64; BUCKET_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// One stripe: a histogram per command, on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    commands: [Counts; Command::ALL.len()],
}

/// Service-time histograms for every command.
#[derive(Debug)]
pub struct CommandLatency {
    stripes: Box<[Stripe]>,
    /// The time-stamp counter (or the monotonic clock where there is none).
    clock: quanta::Clock,
}

impl Default for CommandLatency {
    fn default() -> Self {
        CommandLatency {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            clock: quanta::Clock::new(),
        }
    }
}

/// When a timed request started: the clock's raw reading.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    command: Command,
    raw: u64,
}

/// A histogram as a scrape reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `(le in seconds, requests in that bucket)`, `+Inf` last. Not
    /// cumulative: the encoder adds them up, as Prometheus' `le` wants.
    pub buckets: Vec<(f64, u64)>,
    /// Requests timed.
    pub count: u64,
    /// Their times added up, in seconds.
    pub sum_secs: f64,
}

thread_local! {
    /// This thread's stripe; assigned on first use, round robin.
    static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}

fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE.with(|s| {
        s.get().unwrap_or_else(|| {
            let i = NEXT.fetch_add(1, Relaxed) % STRIPES;
            s.set(Some(i));
            i
        })
    })
}

impl CommandLatency {
    /// Starts timing a request.
    pub fn start(&self, request: &Request<'_>) -> Started {
        Started {
            command: Command::of(request),
            raw: self.clock.raw(),
        }
    }

    /// Counts a request started at `started` as done now. (A task may end
    /// on another core than it started on; a counter reading behind the
    /// start counts as 0.)
    pub fn finish(&self, started: Started) {
        let ns = self.clock.delta_as_nanos(started.raw, self.clock.raw());
        self.record_ns(started.command, ns);
    }

    /// Counts one request of `command` that took `took` (tests: requests
    /// are timed with [`CommandLatency::start`] and [`CommandLatency::finish`]).
    #[cfg(test)]
    pub fn record(&self, command: Command, took: std::time::Duration) {
        self.record_ns(command, u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    fn record_ns(&self, command: Command, ns: u64) {
        let bucket = BUCKET_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(BUCKET_BOUNDS_NS.len());
        let counts = &self.stripes[stripe_index()].commands[command as usize];
        counts.buckets[bucket].fetch_add(1, Relaxed);
        counts.sum_ns.fetch_add(ns, Relaxed);
    }

    /// `command`'s histogram, its stripes added up.
    pub fn snapshot(&self, command: Command) -> Snapshot {
        let mut per_bucket = [0u64; BUCKET_BOUNDS_NS.len() + 1];
        let mut sum_ns = 0u64;
        for stripe in self.stripes.iter() {
            let c = &stripe.commands[command as usize];
            for (total, b) in per_bucket.iter_mut().zip(&c.buckets) {
                *total += b.load(Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(c.sum_ns.load(Relaxed));
        }
        let buckets = per_bucket
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let le = BUCKET_BOUNDS_NS
                    .get(i)
                    .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
                (le, n)
            })
            .collect();
        Snapshot {
            buckets,
            count: per_bucket.iter().sum(),
            sum_secs: sum_ns as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_request_lands_in_the_first_bucket_that_holds_it() {
        let l = CommandLatency::default();
        l.record(Command::Get, Duration::from_micros(10));
        l.record(Command::Get, Duration::from_micros(11));
        l.record(Command::Get, Duration::from_secs(60));
        let s = l.snapshot(Command::Get);
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (10e-6, 1), "10 µs is at or under le=10µs");
        assert_eq!(s.buckets[1], (25e-6, 1));
        assert_eq!(s.buckets[BUCKET_BOUNDS_NS.len() - 1].1, 0);
        assert_eq!(*s.buckets.last().unwrap(), (f64::INFINITY, 1), "60 s");
        assert!((s.sum_secs - 60.000_021).abs() < 1e-9);
        assert_eq!(l.snapshot(Command::Set).count, 0);
    }

    #[test]
    fn stripes_from_many_threads_add_up() {
        let l = std::sync::Arc::new(CommandLatency::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        l.record(Command::MetaSet, Duration::from_micros(300));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = l.snapshot(Command::MetaSet);
        assert_eq!(s.count, 12_000);
        assert_eq!(s.buckets[4].1, 0, "le=250µs");
        assert_eq!(s.buckets[5].1, 12_000, "le=500µs");
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 12_000);
    }

    #[test]
    fn the_bounds_rise() {
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_timed_request_counts_its_time() {
        let l = CommandLatency::default();
        let parsed =
            crate::protocol::parse(b"incr k 1\r\n", &crate::protocol::ParseLimits::new(1024));
        let crate::protocol::Parsed::Complete { request, .. } = parsed else {
            panic!("{parsed:?}");
        };
        let started = l.start(&request);
        std::thread::sleep(Duration::from_millis(3));
        l.finish(started);
        let s = l.snapshot(Command::Incr);
        assert_eq!(s.count, 1);
        assert!(
            (0.003..0.5).contains(&s.sum_secs),
            "a 3 ms sleep timed as {} s",
            s.sum_secs
        );
    }
}
