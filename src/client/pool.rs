//! The connections to one node: a small fixed set of pipelined data
//! connections used round-robin, plus one control connection for the
//! commands whose replies carry no opaque (`lk`, `version`, `stats`), which
//! it sends one at a time.
//!
//! Connections open lazily, on the first request that needs one, and are
//! replaced when they close. Dials to a node that refuses them back off
//! exponentially with jitter ([`equal_jitter`]): during the backoff the node
//! counts as down ([`NodePool::is_down`]), requests for it fail at once
//! without being sent, and routing passes it over for the next node of the
//! key's preference list. The first request after the backoff dials again.
//! A connection on which a request stalls (written, no reply within its
//! timeout) counts as a failure too, and only a reply resets the count: a
//! frozen node accepts dials but answers nothing, and must not be retried
//! at the base backoff forever.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::debug;

use super::command::{Command, Hints};
use super::connection::{AttemptError, Connection, ConnectionLimits, Security};
use super::error::ClientError;
use super::faults::FaultPlan;
use super::reply::Reply;
use super::retry::equal_jitter;
use super::stats::{Counters, bump};

/// How a node's connections are made.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Data connections.
    pub size: usize,
    pub connect_timeout: Duration,
    pub limits: ConnectionLimits,
    /// TLS and authentication.
    pub security: Security,
    pub reconnect_backoff_base: Duration,
    pub reconnect_backoff_cap: Duration,
}

impl PoolSettings {
    /// The pool settings a client configuration asks for.
    pub fn of(config: &super::ClientConfig) -> PoolSettings {
        PoolSettings {
            size: config.pool_size,
            connect_timeout: config.connect_timeout,
            limits: ConnectionLimits {
                in_flight_max: config.in_flight_max,
                reply_bytes_max: config.reply_bytes_max,
            },
            reconnect_backoff_base: config.reconnect_backoff_base,
            reconnect_backoff_cap: config.reconnect_backoff_cap,
            security: Security::of(config),
        }
    }
}

/// One connection place: the live connection, if any, and a gate so that
/// concurrent callers finding it empty wait for one dial instead of each
/// dialling.
struct Slot {
    conn: Mutex<Option<Arc<Connection>>>,
    /// Held across the dial on purpose: it guards no data, it serialises
    /// dials (an async lock, so waiting callers do not block a thread).
    dial: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            conn: Mutex::new(None),
            dial: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.conn
            .lock()
            .as_ref()
            .filter(|c| !c.is_closed())
            .cloned()
    }
}

/// Why and until when a node is passed over.
#[derive(Debug, Default)]
struct Health {
    /// No dial before this.
    down_until: Option<Instant>,
    /// Why the last dial failed.
    last_error: Option<ClientError>,
}

/// A node's connections.
pub struct NodePool {
    addr: SocketAddr,
    settings: PoolSettings,
    slots: Box<[Slot]>,
    /// For `lk`, `version`, `stats`.
    control: Slot,
    /// One control request at a time (their replies are framed by kind).
    control_gate: Semaphore,
    /// Round-robin position.
    next: AtomicUsize,
    /// Failed dials and stalled connections since the node last answered a
    /// request. A successful dial does not reset it: a frozen process
    /// (SIGSTOP, a partition behind a live kernel) accepts connections and
    /// then answers nothing, so only a reply proves the node healthy.
    failures: AtomicU32,
    health: Mutex<Health>,
    /// Reconnect jitter.
    rng: Mutex<SmallRng>,
    counters: Arc<Counters>,
}

impl NodePool {
    pub fn new(addr: SocketAddr, settings: PoolSettings, counters: Arc<Counters>) -> NodePool {
        assert!(settings.size >= 1, "a pool needs a connection");
        NodePool {
            addr,
            slots: (0..settings.size).map(|_| Slot::new()).collect(),
            settings,
            control: Slot::new(),
            control_gate: Semaphore::new(1),
            next: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            health: Mutex::new(Health::default()),
            rng: Mutex::new(SmallRng::from_entropy()),
            counters,
        }
    }

