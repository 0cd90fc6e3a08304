//! An async client for webvac clusters (and plain memcached servers):
//! pipelined connection pools, routing to each key's primary, retries that
//! are safe, and request ids that make non-idempotent operations safe to
//! retry.
//!
//! ```text
//!  Client::get/set/incr/...          typed API (this file)
//!     │  execute(): attempts, timeouts, deadline, retry budget (retry.rs)
//!     │  route(): key → preference list → usable node        (routing.rs)
//!     ▼
//!  NodePool (per node)  round-robin data connections + control connection
//!     ▼
//!  Connection           pipelined, replies matched by O<opaque>
//! ```
//!
//! **Discovery.** [`Client::connect`] asks the seeds, in order, for
//! `version` and `stats cluster`: a webvac cluster reports its members,
//! partition count and N, from which the client builds the same ring the
//! nodes use; a lone webvac node or a memcached server (`stats cluster`
//! answers `ERROR`, or the version does not say webvac) is a one-node map.
//! The map is refreshed every [`ClientConfig::refresh_interval`] and soon
//! after connection failures, from any member or seed that answers.
//!
//! **What is retried.** A request that was never sent (node down, connect
//! refused) moves to the next node at once. A request whose reply was lost
//! (timeout, broken connection) or that got `SERVER_ERROR` is retried, with
//! full-jitter backoff and within the retry budget, only when repeating it
//! is safe:
//!
//! | operation | against webvac | against memcached |
//! |---|---|---|
//! | `get`, `get_many`, `touch`, `set`, key listing | retried | retried |
//! | `replace` | retried, with a request id | retried |
//! | `add`, `append`, `prepend`, `cas`, `incr`, `decr`, `delete` | retried, with a request id | never: [`ClientError::MaybeApplied`] |
//!
//! `set`, `touch` and `replace` are idempotent in effect: a repeat lands on
//! the same state, and any interleaving with other clients' writes is one
//! the first attempt could have produced too (the call was still running).
//! `replace` still carries an id on webvac so its *answer* is exact. The
//! others are not idempotent: a repeated `incr` counts twice, a repeated
//! `add` or `delete` answers "not stored"/"not found" for work it did.
//! Against webvac the client puts a fresh request id on each of these calls
//! (the same id on every attempt of one call), and the server answers a
//! repeated id with the first attempt's result, on any node.
//!
//! **Request ids** are 32 lowercase hex characters: 16 from a random 64-bit
//! prefix drawn once per client, 16 from a per-client counter.
//! [`Options::request_id`] replaces the automatic id, for callers that
//! retry across calls or processes themselves.

mod command;
mod config;
mod connection;
mod error;
mod faults;
mod pool;
mod reply;
pub mod retry;
mod routing;
mod stats;
pub mod tls;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt, TryStreamExt};
use parking_lot::{Mutex, RwLock};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use config::{
    ClientConfig, ClientFaults, GET_MANY_CONCURRENCY_MAX, IN_FLIGHT_MAX_DEFAULT, LIST_COUNT_MAX,
    Options, POOL_SIZE_DEFAULT, REFRESH_AFTER_FAILURE_MIN, REQUEST_ID_BYTES_MAX,
    validate_request_id,
};
pub use connection::auth_request;
pub use error::{ClientError, Result};
pub(crate) use routing::Topology;
pub use routing::{MemberInfo, ServerKind, webvac_version};
pub use stats::ClientStats;

use command::{Command, Hints, StoreMode, WireKey};
use connection::{AttemptError, Connection, ConnectionLimits};
use faults::{FaultInjector, FaultPlan};
use pool::{NodePool, PoolSettings};
use reply::{ErrorReply, Reply, Status};
use retry::{Decision, Failure, RetryBudget};
use stats::{Counters, bump};

/// Room for an in-process request's command line (its data comes on top).
const IN_PROCESS_REQUEST_BYTES: usize = 512;
/// Room an in-process reply starts with: a status line, or a value of a
/// few hundred bytes without growing.
const IN_PROCESS_REPLY_BYTES: usize = 1024;
/// Most addresses one map refresh asks before giving up until next time.
const REFRESH_CANDIDATES_MAX: usize = 16;
/// A listing that returns this many empty pages in a row is taken to be
/// stuck (a server bug) rather than followed forever.
const LIST_EMPTY_PAGES_IN_A_ROW_MAX: u32 = 1 << 20;

/// A value read from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The bytes stored.
    pub data: Bytes,
    /// The 32-bit client flags stored with them.
    pub flags: u32,
    /// The CAS unique, for [`Client::cas`].
    pub cas: u64,
}

/// How a [`Client::cas`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// Stored: the CAS matched.
    Stored,
    /// Not stored: the item changed since the CAS was read.
    Exists,
    /// Not stored: there is no such item (any more).
    NotFound,
}

/// One page of the key listing ([`Client::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Keys of this page (raw bytes; possibly none).
    pub keys: Vec<Vec<u8>>,
    /// The token of the next page, or `None` when the listing is complete.
    pub next: Option<String>,
}

/// A cheap-to-clone handle on a cluster (all clones share connections,
/// map, retry budget and counters). Dropping the last clone closes every
/// connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topology = self.inner.topology();
        f.debug_struct("Client")
            .field("kind", &topology.kind)
            .field("members", &topology.members)
            .finish_non_exhaustive()
    }
}

// Clones of one client are shared across tasks and threads.
const _: () = {
    const fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Client>();
};

/// Whether an operation may repeat, and whether it gets a request id.
#[derive(Debug, Clone, Copy)]
struct OpKind {
    /// Running it twice is the same as once (or indistinguishable from a
    /// concurrent writer's interleaving): retried without an id.
    idempotent: bool,
    /// Against webvac, gets an automatic request id.
    auto_id: bool,
}

const READ: OpKind = OpKind {
    idempotent: true,
    auto_id: false,
};
const IDEMPOTENT_WRITE: OpKind = READ;
const IDEMPOTENT_WITH_ID: OpKind = OpKind {
    idempotent: true,
    auto_id: true,
};
const MUTATION: OpKind = OpKind {
    idempotent: false,
    auto_id: true,
};

/// Per-client request ids: a random prefix and a counter, hex.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:016x}", self.prefix)
    }
}

/// An embedded member that runs protocol commands in this process
/// ([`crate::node`]): the client side of a [`Client`] made by
/// [`Client::in_process`].
pub(crate) trait InProcess: Send + Sync + 'static {
    /// Runs one complete command (as the client encodes it) and appends
    /// the reply, or says why the node no longer takes requests.
    fn call<'a>(
        &'a self,
        request: &'a [u8],
        reply: &'a mut Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
}

/// Where a call's attempts go.
enum Transport {
    /// Over TCP, to the node routing picks.
    Network,
    /// Into an embedded member, which routes further itself.
    InProcess(Arc<dyn InProcess>),
}

struct Inner {
    config: ClientConfig,
    transport: Transport,
    /// The seeds as given, resolved again at each use.
    seeds: Vec<String>,
    /// The current map; replaced whole on refresh.
    topology: RwLock<Arc<Topology>>,
    /// Node pools by address; pools of members that left are dropped on
    /// refresh (calls still using one keep it alive until they finish).
    pools: RwLock<HashMap<SocketAddr, Arc<NodePool>>>,
    pool_settings: PoolSettings,
    budget: Mutex<RetryBudget>,
    /// Backoff jitter.
    rng: Mutex<SmallRng>,
    faults: FaultInjector,
    ids: RequestIds,
    counters: Arc<Counters>,
    /// Wakes the refresher early (after connection failures).
    refresh_wanted: Arc<Notify>,
    /// When the last refresh was asked for or ran.
    last_refresh: Mutex<Instant>,
    /// The refresher task, stopped when the last client handle goes.
    refresher: Mutex<Option<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.lock().take() {
            task.abort();
        }
    }
}

impl Client {
    /// Discovers the cluster from the first seed that answers and returns a
    /// client for it. Seeds are anything that prints as `host:port`
    /// (`&str`, `String`, `SocketAddr`); with plain memcached servers only
    /// the first reachable one is used (this is not a memcached sharding
    /// client).
    ///
    /// Must be called within a tokio runtime; the client spawns its
    /// connection tasks and a map refresher there.
    ///
    /// # Errors
    /// [`ClientError::InvalidArgument`] for a bad configuration or no seeds;
    /// [`ClientError::NoServer`] when no seed answers.
    pub async fn connect<S: fmt::Display>(seeds: &[S], config: ClientConfig) -> Result<Client> {
        config.validate()?;
        if seeds.is_empty() {
            return Err(ClientError::InvalidArgument("no seeds".into()));
        }
        let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
        let topology = discover_any(&seeds, &[], &config).await?;
        debug!(kind = ?topology.kind, members = topology.members.len(), "client connected");
        let inner = Arc::new(Inner::new(config, seeds, topology, Transport::Network));
        let task = tokio::spawn(refresh_loop(
            Arc::downgrade(&inner),
            inner.refresh_wanted.clone(),
            inner.config.refresh_interval,
        ));
        *inner.refresher.lock() = Some(task.abort_handle());
        Ok(Client { inner })
    }