    /// Whether recent dials failed and the backoff has not run out.
    pub fn is_down(&self, now: Instant) -> bool {
        // The common case, a healthy node, takes no lock.
        self.failures.load(Ordering::Relaxed) != 0
            && self.health.lock().down_until.is_some_and(|t| now < t)
    }

    /// Sends one request on a connection of this node (dialling one if
    /// needed) and waits up to `timeout`, dial included.
    ///
    /// # Errors
    /// As [`Connection::call`]; a failed dial or a node in backoff is
    /// [`AttemptError::NotSent`].
    pub async fn call(
        &self,
        command: &Command,
        hints: Option<&Hints>,
        timeout: Duration,
        faults: FaultPlan,
    ) -> Result<Reply, AttemptError> {
        let deadline = Instant::now() + timeout;
        if command.exclusive() {
            let Ok(_permit) = tokio::time::timeout_at(deadline, self.control_gate.acquire()).await
            else {
                return Err(AttemptError::NotSent(ClientError::Timeout(timeout)));
            };
            let conn = self.connection(&self.control, deadline).await?;
            return self.finish(&conn, command, hints, deadline, faults).await;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let conn = self.connection(&self.slots[i], deadline).await?;
        self.finish(&conn, command, hints, deadline, faults).await
    }

    async fn finish(
        &self,
        conn: &Connection,
        command: &Command,
        hints: Option<&Hints>,
        deadline: Instant,
        faults: FaultPlan,
    ) -> Result<Reply, AttemptError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = conn.call(command, hints, remaining, faults).await;
        if result.is_ok() && self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.health.lock().down_until = None;
        }
        if result.is_err() && conn.take_stall() {
            // A node that stops answering is as good as down: let routing
            // pass it over for a while instead of sending it every request.
            self.note_failure(ClientError::Timeout(remaining));
        }
        result
    }

    async fn connection(
        &self,
        slot: &Slot,
        deadline: Instant,
    ) -> Result<Arc<Connection>, AttemptError> {
        if let Some(c) = slot.live() {
            return Ok(c);
        }
        let Ok(_gate) = tokio::time::timeout_at(deadline, slot.dial.lock()).await else {
            return Err(AttemptError::NotSent(ClientError::Timeout(
                deadline.saturating_duration_since(Instant::now()),
            )));
        };
        // Someone else may have dialled while we waited.
        if let Some(c) = slot.live() {
            return Ok(c);
        }
        let now = Instant::now();
        {
            let health = self.health.lock();
            if let Some(until) = health.down_until.filter(|&t| now < t) {
                let kind = match &health.last_error {
                    Some(ClientError::Io { kind, .. }) => *kind,
                    _ => io::ErrorKind::ConnectionRefused,
                };
                let why = health
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| format!(": {e}"));
                return Err(AttemptError::NotSent(ClientError::io_msg(
                    self.addr,
                    kind,
                    format!(
                        "node down after {} failures, next dial in {:?}{why}",
                        self.failures.load(Ordering::Relaxed),
                        until - now
                    ),
                )));
            }
        }
        let connect_timeout = self
            .settings
            .connect_timeout
            .min(deadline.saturating_duration_since(now));
        bump(&self.counters.connects);
        match Connection::connect(
            self.addr,
            connect_timeout,
            self.settings.limits,
            &self.settings.security,
        )
        .await
        {
            Ok(c) => {
                let c = Arc::new(c);
                *slot.conn.lock() = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                bump(&self.counters.connect_failures);
                self.note_failure(e.clone());
                Err(AttemptError::NotSent(e))
            }
        }
    }

    /// Records a failed dial (or a stalled connection): the node counts as
    /// down for a jittered, doubling backoff.
    fn note_failure(&self, error: ClientError) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed);
        let delay = equal_jitter(
            self.settings.reconnect_backoff_base,
            self.settings.reconnect_backoff_cap,
            failures,
            &mut *self.rng.lock(),
        );
        debug!(addr = %self.addr, failures = failures + 1, backoff = ?delay, error = %error, "node marked down");
        let mut health = self.health.lock();
        health.down_until = Some(Instant::now() + delay);
        health.last_error = Some(error);
    }
}