    /// A client whose attempts run in `node`, in this process: the handle
    /// of an embedded member. `topology` is the member's own view (it does
    /// not change, so there is no refresher); `config` supplies the retry
    /// policy, deadlines and request ids.
    pub(crate) fn in_process(
        node: Arc<dyn InProcess>,
        topology: Topology,
        config: ClientConfig,
    ) -> Result<Client> {
        config.validate()?;
        let transport = Transport::InProcess(node);
        let inner = Arc::new(Inner::new(config, Vec::new(), topology, transport));
        Ok(Client { inner })
    }

    // ---- Reads -------------------------------------------------------------

    /// The value of `key`, or `None` on a miss.
    ///
    /// # Errors
    /// [`ClientError::InvalidKey`], or the last attempt's error once the
    /// retries allowed are spent (see the module doc).
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>> {
        self.get_with(key, &Options::default()).await
    }

    /// [`Client::get`] with options; only `read_quorum` applies.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<Option<Value>> {
        let command = Command::Get {
            key: WireKey::new(key.as_ref())?,
            value: true,
            touch: None,
        };
        let read_only = Options {
            read_quorum: options.read_quorum,
            ..Options::default()
        };
        match self.inner.execute("get", command, READ, &read_only).await? {
            Reply::Value(data, f) => Ok(Some(Value {
                data,
                flags: f.client_flags.unwrap_or(0),
                cas: f.cas.unwrap_or(0),
            })),
            Reply::Status(Status::En, _) => Ok(None),
            other => Err(unexpected("get", &other)),
        }
    }

    /// The values of `keys`, in the same order (`None` for misses). Each key
    /// goes to its own primary; at most [`GET_MANY_CONCURRENCY_MAX`] (and
    /// never more than one connection's `in_flight_max`, so a call cannot
    /// make itself busy) are in flight at once.
    ///
    /// # Errors
    /// The first key's error, if any key fails.
    pub async fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Value>>> {
        self.get_many_with(keys, &Options::default()).await
    }

    /// [`Client::get_many`] with options; only `read_quorum` applies.
    ///
    /// # Errors
    /// As [`Client::get_many`].
    pub async fn get_many_with<K: AsRef<[u8]>>(
        &self,
        keys: &[K],
        options: &Options,
    ) -> Result<Vec<Option<Value>>> {
        let concurrency = GET_MANY_CONCURRENCY_MAX.min(self.inner.config.in_flight_max);
        stream::iter(keys.iter().map(|k| self.get_with(k.as_ref(), options)))
            .buffered(concurrency)
            .try_collect()
            .await
    }

    /// Sets a new expiry (memcached exptime) on `key`; `false` on a miss.
    ///
    /// # Errors
    /// As [`Client::get`].
    pub async fn touch(&self, key: impl AsRef<[u8]>, ttl: u32) -> Result<bool> {
        let command = Command::Get {
            key: WireKey::new(key.as_ref())?,
            value: false,
            touch: Some(ttl),
        };
        match self
            .inner
            .execute("touch", command, IDEMPOTENT_WRITE, &Options::default())
            .await?
        {
            Reply::Status(Status::Hd, _) => Ok(true),
            Reply::Status(Status::En, _) => Ok(false),
            other => Err(unexpected("touch", &other)),
        }
    }

    // ---- Writes ------------------------------------------------------------

    /// Stores `value` under `key`; returns the new CAS unique (0 from a
    /// server that does not report it).
    ///
    /// # Errors
    /// As [`Client::get`]; [`ClientError::Server`] for a value over the
    /// server's item size limit (not retried).
    pub async fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<u64> {
        let command = store(key.as_ref(), value.as_ref(), StoreMode::Set, options, None)?;
        match self
            .inner
            .execute("set", command, IDEMPOTENT_WRITE, options)
            .await?
        {
            Reply::Status(Status::Hd, f) => Ok(f.cas.unwrap_or(0)),
            other => Err(unexpected("set", &other)),
        }
    }

    /// Stores only if `key` is absent; `true` if stored.
    ///
    /// # Errors
    /// As [`Client::set`]; against memcached, [`ClientError::MaybeApplied`]
    /// when the reply is lost.
    pub async fn add(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<bool> {
        self.store_bool(
            "add",
            key.as_ref(),
            value.as_ref(),
            StoreMode::Add,
            MUTATION,
            options,
        )
        .await
    }

    /// Stores only if `key` is present; `true` if stored. Idempotent in
    /// effect, so retried everywhere (see the module doc).
    ///
    /// # Errors
    /// As [`Client::set`].
    pub async fn replace(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<bool> {
        self.store_bool(
            "replace",
            key.as_ref(),
            value.as_ref(),
            StoreMode::Replace,
            IDEMPOTENT_WITH_ID,
            options,
        )
        .await
    }

    /// Appends to an existing value; `true` if `key` existed. `ttl` and
    /// `flags` of `options` are ignored (the item keeps its own).
    ///
    /// # Errors
    /// As [`Client::add`].
    pub async fn append(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<bool> {
        self.store_bool(
            "append",
            key.as_ref(),
            value.as_ref(),
            StoreMode::Append,
            MUTATION,
            options,
        )
        .await
    }

    /// Prepends to an existing value; `true` if `key` existed. `ttl` and
    /// `flags` of `options` are ignored.
    ///
    /// # Errors
    /// As [`Client::add`].
    pub async fn prepend(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        options: &Options,
    ) -> Result<bool> {
        self.store_bool(
            "prepend",
            key.as_ref(),
            value.as_ref(),
            StoreMode::Prepend,
            MUTATION,
            options,
        )
        .await
    }

    /// Stores `value` only if the item's CAS unique is still `cas`.
    ///
    /// # Errors
    /// As [`Client::add`].
    pub async fn cas(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        cas: u64,
        options: &Options,
    ) -> Result<CasOutcome> {
        let command = store(
            key.as_ref(),
            value.as_ref(),
            StoreMode::Set,
            options,
            Some(cas),
        )?;
        match self
            .inner
            .execute("cas", command, MUTATION, options)
            .await?
        {
            Reply::Status(Status::Hd, _) => Ok(CasOutcome::Stored),
            Reply::Status(Status::Ex, _) => Ok(CasOutcome::Exists),
            Reply::Status(Status::Nf, _) => Ok(CasOutcome::NotFound),
            other => Err(unexpected("cas", &other)),
        }
    }

    /// Adds `delta` to a decimal counter (wrapping at 2^64, as memcached);
    /// returns the new value, or `None` if `key` does not exist.
    /// `options.ttl`, if given, also sets the expiry.
    ///
    /// # Errors
    /// As [`Client::add`]; [`ClientError::Client`] for a value that is not a
    /// number.
    pub async fn incr(
        &self,
        key: impl AsRef<[u8]>,
        delta: u64,
        options: &Options,
    ) -> Result<Option<u64>> {
        self.arith("incr", key.as_ref(), true, delta, options).await
    }

    /// Subtracts `delta` from a decimal counter (stopping at 0, as
    /// memcached); returns the new value, or `None` if `key` does not exist.
    ///
    /// # Errors
    /// As [`Client::incr`].
    pub async fn decr(
        &self,
        key: impl AsRef<[u8]>,
        delta: u64,
        options: &Options,
    ) -> Result<Option<u64>> {
        self.arith("decr", key.as_ref(), false, delta, options)
            .await
    }

    /// Deletes `key`; `true` if it existed.
    ///
    /// # Errors
    /// As [`Client::add`].
    pub async fn delete(&self, key: impl AsRef<[u8]>, options: &Options) -> Result<bool> {
        let command = Command::Delete {
            key: WireKey::new(key.as_ref())?,
        };
        match self
            .inner
            .execute("delete", command, MUTATION, options)
            .await?
        {
            Reply::Status(Status::Hd, _) => Ok(true),
            Reply::Status(Status::Nf, _) => Ok(false),
            other => Err(unexpected("delete", &other)),
        }
    }

    // ---- Key listing -------------------------------------------------------

    /// One page of the cluster's keys (webvac only): `token` is `None` for
    /// the first page and the previous page's [`Page::next`] after that;
    /// `count` (1 to [`LIST_COUNT_MAX`]) bounds the page, which may hold
    /// fewer keys, even none, and still have a next page. Any node lists the
    /// whole cluster, and asking again with the same token gives the same
    /// page, so this is retried like a read.
    ///
    /// # Errors
    /// [`ClientError::NotSupported`] against memcached or a webvac without
    /// `lk`; [`ClientError::InvalidArgument`] for a bad count or token;
    /// [`ClientError::Client`] for a token the server does not accept.
    pub async fn list_page(&self, token: Option<&str>, count: u32) -> Result<Page> {
        if self.inner.topology().kind != ServerKind::Webvac {
            return Err(ClientError::NotSupported(
                "key listing needs a webvac server".into(),
            ));
        }
        if !(1..=LIST_COUNT_MAX).contains(&count) {
            return Err(ClientError::InvalidArgument(format!(
                "listing count {count} outside 1..={LIST_COUNT_MAX}"
            )));
        }
        let token = token.unwrap_or("-");
        if token.is_empty() || !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ClientError::InvalidArgument(format!(
                "listing token {token:?}"
            )));
        }
        let command = Command::List {
            token: token.to_string(),
            count,
        };
        match self
            .inner
            .execute("list", command, READ, &Options::default())
            .await?
        {
            Reply::Listing { keys, next } => Ok(Page { keys, next }),
            other => Err(unexpected("list", &other)),
        }
    }

    /// Every key of the cluster, as a stream that fetches pages of up to
    /// `count_per_call` keys as it is consumed. A key written or deleted
    /// during the listing may or may not appear. The stream ends after the
    /// last page, or after yielding the first error.
    pub fn list_keys(
        &self,
        count_per_call: u32,
    ) -> impl Stream<Item = Result<Vec<u8>>> + Send + 'static {
        struct Listing {
            client: Client,
            buffered: VecDeque<Vec<u8>>,
            /// `None` before the first page; then the next page's token, or
            /// `Some(None)` when finished.
            next: Option<Option<String>>,
            empty_in_a_row: u32,
        }
        let start = Listing {
            client: self.clone(),
            buffered: VecDeque::new(),
            next: None,
            empty_in_a_row: 0,
        };
        stream::unfold(start, move |mut st| async move {
            loop {
                if let Some(key) = st.buffered.pop_front() {
                    return Some((Ok(key), st));
                }
                let token = match &st.next {
                    None => None,
                    Some(None) => return None,
                    Some(Some(t)) => Some(t.clone()),
                };
                match st.client.list_page(token.as_deref(), count_per_call).await {
                    Ok(page) => {
                        st.empty_in_a_row = if page.keys.is_empty() {
                            st.empty_in_a_row + 1
                        } else {
                            0
                        };
                        let stuck =
                            page.keys.is_empty() && page.next.is_some() && page.next == token;
                        if stuck || st.empty_in_a_row > LIST_EMPTY_PAGES_IN_A_ROW_MAX {
                            st.next = Some(None);
                            let why = format!("key listing makes no progress at token {token:?}");
                            return Some((Err(ClientError::Protocol(why)), st));
                        }
                        st.buffered = page.keys.into();
                        st.next = Some(page.next);
                    }
                    Err(e) => {
                        st.next = Some(None);
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }

    // ---- Introspection -----------------------------------------------------

    /// What the servers are (as of the last discovery).
    pub fn server_kind(&self) -> ServerKind {
        self.inner.topology().kind
    }

    /// The `VERSION` text of the node the map was last read from.
    pub fn server_version(&self) -> String {
        self.inner.topology().version.clone()
    }

    /// The members as of the last discovery, by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.inner.topology().members.clone()
    }

    /// The nodes a request for `key` would try, in order: its preference
    /// list (primary first), then the other members.
    pub fn preference_list(&self, key: impl AsRef<[u8]>) -> Vec<SocketAddr> {
        self.inner
            .topology()
            .candidates(Some(key.as_ref()))
            .into_iter()
            .map(|m| m.addr)
            .collect()
    }

    /// Re-reads the cluster map now.
    ///
    /// # Errors
    /// [`ClientError::NoServer`] when no member or seed answers (the old map
    /// stays).
    pub async fn refresh(&self) -> Result<()> {
        self.inner.refresh().await
    }

    /// The client's counters.
    pub fn stats(&self) -> ClientStats {
        self.inner.counters.snapshot()
    }

    // ---- Helpers -----------------------------------------------------------

    async fn store_bool(
        &self,
        op: &'static str,
        key: &[u8],
        value: &[u8],
        mode: StoreMode,
        kind: OpKind,
        options: &Options,
    ) -> Result<bool> {
        let command = store(key, value, mode, options, None)?;
        match self.inner.execute(op, command, kind, options).await? {
            Reply::Status(Status::Hd, _) => Ok(true),
            Reply::Status(Status::Ns, _) => Ok(false),
            other => Err(unexpected(op, &other)),
        }
    }

    async fn arith(
        &self,
        op: &'static str,
        key: &[u8],
        incr: bool,
        delta: u64,
        options: &Options,
    ) -> Result<Option<u64>> {
        let command = Command::Arith {
            key: WireKey::new(key)?,
            incr,
            delta,
            ttl: options.ttl,
        };
        match self.inner.execute(op, command, MUTATION, options).await? {
            Reply::Value(data, _) => std::str::from_utf8(&data)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Some)
                .ok_or_else(|| ClientError::Protocol(format!("{op} answered {data:?}"))),
            Reply::Status(Status::Nf, _) => Ok(None),
            other => Err(unexpected(op, &other)),
        }
    }
}

fn store(
    key: &[u8],
    value: &[u8],
    mode: StoreMode,
    options: &Options,
    compare_cas: Option<u64>,
) -> Result<Command> {
    // Append and prepend keep the item's own TTL and flags.
    let keeps_meta = matches!(mode, StoreMode::Append | StoreMode::Prepend);
    Ok(Command::Store {
        key: WireKey::new(key)?,
        data: Bytes::copy_from_slice(value),
        mode,
        ttl: if keeps_meta { None } else { options.ttl },
        flags: if keeps_meta { 0 } else { options.flags },
        compare_cas,
    })
}

fn unexpected(op: &str, reply: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {op}: {reply:?}"))
}

/// The error an error reply stands for, and whether another attempt may
/// fare better.
fn error_reply(e: ErrorReply) -> (ClientError, Failure) {
    match e {
        ErrorReply::Error(text) => (ClientError::NotSupported(text), Failure::Permanent),
        ErrorReply::Client(text) => (ClientError::Client(text), Failure::Permanent),
        // Deterministic: the same value is too large on every attempt.
        ErrorReply::Server(text) if text.starts_with("object too large") => {
            (ClientError::Server(text), Failure::Permanent)
        }
        ErrorReply::Server(text) => (ClientError::Server(text), Failure::Transient),
    }
}

impl Inner {
    fn new(
        config: ClientConfig,
        seeds: Vec<String>,
        topology: Topology,
        transport: Transport,
    ) -> Inner {
        let now = Instant::now();
        Inner {
            budget: Mutex::new(RetryBudget::new(config.budget(), now.into_std())),
            rng: Mutex::new(SmallRng::from_entropy()),
            faults: FaultInjector::new(config.faults),
            ids: RequestIds {
                prefix: rand::thread_rng().r#gen(),
                counter: AtomicU64::new(0),
            },
            counters: Arc::new(Counters::default()),
            refresh_wanted: Arc::new(Notify::new()),
            last_refresh: Mutex::new(now),
            refresher: Mutex::new(None),
            topology: RwLock::new(Arc::new(topology)),
            pools: RwLock::new(HashMap::new()),
            pool_settings: PoolSettings::of(&config),
            seeds,
            config,
            transport,
        }
    }

    fn topology(&self) -> Arc<Topology> {
        self.topology.read().clone()
    }

    fn pool(&self, addr: SocketAddr) -> Arc<NodePool> {
        if let Some(p) = self.pools.read().get(&addr) {
            return p.clone();
        }
        self.pools
            .write()
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(NodePool::new(
                    addr,
                    self.pool_settings.clone(),
                    self.counters.clone(),
                ))
            })
            .clone()
    }

    /// The node for the next attempt: the first candidate not yet tried by
    /// this call, not in reconnect backoff and not reported down; failing
    /// that, the first not yet tried; failing that, the primary.
    fn route(&self, topology: &Topology, key: Option<&[u8]>, tried: &[SocketAddr]) -> SocketAddr {
        let now = Instant::now();
        let candidates = topology.candidates(key);
        let untried = || candidates.iter().filter(|m| !tried.contains(&m.addr));
        let usable = |m: &&MemberInfo| {
            m.up && !self
                .pools
                .read()
                .get(&m.addr)
                .is_some_and(|p| p.is_down(now))
        };
        untried()
            .find(usable)
            .or_else(|| untried().next())
            .unwrap_or(&candidates[0])
            .addr
    }

    /// Runs one call: attempts, failover, retries, budget, deadline.
    async fn execute(
        &self,
        op: &'static str,
        command: Command,
        kind: OpKind,
        options: &Options,
    ) -> Result<Reply> {
        if let Some(id) = &options.request_id {
            validate_request_id(id)?;
        }
        let webvac = self.topology().kind == ServerKind::Webvac;
        let hints = webvac.then(|| Hints {
            request_id: options
                .request_id
                .clone()
                .or_else(|| (kind.auto_id && self.config.request_ids).then(|| self.ids.next())),
            read_quorum: options.read_quorum,
            write_quorum: options.write_quorum,
        });
        let has_id = hints.as_ref().is_some_and(|h| h.request_id.is_some());
        if has_id {
            bump(&self.counters.request_ids_sent);
        }
        let retry_safe = kind.idempotent || has_id;
        let policy = self.config.policy();
        bump(&self.counters.requests);
        let started = Instant::now();
        let deadline = started + self.config.deadline;
        self.budget.lock().on_request(started.into_std());
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            bump(&self.counters.attempts);
            let now = Instant::now();
            let timeout = self
                .config
                .attempt_timeout
                .min(deadline.saturating_duration_since(now));
            let (addr, outcome) = match &self.transport {
                Transport::Network => {
                    let topology = self.topology();
                    let addr = self.route(&topology, command.key(), &tried);
                    let plan = self.faults.plan();
                    let pool = self.pool(addr);
                    let outcome = pool.call(&command, hints.as_ref(), timeout, plan).await;
                    (Some(addr), outcome)
                }
                Transport::InProcess(node) => {
                    let outcome =
                        call_in_process(&**node, &command, hints.as_ref(), timeout, &self.config)
                            .await;
                    (None, outcome)
                }
            };
            let (error, failure) = match outcome {
                Ok(Reply::Error(e)) => error_reply(e),
                Ok(reply) => return Ok(reply),
                Err(AttemptError::NotSent(e)) => {
                    let failure = if matches!(e, ClientError::Busy { .. }) {
                        Failure::Busy
                    } else if let Some(addr) = addr {
                        tried.push(addr);
                        self.want_refresh();
                        Failure::NotSent
                    } else {
                        // The embedded node has shut down: there is no
                        // other node to fail over to.
                        Failure::Permanent
                    };
                    (e, failure)
                }
                Err(AttemptError::Unknown(e)) => {
                    if matches!(e, ClientError::Timeout(_)) {
                        bump(&self.counters.timeouts);
                    }
                    // Whether the node died or hangs, its peers' view of it
                    // (`down` in `stats cluster`) helps routing.
                    if let Some(addr) = addr {
                        self.want_refresh();
                        tried.push(addr);
                    }
                    (e, Failure::Unknown)
                }
            };
            let decision = retry::decide(
                &policy,
                failure,
                retry_safe,
                attempts,
                &mut *self.rng.lock(),
            );
            debug!(op, ?addr, attempts, error = %error, ?decision, "client attempt failed");
            let now = Instant::now();
            let past_deadline = |error: ClientError| ClientError::DeadlineExceeded {
                deadline: self.config.deadline,
                attempts,
                last: Box::new(error),
            };
            match decision {
                Decision::FailOver if now < deadline => bump(&self.counters.failovers),
                Decision::FailOver => return Err(past_deadline(error)),
                Decision::RetryAfter(delay) => {
                    if now + delay >= deadline {
                        return Err(past_deadline(error));
                    }
                    if !self.budget.lock().try_withdraw(now.into_std()) {
                        bump(&self.counters.budget_refusals);
                        return Err(ClientError::RetryBudgetExhausted {
                            last: Box::new(error),
                        });
                    }
                    bump(&self.counters.retries);
                    tokio::time::sleep(delay).await;
                }
                Decision::GiveUpMaybeApplied => {
                    bump(&self.counters.maybe_applied);
                    return Err(ClientError::MaybeApplied {
                        op,
                        last: Box::new(error),
                    });
                }
                Decision::GiveUp => {
                    if failure == Failure::Busy {
                        bump(&self.counters.busy);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Asks the refresher for an early refresh, at most every
    /// [`REFRESH_AFTER_FAILURE_MIN`].
    fn want_refresh(&self) {
        let now = Instant::now();
        let mut last = self.last_refresh.lock();
        if now.duration_since(*last) >= REFRESH_AFTER_FAILURE_MIN {
            *last = now;
            self.refresh_wanted.notify_one();
        }
    }

    /// Rediscovers the map from the current members (those not in backoff
    /// first), then the seeds, and installs it.
    async fn refresh(&self) -> Result<()> {
        if matches!(self.transport, Transport::InProcess(_)) {
            // An embedded member's map is its own configuration.
            return Ok(());
        }
        *self.last_refresh.lock() = Instant::now();
        let now = Instant::now();
        let topology = self.topology();
        let (mut first, mut later): (Vec<SocketAddr>, Vec<SocketAddr>) = (Vec::new(), Vec::new());
        for m in &topology.members {
            let down = self
                .pools
                .read()
                .get(&m.addr)
                .is_some_and(|p| p.is_down(now));
            if down {
                later.push(m.addr)
            } else {
                first.push(m.addr)
            }
        }
        first.append(&mut later);
        first.truncate(REFRESH_CANDIDATES_MAX);
        let fresh = discover_any(&self.seeds, &first, &self.config).await?;
        let keep: Vec<SocketAddr> = fresh.members.iter().map(|m| m.addr).collect();
        *self.topology.write() = Arc::new(fresh);
        self.pools.write().retain(|addr, _| keep.contains(addr));
        bump(&self.counters.refreshes);
        Ok(())
    }
}

/// One attempt in an embedded member: the command as the network client
/// would send it, run in-process, its reply decoded as from a socket. A
/// reply that does not come within `timeout` is lost, as on a network (the
/// command may have run).
async fn call_in_process(
    node: &dyn InProcess,
    command: &Command,
    hints: Option<&Hints>,
    timeout: Duration,
    config: &ClientConfig,
) -> Result<Reply, AttemptError> {
    let mut request = Vec::with_capacity(IN_PROCESS_REQUEST_BYTES + command.data_len());
    command.encode(0, hints, &mut request);
    let mut reply = Vec::with_capacity(IN_PROCESS_REPLY_BYTES);
    match tokio::time::timeout(timeout, node.call(&request, &mut reply)).await {
        Err(_) => return Err(AttemptError::Unknown(ClientError::Timeout(timeout))),
        Ok(Err(why)) => return Err(AttemptError::NotSent(ClientError::NoServer(why))),
        Ok(Ok(())) => {}
    }
    let mut buf = bytes::BytesMut::from(&reply[..]);
    let mut decoder = reply::Decoder::new(config.reply_bytes_max, config::REPLY_LINE_BYTES_MAX);
    match decoder.decode(&mut buf, command.expect()) {
        Ok(Some(reply)) if buf.is_empty() => Ok(reply),
        Ok(_) => Err(AttemptError::Unknown(ClientError::Protocol(format!(
            "the embedded node answered {} bytes that are not one reply",
            reply.len()
        )))),
        Err(e) => Err(AttemptError::Unknown(ClientError::Protocol(e))),
    }
}

/// Refreshes the map every `interval`, or sooner when asked, until the
/// client is gone. Holds the client only weakly between refreshes.
async fn refresh_loop(inner: Weak<Inner>, wanted: Arc<Notify>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wanted.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = inner.refresh().await {
            warn!(error = %e, "cluster map refresh failed; keeping the old map");
        }
    }
}

/// Discovers the map from the first of `known` then `seeds` that answers.
async fn discover_any(
    seeds: &[String],
    known: &[SocketAddr],
    config: &ClientConfig,
) -> Result<Topology> {
    let mut failures = Vec::new();
    for addr in known {
        match discover(*addr, config).await {
            Ok(t) => return Ok(t),
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    for seed in seeds {
        let addrs = match tokio::net::lookup_host(seed.as_str()).await {
            Ok(a) => a.collect::<Vec<_>>(),
            Err(e) => {
                failures.push(format!("{seed}: cannot resolve: {e}"));
                continue;
            }
        };
        for addr in addrs.into_iter().take(REFRESH_CANDIDATES_MAX) {
            if known.contains(&addr) {
                continue;
            }
            match discover(addr, config).await {
                Ok(t) => return Ok(t),
                Err(e) => failures.push(format!("{seed} ({addr}): {e}")),
            }
        }
    }
    Err(ClientError::NoServer(failures.join("; ")))
}

/// `version` and `stats` (webvac reports `webvac_version` there; its
/// `version` is memcached's), then for webvac `stats cluster`, on a
/// connection of its own.
async fn discover(addr: SocketAddr, config: &ClientConfig) -> Result<Topology> {
    let limits = ConnectionLimits {
        in_flight_max: 1,
        reply_bytes_max: config.reply_bytes_max,
    };
    let security = connection::Security::of(config);
    let conn = Connection::connect(addr, config.connect_timeout, limits, &security).await?;
    let ask = |command: Command| {
        let conn = &conn;
        async move {
            conn.call(&command, None, config.attempt_timeout, FaultPlan::default())
                .await
                .map_err(|e| e.error().clone())
        }
    };
    let version = match ask(Command::Version).await? {
        Reply::Version(v) => v,
        other => return Err(unexpected("version", &other)),
    };
    let stats = match ask(Command::Stats).await? {
        Reply::Stats(stats) => stats,
        other => return Err(unexpected("stats", &other)),
    };
    let (kind, version) = routing::kind_of_server(version, &stats);
    if kind == ServerKind::Memcached {
        return Ok(Topology::single(addr, kind, version));
    }
    match ask(Command::StatsCluster).await? {
        Reply::Stats(stats) => {
            Topology::from_cluster_stats(addr, version, &stats).map_err(ClientError::Protocol)
        }
        // A node without a cluster.
        Reply::Error(ErrorReply::Error(_)) => Ok(Topology::single(addr, kind, version)),
        Reply::Error(e) => Err(error_reply(e).0),
        other => Err(unexpected("stats cluster", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_valid_distinct_and_32_hex_characters() {
        let ids = RequestIds {
            prefix: 0x9f2c_01ab_77de_4410,
            counter: AtomicU64::new(0),
        };
        let a = ids.next();
        let b = ids.next();
        assert_eq!(a, "9f2c01ab77de44100000000000000000");
        assert_eq!(b, "9f2c01ab77de44100000000000000001");
        validate_request_id(&a).unwrap();
        assert_eq!(a.len(), REQUEST_ID_BYTES_MAX);
    }

    #[test]
    fn error_replies_are_classified() {
        let (e, f) = error_reply(ErrorReply::Server("object too large for cache".into()));
        assert!(matches!(e, ClientError::Server(_)) && f == Failure::Permanent);
        let (_, f) = error_reply(ErrorReply::Server("write quorum not met".into()));
        assert_eq!(f, Failure::Transient);
        let (e, f) = error_reply(ErrorReply::Client("bad data chunk".into()));
        assert!(matches!(e, ClientError::Client(_)) && f == Failure::Permanent);
        let (e, _) = error_reply(ErrorReply::Error("ERROR".into()));
        assert!(matches!(e, ClientError::NotSupported(_)));
    }
}
